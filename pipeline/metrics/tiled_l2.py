"""The paper's tiled L2 (Carlini et al. 2023): the largest per-tile RMS pixel difference.

``conf/metric/tiled_l2.yaml`` (the default, ``metric=tiled_l2``) configures it; see
:func:`pipeline.distance.tiled_l2` for the computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.distance import tiled_l2
from pipeline.metrics.base import Metric, checked_int, checked_number


@dataclass(frozen=True)
class TiledL2(Metric):
    """Images cut into ``grid`` x ``grid`` tiles at a common ``size`` (None: the first
    image's, rounded to a multiple of ``grid``); the distance is the largest tile's RMS
    difference, pixels in [0, 1]. ``device`` ("auto": the GPU when there is one) does not
    change the result beyond rounding, so it is not part of :meth:`describe`."""

    name: ClassVar[str] = "tiled_l2"
    label: ClassVar[str] = "tiled L2"

    grid: int = 4
    size: int | None = None
    device: str = "auto"
    default_threshold: float = 0.15

    def __post_init__(self):
        object.__setattr__(self, "grid", checked_int("grid", self.grid, minimum=1))
        object.__setattr__(self, "size", checked_int("size", self.size, minimum=1, optional=True))
        object.__setattr__(self, "device", str(self.device))
        object.__setattr__(self, "default_threshold", checked_number("default_threshold", self.default_threshold))

    def distances(self, x: Any, y: Any | None = None) -> np.ndarray:
        return tiled_l2(x, y, grid=self.grid, size=self.size, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "grid": self.grid, "size": self.size}
