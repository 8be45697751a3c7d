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

    A reader never sees a half-written file: either the old file (or none) or the new one. The
    file gets the mode that the umask gives any new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600 whatever the umask; outputs get the mode a plain open()
        # would give them, so that colleagues on a shared cluster can read them.
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore it
    os.umask(mask)
    return mask


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


# Longest name a unit may have: file systems cap a name at 255 bytes, and a unit's files add
# suffixes (".json", ".png") and temporary-file affixes to it.
MAX_NAME_BYTES = 200


def unsafe_name(name: object) -> str | None:
    """Why ``name`` cannot name a file or folder inside a run directory, or None when it can.

    Names from other tools (prompt ids, folder names) become paths under the run directory: a
    name must be one plain path component, so that nothing is written outside the directory
    ("..", "/", absolute paths), it cannot clash with the hidden ``.done`` markers, and it
    survives being stored in JSON and parquet (UTF-8 without control characters).
    """
    if not isinstance(name, str) or not name:
        return "empty"
    if name in (".", ".."):
        return f"{name!r} is a reference to a folder"
    if name.startswith("."):
        return "starts with '.' (hidden names are reserved for markers)"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (at most {MAX_NAME_BYTES})"
    return None


def marker_path(directory: str | Path, name: str) -> Path:
    """Where the completion marker of unit ``name`` (a shard, a prompt) lives."""
    return Path(directory) / ".done" / f"{name}.json"


def is_done(directory: str | Path, name: str) -> bool:
    return marker_path(directory, name).exists()


def mark_done(directory: str | Path, name: str, info: dict[str, Any] | None = None) -> Path:
    """Record that unit ``name`` is complete; write it last, after the unit's outputs."""
    return write_json(info or {}, marker_path(directory, name))
