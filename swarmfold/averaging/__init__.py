"""What peers do together: aggregation, outer step, wire codecs, matchmaking, all-reduce, state sync.

This package works on flat float32 tensors and the P2P layer. It never imports
`swarmfold.peer` or `swarmfold.daemon`.
"""
