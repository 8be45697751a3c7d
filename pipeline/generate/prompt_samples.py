"""What the generator's round scheduler (:class:`pipeline.generate.rounds.RoundScheduler`) asks
of the folder and the training set about each prompt of one rank, in one object: which of its
samples are missing, its samples read back, whether they reproduce (or come near) its own
training images, and its completion marker once it needs no more samples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.rejects import RejectLog
from pipeline.executor import StepContext, Unit
from pipeline.generate.adaptive import AdaptiveSettings, Images
from pipeline.generate.rounds import RoundScheduler
from pipeline.generate.samples_on_disk import missing_samples, read_samples
from pipeline.generations import NO_SIGN, STOP_REASONS
from pipeline.training_images import GroupMatcher


class PromptSamples:
    """The samples of the prompts ``units`` (one rank's, not done yet) in ``out_dir``.

    ``groups``: each prompt's training keys (its duplicate group; empty for a prompt without
    one, which ``matches`` and ``near`` never report). ``matcher``: the training images, for
    ``adaptive.stop_when_extracted`` and ``adaptive.near_training`` (None: neither applies).
    A sample that cannot be read back is left out of the checks, as the detector leaves it
    out, and recorded once in ``ctx.rejects`` (its key in :attr:`rejected`); :attr:`stops`
    counts the prompts stopped per stop reason of :mod:`pipeline.generate.adaptive`. A finished
    prompt's training images are dropped from ``matcher`` once no unfinished prompt of
    ``units`` shares them.
    """

    def __init__(
        self,
        out_dir: Path,
        ctx: StepContext,
        units: Sequence[Unit],
        *,
        n_samples: int,
        adaptive: AdaptiveSettings | None,
        matcher: GroupMatcher | None,
        groups: dict[str, list[str]],
    ):
        self.out_dir, self.ctx, self.n_samples, self.adaptive = out_dir, ctx, n_samples, adaptive
        self.matcher, self.groups = matcher, groups
        self.units = {unit.name: unit for unit in units}
        self.stops = dict.fromkeys(STOP_REASONS, 0)
        self.rejected: set[str] = set()
        self._users = Counter(key for name in self.units for key in dict.fromkeys(groups.get(name) or []))

    def scheduler(self) -> RoundScheduler:
        """A round scheduler over these prompts' samples: every one of its callbacks is a method here."""
        return RoundScheduler(
            self.n_samples,
            self.adaptive,
            missing=self.missing,
            read=self.read_back,
            on_finish=self.finish,
            matches=self.matches,
            near=self.near,
        )

    def missing(self, prompt_id: str, start: int, end: int) -> list[int]:
        """Indexes in ``[start, end)`` of the prompt's samples with no PNG yet."""
        return missing_samples(self.out_dir, prompt_id, end, start=start)

    def read_back(self, prompt_id: str, count: int) -> Images:
        """The readable ones among the prompt's first ``count`` samples."""
        return self.read(prompt_id, 0, count)

    def read(self, prompt_id: str, start: int, end: int) -> Images:
        """The readable ones among the prompt's samples ``[start, end)``, uint8 (k, H, W, 3)."""
        found = RejectLog()
        images = read_samples(self.out_dir, prompt_id, end, found, start=start)
        for entry in found.entries:
            if entry["key"] not in self.rejected:
                self.rejected.add(entry["key"])
                self.ctx.rejects.add(entry["key"], entry["source"], entry["reason"])
        return images

    def matches(self, prompt_id: str, start: int, end: int) -> bool:
        """Whether one of samples ``[start, end)`` reproduces one of the prompt's own training images."""
        if self.matcher is None or not self.groups[prompt_id]:
            return False
        return self.matcher.any_match(self.read(prompt_id, start, end), self.groups[prompt_id])

    def near(self, prompt_id: str, end: int) -> bool:
        """Whether one of the prompt's first ``end`` samples is within ``adaptive.near_training``
        of one of its training images."""
        if self.matcher is None or not self.groups[prompt_id]:
            return False
        return self.matcher.any_match(self.read(prompt_id, 0, end), self.groups[prompt_id], within=self.adaptive.near_training)

    def finish(self, prompt_id: str, made: int, reason: str | None) -> None:
        """Mark the prompt done with ``made`` samples; ``reason``: adaptive sampling's stop reason,
        None when it got all ``n_samples``."""
        # ``stopped_early`` means "stopped with no sign of memorization" (what a shortcut can
        # miss); a prompt stopped because it is already flagged has stop_reason "flagged".
        info: dict[str, Any] = {
            "n_samples": self.n_samples,
            "n_generated": made,
            "stopped_early": reason == NO_SIGN,
            "stop_reason": reason,
            "rank": self.ctx.rank,
        }
        if reason is not None:
            info["adaptive"] = self.adaptive.describe()
            self.stops[reason] += 1
        self.ctx.done(self.units[prompt_id], info)
        if self.matcher is not None:
            keys = list(dict.fromkeys(self.groups.get(prompt_id) or []))
            self._users.subtract(keys)
            self.matcher.forget([key for key in keys if self._users[key] <= 0])
