"""The data layer: streaming readers for the formats LAION-style data comes in.

Every reader yields :class:`Record` objects for one shard (``rank`` of ``world_size``),
skips bad records into a :class:`RejectLog` (with the reason), and never holds the data
set in memory. Formats (:data:`READERS`):

* ``files``: img2dataset's files layout, ``name.jpg`` + ``name.txt`` (+ ``name.json``);
* ``webdataset``: tar shards of ``<key>.jpg`` + ``<key>.txt`` (+ ``<key>.json``);
* ``parquet``: image bytes and captions in columns (img2dataset's parquet output);
* ``imagefolder``: a folder of images with ``captions.csv`` or ``captions.jsonl``.

Text is bounded in every format: a record whose caption is above ``max_caption_bytes``
(64 KiB by default) or whose metadata is above ``max_metadata_bytes`` (1 MiB) is rejected
as a whole (``oversized caption``/``oversized metadata``), and a file or tar member above
its limit is never read (see :mod:`pipeline.data.assemble`). Both are options of every
reader, so ``data.max_caption_bytes=...`` sets them from the config.

Embeddings on disk in clip-retrieval's layout (what the duplicate finder writes and reads,
and the detector searches) are :mod:`pipeline.data.embeddings_store`'s.

Stages call :func:`iter_records` (or :func:`open_dataset` with the ``data`` config group):
wrong arguments raise at once, naming the config key (``data.format``, ``data.path``,
``data.caption_column``, ``rank``...); a shard that yields no record at all raises
:class:`EmptyDatasetError` when the stream ends, naming the path and the reject summary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.data.checks import require_records
from pipeline.data.errors import DataConfigError, EmptyDatasetError
from pipeline.data.files import iter_files
from pipeline.data.imagefolder import iter_imagefolder
from pipeline.data.images import BadImage, decode_image
from pipeline.data.key_table import read_key_table, rekey_by_url
from pipeline.data.parquet import iter_parquet
from pipeline.data.progress import with_progress
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.data.tars import iter_webdataset

READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "files": iter_files,
    "webdataset": iter_webdataset,
    "parquet": iter_parquet,
    "imagefolder": iter_imagefolder,
}

# Keys of a ``data`` config group that describe the data set but are not reader options
# (``locations``: the folder of its location index, :mod:`pipeline.data.locations`;
# ``key_table``: records keyed by URL from another list, :mod:`pipeline.data.key_table`).
NON_READER_KEYS = frozenset({"format", "path", "ground_truth", "name", "locations", "key_table"})
_COMMON_ARGS = frozenset({"path", "root", "rank", "world_size", "rejects", "decode"})


def reader_options(format: str) -> list[str]:
    """The options (beyond path, rank, world_size, rejects, decode) that ``format`` takes."""
    return [name for name in inspect.signature(READERS[format]).parameters if name not in _COMMON_ARGS]


def iter_records(
    format: str,
    path: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    progress: bool = False,
    require_nonempty: bool = True,
    **options: Any,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` of the data set at ``path``.

    Args:
        format: one of :data:`READERS`.
        path: the data set's folder (or, for ``webdataset``/``parquet``, one shard file).
        rank, world_size: which shard; every record belongs to exactly one rank.
        rejects: where skipped records go (a ``RejectLog(path)`` also writes JSON lines);
            a fresh in-memory log when None.
        decode: False yields ``image=None`` without reading image bytes.
        progress: show a tqdm bar on stderr (count, rate, rejects so far).
        require_nonempty: raise ``EmptyDatasetError`` at the end if no record was yielded.
        options: format options, e.g. ``caption_column`` for parquet, or in every format
            ``max_caption_bytes`` and ``max_metadata_bytes`` (positive integers; see
            :func:`reader_options`).

    Raises at once (before the first record): ``DataConfigError`` (a ``ValueError``) or
    ``FileNotFoundError`` with a message that starts with the config key at fault.
    """
    if format not in READERS:
        raise DataConfigError(f"data.format: unknown format {format!r}; expected one of {sorted(READERS)}")
    if path is None or str(path) in ("", "???"):
        raise DataConfigError("data.path: not set; give the data set's location, e.g. data.path=/data/laion")
    if not Path(path).exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    known = reader_options(format)
    for name in options:
        if name not in known:
            raise DataConfigError(f"data.{name}: not an option of the {format} format; it takes {known or 'no options'}")
    rank, world_size = check_shard(rank, world_size)
    rejects = rejects if rejects is not None else RejectLog()
    records = READERS[format](path, rank=rank, world_size=world_size, rejects=rejects, decode=decode, **options)
    if require_nonempty:
        records = require_records(records, path, rejects, rank, world_size)
    shard = f" [rank {rank}/{world_size}]" if world_size > 1 else ""
    return with_progress(records, f"reading {Path(path).name}{shard}", rejects, enabled=progress)


def open_dataset(
    data: Mapping[str, Any],
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    progress: bool = True,
    require_nonempty: bool = True,
) -> Iterator[Record]:
    """:func:`iter_records` for a ``data`` config group (``conf/data/*.yaml``, a dict or DictConfig).

    ``data.format`` and ``data.path`` are required; ``ground_truth``, ``name`` and ``locations``
    are ignored; ``key_table`` keys each record by its URL (:mod:`pipeline.data.key_table`);
    every other key is a reader option (a key the format does not take raises).
    Progress is on by default, as a stage wants it.
    """
    values = _plain(data)
    for key in ("format", "path"):
        if values.get(key) in (None, "", "???"):
            raise DataConfigError(f"data.{key}: not set; pick a conf/data/*.yaml or pass data.{key}=...")
    options = {k: v for k, v in values.items() if k not in NON_READER_KEYS}
    keys_by_url = read_key_table(values["key_table"]) if values.get("key_table") else None
    rejects = rejects if rejects is not None else RejectLog()
    records = iter_records(
        values["format"],
        values["path"],
        rank=rank,
        world_size=world_size,
        rejects=rejects,
        decode=decode,
        progress=progress,
        require_nonempty=require_nonempty,
        **options,
    )
    return records if keys_by_url is None else rekey_by_url(records, keys_by_url, rejects)


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict; OmegaConf's mandatory ``???`` values stay ``"???"`` instead of raising."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data, DictConfig):
            return OmegaConf.to_container(data, resolve=True, throw_on_missing=False)
    except ImportError:  # plain dicts need no omegaconf
        pass
    return dict(data)


__all__ = [
    "READERS",
    "BadImage",
    "DataConfigError",
    "EmptyDatasetError",
    "Record",
    "RejectLog",
    "decode_image",
    "iter_files",
    "iter_imagefolder",
    "iter_parquet",
    "iter_records",
    "iter_webdataset",
    "open_dataset",
    "reader_options",
    "require_records",
    "with_progress",
]
