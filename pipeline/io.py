"""Atomic writes and completion markers: what makes every stage safe to interrupt and rerun."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file: either the old file (or none) or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_parquet(df, path: str | Path) -> Path:
    """Write a pandas DataFrame to parquet atomically."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def marker_path(directory: str | Path, name: str) -> Path:
    """Where the completion marker of unit ``name`` (a shard, a prompt) lives."""
    return Path(directory) / ".done" / f"{name}.json"


def is_done(directory: str | Path, name: str) -> bool:
    return marker_path(directory, name).exists()


def mark_done(directory: str | Path, name: str, info: dict[str, Any] | None = None) -> Path:
    """Record that unit ``name`` is complete; write it last, after the unit's outputs."""
    return write_json(info or {}, marker_path(directory, name))
