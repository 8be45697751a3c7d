"""The prescreen's settings: the ``prescreen`` config group, read and checked in one place.

``prescreen_settings(cfg)`` builds :class:`PrescreenSettings` from a composed config
(:func:`pipeline.cli.settings_from`); a wrong value raises a :class:`pipeline.cli.ConfigError`
whose message starts with its key (``prescreen.seeds: must be at least 1, got -1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

from pipeline.cli import ConfigError, setting, settings_from
from pipeline.prescreen.scores import SCORES, TEXT_SCORES

DEFAULT_LEVELS = (0.125,)
# score=own_images: where each training image is noised, fractions of the schedule (0: its first,
# noisiest timestep): 0.08, the third timestep of a 25-step schedule (docs/screening.md).
DEFAULT_IMAGE_LEVELS = (0.08,)
# The singleton prompts a list needs for the robust z to be taken against them (else against
# every prompt): the MAD of 30 draws of a normal bulk estimates its scale within about 20%
# (one standard error), where 10 would leave it within 40%.
DEFAULT_REFERENCE_SINGLETONS = 30


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

    ``score="own_images"`` (:mod:`pipeline.prescreen.own_images`) ranks by two scores together:
    ``text_score`` (one of :data:`pipeline.prescreen.scores.TEXT_SCORES`, on every prompt) and
    the caption's denoising gain on up to ``images`` of the prompt's own training images (its
    ``keys``; a prompt with none is ranked by the text score alone), each noised at
    ``image_levels`` (fractions of the schedule, as ``levels``) with ``image_draws`` noise draws.
    Each is standardised over the prompts (robust z) and the prompt's score is the largest of the
    two and of their sum's robust z.

    The keep rule (:func:`pipeline.prescreen.keep.choose_kept`): the ``keep_top`` highest-scoring
    prompts (or the top ``keep_fraction`` of them), and/or those scoring at least
    ``score_threshold``, and/or those whose robust z-score (distance from the median score in
    scaled median absolute deviations) is at least ``min_robust_z``; a singleton prompt
    (``dup_count`` 1) must reach ``singleton_min_robust_z`` instead, when that is set. Every
    robust z is taken against the singleton prompts' median and MAD when the list has at least
    ``reference_singletons`` of them, else against every prompt (None: always every prompt; see
    :mod:`pipeline.prescreen.keep`).
    """

    seeds: int = setting(minimum=1, default=4)
    steps: int = setting(minimum=1, default=50)
    batch_size: int = setting(minimum=1, default=64)
    base_seed: int = 0
    keep_top: int | None = setting(minimum=0, default=None)
    keep_fraction: float | None = None  # its range, (0, 1], is checked by choose_kept
    score_threshold: float | None = None
    min_robust_z: float | None = None
    singleton_min_robust_z: float | None = None
    reference_singletons: int | None = setting(minimum=1, default=DEFAULT_REFERENCE_SINGLETONS)
    height: int | None = setting(minimum=1, default=None)
    width: int | None = setting(minimum=1, default=None)
    score: Literal["wen", "anisotropy", "wen_levels", "own_images"] = "wen"  # SCORES: checked by __post_init__, naming the key
    anisotropy_weight: float = 2.0
    guidance_scale: float | None = None
    levels: Sequence[float] | None = DEFAULT_LEVELS
    text_score: Literal["wen", "anisotropy", "wen_levels"] = "wen_levels"  # TEXT_SCORES, checked by __post_init__
    images: int = setting(minimum=1, default=2)
    image_levels: Sequence[float] | None = DEFAULT_IMAGE_LEVELS
    image_draws: int = setting(minimum=1, default=1)

    def __post_init__(self):
        if self.score not in SCORES:
            raise ConfigError(f"prescreen.score: must be one of {', '.join(SCORES)}; got {self.score!r}")
        self.score = str(self.score)
        if self.text_score not in TEXT_SCORES:
            raise ConfigError(f"prescreen.text_score: must be one of {', '.join(TEXT_SCORES)}; got {self.text_score!r}")
        self.text_score = str(self.text_score)
        self.levels = levels_tuple(self.levels)
        self.image_levels = levels_tuple(self.image_levels, "image_levels", DEFAULT_IMAGE_LEVELS)

    @property
    def caption_score(self) -> str:
        """The score read from the caption alone: ``score``, or ``text_score`` under ``own_images``."""
        return self.text_score if self.score == "own_images" else self.score

    def text_settings(self) -> PrescreenSettings:
        """These settings with ``score`` the caption-only one (:attr:`caption_score`)."""
        return replace(self, score=self.caption_score)

    def level_values(self) -> list[float]:
        """The noise levels ``score="wen_levels"`` evaluates: ``levels``, distinct, in increasing order."""
        return sorted({float(v) for v in self.levels})


def levels_tuple(value, key: str = "levels", default: tuple[float, ...] = DEFAULT_LEVELS) -> tuple[float, ...]:
    """``prescreen.<key>`` (``levels``, ``image_levels``) as a tuple of fractions of the schedule in
    [0, 1]: a list of numbers, or one number; None gives ``default``. Anything else raises a
    ConfigError naming the key."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        values = [value]
    elif isinstance(value, str) or not hasattr(value, "__iter__"):
        values = None
    else:
        values = list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
        raise ConfigError(
            f"prescreen.{key}: a list of fractions of the schedule in [0, 1] (0: the first timestep), got {value!r}"
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
# The settings that decide a prompt's own_images score besides those (with score=own_images only,
# so that the other scores' units keep their digests).
OWN_IMAGE_SETTINGS = ("text_score", "images", "image_levels", "image_draws")


def score_settings(settings: PrescreenSettings) -> dict:
    """The settings a prompt's score depends on (:data:`SCORE_SETTINGS`, and
    :data:`OWN_IMAGE_SETTINGS` under ``score=own_images``), tuples as lists: a unit's settings."""
    names = SCORE_SETTINGS + (OWN_IMAGE_SETTINGS if settings.score == "own_images" else ())
    return {name: list(v) if isinstance(v := getattr(settings, name), tuple) else v for name in names}
