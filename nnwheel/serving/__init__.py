"""Serving an installed model: the HTTP app, batching, metrics, and deployment files."""
