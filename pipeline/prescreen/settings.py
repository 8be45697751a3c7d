"""The prescreen's settings: the ``prescreen`` config group, read and checked in one place.

``prescreen_settings(cfg)`` builds :class:`PrescreenSettings` from a composed config
(:func:`pipeline.cli.settings_from`); a wrong value raises a :class:`pipeline.cli.ConfigError`
whose message starts with its key (``prescreen.seeds: must be at least 1, got -1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

from pipeline.cli import ConfigError, setting, settings_from
from pipeline.prescreen.scores import SCORES

DEFAULT_LEVELS = (0.125,)


@dataclass
class PrescreenSettings:
    """``seeds`` noise draws per prompt; ``steps`` sets the scheduler's timesteps (as sampling would).

    ``score``: what ranks and keeps prompts, one of :data:`pipeline.prescreen.scores.SCORES`
    (``"anisotropy"`` also computes Wen's, at twice the cost); ``anisotropy_weight``: the
    alignment's weight in the anisotropy score; ``guidance_scale``: FLUX-dev's guidance embedding
    (None: FluxPipeline's default 3.5; the other families' first step does not depend on it);
    ``levels``: where ``"wen_levels"`` takes Wen's norm, fractions of the schedule in [0, 1] (0:
    its first timestep; see :mod:`pipeline.prescreen.scores`), a tuple of floats once built (a
    single number counts as one level, null as the default).

    The keep rule (:func:`pipeline.prescreen.keep.choose_kept`): the ``keep_top`` highest-scoring
    prompts (or the top ``keep_fraction`` of them), and/or those scoring at least
    ``score_threshold``, and/or those whose robust z-score (distance from the median score in
    scaled median absolute deviations) is at least ``min_robust_z``.
    """

    seeds: int = setting(minimum=1, default=4)
    steps: int = setting(minimum=1, default=50)
    batch_size: int = setting(minimum=1, default=64)
    base_seed: int = 0
    keep_top: int | None = setting(minimum=0, default=None)
    keep_fraction: float | None = None  # its range, (0, 1], is checked by choose_kept
    score_threshold: float | None = None
    min_robust_z: float | None = None
    height: int | None = setting(minimum=1, default=None)
    width: int | None = setting(minimum=1, default=None)
    score: Literal["wen", "anisotropy", "wen_levels"] = "wen"  # SCORES: checked by __post_init__, naming the key
    anisotropy_weight: float = 2.0
    guidance_scale: float | None = None
    levels: Sequence[float] | None = DEFAULT_LEVELS

    def __post_init__(self):
        if self.score not in SCORES:
            raise ConfigError(f"prescreen.score: must be one of {', '.join(SCORES)}; got {self.score!r}")
        self.score = str(self.score)
        self.levels = levels_tuple(self.levels)

    def level_values(self) -> list[float]:
        """The noise levels ``score="wen_levels"`` evaluates: ``levels``, distinct, in increasing order."""
        return sorted({float(v) for v in self.levels})


def levels_tuple(value) -> tuple[float, ...]:
    """``prescreen.levels`` as a tuple of fractions of the schedule in [0, 1]: a list of numbers,
    or one number; None gives :data:`DEFAULT_LEVELS`. Anything else raises a ConfigError naming the key."""
    if value is None:
        return DEFAULT_LEVELS
    if isinstance(value, (int, float)):
        values = [value]
    elif isinstance(value, str) or not hasattr(value, "__iter__"):
        values = None
    else:
        values = list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
        raise ConfigError(
            f"prescreen.levels: a list of fractions of the schedule in [0, 1] (0: the first timestep), got {value!r}"
        )
    return tuple(float(v) for v in values)


def prescreen_settings(cfg) -> PrescreenSettings:
    """:class:`PrescreenSettings` from the ``prescreen`` group of ``cfg``; an unknown key or a
    wrong value raises a ConfigError naming its key."""
    names = [f.name for f in fields(PrescreenSettings)]
    unknown = sorted(set(cfg.prescreen) - set(names))
    if unknown:
        raise ConfigError(f"prescreen.{unknown[0]}: unknown key; the prescreen section takes {', '.join(names)}")
    return settings_from(PrescreenSettings, cfg, "prescreen.")


# The settings that decide a prompt's score (not which prompts are kept: changing those redoes
# only the ranking).
SCORE_SETTINGS = (
    "seeds",
    "steps",
    "batch_size",
    "base_seed",
    "height",
    "width",
    "score",
    "anisotropy_weight",
    "guidance_scale",
    "levels",
)
