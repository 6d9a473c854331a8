"""Benchmarks: AR vs speculative, step cost, our loop vs the naive one. See docs/ARCHITECTURE.md."""
