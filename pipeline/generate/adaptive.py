"""Adaptive sampling: spend the full sample budget only on prompts that look memorized.

A memorized prompt produces the same image again and again, so among its first few samples
some pairs are already near-copies under the detector's rule (:class:`pipeline.rule.NearCopyRule`,
which these settings carry: the same metric, threshold and clique size). A prompt whose first
round has no such pair is very unlikely to grow a clique of ``min_clique`` members later;
sampling stops there. The stop is deliberately weak (one close pair suffices) so that recall
stays high.

Two further stops end a prompt as soon as the detector's verdict on it is decided, so they
cannot change what is flagged by a detector with the same rule (the rule is stored with the
decisions, see :meth:`AdaptiveSettings.describe`, and the detector names the prompts stopped
under another one):

* ``stop_when_flagged``: the samples so far hold a clique of ``min_clique`` near-copies; the
  detector will flag the prompt whatever the later samples are.
* ``stop_when_out_of_reach``: the largest clique so far has ``c`` members (proven maximum) and
  only ``r`` samples of the budget remain, with ``c + r < min_clique``. Any clique among all the
  samples is, restricted to the present ones, a clique here, so it has at most ``c + r``
  members: the prompt can no longer be flagged.

With either stop on, a round also ends early at the first sample count where that stop could
apply (``min_clique - c`` more samples for a flag; ``budget - min_clique + c + 1`` for out of
reach), since no check before it can decide anything and none after it should wait.

Two more stops take the verdict on fewer samples than the budget (the budget report counts
them apart; the prompt's clique size and reproduction rate are those of the samples made):

* ``stop_when_extracted`` (needs a training set): each round's new samples are compared with
  the prompt's training candidates (its duplicate group); the prompt stops as soon as one
  sample is within the verification threshold of one of them. It is then extracted whatever
  the later samples are (verification's verdict cannot be undone by more samples), though a
  clique it would have formed later is not formed (the clique verdict is the samples made).
  Checked at each round end before the checks above, so an extracted prompt is never stopped
  for another reason.
* ``stop_when_unlikely``: a heuristic, not a proof. After a round with ``m`` readable samples,
  a largest clique of ``c`` (proven maximum), no training match (when checked) and ``r``
  samples of the budget left, the clique is taken to grow at most at the rate at which
  samples so far fall into it: the upper end ``p+`` of the 95% Wilson interval of ``c`` in
  ``m`` (:func:`pipeline.stats.wilson_interval`). When ``c + p+ r < min_clique`` the prompt
  stops (:func:`unlikely_to_complete`). It can be wrong: a prompt whose samples join a clique
  faster later than they did so far, or whose final clique is made of other samples, is
  missed; the benchmark (``benchmarks/screen_bench.py``) counts such misses by replaying the
  rule on brute force's samples. With it on, a round also ends at the first count at which the
  bound would stop the prompt if its clique did not grow.

One setting keeps a prompt going where those stops would end it (``near_training``, needs
``stop_when_extracted``'s training images): a prompt one of whose samples so far is within
``near_training`` (looser than the verification threshold) of one of its training images is
not stopped for lack of near-copy pairs (``NO_SIGN``), nor by the clique stops
``OUT_OF_REACH`` and ``UNLIKELY``: those speak of the flag, and such a prompt can still be
extracted by a later sample. It is sampled until extracted, flagged or out of budget. Why: on
the demo model, prompts that brute force extracts in only a few of 24 samples show no near-copy
pair among their first 8 samples, but have one sample there within 0.25 of a training copy,
which singletons' samples rarely come (docs/screening.md). It only adds samples, so it
cannot lose a verdict; its cost is counted like any sample.

A sample that cannot be read is left out of the checks, as the detector leaves it out: the
clique of the samples read plus the samples left is still a bound on the detector's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline.cli import ConfigError, config_int, config_number
from pipeline.generations import EXTRACTED, FLAGGED, NO_SIGN, OUT_OF_REACH, UNLIKELY
from pipeline.rule import NearCopyRule
from pipeline.stats import Z_95, wilson_interval

# A round check's verdicts: go on, or one of the stop reasons recorded in the generations folder.
CONTINUE = "continue"
# A check re-reads and re-measures every sample so far; a round of at least this share of them
# keeps the checks a small cost next to sampling, however close a prompt hovers to a decision.
MIN_ROUND_SHARE = 1 / 16
# Keys the adaptive section had before the near-copy rule was configured once for every stage.
MOVED_KEYS = {"threshold": "rule.threshold", "min_clique": "rule.min_clique", "grid": "metric.grid"}

Images = np.ndarray | Sequence[np.ndarray]
# matches(start, end): whether any of a prompt's samples [start, end) is within the verification
# threshold of one of its training candidates (stop_when_extracted).
Matches = Callable[[int, int], bool]
# near(end): whether one of a prompt's first ``end`` samples is within ``near_training`` of one of
# its training candidates.
Near = Callable[[int], bool]
# The stops that ``near_training`` overrides: they judge the flag, not an extraction still to come.
HELD_BY_TRAINING = (NO_SIGN, OUT_OF_REACH, UNLIKELY)


@dataclass(frozen=True)
class AdaptiveSettings:
    """``first_round`` samples first; then rounds growing by ``growth`` up to the full budget.
    ``first_round`` is at least 2 (a near-copy pair needs two samples), or 1 with
    ``near_training`` (one sample near a training image holds the prompt; with none, the
    prompt stops after it unless extracted).

    Sampling continues after a round while the samples so far have at least
    ``min_close_pairs`` near-copy pairs under ``rule`` (the detector's), and, with
    ``stop_when_flagged``, no clique of ``rule.min_clique`` of them yet (the detector's flag),
    and, with ``stop_when_out_of_reach``, the remaining budget could still complete one, and,
    with ``stop_when_extracted``, none of them is within the verification threshold of one of
    the prompt's training images (the caller supplies that check), and, with
    ``stop_when_unlikely``, the clique's growth bound still reaches ``rule.min_clique`` (see the
    module doc). ``near_training`` (a distance of ``rule.metric``, or None): a prompt with a
    sample within it of one of its training images goes on despite the stops above but the flag
    (with ``stop_when_extracted`` only; see the module doc).
    """

    enabled: bool = False
    first_round: int = 16
    growth: float = 2.0
    min_close_pairs: int = 1
    stop_when_flagged: bool = False
    stop_when_out_of_reach: bool = False
    stop_when_extracted: bool = False
    stop_when_unlikely: bool = False
    near_training: float | None = None
    # The identity of the training set stop_when_extracted compares with
    # (:func:`pipeline.training_images.training_set_identity`): a changed set decides again.
    training_set: str | None = None
    rule: NearCopyRule = field(default_factory=NearCopyRule)

    def __post_init__(self):
        if self.first_round < 1 or (self.first_round < 2 and self.near_training is None):
            raise ValueError(
                "adaptive.first_round: need at least 2 samples to compare (1 only with adaptive.near_training, which "
                f"can hold a prompt on one sample near a training image), got {self.first_round}"
            )
        if self.growth <= 1:
            raise ValueError(f"adaptive.growth: must be above 1, got {self.growth}")
        if self.min_close_pairs < 1:
            raise ValueError(f"adaptive.min_close_pairs: must be at least 1, got {self.min_close_pairs}")
        if self.near_training is not None and not float(self.near_training) > 0:
            raise ValueError(f"adaptive.near_training: must be a positive distance or null, got {self.near_training}")
        if self.near_training is not None and not self.stop_when_extracted:
            raise ValueError(
                "adaptive.near_training: compares samples with the training images, which only "
                "adaptive.stop_when_extracted brings: set it true too"
            )
        if not isinstance(self.rule, NearCopyRule):
            raise TypeError(f"rule: expected a NearCopyRule, got {type(self.rule).__name__}")

    @property
    def needs_clique(self) -> bool:
        """Whether a check searches the largest clique (only the stops on the verdict need it)."""
        return self.stop_when_flagged or self.stop_when_out_of_reach or self.stop_when_unlikely

    @property
    def min_clique(self) -> int:
        """The rule's ``min_clique``: the clique the stops on the verdict judge by."""
        return self.rule.min_clique

    def describe(self) -> dict[str, Any]:
        """The settings as JSON values, the rule's description under ``rule``: what the generator
        stores with the samples (prompts.parquet's ``adaptive`` column, completion markers)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}
        return {**values, "rule": self.rule.describe()}


@dataclass(frozen=True)
class RoundCheck:
    """What a check after a round found: the ``verdict`` and, when searched, the size of the
    largest clique of near-copies found among the samples so far."""

    verdict: str
    clique_size: int | None = None
    # CONTINUE given by near_training over a stop (the next round is then the scheduled one).
    held: bool = False


def clique_growth_bound(clique: int, samples: int, remaining: int, z: float = Z_95) -> float:
    """``clique + remaining * p+``: the largest clique ``stop_when_unlikely`` expects by the end
    of the budget, where ``p+`` is the upper end of the Wilson interval (normal quantile ``z``,
    95% by default) of ``clique`` members among ``samples`` (the rate at which samples so far
    fell into the clique). ``clique <= samples``; ``remaining >= 0``."""
    _, high = wilson_interval(clique, samples, z)
    return clique + remaining * high


def unlikely_to_complete(clique: int, samples: int, remaining: int, min_clique: int, z: float = Z_95) -> bool:
    """Whether :func:`clique_growth_bound` falls short of ``min_clique`` (stop ``UNLIKELY``)."""
    return clique_growth_bound(clique, samples, remaining, z) < min_clique


def round_ends(n_samples: int, settings: AdaptiveSettings) -> list[int]:
    """The geometric schedule: cumulative sample counts after each round, ending at ``n_samples``.

    >>> round_ends(500, AdaptiveSettings(first_round=16, growth=2.0))
    [16, 32, 64, 128, 256, 500]
    """
    ends, size = [], settings.first_round
    while size < n_samples:
        ends.append(size)
        size = int(np.ceil(size * settings.growth))
    ends.append(n_samples)
    return ends


def close_pair_matrix(images: Images, settings: AdaptiveSettings) -> np.ndarray:
    """Boolean (N, N) matrix of near-copy pairs under ``settings.rule`` (diagonal False);
    ``images`` uint8 (N, H, W, 3) or float in [0, 1], or a list of such images."""
    return settings.rule.near_copies(settings.rule.distances(images))


def _pair_count(close: np.ndarray) -> int:
    """Pairs in a symmetric boolean near-copy matrix (each counted once)."""
    return int(np.triu(close, k=1).sum())


def close_pairs(images: Images, settings: AdaptiveSettings) -> int:
    """Number of sample pairs that are near-copies."""
    if len(images) < 2:
        return 0
    return _pair_count(close_pair_matrix(images, settings))


def check_round(images: Images, settings: AdaptiveSettings, n_samples: int | None = None, made: int | None = None) -> RoundCheck:
    """The decision after a round, from the samples so far (uint8 (N, H, W, 3), or a list).

    The verdict is ``CONTINUE``, ``NO_SIGN`` (stop: fewer than ``min_close_pairs`` near-copy
    pairs), ``FLAGGED`` (stop: the rule's verdict flags them already), ``OUT_OF_REACH``
    (stop: ``n_samples``, the prompt's budget, leaves too few samples to complete a clique;
    needs ``n_samples``) or ``UNLIKELY`` (stop: the clique's growth bound falls short, see
    :func:`unlikely_to_complete`; needs ``n_samples``). ``made`` is how many samples the prompt
    has (default ``len(images)``; more when some could not be read and are not in ``images``).
    A training match (``stop_when_extracted``) is checked by the caller, before this.
    """
    if len(images) < 2:
        return RoundCheck(NO_SIGN)
    rule = settings.rule
    distances = rule.distances(images)
    if _pair_count(rule.near_copies(distances)) < settings.min_close_pairs:
        return RoundCheck(NO_SIGN)
    if not settings.needs_clique:
        return RoundCheck(CONTINUE)
    verdict = rule.verdict(distances)
    size = verdict["clique_size"]
    # A search stopped at its step budget gives a smaller clique than the largest: a sound flag
    # (it exists), but no proof that a clique is out of reach.
    if settings.stop_when_flagged and verdict["flagged"]:
        return RoundCheck(FLAGGED, size)
    made = len(images) if made is None else int(made)
    remaining = None if n_samples is None else int(n_samples) - made
    if (
        settings.stop_when_out_of_reach
        and verdict["clique_exact"]
        and remaining is not None
        and size + remaining < rule.min_clique
    ):
        return RoundCheck(OUT_OF_REACH, size)
    # The rate is that of the samples read (the clique is among them); the budget left counts from
    # the samples made.
    if (
        settings.stop_when_unlikely
        and verdict["clique_exact"]
        and remaining is not None
        and unlikely_to_complete(size, len(images), remaining, rule.min_clique)
    ):
        return RoundCheck(UNLIKELY, size)
    return RoundCheck(CONTINUE, size)


def held_by_training(check: RoundCheck, settings: AdaptiveSettings, near: Near | None, made: int) -> RoundCheck:
    """``check``, or CONTINUE (same clique size) where ``near_training`` holds the prompt: its
    verdict is one of ``HELD_BY_TRAINING`` and ``near(made)`` says one of its ``made`` samples so
    far is within ``near_training`` of a training image. ``near`` is asked only then."""
    if settings.near_training is None or near is None or check.verdict not in HELD_BY_TRAINING:
        return check
    return RoundCheck(CONTINUE, check.clique_size, held=True) if near(made) else check


def round_verdict(images: Images, settings: AdaptiveSettings, n_samples: int | None = None) -> str:
    """The verdict of :func:`check_round`."""
    return check_round(images, settings, n_samples).verdict


def next_round_end(made: int, check: RoundCheck, n_samples: int, settings: AdaptiveSettings) -> int:
    """Where the next round ends, for a prompt with ``made`` samples that ``check`` let go on.

    The next end of the geometric schedule (:func:`round_ends`), or sooner: at the first count
    at which a stop on the verdict could apply (see the module doc), but no sooner than
    ``MIN_ROUND_SHARE`` of ``made`` more samples; for a prompt held by ``near_training``
    (``check.held``), the scheduled end.
    """
    scheduled = next(end for end in round_ends(n_samples, settings) if end > made)
    # A held prompt goes on to the schedule: the stops whose counts would end it sooner are the
    # ones near_training overrides.
    if check.clique_size is None or check.held:
        return scheduled
    decisive = []
    if settings.stop_when_flagged:
        decisive.append(made + settings.rule.min_clique - check.clique_size)
    if settings.stop_when_out_of_reach:
        decisive.append(n_samples - settings.rule.min_clique + check.clique_size + 1)
    if settings.stop_when_unlikely:
        # The first count at which the bound stops the prompt if its clique does not grow (the
        # bound falls as samples come and the budget shrinks); none before the budget: no entry.
        # The samples are counted as made, whatever some unreadable ones would change.
        first = next(
            (
                k
                for k in range(made + 1, n_samples)
                if unlikely_to_complete(check.clique_size, k, n_samples - k, settings.rule.min_clique)
            ),
            None,
        )
        if first is not None:
            decisive.append(first)
    if not decisive:
        return scheduled
    shortest = made + max(1, math.ceil(made * MIN_ROUND_SHARE))
    return min(scheduled, max(min(decisive), shortest))


def adaptive_outcome(
    first: Callable[[int], Images],
    n_samples: int,
    settings: AdaptiveSettings,
    matches: Matches | None = None,
    near: Near | None = None,
) -> tuple[int, str | None]:
    """What adaptive sampling makes of one prompt: ``(samples made, stop reason)``.

    The reason is ``NO_SIGN``, ``FLAGGED``, ``OUT_OF_REACH``, ``EXTRACTED`` or ``UNLIKELY`` for
    a prompt stopped before ``n_samples``, None for one sampled in full. ``first(k)`` returns
    the readable ones among the prompt's first ``k`` samples (uint8 (k, H, W, 3), or a list);
    ``matches(start, end)``, with ``stop_when_extracted``, whether one of samples
    ``[start, end)`` is within the verification threshold of one of the prompt's training
    images (None: never, as for a prompt without training candidates); ``near(k)``, with
    ``near_training``, whether one of the first ``k`` is within it of one of them (see
    :func:`held_by_training`). Since sample ``i``
    comes from its own seed, the samples of a brute-force run give the adaptive run's decisions
    exactly, without sampling again (what the budget report uses).
    """
    n_samples = int(n_samples)
    start, made = 0, round_ends(n_samples, settings)[0]
    while made < n_samples:
        # Each round's new samples once: a match in an earlier round would have stopped it there.
        if settings.stop_when_extracted and matches is not None and matches(start, made):
            return made, EXTRACTED
        check = held_by_training(check_round(first(made), settings, n_samples, made=made), settings, near, made)
        if check.verdict != CONTINUE:
            return made, check.verdict
        start, made = made, next_round_end(made, check, n_samples, settings)
    return made, None


def adaptive_settings(values: Mapping[str, Any] | None, rule: NearCopyRule | None = None) -> AdaptiveSettings:
    """:class:`AdaptiveSettings` from a config mapping (the ``adaptive:`` section) and the
    near-copy rule (:func:`pipeline.rule.rule_from_config`; default: the default rule);
    unknown keys are errors."""
    values = dict(values or {})
    known = [f.name for f in fields(AdaptiveSettings) if f.name != "rule"]
    unknown = sorted(set(values) - set(known))
    if unknown:
        key = unknown[0]
        if key in MOVED_KEYS:
            raise ConfigError(
                f"adaptive.{key}: moved: the near-copy rule is configured once for every stage; "
                f"set {MOVED_KEYS[key]} (conf/rule.yaml, conf/metric/)"
            )
        raise ConfigError(f"adaptive.{key}: unknown key; the adaptive section takes {', '.join(known)}")
    section = OmegaConf.create({"adaptive": values})  # so that errors name adaptive.<key>
    parsed: dict[str, Any] = {}
    for key in known:
        if key not in values:
            continue
        kind = type(getattr(AdaptiveSettings, key))
        if key == "near_training":  # a distance, or null (off)
            parsed[key] = config_number(section, f"adaptive.{key}", optional=True)
        elif kind is bool:
            if not isinstance(values[key], bool):
                raise ConfigError(f"adaptive.{key}: expected true or false, got {values[key]!r}")
            parsed[key] = values[key]
        else:
            read = config_int if kind is int else config_number
            parsed[key] = read(section, f"adaptive.{key}")
    return AdaptiveSettings(**parsed, rule=rule if rule is not None else NearCopyRule())
