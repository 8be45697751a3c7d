"""The stage executor: what every stage shares once it says what its work is.

A stage (in datatrove's shape) says which *units* of work shard ``rank`` of ``world_size``
owns (a data shard, a prompt, a phase run once) and how to do them; the executor owns the
rest, the same way for every stage, locally or as one SLURM array task per rank:

* **completion markers**: ``<out_dir>/.done/<unit>.json``, written after the unit's outputs,
  holding a digest of the settings that decide its result. A unit whose marker carries the
  same digest is skipped (logged); a changed setting redoes exactly the units it decides. A
  step whose units can stay valid under other settings (the generator's prompt sampled in full
  serves any later budget up to its own) says so with ``is_complete(unit, marker)``.
* **rejects**: one ``<logs_dir>/rejects/rejects_<rank>.jsonl`` per rank (processes of an array
  never append to the same file), listing each rejected record once across reruns.
* **stats**: ``<logs_dir>/stats/<step>_<rank>.json``: units done and skipped, records rejected
  by reason, seconds.

``logs_dir`` is ``out_dir`` unless the stage's folder has no room for them (the generations
folder, whose sub-folders are prompts).

    class Embed:
        name = "embed"
        def units(self, rank, world_size): return [Unit(f"embed_{rank}", {...})]
        def run(self, units, ctx): ...; ctx.done(unit, {"rows": n})

    run_step(Embed(), out_dir, rank=rank, world_size=world_size)

Errors in the entry point go through :func:`pipeline.cli.stage_main` (one line, exit 2), which
also holds the writer lock of the stage's folder for its rank (:func:`pipeline.io.writer_lock`):
one process writes a rank's units and markers at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.io import atomic_write, marker_path, unsafe_name, write_json

log = logging.getLogger(__name__)


def settings_digest(settings: Any) -> str:
    """A short, stable digest of JSON-able ``settings`` (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


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

    def units(self, rank: int, world_size: int) -> Sequence[Unit]:
        """The units shard ``rank`` of ``world_size`` owns; every unit belongs to exactly one rank."""

    def run(self, units: Sequence[Unit], ctx: StepContext) -> None:
        """Do ``units`` (those not done yet), calling ``ctx.done(unit, info)`` as each one is complete."""

    # Optional: ``is_complete(unit, marker) -> bool``, whether ``marker`` (a unit's marker, as
    # written by :meth:`StepContext.done`) still covers ``unit``; default: the same digest.


class StepContext:
    """What a running step is given: where it writes, its rejects, and how it marks units done."""

    def __init__(self, out_dir: Path, step: Step, rank: int, world_size: int, progress: bool = True, logs_dir: Path | None = None):
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
        write_json({**dict(info or {}), "settings": dict(unit.settings), "digest": unit.digest}, marker_path(self.out_dir, unit.name))
        self.completed += 1


def read_marker(out_dir: str | Path, name: str) -> dict | None:
    """A unit's marker as written by :meth:`StepContext.done`, or None: absent, unreadable (a
    folder, not UTF-8), not JSON, or JSON but not an object (``[]``, ``"x"``); a unit whose
    marker reads as None is not done."""
    path = marker_path(out_dir, name)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def all_done(out_dir: str | Path, units: Iterable[Unit]) -> bool:
    """Every one of ``units`` (e.g. all ranks' units) has a current marker."""
    return all((read_marker(out_dir, u.name) or {}).get("digest") == u.digest for u in units)


def run_step(
    step: Step, out_dir: str | Path, rank: int = 0, world_size: int = 1, progress: bool = True, logs_dir: str | Path | None = None
) -> StepContext:
    """Run shard ``rank`` of ``world_size`` of ``step``: skip the units already done with the
    same settings, run the others, write this rank's stats. Returns the context (its
    ``rejects`` and counts) for the stage's own summary. ``logs_dir``: where rejects and
    stats go (default ``out_dir``)."""
    rank, world_size = check_shard(rank, world_size)
    out_dir = Path(out_dir)
    ctx = StepContext(out_dir, step, rank, world_size, progress, None if logs_dir is None else Path(logs_dir))
    units = list(step.units(rank, world_size))
    todo = [unit for unit in units if not ctx.is_done(unit)]
    ctx.skipped = len(units) - len(todo)
    if len(todo) < len(units):
        log.info("%s [rank %d/%d]: %d of %d units already done with the same settings, skipped",
                 step.name, rank, world_size, len(units) - len(todo), len(units))
    started = time.perf_counter()
    if todo:
        step.run(todo, ctx)
    seconds = time.perf_counter() - started
    unfinished = [unit.name for unit in todo if not ctx.is_done(unit)]
    write_json(
        {
            "step": step.name, "rank": rank, "world_size": world_size, "units": len(units),
            "skipped": len(units) - len(todo), "done": ctx.completed, "unfinished": unfinished[:100],
            "rejected": len(ctx.rejects), "rejected_by_reason": ctx.rejects.counts(), "seconds": round(seconds, 3),
        },
        ctx.logs_dir / "stats" / f"{step.name}_{rank}.json",
    )  # fmt: skip
    if len(ctx.rejects):
        log.warning("%s [rank %d/%d]: %s", step.name, rank, world_size, ctx.rejects.summary())
    return ctx


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
