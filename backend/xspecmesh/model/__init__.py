"""The model layer: configuration, the backbone with its KV cache, drafting heads, checkpoints. See docs/ARCHITECTURE.md."""
