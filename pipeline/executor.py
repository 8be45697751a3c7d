"""The stage executor: the whole life of a step, the same way for every stage.

A step (in datatrove's shape) lists *every* unit of its work (a data shard, a prompt, a phase
run once) and says how to do some of them; the executor owns the rest, locally or as one SLURM
array task per rank:

* **sharding**: rank ``r`` of ``world_size`` runs units ``r, r + world_size, ...`` of the list
  (a step may say otherwise with ``shard(units, rank, world_size)``); every unit belongs to
  exactly one rank.
* **completion markers**: ``<out_dir>/.done/<unit>.json``, written after the unit's outputs,
  holding a digest of the settings that decide its result. A unit whose marker carries the
  same digest is skipped (logged); a changed setting redoes exactly the units it decides. A
  step whose units can stay valid under other settings (the generator's prompt sampled in full
  serves any later budget up to its own) says so with ``is_complete(unit, marker)``.
* **finish**: when every unit of every rank is complete, the step's optional ``finish(ctx)``
  (merges, final tables) runs exactly once for that set of units: whichever rank completes the
  last unit runs it under a lock, and records it in ``<out_dir>/.done/.finish_<step>.json``; a
  rerun over the same units skips it unless a file of the step's ``outputs()`` is missing.
* **rejects**: one ``<logs_dir>/rejects/rejects_<rank>.jsonl`` per rank (processes of an array
  never append to the same file), listing each rejected record once across reruns, merged into
  ``<logs_dir>/rejects.jsonl`` at the finish.
* **stats**: ``<logs_dir>/stats/<step>_<rank>.json`` per rank (units done and skipped, records
  rejected by reason, seconds, and what the step counted and timed with :meth:`StepContext.stat`
  and :meth:`StepContext.track_time`), merged over ranks into ``<logs_dir>/stats.json`` (a key
  per step) at the finish.

``logs_dir`` is ``out_dir`` unless the stage's folder has no room for them (the generations
folder, whose sub-folders are prompts).

    class Embed:
        name = "embed"
        def units(self): return [Unit(f"embed_{r}", {...}) for r in range(self.world_size)]
        def run(self, units, ctx):
            with ctx.track_time("embedding"): ...
            ctx.stat("rows", n); ctx.done(unit)
        def finish(self, ctx): ...  # every rank's units are done

    run_step(Embed(), out_dir, rank=rank, world_size=world_size)
    run_steps([Embed(), Index(), Search()], out_dir, rank, world_size)  # phases in order

Errors in the entry point go through :func:`pipeline.cli.stage_main` (one line, exit 2), which
also holds the writer lock of the stage's folder for its rank (:func:`pipeline.io.writer_lock`):
one process writes a rank's units and markers at a time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.identity import digest_of
from pipeline.io import atomic_write, marker_path, read_json_object, unsafe_name, write_json
from pipeline.layout import REJECTS, STATS

log = logging.getLogger(__name__)


def settings_digest(settings: Any) -> str:
    """A short, stable digest of JSON-able ``settings`` (key order does not matter)."""
    return digest_of(settings)


@dataclass(frozen=True)
class Unit:
    """One piece of a stage's work: its marker ``name`` (a plain file name) and the
    ``settings`` that decide its result (JSON-able; stored in the marker with their digest)."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        problem = unsafe_name(self.name)
        if problem:
            raise ValueError(f"unit name {ascii(self.name)} cannot name a marker file: it {problem}")

    @property
    def digest(self) -> str:
        return settings_digest(dict(self.settings))


class Step(Protocol):
    """What a stage (or one phase of it) tells the executor."""

    name: str

    def units(self) -> Sequence[Unit]:
        """Every unit of the step, every rank's, in a fixed order (the executor shards them).
        Steps that share an ``out_dir`` name their units apart: a marker is found by name."""

    def run(self, units: Sequence[Unit], ctx: StepContext) -> None:
        """Do ``units`` (this rank's not done yet), calling ``ctx.done(unit, info)`` as each one is complete."""

    # Optional:
    # ``shard(units, rank, world_size) -> units``: this rank's share (default: round robin);
    # ``is_complete(unit, marker) -> bool``: whether ``marker`` (a unit's marker, as written by
    #   :meth:`StepContext.done`) still covers ``unit`` (default: the same digest);
    # ``finish(ctx)``: run once when every unit is complete (merges, final tables);
    # ``outputs() -> paths``: what ``finish`` writes; a missing one runs it again;
    # ``finish_settings()``: JSON-able settings the finish alone depends on (a change runs it again);
    # ``rejects_per_world_size = True``: units redone when world_size changes (rank files
    #   beyond it are stale and left out of the merged rejects);
    # ``rejects_file``: where the merged rejects go (default ``<logs_dir>/rejects.jsonl``).


def round_robin(units: Sequence[Unit], rank: int, world_size: int) -> list[Unit]:
    """Units ``rank, rank + world_size, ...``: every unit goes to exactly one rank, and each
    rank gets a share of the top of a ranked list."""
    return list(units[rank::world_size])


class StepContext:
    """What a running step is given: where it writes, its rejects, how it marks units done, and
    where it counts (:meth:`stat`) and times (:meth:`track_time`) its work for the stats."""

    def __init__(
        self, out_dir: Path, step: Step, rank: int, world_size: int, progress: bool = True, logs_dir: Path | None = None
    ):
        self.out_dir = out_dir
        self.step = step.name
        self._is_complete = getattr(step, "is_complete", None)
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self.logs_dir = out_dir if logs_dir is None else Path(logs_dir)
        self.rejects = RejectLog(self.logs_dir / "rejects" / f"rejects_{rank}.jsonl", once=True)
        self.completed = 0
        self.skipped = 0  # units found done before the step ran
        self.all_done = False  # every rank's units complete (set after the rank's run)
        self.finished = False  # this process ran the step's finish
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def stat(self, name: str, value: float = 1) -> None:
        """Add ``value`` to the count ``name`` of this rank's stats (summed over ranks at the finish)."""
        self.counts[name] += value

    @contextmanager
    def track_time(self, name: str) -> Iterator[None]:
        """Add the block's wall time, in seconds, to the timer ``name`` of this rank's stats."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def is_done(self, unit: Unit) -> bool:
        """The unit has a marker that covers it: written with the same settings, or one the
        step's ``is_complete`` accepts."""
        info = read_marker(self.out_dir, unit.name)
        if info is None:
            return False
        if self._is_complete is not None:
            return bool(self._is_complete(unit, info))
        return info.get("digest") == unit.digest

    def done(self, unit: Unit, info: Mapping[str, Any] | None = None) -> None:
        """Mark ``unit`` complete; call it after the unit's outputs are written."""
        write_json(
            {**dict(info or {}), "settings": dict(unit.settings), "digest": unit.digest}, marker_path(self.out_dir, unit.name)
        )
        self.completed += 1


def read_marker(out_dir: str | Path, name: str) -> dict | None:
    """A unit's marker as written by :meth:`StepContext.done`, or None: absent, unreadable (a
    folder, not UTF-8), not JSON, or JSON but not an object (``[]``, ``"x"``); a unit whose
    marker reads as None is not done."""
    return read_json_object(marker_path(out_dir, name))


def all_done(out_dir: str | Path, units: Iterable[Unit]) -> bool:
    """Every one of ``units`` (e.g. all ranks' units) has a current marker."""
    return all((read_marker(out_dir, u.name) or {}).get("digest") == u.digest for u in units)


FINISH_MARKER = ".finish_{step}"  # a hidden marker name: no unit can take it (unsafe_name)


def run_step(
    step: Step, out_dir: str | Path, rank: int = 0, world_size: int = 1, progress: bool = True, logs_dir: str | Path | None = None
) -> StepContext:
    """Run shard ``rank`` of ``world_size`` of ``step``: skip the units already done with the
    same settings, run the others, write this rank's stats; then, when every rank's units are
    complete, the step's finish (once, see the module doc). Returns the context (its
    ``rejects``, counts, ``all_done`` and ``finished``) for the stage's own summary.
    ``logs_dir``: where rejects and stats go (default ``out_dir``)."""
    rank, world_size = check_shard(rank, world_size)
    out_dir = Path(out_dir)
    ctx = StepContext(out_dir, step, rank, world_size, progress, None if logs_dir is None else Path(logs_dir))
    every = list(step.units())
    shard = getattr(step, "shard", round_robin)
    units = list(shard(every, rank, world_size))
    todo = [unit for unit in units if not ctx.is_done(unit)]
    ctx.skipped = len(units) - len(todo)
    if len(todo) < len(units):
        log.info(
            "%s [rank %d/%d]: %d of %d units already done with the same settings, skipped",
            step.name,
            rank,
            world_size,
            len(units) - len(todo),
            len(units),
        )
    with ctx.track_time("run"):
        if todo:
            step.run(todo, ctx)
    unfinished = [unit.name for unit in todo if not ctx.is_done(unit)]
    write_json(
        _rank_stats(step.name, ctx, len(units), len(todo), unfinished), ctx.logs_dir / "stats" / f"{step.name}_{rank}.json"
    )
    if len(ctx.rejects):
        log.warning("%s [rank %d/%d]: %s", step.name, rank, world_size, ctx.rejects.summary())
    mine = {unit.name for unit in units}
    ctx.all_done = not unfinished and all(ctx.is_done(unit) for unit in every if unit.name not in mine)
    if ctx.all_done:
        _finish(step, ctx, every)
    return ctx


def run_steps(
    steps: Sequence[Step],
    out_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    logs_dir: str | Path | None = None,
) -> list[StepContext]:
    """Run dependent steps (phases) in order for shard ``rank``: each starts once the one before
    it is complete on every rank. Returns the contexts of the steps run; it stops (logged)
    after a step whose other ranks have not finished yet: their array tasks, or a rerun, go on
    from there."""
    contexts = []
    for step in steps:
        ctx = run_step(step, out_dir, rank=rank, world_size=world_size, progress=progress, logs_dir=logs_dir)
        contexts.append(ctx)
        if not ctx.all_done:
            rest = [s.name for s in steps[len(contexts) :]]
            if rest:
                log.info(
                    "%s [rank %d/%d]: other ranks' units are not done yet; %s wait for them (rerun, or chain the arrays)",
                    step.name,
                    rank,
                    world_size,
                    ", ".join(rest),
                )
            break
    return contexts


def _rank_stats(name: str, ctx: StepContext, units: int, todo: int, unfinished: list[str]) -> dict[str, Any]:
    return {
        "step": name,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "units": units,
        "skipped": units - todo,
        "done": ctx.completed,
        "unfinished": unfinished[:100],
        "rejected": len(ctx.rejects),
        "rejected_by_reason": ctx.rejects.counts(),
        "seconds": round(ctx.seconds["run"], 3),
        "counts": dict(ctx.counts),
        "timers": {k: round(v, 3) for k, v in ctx.seconds.items()},
    }


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting for it) while the block runs; unlocked on a
    file system without flock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("%s: no flock on this file system (%s); the finish runs unlocked", path, err.strerror)
        yield
    finally:
        os.close(fd)


def _finish(step: Step, ctx: StepContext, every: list[Unit]) -> None:
    """The step's finish, once for this set of units: merged rejects and stats, then ``finish``.

    Skipped when its marker holds the same units' digest and every file of ``outputs()`` is as
    the finish left it (same size and modification time): an output deleted, or rewritten by
    another step since, runs it again."""
    outputs = [Path(p) for p in (step.outputs() if hasattr(step, "outputs") else [])]
    extra = step.finish_settings() if hasattr(step, "finish_settings") else None
    digest = settings_digest([[[u.name, u.digest] for u in every], extra])
    name = FINISH_MARKER.format(step=step.name)
    # Beside the finish marker: the stage's .lock/ folder holds the writer locks, removed when released.
    with _exclusive(marker_path(ctx.out_dir, name).with_suffix(".lock")):
        marker = read_marker(ctx.out_dir, name)
        if marker is not None and marker.get("digest") == digest and marker.get("outputs") == _state(outputs):
            return
        # Rejects of every rank file there is: a unit's rejects outlive a change of world_size
        # with the unit; a step whose units are per rank says so with rejects_per_world_size.
        per_world_size = getattr(step, "rejects_per_world_size", False)
        merged = getattr(step, "rejects_file", None) or ctx.logs_dir / REJECTS
        merge_rejects(ctx.logs_dir / "rejects", merged, ctx.world_size if per_world_size else None)
        merge_stats(ctx.logs_dir, step.name, ctx.world_size)
        if hasattr(step, "finish"):
            step.finish(ctx)
        write_json(
            {"digest": digest, "units": len(every), "rank": ctx.rank, "outputs": _state(outputs)}, marker_path(ctx.out_dir, name)
        )
        ctx.finished = True


def _state(paths: Sequence[Path]) -> dict[str, Any]:
    """``{path: [size, mtime_ns]}`` of ``paths`` (None for a missing one)."""
    state = {}
    for path in paths:
        try:
            stat = path.stat()
            state[str(path)] = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            state[str(path)] = None
    return state


def merge_stats(logs_dir: str | Path, step: str, world_size: int) -> dict[str, Any]:
    """Sum the ranks' ``stats/<step>_<rank>.json`` into ``<logs_dir>/stats.json`` under ``step``
    (other steps' entries kept); returns the merged entry. Seconds are summed over ranks
    (``seconds``) and the slowest rank's kept (``slowest_rank_seconds``)."""
    logs_dir = Path(logs_dir)
    merged: dict[str, Any] = {
        "world_size": world_size,
        "units": 0,
        "skipped": 0,
        "done": 0,
        "rejected": 0,
        "seconds": 0.0,
        "slowest_rank_seconds": 0.0,
        "rejected_by_reason": Counter(),
        "counts": Counter(),
        "timers": Counter(),
    }
    for rank in range(world_size):
        stats = read_json_object(logs_dir / "stats" / f"{step}_{rank}.json")
        if stats is None:
            continue
        for key in ("units", "skipped", "done", "rejected", "seconds"):
            merged[key] += stats.get(key) or 0
        merged["slowest_rank_seconds"] = max(merged["slowest_rank_seconds"], stats.get("seconds") or 0)
        for key in ("rejected_by_reason", "counts", "timers"):
            merged[key].update(stats.get(key) or {})
    merged = {k: dict(v) if isinstance(v, Counter) else v for k, v in merged.items()}
    path = logs_dir / STATS
    everything = read_json_object(path) or {}
    everything[step] = merged
    write_json(everything, path)
    return merged


def merge_rejects(rejects_dir: str | Path, out: str | Path, world_size: int | None = None) -> list[dict]:
    """Concatenate the ranks' ``rejects_<rank>.jsonl`` of ``rejects_dir`` into ``out``
    (atomically) and return the entries (a line that is not JSON is copied, not returned).

    ``world_size``: only ranks ``0 .. world_size - 1``, for a step whose units are redone when
    ``world_size`` changes (a file of an earlier run with more ranks is stale); None: every
    rank's file, for a step whose units, and so their rejects, outlive a change of world_size.
    """
    if world_size is None:
        paths = sorted(Path(rejects_dir).glob("rejects_*.jsonl"), key=lambda p: (len(p.name), p.name))
    else:
        paths = [Path(rejects_dir) / f"rejects_{rank}.jsonl" for rank in range(world_size)]
    lines = []
    for path in paths:
        if path.is_file():
            lines += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    text = "".join(line + "\n" for line in lines)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return entries
