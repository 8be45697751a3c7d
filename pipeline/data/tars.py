"""img2dataset's ``webdataset`` layout: tar shards ``{shard:05d}.tar`` of ``<key>.jpg``/``<key>.txt``/``<key>.json``.

Tars are read with the standard library as a stream (``tarfile`` mode ``r|*``): one pass,
one record's files in memory at a time, gzip-compressed shards too. As in WebDataset, the
files of a record are consecutive members that share the name up to the first dot of the
base name (``a/b/000123.jpg`` and ``a/b/000123.txt`` make the record ``a/b/000123``).

The key of a record is ``<shard stem>/<key in the tar>``, e.g. ``00003/000030017``.
Sharding: by file when there are at least ``world_size`` tar files, else by record (see
:mod:`pipeline.data.sharding`).

A shard that breaks part-way (a truncated download, also one cut at a member boundary: a
tar must end with its end-of-archive marker) keeps the records read before the break; the
record being read at the break is lost with those after it. They are logged as one
``unreadable file`` entry whose count is the records lost: img2dataset's sidecar beside
``{shard}.tar`` (``{shard}_stats.json`` or the metadata table ``{shard}.parquet``, which are
never read as data) says how many the shard holds; without one the count is the one record
known lost, and the reason says it is a lower bound.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.assemble import (
    MAX_CAPTION_BYTES,
    MAX_METADATA_BYTES,
    TextLimits,
    TooLarge,
    caption_or_reject,
    decode_or_reject,
    parse_meta,
)
from pipeline.data.location import Location, data_root, relative_file, sha1_of
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import add_lost, check_shard, owns, split_files
from pipeline.data.shards import find_shards, shard_stem

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # in order of preference
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def iter_webdataset(
    path: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` from the tar file(s) at ``path``.

    ``path`` is a folder (its ``.tar`` files, sub-folders included, in name order) or one
    tar file. Checks the arguments at once; reading is lazy. A record whose ``.txt`` holds
    more than ``max_caption_bytes`` or whose ``.json`` more than ``max_metadata_bytes`` is
    rejected (``oversized caption``/``oversized metadata``) with that member left unread;
    members of other kinds than image, ``.txt`` and ``.json`` are never read.
    """
    rank, world_size = check_shard(rank, world_size)
    limits = TextLimits.from_options(max_caption_bytes, max_metadata_bytes)
    shards = find_shards(path, TAR_SUFFIXES, "webdataset")
    rejects = rejects if rejects is not None else RejectLog()
    files, by_record = split_files(shards, rank, world_size)
    return _iter_tars(files, data_root(path), rank, world_size if by_record else 1, rejects, decode, limits)


def _iter_tars(
    files: list[Path], root: Path, rank: int, world_size: int, rejects: RejectLog, decode: bool, limits: TextLimits
) -> Iterator[Record]:
    # With world_size 1 here every record of ``files`` is ours (the split was by file).
    rank = rank if world_size > 1 else 0
    index = 0  # records seen so far over all files, the same on every rank
    for tar_path in files:
        stem = shard_stem(tar_path, TAR_SUFFIXES)
        # A compressed tar cannot be read at an offset: its records have no location.
        file = relative_file(root, tar_path) if tar_path.name.lower().endswith(".tar") else None
        seen: set[str] = set()  # keys of this shard so far (every rank tracks all)
        seen_all = 0  # records of this shard, all ranks'
        for sample in _tar_samples(tar_path, decode, limits):
            if isinstance(sample, _Break):  # the shard broke; the rest of it is lost
                _add_break(tar_path, stem, sample, seen_all, index, rank, world_size, rejects)
                break
            tar_key, members, spans = sample
            seen_all += 1
            index += 1
            duplicate = tar_key in seen
            seen.add(tar_key)
            if not owns(index - 1, rank, world_size):
                continue
            key = f"{stem}/{tar_key}"
            if duplicate:
                rejects.add(key, str(tar_path), f"duplicate key: {tar_key!r} appears twice in {tar_path.name}")
                continue
            record = _make_record(key, members, f"{tar_path}:{tar_key}", rejects, decode, limits)
            if record is not None:
                if file is not None:
                    ext = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
                    offset, size = spans[ext]
                    record.location = Location(file, offset=offset, size=size, sha1=sha1_of(members[ext]))
                yield record


@dataclass(frozen=True)
class _Break:
    """Where a shard stopped being readable: why, and the record it was reading (None before the first)."""

    error: str
    pending: str | None


class _TarInfo(tarfile.TarInfo):
    """Notes on its ``TarFile`` whether the last header it read was the archive's end marker.

    tarfile ends a stream quietly when the file stops at or inside a header, as a truncated
    download can; only an all-zero block (``EOFHeaderError``) is the archive's real end.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.reached_end_marker = isinstance(err, tarfile.EOFHeaderError)
            raise


def _tar_samples(
    tar_path: Path, read_images: bool, limits: TextLimits
) -> Iterator[tuple[str, dict[str, bytes | TooLarge | None], dict[str, tuple[int, int]]] | _Break]:
    """Yield ``(key, {extension: bytes}, {extension: (data offset, size)})`` per record in tar
    order; a ``_Break`` ends a damaged shard.

    Image bytes are only read when ``read_images``, and members that are not an image, a
    ``.txt`` or a ``.json`` never (the value is ``None``). A ``.txt`` or ``.json`` above its
    limit is not read either: its header's size decides (the value is a ``TooLarge``). At a
    break, the record being read is not yielded: it may lack members.
    """
    text_limits = {"txt": limits.caption, "json": limits.metadata}
    key, members, spans = None, {}, {}
    try:
        with tarfile.open(tar_path, mode="r|*", tarinfo=_TarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                name, extension = base.split(".", 1)
                member_key = posixpath.join(folder, name)
                if member_key != key:
                    if key is not None:
                        yield key, members, spans
                    key, members, spans = member_key, {}, {}
                extension = extension.lower()
                spans[extension] = (member.offset_data, member.size)
                if extension in IMAGE_EXTENSIONS:
                    members[extension] = tar.extractfile(member).read() if read_images else None
                elif extension in text_limits:
                    too_large = member.size > text_limits[extension]
                    members[extension] = TooLarge(member.size) if too_large else tar.extractfile(member).read()
                else:  # the stream skips what is not read
                    members[extension] = None
            if not getattr(tar, "reached_end_marker", False):
                raise tarfile.ReadError("the file ends without the tar end-of-archive marker (truncated)")
    except READ_ERRORS as err:
        yield _Break(f"{tar_path} is damaged ({type(err).__name__}: {err})", key)
        return
    if key is not None:
        yield key, members, spans


def _add_break(
    tar_path: Path, stem: str, broken: _Break, read: int, start: int, rank: int, world_size: int, rejects: RejectLog
) -> None:
    """Log the records a shard lost where it broke: ``read`` were read; the next is record number ``start``.

    The records after the break cannot be seen in the tar. img2dataset's sidecar says how
    many it wrote; without one, the record being read (when there was one) is the count
    known, and the reason says it is a lower bound.
    """
    reason = f"unreadable file: {broken.error}; the records after the first {read} of this shard are lost"
    written = _sidecar_successes(tar_path, stem)
    if written is not None:
        n_written, sidecar = written
        lost = max(n_written - read, 1 if broken.pending is not None else 0)
        if not lost:
            return  # the sidecar says every record was read before the break
        reason += f": {lost} records ({sidecar} says the shard has {n_written})"
    else:
        lost = 1
        what = f"{broken.pending!r}, being read at the break" if broken.pending is not None else "the shard's first"
        reason += f": at least 1 record ({what}; no {stem}_stats.json or {stem}.parquet beside it says how many followed)"
    add_lost(rejects, f"{stem}/*", str(tar_path), reason, start, lost, rank, world_size)


def _sidecar_successes(tar_path: Path, stem: str) -> tuple[int, str] | None:
    """How many records img2dataset wrote into the shard, and the sidecar file that says so.

    img2dataset writes beside ``{stem}.tar`` its stats, ``{stem}_stats.json`` (``successes``),
    and its metadata table, ``{stem}.parquet`` (one row per URL, ``status`` ``success`` for
    those in the tar). None when neither is there and readable.
    """
    stats = tar_path.with_name(f"{stem}_stats.json")
    try:
        successes = json.loads(stats.read_bytes())["successes"]
        if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0:
            return successes, stats.name
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stats, or not img2dataset's: try the table
    table = tar_path.with_name(f"{stem}.parquet")
    try:
        status = pq.read_table(table, columns=["status"]).column("status")
        return pc.sum(pc.equal(status, "success")).as_py() or 0, table.name
    except (OSError, pa.ArrowException):
        return None


def _make_record(
    key: str, members: dict[str, bytes | TooLarge | None], source: str, rejects: RejectLog, decode: bool, limits: TextLimits
) -> Record | None:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        rejects.add(key, source, f"missing image: the record has only {', '.join(sorted(members))}")
        return None
    if "txt" not in members:
        rejects.add(key, source, "missing caption: no .txt in the record")
        return None
    caption = caption_or_reject(members["txt"], key, source, rejects, "the .txt is empty", limits.caption)
    if caption is None:
        return None
    meta: dict | None = {}
    if "json" in members:
        meta = parse_meta(members["json"], key, source, rejects, limits.metadata)
        if meta is None:
            return None
    image = None
    if decode:
        image = decode_or_reject(members[image_ext], key, f"{source}.{image_ext}", rejects)
        if image is None:
            return None
    return Record(key=key, caption=caption, image=image, meta=meta)
