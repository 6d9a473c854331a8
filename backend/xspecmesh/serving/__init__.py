"""The add-on's backend: the JSON-lines protocol and the server. See docs/ARCHITECTURE.md."""
