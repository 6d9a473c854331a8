"""Mesh geometry: loading and normalizing meshes, the BPT tokenizer, procedural shapes, metrics, Fit to Source. See docs/ARCHITECTURE.md."""
