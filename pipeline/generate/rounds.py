"""The generator's schedule: which samples each prompt gets next, round by round.

Without adaptive sampling a prompt has one round, all ``n_samples`` of it. With it
(:mod:`pipeline.generate.adaptive`), rounds end at :func:`pipeline.generate.adaptive.round_ends` (or sooner, see
:func:`pipeline.generate.adaptive.next_round_end`), and after each one the samples so far go through
:func:`pipeline.generate.adaptive.check_round`, which lets the prompt go on or stops it; with
``stop_when_extracted``, the round's new samples are first compared with the prompt's training
images (``matches``), and a match stops the prompt; with ``near_training``, a prompt whose
samples come within it of those images is held past the stops on the flag (``near``).

:class:`RoundScheduler` holds that state for every unfinished prompt and nothing else: it
touches no file and no model. The generator's loop asks it what to sample (:meth:`start`),
tells it each sample written (:meth:`written`), and hears through ``on_finish`` when a prompt
needs no more samples, so that the loop can keep batches full across prompts while each
prompt's rounds stay in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.generate.adaptive import (
    CONTINUE,
    AdaptiveSettings,
    Images,
    check_round,
    held_by_training,
    next_round_end,
    round_ends,
)
from pipeline.generate.sampling import SampleTask
from pipeline.generations import EXTRACTED

# missing(prompt_id, start, end): indexes in [start, end) with no sample on disk yet.
Missing = Callable[[str, int, int], Sequence[int]]
# read(prompt_id, count): the readable ones among the prompt's first ``count`` samples.
ReadBack = Callable[[str, int], Images]
# on_finish(prompt_id, made, reason): the prompt is done with ``made`` samples; ``reason`` is
# adaptive sampling's stop reason, or None when it got all ``n_samples``.
OnFinish = Callable[[str, int, "str | None"], None]
# matches(prompt_id, start, end): whether one of samples [start, end) is within the verification
# threshold of one of the prompt's training candidates (stop_when_extracted).
MatchCheck = Callable[[str, int, int], bool]
# near(prompt_id, end): whether one of the prompt's first ``end`` samples is within
# adaptive.near_training of one of its training candidates.
NearCheck = Callable[[str, int], bool]


@dataclass
class _PromptRound:
    """One unfinished prompt: its current round covers samples ``[start, end)``, of which
    ``waiting`` are queued and not written yet."""

    caption: str
    seeds: Sequence[int]
    start: int
    end: int
    waiting: int = 0


class RoundScheduler:
    """The rounds of every unfinished prompt of one generator run; see the module doc.

    ``n_samples``: each prompt's budget. ``adaptive``: the settings (None or disabled: one
    round of ``n_samples``). ``missing``, ``read``, ``on_finish``, ``matches`` and ``near``
    connect it to the folder and the training set (see their type aliases above); without
    ``matches``, ``stop_when_extracted`` never stops a prompt; without ``near``,
    ``near_training`` never holds one.
    """

    def __init__(
        self,
        n_samples: int,
        adaptive: AdaptiveSettings | None,
        *,
        missing: Missing,
        read: ReadBack,
        on_finish: OnFinish,
        matches: MatchCheck | None = None,
        near: NearCheck | None = None,
    ):
        self.n_samples = int(n_samples)
        self.adaptive = adaptive if adaptive is not None and adaptive.enabled else None
        self.ends = round_ends(self.n_samples, self.adaptive) if self.adaptive is not None else [self.n_samples]
        self._missing, self._read, self._on_finish = missing, read, on_finish
        self._matches = matches if self.adaptive is not None and self.adaptive.stop_when_extracted else None
        self._near = near if self.adaptive is not None and self.adaptive.near_training is not None else None
        self._active: dict[str, _PromptRound] = {}

    @property
    def active(self) -> int:
        """Prompts started and not finished."""
        return len(self._active)

    def start(self, prompt_id: str, caption: str, seeds: Sequence[int]) -> list[SampleTask]:
        """Begin a prompt (``seeds``: one per sample index, ``n_samples`` of them): the tasks of
        its first round whose samples are missing; none when the samples on disk already
        decide it (it is then finished through ``on_finish`` before this returns)."""
        if prompt_id in self._active:
            raise ValueError(f"prompt {prompt_id!r} is already scheduled")
        self._active[prompt_id] = _PromptRound(caption, seeds, start=0, end=self.ends[0])
        return self._advance(prompt_id)

    def written(self, prompt_id: str) -> list[SampleTask]:
        """One queued sample of ``prompt_id`` is on disk. Once its whole round is, the prompt
        moves on: the tasks of its next round, or none (finished, or still waiting)."""
        state = self._active[prompt_id]
        state.waiting -= 1
        return self._advance(prompt_id) if state.waiting == 0 else []

    def _advance(self, prompt_id: str) -> list[SampleTask]:
        """Move past the rounds whose samples all exist: queue the next missing samples, stop
        the prompt, or finish it."""
        state = self._active[prompt_id]
        while True:
            todo = list(self._missing(prompt_id, state.start, state.end))
            if todo:
                state.waiting = len(todo)
                return [SampleTask(prompt_id, state.caption, i, int(state.seeds[i])) for i in todo]
            if state.end == self.n_samples:
                return self._finish(prompt_id, state.end, None)
            # Each round's samples once, in order: a match in an earlier round would have stopped it.
            if self._matches is not None and self._matches(prompt_id, state.start, state.end):
                return self._finish(prompt_id, state.end, EXTRACTED)
            check = check_round(self._read(prompt_id, state.end), self.adaptive, self.n_samples, made=state.end)
            near = (lambda end, pid=prompt_id: self._near(pid, end)) if self._near is not None else None
            check = held_by_training(check, self.adaptive, near, state.end)
            if check.verdict != CONTINUE:
                return self._finish(prompt_id, state.end, check.verdict)
            state.start, state.end = state.end, next_round_end(state.end, check, self.n_samples, self.adaptive)

    def _finish(self, prompt_id: str, made: int, reason: str | None) -> list[SampleTask]:
        del self._active[prompt_id]
        self._on_finish(prompt_id, made, reason)
        return []
