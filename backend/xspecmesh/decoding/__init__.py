"""Decoding: token sampling and the grammar, AR and speculative loops, and the engine (the one retopology pipeline). See docs/ARCHITECTURE.md."""
