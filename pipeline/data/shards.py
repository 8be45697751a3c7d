"""Finding the shard files (``.tar``, ``.parquet``) of a data set given as a folder or one file."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.errors import DataConfigError
from pipeline.data.walk import list_files


def find_shards(path: str | Path, suffixes: tuple[str, ...], format: str) -> list[Path]:
    """The sorted shard files at ``path``: the file itself, or those under the folder.

    Raises ``FileNotFoundError``/``DataConfigError`` naming ``data.path`` when ``path`` is
    missing or is a file of another kind. An empty list means an empty data set.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if path.is_file():
        if not path.name.lower().endswith(suffixes):
            raise DataConfigError(f"data.path: {path} is not a {' or '.join(suffixes)} file, which the {format} format reads")
        return [path]
    return list_files(path, suffixes)


def shard_stem(path: Path, suffixes: tuple[str, ...]) -> str:
    """``00003`` for ``00003.tar`` or ``00003.tar.gz``: the shard's part of a record key."""
    name = path.name
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
