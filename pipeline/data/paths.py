"""Paths named by untrusted text: a training key from another tool's table, a captions file's row.

Such a name is only ever joined to its data set's folder; :func:`path_under` refuses one
that would lead anywhere else, before anything is read.
"""

from __future__ import annotations

import posixpath
from pathlib import Path


class UnsafePath(ValueError):
    """A name that would lead outside its folder; the message names it and says how: ``'../x' has a '..' component``."""


def path_under(root: str | Path, name: str) -> Path:
    """``root / name`` when that path stays inside ``root``; else raise :class:`UnsafePath`.

    ``name`` is a relative POSIX path. Refused: a name that is not a non-empty string, is
    absolute, has a ``..`` component, or holds a NUL or a backslash (a Windows separator);
    and one whose path, symlinks followed, resolves outside ``root`` resolved (``root``
    itself may be a symlink). The path need not exist.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{name!r} is not a non-empty path")
    if "\x00" in name:
        raise UnsafePath(f"{name!r} holds a NUL byte")
    if "\\" in name:
        raise UnsafePath(f"{name!r} holds a backslash")
    if posixpath.isabs(name):
        raise UnsafePath(f"{name!r} is an absolute path")
    if ".." in name.split("/"):
        raise UnsafePath(f"{name!r} has a '..' component")
    root = Path(root)
    path = root / name
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise UnsafePath(f"{name!r} cannot be resolved under {root} ({err})") from None
    if not inside:
        raise UnsafePath(f"{name!r} resolves outside {root} (through a symlink)")
    return path
