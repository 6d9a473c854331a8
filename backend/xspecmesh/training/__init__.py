"""Training: data pairs and the trainer for backbone, heads and LoRA. See docs/ARCHITECTURE.md."""
