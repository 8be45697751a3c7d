"""A deterministic, streaming walk over a folder tree: the same order on every run and rank."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path


def walk_sorted(root: str | Path, on_error: Callable[[Path, OSError], None] | None = None) -> Iterator[tuple[Path, list[str]]]:
    """Yield ``(folder, sorted names of its files)`` for ``root`` and every folder below it.

    Folders come depth-first in name order, so only one folder's listing is in memory at a
    time. Hidden names (``.x``, e.g. macOS ``._photo.jpg`` or partial downloads) are skipped.
    Symlinked folders are followed once (a link loop is not walked twice). A folder that
    cannot be listed goes to ``on_error(folder, error)`` (or raises when there is none).
    """
    seen: set[str] = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            if on_error is None:
                raise
            on_error(folder, err)
            continue
        files, subfolders = [], []
        for entry in entries:
            try:
                if entry.is_dir():
                    subfolders.append(Path(entry.path))
                elif entry.is_file():
                    files.append(entry.name)
            except OSError:  # e.g. a dangling link: neither a file nor a folder
                continue
        yield folder, files
        stack.extend(reversed(subfolders))  # popped in name order


def list_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Sorted files under ``root`` whose name ends with one of ``suffixes`` (case-insensitive).

    For shard files (``.tar``, ``.parquet``): there are few of them, so a list is fine.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    return [folder / name for folder, names in walk_sorted(root) for name in names if name.lower().endswith(suffixes)]
