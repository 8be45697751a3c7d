"""A new metric in one file: the plain RMS pixel difference over the whole image.

Registered with the stages by one config entry, ``tests/conf/metric/rms.yaml``
(``hydra.searchpath=[file://tests/conf] metric=rms``); test_rule.py shows adaptive sampling,
the detector and verification all measuring with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.distance import to_batch
from pipeline.metrics.base import Metric


@dataclass(frozen=True)
class WholeImageRMS(Metric):
    """RMS of the pixel differences over the whole image, pixels in [0, 1] (``y`` resized to ``x``'s size)."""

    name: ClassVar[str] = "rms"
    label: ClassVar[str] = "whole-image RMS"
    default_threshold: float = 0.15

    def distances(self, x, y=None) -> np.ndarray:
        a = _unit(to_batch(x))
        b = a if y is None else _unit(to_batch(y, size=tuple(a.shape[1:3])) if len(a) else to_batch(y))
        if not len(a) or not len(b):
            return np.zeros((len(a), len(b)))
        flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return np.sqrt(((flat_a[:, None, :] - flat_b[None, :, :]) ** 2).mean(axis=-1))


def _unit(batch) -> np.ndarray:
    array = batch.numpy()
    return array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
