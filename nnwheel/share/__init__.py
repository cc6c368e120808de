"""Sharing wheels: the local devpi index, and publishing to it or to PyPI."""
