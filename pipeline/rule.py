"""The near-copy rule: when samples are copies of one image, and when a prompt is memorized.

One rule serves adaptive sampling (:mod:`pipeline.generate.adaptive`), the detector
(:mod:`pipeline.detect`), verification (:mod:`pipeline.detect.verify`) and the demo evaluation
(:mod:`pipeline.demo.evaluate`): a ``metric`` (:mod:`pipeline.metrics`) measures distances,
two images closer than ``threshold`` are near-copies, and a prompt is flagged when at least
``min_clique`` of its samples are pairwise near-copies (a clique; Carlini et al. 2023), found
by a search of at most ``max_clique_steps`` nodes.

It is configured once for every stage: ``rule.threshold``, ``rule.min_clique`` and
``rule.max_clique_steps`` in ``conf/rule.yaml``, the metric's own parameters (tiled L2's
``grid`` and ``size``) in ``conf/metric/<name>.yaml``, chosen with ``metric=<name>``.
:meth:`NearCopyRule.describe` is what gets stored with samples and verdicts; two rules judge
alike exactly when their descriptions are equal (:meth:`NearCopyRule.matches`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.cli import ConfigError, config_int, config_number
from pipeline.clique import MAX_STEPS, max_clique
from pipeline.metrics.base import Metric
from pipeline.metrics.tiled_l2 import TiledL2

# Keys of a description that belong to the rule itself; a metric's parameters must not reuse them.
RULE_KEYS = ("metric", "threshold", "min_clique", "max_clique_steps")


@dataclass(frozen=True)
class NearCopyRule:
    """``metric``, ``threshold`` (None: the metric's ``default_threshold``; resolved on
    construction, so ``rule.threshold`` is always a number), ``min_clique`` and
    ``max_clique_steps``; see the module doc."""

    metric: Metric = field(default_factory=TiledL2)
    threshold: float | None = None
    min_clique: int = 10
    max_clique_steps: int = MAX_STEPS

    def __post_init__(self):
        if not isinstance(self.metric, Metric):
            raise ConfigError(f"metric: expected a pipeline.metrics.Metric, got {type(self.metric).__name__}")
        threshold = self.metric.default_threshold if self.threshold is None else float(self.threshold)
        if not threshold > 0:
            raise ConfigError(f"rule.threshold: must be positive, got {threshold}")
        if int(self.min_clique) < 2:
            raise ConfigError(f"rule.min_clique: a clique needs at least 2 samples, got {self.min_clique}")
        if int(self.max_clique_steps) < 1:
            raise ConfigError(f"rule.max_clique_steps: must be at least 1, got {self.max_clique_steps}")
        clashing = sorted(set(self.metric.describe()) & set(RULE_KEYS))
        if clashing:
            raise ConfigError(
                f"metric: the parameter {clashing[0]!r} of metric {self.metric.name!r} clashes with the rule's own key"
            )
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "min_clique", int(self.min_clique))
        object.__setattr__(self, "max_clique_steps", int(self.max_clique_steps))

    def distances(self, x: Any, y: Any | None = None) -> np.ndarray:
        """The metric's distances: float64 (len(x), len(y)); all pairs within ``x`` when ``y`` is None."""
        return np.asarray(self.metric.distances(x, y), dtype=np.float64)

    def near_copies(self, distances: np.ndarray) -> np.ndarray:
        """Boolean (n, n) matrix of near-copy pairs (closer than ``threshold``), diagonal False."""
        close = np.asarray(distances, dtype=np.float64) < self.threshold
        np.fill_diagonal(close, False)
        return close

    def verdict(self, distances: np.ndarray) -> dict[str, Any]:
        """The verdict on one prompt from the (n, n) symmetric distances between its samples.

        Returns:
            ``clique_size``, ``flagged`` (``clique_size >= min_clique``), ``members`` (positions
            in the matrix, increasing), ``representative`` (the member with the smallest mean
            distance to the other members; -1 when n == 0), ``max_pair_distance`` (largest
            distance within the clique, 0 for one member), ``median_pair_distance`` (over all
            pairs of samples; NaN when n < 2) and ``clique_exact`` (False when the clique search
            ran out of ``max_clique_steps``: the size is a lower bound, still a sound flag, but
            no proof that a larger clique is absent).
        """
        distances = np.asarray(distances, dtype=np.float64)
        n = distances.shape[0]
        clique = max_clique(distances < self.threshold, max_steps=self.max_clique_steps)
        members = clique.members
        if members:
            within = distances[np.ix_(members, members)]
            mean_to_others = within.sum(axis=1) / max(1, len(members) - 1)
            representative = members[int(np.argmin(mean_to_others))]
            max_pair = float(within.max())
        else:
            representative, max_pair = -1, float("nan")
        upper = distances[np.triu_indices(n, k=1)]
        return {
            "clique_size": len(members),
            "flagged": len(members) >= self.min_clique,
            "members": members,
            "representative": representative,
            "max_pair_distance": max_pair,
            "median_pair_distance": float(np.median(upper)) if upper.size else float("nan"),
            "clique_exact": clique.exact,
        }

    def describe(self) -> dict[str, Any]:
        """The rule as JSON values: ``metric`` (its name) and the metric's parameters, then
        ``threshold``, ``min_clique`` and ``max_clique_steps``; e.g. ``{"metric": "tiled_l2",
        "grid": 4, "size": None, "threshold": 0.15, "min_clique": 10, "max_clique_steps": 200000}``."""
        metric = dict(self.metric.describe())
        name = metric.pop("name", self.metric.name)
        return {
            "metric": name,
            **metric,
            "threshold": self.threshold,
            "min_clique": self.min_clique,
            "max_clique_steps": self.max_clique_steps,
        }

    def matches(self, description: Any) -> bool:
        """Whether a stored description (:meth:`describe`, e.g. read back from JSON) is this rule's."""
        if not isinstance(description, Mapping):
            return False
        try:
            return _canonical(description) == _canonical(self.describe())
        except (TypeError, ValueError):  # not JSON: no rule this one could be
            return False


def _canonical(description: Mapping) -> Any:
    return json.loads(json.dumps(dict(description), sort_keys=True, allow_nan=True))


def metric_from_config(node: Any) -> Metric:
    """Build the metric of a ``metric`` config node (``_target_`` and the constructor's
    arguments) with Hydra; a mistake in it raises a ConfigError naming its key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
        raise ConfigError(f"metric: expected a metric config with a _target_ (metric=<name>, see conf/metric/), got {node!r}")
    try:
        metric = instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError):  # ConfigError: the constructor named the key
            raise cause from None
        raise ConfigError(f"metric: cannot build {node.get('_target_')!r}: {cause or err}") from None
    if not isinstance(metric, Metric):
        raise ConfigError(f"metric: {node.get('_target_')!r} is not a pipeline.metrics.Metric")
    return metric


# Top-level keys the detector (and the demo evaluation) had before the rule was configured once;
# given with "+key=" they would be ignored silently.
MOVED_KEYS = {
    "threshold": "rule.threshold",
    "thresholds": "metric.default_threshold",
    "min_clique": "rule.min_clique",
    "max_clique_steps": "rule.max_clique_steps",
    "grid": "metric.grid",
    "size": "metric.size",
}


def rule_from_config(cfg: Any, metric: Metric | None = None) -> NearCopyRule:
    """The rule of a composed stage config: ``metric`` (built from ``cfg.metric`` unless given)
    and the ``rule`` section; errors name the config key."""
    for key, where in MOVED_KEYS.items():
        if key in cfg:
            raise ConfigError(
                f"{key}: moved: the near-copy rule is configured once for every stage; set {where} (conf/rule.yaml, conf/metric/)"
            )
    return NearCopyRule(
        metric=metric if metric is not None else metric_from_config(cfg.get("metric")),
        threshold=config_number(cfg, "rule.threshold", optional=True),
        min_clique=config_int(cfg, "rule.min_clique", minimum=2),
        max_clique_steps=config_int(cfg, "rule.max_clique_steps", minimum=1),
    )
