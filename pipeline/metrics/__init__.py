"""Distances between images for the near-copy rule: the interface and the registry
(:mod:`pipeline.metrics.base`) and the metrics that ship: ``tiled_l2`` (the paper's), ``clip``
and ``sscd`` (SSCD copy detection, from a local model file). A new metric is one module plus
``conf/metric/<name>.yaml``; see the base module."""

from pipeline.metrics.base import REGISTRY, Metric, metric_named
from pipeline.metrics.clip import ClipDistance
from pipeline.metrics.sscd import SSCDDistance
from pipeline.metrics.tiled_l2 import TiledL2

__all__ = ["REGISTRY", "ClipDistance", "Metric", "SSCDDistance", "TiledL2", "metric_named"]
