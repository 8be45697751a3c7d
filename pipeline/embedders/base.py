"""The interface every embedder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image


class Embedder(ABC):
    """Maps images to unit-length vectors; cosine similarity is then a dot product.

    Subclasses set ``name`` (recorded with the embeddings) and ``dim``.
    """

    name: str = "embedder"
    dim: int

    @abstractmethod
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Embed a batch of RGB images.

        Returns:
            float32 array of shape ``(len(images), dim)``, each row of L2 norm 1.
        """
