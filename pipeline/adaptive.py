"""Adaptive sampling: spend the full sample budget only on prompts that look memorized.

A memorized prompt produces the same image again and again, so among its first few samples
some pairs are already closer than the detector's threshold. A prompt whose first round has no
such pair is very unlikely to grow a clique of ``min_clique`` members later; sampling stops
there. The rule is deliberately weak (one close pair suffices) so that recall stays high.

With ``stop_when_flagged``, sampling also stops on success: once the samples so far hold a
clique of ``min_clique`` near-copies, the detector will flag the prompt whatever the later
samples are, so a memorized prompt costs the samples that show it rather than the full budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.clique import max_clique
from pipeline.distance import tiled_l2

CONTINUE, NO_SIGN, FLAGGED = "continue", "no_close_pairs", "flagged"


@dataclass(frozen=True)
class AdaptiveSettings:
    """``first_round`` samples first; then rounds growing by ``growth`` up to the full budget.

    Sampling continues after a round while the samples so far have at least
    ``min_close_pairs`` pairs under ``threshold`` (tiled L2, as the detector measures), and,
    with ``stop_when_flagged``, no clique of ``min_clique`` of them yet (the detector's flag).
    """

    enabled: bool = False
    first_round: int = 16
    growth: float = 2.0
    threshold: float = 0.15
    min_close_pairs: int = 1
    grid: int = 4
    stop_when_flagged: bool = False
    min_clique: int = 10

    def __post_init__(self):
        if self.first_round < 2:
            raise ValueError(f"adaptive.first_round: need at least 2 samples to compare, got {self.first_round}")
        if self.growth <= 1:
            raise ValueError(f"adaptive.growth: must be above 1, got {self.growth}")
        if self.min_close_pairs < 1:
            raise ValueError(f"adaptive.min_close_pairs: must be at least 1, got {self.min_close_pairs}")
        if self.min_clique < 2:
            raise ValueError(f"adaptive.min_clique: a clique needs at least 2 samples, got {self.min_clique}")


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


def close_pair_matrix(images: np.ndarray, settings: AdaptiveSettings) -> np.ndarray:
    """Boolean (N, N) matrix of near-copy pairs (diagonal False); ``images`` uint8 (N, H, W, 3) or float in [0, 1]."""
    close = tiled_l2(images, grid=settings.grid) < settings.threshold
    np.fill_diagonal(close, False)
    return close


def _pair_count(close: np.ndarray) -> int:
    """Pairs in a symmetric boolean near-copy matrix (each counted once)."""
    return int(np.triu(close, k=1).sum())


def close_pairs(images: np.ndarray, settings: AdaptiveSettings) -> int:
    """Number of sample pairs closer than the threshold."""
    if len(images) < 2:
        return 0
    return _pair_count(close_pair_matrix(images, settings))


def round_verdict(images: np.ndarray, settings: AdaptiveSettings) -> str:
    """The rule after a round, from the samples so far: ``CONTINUE``, ``NO_SIGN`` (stop: no
    forming clique) or ``FLAGGED`` (stop: a clique of ``min_clique`` is already there)."""
    if len(images) < 2:
        return NO_SIGN
    close = close_pair_matrix(images, settings)
    if _pair_count(close) < settings.min_close_pairs:
        return NO_SIGN
    if settings.stop_when_flagged and len(images) >= settings.min_clique:
        # The search may stop at its step budget with a smaller clique: then sampling goes on, as without the switch.
        if len(max_clique(close).members) >= settings.min_clique:
            return FLAGGED
    return CONTINUE


def keep_sampling(images: np.ndarray, settings: AdaptiveSettings) -> bool:
    """Whether the prompt gets its next round (:func:`round_verdict` is ``CONTINUE``)."""
    return round_verdict(images, settings) == CONTINUE


def adaptive_outcome(first: Callable[[int], np.ndarray], n_samples: int, settings: AdaptiveSettings) -> tuple[int, str | None]:
    """What adaptive sampling makes of one prompt: ``(samples made, stop reason)``.

    The reason is ``NO_SIGN`` or ``FLAGGED`` for a prompt stopped before ``n_samples``, None
    for one sampled in full. ``first(k)`` returns the prompt's first ``k`` samples (uint8
    (k, H, W, 3)). Since sample ``i`` comes from its own seed, the samples of a brute-force
    run give the adaptive run's decisions exactly, without sampling again (what the budget
    report uses).
    """
    ends = round_ends(int(n_samples), settings)
    for end in ends[:-1]:
        verdict = round_verdict(first(end), settings)
        if verdict != CONTINUE:
            return end, verdict
    return ends[-1], None


def adaptive_settings(values: Mapping[str, Any] | None) -> AdaptiveSettings:
    """:class:`AdaptiveSettings` from a config mapping (the ``adaptive:`` section); unknown keys are errors."""
    values = dict(values or {})
    known = [f.name for f in fields(AdaptiveSettings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"adaptive.{unknown[0]}: unknown key; the adaptive section takes {', '.join(known)}")
    flags = {k for k in known if isinstance(getattr(AdaptiveSettings, k), bool)}
    return AdaptiveSettings(
        **{k: bool(values[k]) for k in flags if k in values},
        **{k: type(getattr(AdaptiveSettings, k))(values[k]) for k in known if k not in flags and k in values},
    )
