"""XSpecMesh: BPT-style mesh generation accelerated by multi-head speculative decoding."""

__version__ = "0.1.0"
