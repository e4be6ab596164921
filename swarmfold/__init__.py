"""swarmfold: Folding@home for LLM training.

Peers join a hivemind DHT, train one shared model on their own data shards, and every H
inner steps combine their progress with deterministic, atomic group averaging (DiLoCo
rounds). See DESIGN notes in README.md.
"""

__version__ = "0.1.0"
