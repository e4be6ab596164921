"""Tools for developing and testing swarmfold (not used by a running peer)."""
