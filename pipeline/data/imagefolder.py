"""A plain folder of images with one captions file: ``captions.csv`` or ``captions.jsonl``.

``captions.csv`` has a header with (at least) the columns ``file,caption``; each line of
``captions.jsonl`` is ``{"file": ..., "caption": ...}``. ``file`` is the image's path
relative to the folder; other columns or fields go to ``Record.meta``. The column names
are configurable (``file_column``, ``caption_column``), and so is the captions file
(``captions``, relative to the folder or absolute).

The key of a record is its file path without suffix (``"cats/001"``). A record is a row of
the captions file; an image under the folder that no row names is reported as a
``missing caption`` reject, after the rows. A row naming a file outside the folder (an
absolute path, ``..``, or a symlink leading out: see :func:`pipeline.data.paths.path_under`)
is rejected as ``missing image`` and its file is never read. Sharding is by record: row ``i`` (then the
unlisted images, in walk order) goes to rank ``i % world_size``. The captions file is read
as a stream; the set of listed paths is kept to find unlisted images and duplicates.

The captions file should be UTF-8: a row with a field that is not (an invalid byte) is
rejected as ``unreadable caption`` and the reading goes on; a header that is not raises
``DataConfigError``. A file that cannot be read further (an I/O error, a CSV field over
the csv module's limit) loses its remaining rows: one reject, counted as the one row known
lost, the reason saying it is a lower bound.

A row whose caption holds more than ``max_caption_bytes`` or whose other fields (as JSON)
more than ``max_metadata_bytes`` is rejected (``oversized caption``/``oversized metadata``).
A JSON line too long to hold such a row (see :func:`_row_limit`) is rejected as
``oversized row`` without being held whole or parsed.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.assemble import (
    MAX_CAPTION_BYTES,
    MAX_METADATA_BYTES,
    TextLimits,
    TooLarge,
    caption_or_reject,
    text_size,
    utf8_problem,
)
from pipeline.data.errors import DataConfigError
from pipeline.data.files import IMAGE_SUFFIXES, read_image_record
from pipeline.data.paths import UnsafePath, path_under
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard, owns
from pipeline.data.walk import walk_sorted

CAPTION_FILES = ("captions.csv", "captions.jsonl")


def iter_imagefolder(
    path: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    captions: str | None = None,
    file_column: str = "file",
    caption_column: str = "caption",
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` of the image folder at ``path``.

    Checks at once: the folder, the captions file (``data.captions``) and, for a CSV, its
    header (``data.file_column``, ``data.caption_column``), and the size limits. Reading is lazy.
    """
    rank, world_size = check_shard(rank, world_size)
    limits = TextLimits.from_options(max_caption_bytes, max_metadata_bytes)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data.path: {root} does not exist")
    if not root.is_dir():
        raise DataConfigError(f"data.path: {root} is not a folder; the imagefolder format reads a folder of images")
    captions_path = find_captions(root, captions)
    if captions_path.suffix.lower() == ".csv":
        check_csv_header(captions_path, file_column, caption_column)
    rejects = rejects if rejects is not None else RejectLog()
    columns = (file_column, caption_column)
    return _iter_imagefolder(root, captions_path, columns, limits, rank, world_size, rejects, decode)


def find_captions(root: Path, captions: str | None) -> Path:
    if captions is not None:
        path = root / captions  # an absolute ``captions`` replaces ``root``
        if not path.is_file():
            raise DataConfigError(f"data.captions: {path} does not exist")
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise DataConfigError(f"data.captions: {path} must be a .csv or .jsonl file")
        return path
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
        raise DataConfigError(
            f"data.path: {root} has neither {' nor '.join(CAPTION_FILES)}; the imagefolder format needs one "
            "(or set data.captions to the captions file)"
        )
    if len(found) > 1:
        raise DataConfigError(
            f"data.captions: {root} has both {' and '.join(CAPTION_FILES)}; set data.captions to the one to read"
        )
    return found[0]


def check_csv_header(path: Path, file_column: str, caption_column: str) -> None:
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader(f), None)
    except csv.Error as err:
        raise DataConfigError(f"data.captions: cannot read the header of {path}: {err}") from None
    if header is None:
        return  # an empty file: an empty data set, reported when read
    problem = utf8_problem(header)
    if problem is not None:
        raise DataConfigError(f"data.captions: the header of {path} is not valid UTF-8 ({problem}); save it as UTF-8")
    for key, column in (("data.file_column", file_column), ("data.caption_column", caption_column)):
        if column not in header:
            raise DataConfigError(f"{key}: no column {column!r} in {path} (columns: {', '.join(header)})")


def _row_limit(limits: TextLimits) -> int:
    """The most bytes a JSON line can take to hold a row within ``limits``: a JSON escape
    takes up to 6 bytes a character (``\\u00e9``), and the file path up to 4096 (PATH_MAX)."""
    return 6 * (limits.caption + limits.metadata) + 4096


def _lines(f, limit: int) -> Iterator[bytes | TooLarge]:
    """The lines of the binary file ``f``; a line of more than ``limit`` bytes comes as a ``TooLarge``,
    read through in pieces of ``limit`` bytes, never held whole."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(limit + 1)
        yield TooLarge(limit, exact=False)


def _rows(path: Path, limits: TextLimits) -> Iterator[tuple[str, dict | None, str]]:
    """``(row label, fields, reason)`` per row of the captions file; ``reason`` is "" for a good row.

    A row that is not valid UTF-8 is a problem of that row alone: the file is decoded with
    ``surrogateescape`` (CSV) or line by line (JSON lines), so an invalid byte never stops
    the reading, and its row's ``fields`` are still given (to know which image it lists).
    ``fields`` is None when the row cannot be parsed at all, or is too long to be read.
    """
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            for fields in reader:
                label = f"line {reader.line_num}"
                yield label, fields, _not_utf8(label, fields)
        return
    with path.open("rb") as f:
        for line_number, raw in enumerate(_lines(f, _row_limit(limits)), 1):
            label = f"line {line_number}"
            if isinstance(raw, TooLarge):
                yield (
                    label,
                    None,
                    (
                        f"oversized row: {label} holds more than {raw.size} bytes, more than a row within "
                        "data.max_caption_bytes and data.max_metadata_bytes can take"
                    ),
                )
                continue
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            line = raw.decode("utf-8", errors="surrogateescape")
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError as err:
                yield label, None, f"unreadable caption: {label} is not JSON: {err}"
                continue
            if not isinstance(fields, dict):
                yield label, None, f"unreadable caption: {label} is not a JSON object"
                continue
            yield label, fields, _not_utf8(label, fields)


def _not_utf8(label: str, fields: dict) -> str:
    """The reason to reject a row with a field that is not valid UTF-8, or ""."""
    problem = utf8_problem(fields)
    return "" if problem is None else f"unreadable caption: not valid UTF-8 ({label}, {problem})"


def _iter_imagefolder(
    root: Path,
    captions_path: Path,
    columns: tuple[str, str],
    limits: TextLimits,
    rank: int,
    world_size: int,
    rejects: RejectLog,
    decode: bool,
) -> Iterator[Record]:
    file_column = columns[0]
    listed: set[str] = set()  # every listed path, all ranks' (to find unlisted images)
    keys: set[str] = set()
    index = 0
    try:
        for label, fields, reason in _rows(captions_path, limits):
            index += 1
            source = f"{captions_path}:{label}"
            rel = _relative_path(fields.get(file_column)) if fields is not None else None
            # A path with an undecodable byte still names its image (file names are read
            # the same way), but cannot be a key: keys are written as UTF-8.
            readable = rel is not None and utf8_problem(rel) is None
            key = posixpath.splitext(rel)[0] if readable else f"{captions_path.name}:{label}"
            duplicate = key in keys
            if rel:
                listed.add(rel)
                keys.add(key)
            if not owns(index - 1, rank, world_size):
                continue
            if reason:
                rejects.add(key, source, reason)
            elif not rel:
                value = fields.get(file_column)
                what = "no file" if not value else f"the file {value!r} is outside {root}"
                rejects.add(key, source, f"missing image: {what}")
            elif duplicate:
                rejects.add(key, source, f"duplicate key: {key!r} is listed twice in {captions_path.name}")
            else:
                record = _make_record(root, rel, key, fields, columns, limits, source, rejects, decode)
                if record is not None:
                    yield record
    except (OSError, csv.Error) as err:
        # The rows after the break cannot be counted without parsing them; the one that
        # broke is known lost. Its owner reports it (the unread rows' images would all look
        # unlisted: this one reject says it instead).
        if owns(index, rank, world_size):
            rejects.add(
                f"{captions_path.name}:*",
                str(captions_path),
                f"unreadable caption: {err}; the rows after the first {index} are lost: at least 1 row "
                "(the rest of the file cannot be read to count them)",
            )
        return

    for folder, names in walk_sorted(root):
        for name in names:
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            rel = (folder / name).relative_to(root).as_posix()
            if rel in listed:
                continue
            index += 1
            if owns(index - 1, rank, world_size):
                rejects.add(
                    posixpath.splitext(rel)[0],
                    str(folder / name),
                    f"missing caption: {rel} is not listed in {captions_path.name}",
                )


def _relative_path(value) -> str | None:
    """``value`` as a normalised path inside the folder, or None when it is empty or leaves it."""
    if value is None or not str(value).strip():
        return None
    rel = posixpath.normpath(str(value).strip())
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../"):
        return None
    return rel


def _make_record(
    root: Path,
    rel: str,
    key: str,
    fields: dict,
    columns: tuple[str, str],
    limits: TextLimits,
    source: str,
    rejects: RejectLog,
    decode: bool,
) -> Record | None:
    file_column, caption_column = columns
    empty = f"{caption_column!r} is empty or absent"
    caption = caption_or_reject(fields.get(caption_column), key, source, rejects, empty, limits.caption)
    if caption is None:
        return None
    meta = {k: v for k, v in fields.items() if k not in (file_column, caption_column)}
    meta_size = text_size(json.dumps(meta, ensure_ascii=False))
    if meta_size > limits.metadata:
        rejects.add(key, source, TooLarge(meta_size).reason("metadata", "max_metadata_bytes", limits.metadata))
        return None
    try:
        image_path = path_under(root, rel)
    except UnsafePath as err:
        rejects.add(key, source, f"missing image: the file {err}")
        return None
    if not image_path.is_file():
        rejects.add(key, str(image_path), "unreadable file: no such file")
        return None
    return read_image_record(root, image_path, key, caption, meta, rejects, decode)
