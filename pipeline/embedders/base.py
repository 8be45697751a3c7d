"""The interface every embedder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image


class Embedder(ABC):
    """Maps images to unit-length vectors; cosine similarity is then a dot product.

    Subclasses set ``name`` (recorded with the embeddings) and ``dim``, and may set
    ``threshold``: the cosine similarity at or above which two images count as
    near-duplicates in this embedding space (the duplicate finder's default; None when the
    space has no calibrated value).
    """

    name: str = "embedder"
    dim: int
    threshold: float | None = None

    @abstractmethod
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Embed a batch of RGB images.

        Returns:
            float32 array of shape ``(len(images), dim)``, each row of L2 norm 1.
        """


class PerImageEmbedder(Embedder):
    """An embedder that describes one image at a time (no batched model): subclasses implement
    :meth:`embed_one`; :meth:`embed` stacks its rows."""

    @abstractmethod
    def embed_one(self, image: Image.Image) -> np.ndarray:
        """The embedding of one image: float32 ``(dim,)``, unit norm."""

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            out[row] = self.embed_one(image)
        return out
