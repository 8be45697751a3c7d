"""Adaptive sampling: spend the full sample budget only on prompts that look memorized.

A memorized prompt produces the same image again and again, so among its first few samples
some pairs are already closer than the detector's threshold. A prompt whose first round has no
such pair is very unlikely to grow a clique of ``min_clique`` members later; sampling stops
there. The rule is deliberately weak (one close pair suffices) so that recall stays high.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.distance import tiled_l2


@dataclass(frozen=True)
class AdaptiveSettings:
    """``first_round`` samples first; then rounds growing by ``growth`` up to the full budget.

    Sampling continues after a round while the samples so far have at least
    ``min_close_pairs`` pairs under ``threshold`` (tiled L2, as the detector measures).
    """

    enabled: bool = False
    first_round: int = 16
    growth: float = 2.0
    threshold: float = 0.15
    min_close_pairs: int = 1
    grid: int = 4

    def __post_init__(self):
        if self.first_round < 2:
            raise ValueError(f"adaptive.first_round: need at least 2 samples to compare, got {self.first_round}")
        if self.growth <= 1:
            raise ValueError(f"adaptive.growth: must be above 1, got {self.growth}")
        if self.min_close_pairs < 1:
            raise ValueError(f"adaptive.min_close_pairs: must be at least 1, got {self.min_close_pairs}")


def round_ends(n_samples: int, settings: AdaptiveSettings) -> list[int]:
    """Cumulative sample counts after each round, ending at ``n_samples``.

    >>> round_ends(500, AdaptiveSettings(first_round=16, growth=2.0))
    [16, 32, 64, 128, 256, 500]
    """
    ends, size = [], settings.first_round
    while size < n_samples:
        ends.append(size)
        size = int(np.ceil(size * settings.growth))
    ends.append(n_samples)
    return ends


def close_pairs(images: np.ndarray, settings: AdaptiveSettings) -> int:
    """Number of sample pairs closer than the threshold; ``images`` uint8 (N, H, W, 3) or float in [0, 1]."""
    if len(images) < 2:
        return 0
    distances = tiled_l2(images, grid=settings.grid)
    upper = np.triu_indices(len(images), k=1)
    return int((distances[upper] < settings.threshold).sum())


def keep_sampling(images: np.ndarray, settings: AdaptiveSettings) -> bool:
    """The early-stop rule: continue only when the samples so far show a forming clique."""
    return close_pairs(images, settings) >= settings.min_close_pairs


def adaptive_outcome(first: Callable[[int], np.ndarray], n_samples: int, settings: AdaptiveSettings) -> tuple[int, bool]:
    """What adaptive sampling makes of one prompt: ``(samples made, stopped early)``.

    ``first(k)`` returns the prompt's first ``k`` samples (uint8 (k, H, W, 3)). Since sample
    ``i`` comes from its own seed, the samples of a brute-force run give the adaptive run's
    decisions exactly, without sampling again (what the budget report uses).
    """
    ends = round_ends(int(n_samples), settings)
    for end in ends[:-1]:
        if not keep_sampling(first(end), settings):
            return end, True
    return ends[-1], False


def adaptive_settings(values: Mapping[str, Any] | None) -> AdaptiveSettings:
    """:class:`AdaptiveSettings` from a config mapping (the ``adaptive:`` section); unknown keys are errors."""
    values = dict(values or {})
    known = [f.name for f in fields(AdaptiveSettings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"adaptive.{unknown[0]}: unknown key; the adaptive section takes {', '.join(known)}")
    return AdaptiveSettings(
        enabled=bool(values.get("enabled", False)),
        **{k: type(getattr(AdaptiveSettings, k))(values[k]) for k in known if k != "enabled" and k in values},
    )
