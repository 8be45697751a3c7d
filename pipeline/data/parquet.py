"""Parquet files of image bytes and captions, as img2dataset's ``parquet`` output writes them.

img2dataset's columns: ``key`` (str), ``jpg`` (encoded image bytes, null for a failed
download), ``txt`` and ``caption`` (the caption), ``status``, ``error_message``, ``url``,
``width``, ``height`` ... The image column may also be a Hugging Face ``Image`` struct
(``{"bytes": ..., "path": ...}``). Files are read in batches of ``batch_size`` rows with
pyarrow (never the whole file), and only the columns needed.

The key of a record is the ``key_column`` value when the file has that column, else
``<file stem>/<row index>``. Sharding: by file when there are at least ``world_size``
files, else by row (see :mod:`pipeline.data.sharding`). Other columns (except binary ones)
go to ``Record.meta``.

A caption (text or bytes) or another string that is not valid UTF-8 rejects its row, and so
does a caption of more than ``max_caption_bytes`` or other text columns (strings) of more than
``max_metadata_bytes`` together (``oversized caption``/``oversized metadata``): the file's
batch holds them already, but they are never converted to Python objects nor kept. A file
that cannot be read is logged as one ``unreadable file`` entry counting the rows it loses:
all of them when the image or caption column is missing, those after the break when it
breaks part-way, and "at least 1" when even its footer (the row count) is unreadable.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator
from dataclasses import dataclass, replace
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
    utf8_problem,
)
from pipeline.data.errors import DataConfigError
from pipeline.data.location import Location, data_root, relative_file, sha1_of
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import add_lost, check_shard, owns, split_files
from pipeline.data.shards import find_shards

PARQUET_SUFFIXES = (".parquet",)
# Tried in order when ``caption_column`` is not set; img2dataset writes both.
DEFAULT_CAPTION_COLUMNS = ("caption", "txt")
READ_ERRORS = (OSError, pa.ArrowException)


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str
    key: str | None


def iter_parquet(
    path: str | Path,
    rank: int = 0,
    world_size: int = 1,
    rejects: RejectLog | None = None,
    decode: bool = True,
    image_column: str = "jpg",
    caption_column: str | None = None,
    key_column: str | None = "key",
    batch_size: int = 256,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> Iterator[Record]:
    """Stream the records of shard ``rank`` of ``world_size`` from the parquet file(s) at ``path``.

    ``path`` is a folder (its ``.parquet`` files, sub-folders included, in name order) or
    one file. ``caption_column=None`` takes ``caption``, else ``txt``. The columns are checked
    at once against the first readable file: a missing one raises ``DataConfigError`` naming
    ``data.image_column`` or ``data.caption_column``, as do the size limits. Reading is lazy.
    """
    rank, world_size = check_shard(rank, world_size)
    limits = TextLimits.from_options(max_caption_bytes, max_metadata_bytes)
    try:
        batch_size = operator.index(batch_size)
    except TypeError:
        batch_size = 0
    if batch_size < 1:
        raise DataConfigError(f"data.batch_size: must be a positive integer, got {batch_size!r}")
    shards = find_shards(path, PARQUET_SUFFIXES, "parquet")
    rejects = rejects if rejects is not None else RejectLog()
    columns = resolve_columns(shards, image_column, caption_column, key_column)
    files, by_record = split_files(shards, rank, world_size)
    root = data_root(path)
    return _iter_parquet(files, root, columns, rank, world_size if by_record else 1, rejects, decode, batch_size, limits)


def is_image_type(type_: pa.DataType) -> bool:
    """Encoded bytes, or a struct with a ``bytes`` field (the Hugging Face ``Image`` feature)."""
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return True
    return pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0


def resolve_columns(shards: list[Path], image_column: str, caption_column: str | None, key_column: str | None) -> Columns:
    """Check the configured columns against the first readable file's schema."""
    schema = None
    for shard in shards:
        try:
            schema, where = pq.read_schema(shard), shard
            break
        except READ_ERRORS:
            continue  # reported as a reject when the reader reaches it
    if schema is None:  # no file, or none readable: nothing to check against
        return Columns(image_column, caption_column or DEFAULT_CAPTION_COLUMNS[0], key_column)
    names = schema.names
    listing = f"(columns: {', '.join(names)})"
    if image_column not in names:
        raise DataConfigError(f"data.image_column: no column {image_column!r} in {where} {listing}")
    if not is_image_type(schema.field(image_column).type):
        raise DataConfigError(
            f"data.image_column: column {image_column!r} in {where} holds {schema.field(image_column).type}, "
            "not encoded image bytes"
        )
    if caption_column is None:
        caption_column = next((c for c in DEFAULT_CAPTION_COLUMNS if c in names), None)
        if caption_column is None:
            raise DataConfigError(
                f"data.caption_column: not set and none of {', '.join(DEFAULT_CAPTION_COLUMNS)} is a column of {where}; "
                f"set it to the caption column {listing}"
            )
    elif caption_column not in names:
        raise DataConfigError(f"data.caption_column: no column {caption_column!r} in {where} {listing}")
    return Columns(image_column, caption_column, key_column)


def _iter_parquet(
    files: list[Path],
    root: Path,
    columns: Columns,
    rank: int,
    world_size: int,
    rejects: RejectLog,
    decode: bool,
    batch_size: int,
    limits: TextLimits,
) -> Iterator[Record]:
    # With world_size 1 here every row of ``files`` is ours (the split was by file).
    rank = rank if world_size > 1 else 0
    offset = 0  # rows in the files before this one, the same on every rank
    for shard in files:
        stem = shard.stem
        try:
            parquet_file = pq.ParquetFile(shard)
            schema = parquet_file.schema_arrow
        except READ_ERRORS as err:
            # Its row count is in the footer that failed, so its rows take no record numbers.
            reason = f"unreadable file: {type(err).__name__}: {err}; at least 1 record lost (its row count is unreadable)"
            add_lost(rejects, f"{stem}/*", str(shard), reason, offset, 1, rank, world_size)
            continue
        n_rows = parquet_file.metadata.num_rows
        file = relative_file(root, shard)
        # The first row of each row group: a row's location is its group and its place in it.
        group_starts = [0]
        for i in range(parquet_file.metadata.num_row_groups - 1):
            group_starts.append(group_starts[-1] + parquet_file.metadata.row_group(i).num_rows)
        missing = [c for c in (columns.image, columns.caption) if c not in schema.names]
        if missing:
            reason = f"unreadable file: no column {missing[0]!r}; its {n_rows} rows are skipped"
            add_lost(rejects, f"{stem}/*", str(shard), reason, offset, n_rows, rank, world_size)
            offset += n_rows
            continue
        key_column = columns.key if columns.key in schema.names else None
        wanted = [f.name for f in schema if f.name in (columns.image, columns.caption, key_column) or not is_image_type(f.type)]
        row = 0
        seen: set[str] = set()
        try:
            for batch in parquet_file.iter_batches(batch_size=batch_size, columns=wanted):
                batch, oversized = _drop_oversized(batch, columns, limits)
                for (values, bad_text), too_large in zip(_rows(batch), oversized):
                    row_index, row = row, row + 1  # ``row`` counts the rows read so far
                    key = _key(values, key_column, stem, row_index)
                    duplicate = key in seen
                    seen.add(key)
                    if not owns(offset + row_index, rank, world_size):
                        continue
                    source = f"{shard}:row {row_index}"
                    if duplicate:
                        rejects.add(key, source, f"duplicate key: {key!r} appears twice in {shard.name}")
                    elif too_large is not None:
                        rejects.add(key, source, too_large)
                    elif bad_text is not None:
                        column, problem = bad_text
                        kind = "unreadable caption" if column == columns.caption else "unreadable metadata"
                        rejects.add(key, source, f"{kind}: not valid UTF-8 (column {column!r}: {problem})")
                    else:
                        group = bisect.bisect_right(group_starts, row_index) - 1
                        place = Location(file, offset=group, row=row_index - group_starts[group])
                        record = _make_record(key, values, columns, source, rejects, decode, place)
                        if record is not None:
                            yield record
        except READ_ERRORS as err:
            reason = f"unreadable file: {type(err).__name__}: {err}; rows {row} to {n_rows - 1} of this file are lost"
            add_lost(rejects, f"{stem}/*", str(shard), reason, offset + row, n_rows - row, rank, world_size)
        offset += n_rows


def _text_bytes(column: pa.Array) -> pa.Array | None:
    """The size in bytes of each value of a string or binary column (0 for null); None for other types."""
    if not (
        pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
        or pa.types.is_binary(column.type)
        or pa.types.is_large_binary(column.type)
    ):
        return None
    return pc.fill_null(pc.binary_length(column), 0).cast(pa.int64())


def _drop_oversized(batch: pa.RecordBatch, columns: Columns, limits: TextLimits) -> tuple[pa.RecordBatch, list[str | None]]:
    """``batch`` with the text of rows above a limit set to null, and per row the reason to reject it (None: within).

    The caption column is measured against ``limits.caption``; the other string and binary
    columns but the image and key, summed, against ``limits.metadata``.
    """
    names = batch.schema.names
    caption = _text_bytes(batch.column(names.index(columns.caption)))
    meta_names = [n for n in names if n not in (columns.image, columns.caption, columns.key)]
    meta_sizes = [size for size in (_text_bytes(batch.column(names.index(n))) for n in meta_names) if size is not None]
    zeros = pa.array([0] * batch.num_rows, pa.int64())
    meta = zeros
    for size in meta_sizes:
        meta = pc.add(meta, size)
    caption = zeros if caption is None else caption
    over = pc.or_(pc.greater(caption, limits.caption), pc.greater(meta, limits.metadata))
    if not pc.any(over).as_py():
        return batch, [None] * batch.num_rows
    reasons = [
        TooLarge(c).reason("caption", "max_caption_bytes", limits.caption)
        if c > limits.caption
        else TooLarge(m).reason("metadata", "max_metadata_bytes", limits.metadata)
        if m > limits.metadata
        else None
        for c, m in zip(caption.to_pylist(), meta.to_pylist())
    ]
    for i, name in enumerate(names):
        if name == columns.caption or (name in meta_names and _text_bytes(batch.column(i)) is not None):
            column = batch.column(i)
            batch = batch.set_column(i, name, pc.if_else(over, pa.scalar(None, column.type), column))
    return batch, reasons


def _rows(batch: pa.RecordBatch) -> Iterator[tuple[dict, tuple[str, str] | None]]:
    """``(values, bad_text)`` per row of ``batch``; ``bad_text`` is ``(column, problem)`` for a
    row with a string that is not valid UTF-8, whose value then reads as None.

    pyarrow does not check the strings a parquet file holds, and converting a batch fails
    as a whole on one bad string: such a batch is converted value by value instead.
    """
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        rows = None
    if rows is not None:
        yield from ((values, None) for values in rows)
        return
    for i in range(batch.num_rows):
        values, bad_text = {}, None
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                values[name] = column[i].as_py()
            except UnicodeDecodeError as err:
                values[name] = None
                bad_text = bad_text or (name, utf8_problem(err.object))
        yield values, bad_text


def _key(values: dict, key_column: str | None, stem: str, row: int) -> str:
    if key_column is not None and values.get(key_column) is not None:
        return str(values[key_column])
    return f"{stem}/{row}"


def _make_record(
    key: str, values: dict, columns: Columns, source: str, rejects: RejectLog, decode: bool, place: Location
) -> Record | None:
    image = values[columns.image]
    if isinstance(image, dict):  # Hugging Face Image struct
        image = image.get("bytes")
    if image is None:
        status = values.get("status")
        if status is not None and status != "success":  # an img2dataset download that failed
            error = values.get("error_message")
            rejects.add(key, source, f"not downloaded: status {status}" + (f" ({error})" if error else ""))
        else:
            rejects.add(key, source, f"missing image: column {columns.image!r} is null")
        return None
    caption = caption_or_reject(values[columns.caption], key, source, rejects, f"column {columns.caption!r} is empty")
    if caption is None:
        return None
    decoded = None
    if decode:
        decoded = decode_or_reject(image, key, source, rejects)
        if decoded is None:
            return None
    meta = {k: v for k, v in values.items() if k not in (columns.image, columns.caption, columns.key)}
    location = replace(place, size=len(image), sha1=sha1_of(image))
    return Record(key=key, caption=caption, image=decoded, meta=meta, location=location)
