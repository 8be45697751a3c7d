"""A CLIP-style cosine distance: 1 - cosine similarity of image embeddings.

``metric=clip`` (``conf/metric/clip.yaml``) takes the stage's ``embedder`` (``conf/embedder/``;
CLIP weights for the paper's variant); a stage without an embedder group needs
``+embedder=<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.cli import ConfigError
from pipeline.distance import clip_distance
from pipeline.embedders.base import Embedder
from pipeline.metrics.base import Metric, checked_int, checked_number


@dataclass(frozen=True)
class ClipDistance(Metric):
    """Cosine distance between ``embedder``'s embeddings, in [0, 2]."""

    name: ClassVar[str] = "clip"
    label: ClassVar[str] = "CLIP cosine distance"

    embedder: Embedder | None = None
    batch_size: int = 64
    default_threshold: float = 0.05

    def __post_init__(self):
        if self.embedder is None:
            raise ConfigError(
                "embedder: metric=clip needs an embedder; pass embedder=<name> "
                "(+embedder=<name> in a stage without one; see conf/embedder/)"
            )
        if not isinstance(self.embedder, Embedder):
            raise ConfigError(f"embedder: metric=clip needs an Embedder, got {type(self.embedder).__name__}")
        object.__setattr__(self, "batch_size", checked_int("batch_size", self.batch_size, minimum=1))
        object.__setattr__(self, "default_threshold", checked_number("default_threshold", self.default_threshold))

    def distances(self, x: Any, y: Any | None = None) -> np.ndarray:
        return clip_distance(x, y, embedder=self.embedder, batch_size=self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "embedder": getattr(self.embedder, "name", type(self.embedder).__name__)}
