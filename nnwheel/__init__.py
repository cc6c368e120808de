"""nnwheel: trained neural networks distributed as ordinary Python wheels."""

__version__ = "0.1.0"
