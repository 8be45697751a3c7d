"""img2dataset's ``webdataset`` layout: tar shards ``{shard:05d}.tar`` of ``<key>.jpg``/``<key>.txt``/``<key>.json``.

Tars are read with the standard library as a stream (``tarfile`` mode ``r|*``): one pass,
one record's files in memory at a time, gzip-compressed shards too. As in WebDataset, the
files of a record are consecutive members that share the name up to the first dot of the
base name (``a/b/000123.jpg`` and ``a/b/000123.txt`` make the record ``a/b/000123``).

The key of a record is ``<shard stem>/<key in the tar>``, e.g. ``00003/000030017``.
Sharding: by file when there are at least ``world_size`` tar files, else by record (see
:mod:`pipeline.data.sharding`). A shard that breaks part-way (truncated download) keeps the
records read before the break; the loss is one ``unreadable file`` reject for that shard.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.assemble import clean_caption, decode_or_reject, parse_meta
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.shards import find_shards, shard_stem
from pipeline.data.sharding import check_shard, owns, split_files

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # in order of preference
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def iter_webdataset(
    path: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` from the tar file(s) at ``path``.

    ``path`` is a folder (its ``.tar`` files, sub-folders included, in name order) or one
    tar file. Checks the arguments at once; reading is lazy.
    """
    rank, world_size = check_shard(rank, world_size)
    shards = find_shards(path, TAR_SUFFIXES, "webdataset")
    rejects = rejects if rejects is not None else RejectLog()
    files, by_record = split_files(shards, rank, world_size)
    return _iter_tars(files, rank, world_size if by_record else 1, rejects, decode)


def _iter_tars(files: list[Path], rank: int, world_size: int, rejects: RejectLog, decode: bool) -> Iterator[Record]:
    # With world_size 1 here every record of ``files`` is ours (the split was by file).
    rank = rank if world_size > 1 else 0
    index = 0  # records seen so far over all files, the same on every rank
    for tar_path in files:
        stem = shard_stem(tar_path, TAR_SUFFIXES)
        seen: set[str] = set()  # keys of this shard so far (every rank tracks all)
        seen_all = 0  # records of this shard, all ranks'
        for sample in _tar_samples(tar_path, decode):
            if isinstance(sample, Exception):  # the shard broke; the rest of it is lost
                if owns(index, rank, world_size):  # one rank reports it
                    rejects.add(f"{stem}/*", str(tar_path), f"unreadable file: {sample}; the records after the first {seen_all} of this shard are lost")
                break
            tar_key, members = sample
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
            record = _make_record(key, members, f"{tar_path}:{tar_key}", rejects, decode)
            if record is not None:
                yield record


def _tar_samples(tar_path: Path, read_images: bool) -> Iterator[tuple[str, dict[str, bytes | None]] | Exception]:
    """Yield ``(key, {extension: bytes})`` per record in tar order; an error is yielded last.

    Image bytes are only read when ``read_images`` (else the value is ``None``).
    """
    key, members = None, {}
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
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
                        yield key, members
                    key, members = member_key, {}
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS and not read_images:
                    members[extension] = None
                else:
                    members[extension] = tar.extractfile(member).read()
    except READ_ERRORS as err:
        yield RuntimeError(f"{tar_path} is damaged ({type(err).__name__}: {err})")
        return
    if key is not None:
        yield key, members


def _make_record(key: str, members: dict[str, bytes | None], source: str, rejects: RejectLog, decode: bool) -> Record | None:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        rejects.add(key, source, f"missing image: the record has only {', '.join(sorted(members))}")
        return None
    if "txt" not in members:
        rejects.add(key, source, "missing caption: no .txt in the record")
        return None
    caption = clean_caption(members["txt"])
    if not caption:
        rejects.add(key, source, "missing caption: the .txt is empty")
        return None
    meta: dict | None = {}
    if "json" in members:
        meta = parse_meta(members["json"], key, source, rejects)
        if meta is None:
            return None
    image = None
    if decode:
        image = decode_or_reject(members[image_ext], key, f"{source}.{image_ext}", rejects)
        if image is None:
            return None
    return Record(key=key, caption=caption, image=image, meta=meta)
