"""Identities of inputs: what a unit's marker records so that a changed input redoes the unit.

An input is identified by what can be read without reading its content whole: a file by its
name, size and modification time (nanoseconds), a folder by those of every file under it. A
rewrite of a file changes its modification time even when its size stays; a copy of a folder
(``cp -r``) changes it too, which only costs a recomputation. Sample images, whose content is
the evidence, are identified by a digest of their bytes instead (:func:`file_digest`).

Nothing here writes anywhere: inputs are read-only to every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Bytes read at a time when hashing a file.
_CHUNK = 1 << 20


def file_identity(path: str | Path) -> list[Any]:
    """``[name, size, mtime_ns]`` of the file at ``path``; ``[name, None, None]`` when it is
    missing or unreadable (so that its appearance changes the identity too)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return [path.name, None, None]
    return [path.name, int(stat.st_size), int(stat.st_mtime_ns)]


def tree_identity(root: str | Path, skip_hidden: bool = True) -> list[list[Any]]:
    """``[[relative path, size, mtime_ns], ...]`` of every file under ``root``, sorted by path.

    Hidden files and folders (names starting with ``.``: caches, lock files) are left out
    with ``skip_hidden``. A file that is a folder's only content makes it a tree of one; a
    path that is a file is identified as a tree of that one file; a missing path as ``[]``.
    """
    root = Path(root)
    if root.is_file():
        return [file_identity(root)]
    if not root.is_dir():
        return []
    out = []
    seen = {os.path.realpath(root)}  # a symlink loop is walked once
    for folder, dirs, files in os.walk(root, followlinks=True):
        if skip_hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if skip_hidden and name.startswith("."):
                continue
            path = Path(folder) / name
            entry = file_identity(path)
            entry[0] = path.relative_to(root).as_posix()
            out.append(entry)
    out.sort(key=lambda entry: entry[0])
    return out


def digest_of(value: Any) -> str:
    """A short, stable digest of a JSON-able ``value`` (key order does not matter): a unit's
    settings, a tree identity, a list of file identities."""
    canonical = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def model_identity(path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """What identifies the weights at ``model.path``.

    A local diffusers folder (with ``model_index.json``): the digest of the names, sizes and
    modification times of ``model_index.json`` and of every file in the component folders it
    lists (``unet/``, ``vae/``, ``text_encoder/`` ...), so weights replaced in place are a
    different model while files beside them (notes, evaluations, checkpoints) are not. Any
    other local path: every file under it. A hub id: the id and the revision asked for (the
    hub's cache keys snapshots by commit).
    """
    local = Path(str(path)).expanduser()
    if not local.exists():
        return {"path": str(path), "revision": revision}
    index = local / "model_index.json"
    files = tree_identity(local)
    if index.is_file():
        import json

        try:
            components = {
                name
                for name, value in json.loads(index.read_text(encoding="utf-8")).items()
                if not name.startswith("_") and isinstance(value, list)
            }
        except (OSError, ValueError):
            components = set()
        files = [entry for entry in files if entry[0] == "model_index.json" or entry[0].split("/", 1)[0] in components]
    return {"path": str(path), "files": len(files), "digest": digest_of(files)}


def file_digest(path: str | Path) -> str:
    """The SHA-1 of the file's bytes (hex, 40 characters). Raises OSError when unreadable."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> list[Any]:
    """``[[name, sha1 or None], ...]`` of ``paths``, in their order (None: unreadable, which is
    itself part of the identity)."""
    out = []
    for path in paths:
        try:
            out.append([Path(path).name, file_digest(path)])
        except OSError:
            out.append([Path(path).name, None])
    return out
