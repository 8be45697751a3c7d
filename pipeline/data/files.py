"""img2dataset's ``files`` layout: ``name.jpg`` with ``name.txt`` and optionally ``name.json``.

Images may sit directly in the root or in sub-folders (img2dataset writes ``00000/``,
``00001/`` ...). The key of a record is its path relative to the root, without suffix
(``"00000/000000123"``, or ``"000123"`` for a flat folder).

What counts as a record: every name stem in a folder that has an image or a caption file.
So a caption without its image is reported (``missing image``) rather than ignored; a lone
``.json`` (img2dataset's ``00000_stats.json``) is not a record. Hidden files are skipped.
A caption or ``.json`` file above ``max_caption_bytes``/``max_metadata_bytes`` rejects its
record (``oversized caption``/``oversized metadata``); at most the limit and a byte are read.
Sharding is by record: record ``i`` of the walk goes to rank ``i % world_size``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.assemble import (
    MAX_CAPTION_BYTES,
    MAX_METADATA_BYTES,
    TextLimits,
    caption_or_reject,
    decode_or_reject,
    parse_meta,
    read_at_most,
)
from pipeline.data.errors import DataConfigError
from pipeline.data.location import Location, relative_file, sha1_of
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard, owns
from pipeline.data.walk import walk_sorted

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_image_files(root: Path) -> list[Path]:
    """All image files under ``root``, in the order the reader visits them."""
    return [
        folder / name
        for folder, names in walk_sorted(root)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
    ]


def group_by_stem(names: list[str]) -> dict[str, dict]:
    """``{stem: {"images": [...], "txt": name, "json": name}}`` for one folder's file names."""
    groups: dict[str, dict] = {}
    for name in names:
        stem, suffix = os.path.splitext(name)
        suffix = suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            groups.setdefault(stem, {}).setdefault("images", []).append(name)
        elif suffix in (".txt", ".json"):
            groups.setdefault(stem, {}).setdefault(suffix[1:], name)
    return groups


def iter_files(
    root: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` (record ``i`` goes to ``i % world_size``).

    Checks the arguments at once (a ``ValueError`` naming the key); reading is lazy.
    """
    root = Path(root)
    rank, world_size = check_shard(rank, world_size)
    limits = TextLimits.from_options(max_caption_bytes, max_metadata_bytes)
    if not root.exists():
        raise FileNotFoundError(f"data.path: {root} does not exist")
    if not root.is_dir():
        raise DataConfigError(f"data.path: {root} is not a folder; the files format reads a folder of name.jpg + name.txt")
    rejects = rejects if rejects is not None else RejectLog()
    return _iter_files(root, rank, world_size, rejects, decode, limits)


def _iter_files(root: Path, rank: int, world_size: int, rejects: RejectLog, decode: bool, limits: TextLimits) -> Iterator[Record]:
    index = 0  # records seen so far, in the walk's order (the same on every rank)

    def unlisted(folder: Path, err: OSError) -> None:
        if owns(index, rank, world_size):  # one rank reports it
            rejects.add(
                f"{folder.relative_to(root).as_posix()}/*", str(folder), f"unreadable file: cannot list the folder: {err}"
            )

    for folder, names in walk_sorted(root, on_error=unlisted):
        groups = group_by_stem(names)
        for stem in sorted(groups):
            group = groups[stem]
            if "images" not in group and "txt" not in group:
                continue
            index += 1
            if not owns(index - 1, rank, world_size):
                continue
            record = _read_record(root, folder, stem, group, rejects, decode, limits)
            if record is not None:
                yield record


def _read_record(
    root: Path, folder: Path, stem: str, group: dict, rejects: RejectLog, decode: bool, limits: TextLimits
) -> Record | None:
    key = (folder / stem).relative_to(root).as_posix()
    images = group.get("images", [])
    if not images:
        rejects.add(key, str(folder / group["txt"]), f"missing image: {group['txt']} has no image file beside it")
        return None
    image_path = folder / images[0]
    for extra in images[1:]:
        rejects.add(
            key, str(folder / extra), f"duplicate key: {extra} and {images[0]} share the key {key!r}; only {images[0]} is read"
        )

    if "txt" not in group:
        rejects.add(key, str(image_path), f"missing caption: no {stem}.txt")
        return None
    caption_path = folder / group["txt"]
    try:
        raw_caption = read_at_most(caption_path, limits.caption)
    except OSError as err:
        rejects.add(key, str(caption_path), f"unreadable caption: {err}")
        return None
    empty = "the caption file is empty"
    caption = caption_or_reject(raw_caption, key, str(caption_path), rejects, empty, limits.caption)
    if caption is None:
        return None

    meta: dict | None = {}
    if "json" in group:
        meta_path = folder / group["json"]
        try:
            meta = parse_meta(read_at_most(meta_path, limits.metadata), key, str(meta_path), rejects, limits.metadata)
        except OSError as err:
            rejects.add(key, str(meta_path), f"unreadable metadata: {err}")
            return None
        if meta is None:
            return None

    return read_image_record(root, image_path, key, caption, meta, rejects, decode)


def read_image_record(
    root: Path, image_path: Path, key: str, caption: str, meta: dict, rejects: RejectLog, decode: bool
) -> Record | None:
    """The record of an image file under ``root``, located by its path (its bytes read and
    decoded when ``decode``, else only its size taken); None when it is rejected."""
    image, data = None, None
    try:
        if decode:
            data = image_path.read_bytes()
        size = len(data) if data is not None else image_path.stat().st_size
    except OSError as err:
        rejects.add(key, str(image_path), f"unreadable file: {err}")
        return None
    if decode:
        image = decode_or_reject(data, key, str(image_path), rejects)
        if image is None:
            return None
    location = Location(relative_file(root, image_path), size=size, sha1=sha1_of(data))
    return Record(key=key, caption=caption, image=image, meta=meta, location=location)
