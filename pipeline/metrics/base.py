"""What a distance between images must offer the near-copy rule, and the metrics by name.

A metric says how far apart images are: :meth:`Metric.distances` gives a float64 (N, M) matrix
(all pairs within ``x`` when ``y`` is None: symmetric, zero diagonal), and the near-copy rule
(:class:`pipeline.rule.NearCopyRule`) turns it into verdicts with a threshold. Adaptive
sampling, the detector, verification and the demo evaluation measure only through the rule,
so a new metric is one module with a :class:`Metric` subclass and one config file,
``conf/metric/<name>.yaml``, whose ``_target_`` names the class (its other keys are the
constructor's arguments); ``metric=<name>`` on any stage's command line then applies it
everywhere.

Subclasses set ``name`` (the registry key, stored with every verdict), ``label`` (how
figures name it) and a ``default_threshold`` (used when ``rule.threshold`` is null), and
return from :meth:`Metric.describe` every parameter that changes a distance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
from omegaconf import OmegaConf

from pipeline.cli import ConfigError, config_int, config_number

# name -> Metric subclass; a subclass with a ``name`` of its own registers itself on import.
REGISTRY: dict[str, type[Metric]] = {}


class Metric(ABC):
    """A distance between images; see the module doc."""

    name: ClassVar[str]
    label: ClassVar[str] = ""
    default_threshold: float

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if isinstance(cls.__dict__.get("name"), str):
            REGISTRY[cls.name] = cls

    @abstractmethod
    def distances(self, x: Any, y: Any | None = None) -> np.ndarray:
        """Distances between every image of ``x`` and every image of ``y`` (or within ``x``).

        Images come as :func:`pipeline.distance.to_batch` takes them (uint8 or float HWC
        arrays, a stacked batch or a list, PIL images). Returns float64 (len(x), len(y)).
        """

    def describe(self) -> dict[str, Any]:
        """``name`` and every parameter that changes a distance (JSON values): what is stored
        with samples and verdicts, and compared to tell whether two rules judge alike."""
        return {"name": self.name}

    @property
    def display_label(self) -> str:
        return self.label or self.name


def metric_named(name: str, **params: Any) -> Metric:
    """The registered metric called ``name``, built with ``params``."""
    if name not in REGISTRY:
        raise ConfigError(f"metric: unknown metric {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name](**params)


def checked_int(key: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """A metric parameter as an int; errors name ``metric.<key>`` (its config key)."""
    return config_int(OmegaConf.create({"metric": {key: value}}), f"metric.{key}", minimum=minimum, optional=optional)


def checked_number(key: str, value: Any, *, minimum: float | None = None) -> float:
    """A metric parameter as a finite float; errors name ``metric.<key>``."""
    number = config_number(OmegaConf.create({"metric": {key: value}}), f"metric.{key}", minimum=minimum)
    if key == "default_threshold" and not number > 0:
        raise ConfigError(f"metric.default_threshold: must be positive, got {number}")
    return number
