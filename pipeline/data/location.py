"""Where a record's image bytes lie in its data set, so that it can be read again alone.

Readers attach a :class:`Location` to every record they yield (``Record.location``); the
duplicate finder stores them as a location index (:mod:`pipeline.data.locations`), and
training images are then read by key with a seek, a row group or one file instead of a
stream over the whole set.

* ``webdataset``: the tar file, the byte offset of the image member's data and its size (a
  compressed tar cannot be read at an offset: its records have no location);
* ``parquet``: the file, the row group and the row within it;
* ``files`` and ``imagefolder``: the image file.

``file`` is a POSIX path relative to the data set's root (:func:`data_root`), so an index stays
valid when the set is mounted elsewhere. ``size`` is the image's byte count and ``sha1`` the
digest of its bytes when the reader read them (None when it did not: ``decode=False``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """The image bytes of one record: ``file`` (relative to the data set's root), ``offset``
    (tar: byte offset of the member's data; parquet: the row group; else 0), ``row`` (parquet:
    row within the row group; else -1), ``size`` (bytes; -1 when unknown) and ``sha1`` (the hex
    SHA-1 of the bytes, or its first 16 hex digits as the location index keeps it; or None)."""

    file: str
    offset: int = 0
    row: int = -1
    size: int = -1
    sha1: str | None = None


def data_root(path: str | Path) -> Path:
    """The folder locations are relative to: ``path`` when it is a folder, else its parent
    (a data set given as one ``.tar`` or ``.parquet`` file)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def relative_file(root: Path, file: Path) -> str:
    """``file`` as a POSIX path under ``root`` (its name alone when it is not under it)."""
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.name


def sha1_of(data: bytes | None) -> str | None:
    """The hex SHA-1 of ``data``; None for None."""
    return None if data is None else hashlib.sha1(data).hexdigest()
