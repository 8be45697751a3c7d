"""Image embedders: map images to L2-normalised vectors, for duplicate search and CLIP distances."""

from pipeline.embedders.base import Embedder

__all__ = ["Embedder"]
