"""The greenpatch shop demo project (see examples/README.md)."""
