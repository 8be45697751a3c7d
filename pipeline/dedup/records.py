"""The group phase's records out of core: ``groups.parquet`` and the selection written without
ever holding every record's key and caption.

The groups (:func:`~pipeline.dedup.grouping.group_table`) list the records in (key, caption)
order and rank groups of equal size by their first record in that order, so the records must
be sorted by strings that, at LAION scale (2.3B records), do not fit one task. They are sorted
by distribution instead, ``chunk_rows`` records at a time:

1. a sample of the keys (every ``stride``-th) gives ``P - 1`` splitters, ``P = ceil(N / chunk_rows)``;
2. the metadata files are streamed in chunks (pyarrow), each record sent to the bucket of its
   key's range (records with equal keys share one), and each chunk written to a *run* file
   (Arrow IPC) ordered by bucket, rows ascending within a bucket;
3. bucket by bucket, its slices of every run are read back (memory-mapped), sorted by
   (key, caption) and written to a sorted file: bucket after bucket, the records in the order of
   ``group_table``. Arrow's sort is stable and a bucket's rows come in row order, so ties keep
   the order of one global sort.

Group sizes come from the union-find's labels (one int64 per row; a row is its group's root
when its label is itself): only groups with duplicates (``G`` of them, ``M`` rows) get a table
entry, ``sizes`` and ``first`` (their first record's position, found while sorting); singletons
are numbered as they come, in position order, after the ``G`` groups with duplicates. The
groups are then streamed to ``groups.parquet`` in row groups of :data:`PARQUET_ROW_GROUP`
rows (the row groups ``DataFrame.to_parquet`` writes, so the file is byte-for-byte what the
in-memory path writes), and only the selected groups' members are collected for the selection.

Held at once: the labels (8 bytes per row), ``O(M)`` integers for the groups with
duplicates, one bucket of records (``~chunk_rows``; more when many records share one key),
one row group being written, and the selected groups' members.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.embeddings_store import REQUIRED_COLUMNS, embedding_path, metadata_path
from pipeline.dedup.grouping import group_table, select_top
from pipeline.io import atomic_write, current_umask, write_parquet

log = logging.getLogger(__name__)

# Rows per row group of groups.parquet: pyarrow's default, what DataFrame.to_parquet writes.
PARQUET_ROW_GROUP = 1 << 20
# Keys sampled per bucket to place the splitters.
SAMPLES_PER_BUCKET = 64
SCHEMA = pa.schema([("key", pa.large_string()), ("caption", pa.large_string()), ("row", pa.int64())])


def iter_metadata(
    root: str | Path, shards: list[int], chunk_rows: int, keys_only: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(keys, captions)`` of the metadata files of ``shards`` in row order, ``chunk_rows`` at a
    time (object arrays of str), converted as :func:`~pipeline.data.embeddings_store.read_metadata`
    converts them (key as str, a missing caption as ""). ``keys_only``: captions are None."""
    root = Path(root)
    for shard in shards:
        path = metadata_path(root, shard)
        if not path.exists():
            raise FileNotFoundError(f"embeddings_dir: {embedding_path(root, shard)} has no metadata file {path}")
        present = set(pq.read_schema(path).names)
        missing = [c for c in REQUIRED_COLUMNS if c not in present]
        if missing:
            raise ValueError(f"embeddings_dir: {path} lacks columns {missing} (it has {sorted(present)})")
        columns = ["key"] if keys_only else list(REQUIRED_COLUMNS)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            frame = batch.to_pandas()
            keys = _str_values(frame["key"].astype(str))
            yield keys, None if keys_only else _str_values(frame["caption"].fillna("").astype(str))


def _str_values(series: pd.Series) -> np.ndarray:
    return pd.Series(series, dtype=str).to_numpy(dtype=object)


@dataclass
class SortStats:
    """What the sort held and found: ``buckets``, the largest bucket's records (``max_bucket``),
    records whose key an earlier one has (``duplicate_keys``, with an ``example``)."""

    records: int = 0
    buckets: int = 0
    max_bucket: int = 0
    duplicate_keys: int = 0
    example: str | None = None
    bucket_sizes: list[int] = field(default_factory=list)


def sort_records(root: str | Path, shards: list[int], n: int, chunk_rows: int, scratch: Path) -> tuple[list[Path], SortStats]:
    """Sort the records of ``shards`` by (key, caption), out of core (see the module doc):
    the sorted files (Arrow IPC, ``key``, ``caption``, ``row``), in order, under ``scratch``."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stats = SortStats(records=n, buckets=max(1, math.ceil(n / chunk_rows)))
    splitters = _splitters(root, shards, n, stats.buckets, chunk_rows)
    runs = []
    seen = 0
    for keys, captions in iter_metadata(root, shards, chunk_rows):
        bucket = np.searchsorted(splitters, keys, side="right") if len(splitters) else np.zeros(len(keys), np.int64)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(stats.buckets + 1))
        table = pa.table(
            [
                pa.array(keys[order], pa.large_string()),
                pa.array(captions[order], pa.large_string()),
                pa.array(seen + order.astype(np.int64), pa.int64()),
            ],
            schema=SCHEMA,
        )
        path = scratch / f"run_{len(runs)}.arrow"
        _write_ipc(path, table)
        runs.append((path, bounds))
        seen += len(keys)
    if seen != n:
        raise ValueError(f"embeddings_dir: the metadata files list {seen} records for {n} embedding rows")
    sorted_files = []
    for p in range(stats.buckets):
        parts = []
        for path, bounds in runs:
            if bounds[p + 1] > bounds[p]:
                with pa.memory_map(str(path)) as source:
                    parts.append(pa.ipc.open_file(source).read_all().slice(bounds[p], bounds[p + 1] - bounds[p]))
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending"), ("caption", "ascending")]))
        del parts
        keys = table["key"]
        if len(table) > 1:
            same = pc.equal(keys.slice(1), keys.slice(0, len(table) - 1)).to_numpy(zero_copy_only=False)
            if same.any():
                stats.duplicate_keys += int(same.sum())
                stats.example = stats.example or keys[int(np.argmax(same))].as_py()
        stats.bucket_sizes.append(len(table))
        stats.max_bucket = max(stats.max_bucket, len(table))
        sorted_files.append(scratch / f"sorted_{p}.arrow")
        _write_ipc(sorted_files[-1], table)
        del table, keys
    for path, _ in runs:
        path.unlink()
    return sorted_files, stats


def _splitters(root, shards, n: int, buckets: int, chunk_rows: int) -> np.ndarray:
    """``buckets - 1`` keys cutting the sorted keys into ranges of about ``n / buckets``
    records: quantiles of every ``stride``-th key (object array of str; empty for one bucket)."""
    if buckets <= 1:
        return np.array([], dtype=object)
    stride = max(1, n // (buckets * SAMPLES_PER_BUCKET))
    sample, seen = [], 0
    for keys, _ in iter_metadata(root, shards, chunk_rows, keys_only=True):
        first = (-seen) % stride
        sample.extend(keys[first::stride].tolist())
        seen += len(keys)
    sample.sort()  # Python's order of str: code points, as Arrow's UTF-8 byte order
    return np.array([sample[len(sample) * q // buckets] for q in range(1, buckets)], dtype=object)


def _write_ipc(path: Path, table: pa.Table) -> None:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def _read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def duplicate_groups(labels: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(roots, sizes)`` of the groups with duplicates, roots ascending, from flat union-find
    labels (each row's root, the smallest row of its group): a root's members are the rows
    labelled with it other than itself. Holds one int64 per such member, not per row."""
    members = []
    for lo in range(0, len(labels), chunk_rows):
        part = labels[lo : lo + chunk_rows]
        members.append(part[part != np.arange(lo, lo + len(part))])
    roots, counts = np.unique(np.concatenate(members) if members else np.zeros(0, np.int64), return_counts=True)
    return roots.astype(np.int64), counts.astype(np.int64) + 1


@dataclass
class GroupCounts:
    """The groups' numbers for the summary."""

    records: int
    groups: int
    duplicate_groups: int
    records_in_duplicate_groups: int


def write_groups(
    root: str | Path,
    shards: list[int],
    labels: np.ndarray,
    top_k: int,
    min_group_size: int,
    groups_path: Path,
    scratch: Path,
    chunk_rows: int,
) -> tuple[pd.DataFrame, GroupCounts, SortStats]:
    """Write ``groups.parquet`` (what :func:`~pipeline.dedup.grouping.group_table` gives for all
    records in (key, caption) order) from flat union-find ``labels`` (each row's smallest row);
    returns the selection (:func:`~pipeline.dedup.grouping.select_top`), the counts, and the
    sort's stats. ``scratch`` is removed afterwards."""
    n = len(labels)
    if n == 0:  # nothing to sort: the in-memory path, for the same (empty) files
        groups = group_table([], [], labels)
        write_parquet(groups, groups_path)
        return select_top(groups, top_k, min_group_size), GroupCounts(0, 0, 0, 0), SortStats()
    writer = _GroupsWriter(groups_path)
    try:
        sorted_files, stats = sort_records(root, shards, n, chunk_rows, scratch)
        roots, sizes = duplicate_groups(labels, chunk_rows)
        # Each group with duplicates: its first record in (key, caption) order.
        first = np.full(len(roots), n, dtype=np.int64)
        position = 0
        for path in sorted_files:
            rows = _read_ipc(path)["row"].to_numpy()
            where, hit = _lookup(roots, labels[rows])
            np.minimum.at(first, where[hit], position + np.flatnonzero(hit))
            position += len(rows)
        ranked = np.lexsort((first, -sizes))
        group_id = np.empty(len(roots), dtype=np.int64)
        group_id[ranked] = np.arange(len(roots))
        n_single = n - int(sizes.sum())
        eligible = int((sizes >= min_group_size).sum()) + (n_single if min_group_size <= 1 else 0)
        chosen = min(top_k, eligible)  # the selection: group ids [0, chosen), ranked by size
        picked = []
        singles = 0
        for path in sorted_files:
            table = _read_ipc(path)
            rows = table["row"].to_numpy()
            where, hit = _lookup(roots, labels[rows])
            gid = np.empty(len(rows), dtype=np.int64)
            size = np.ones(len(rows), dtype=np.int64)
            gid[hit], size[hit] = group_id[where[hit]], sizes[where[hit]]
            lone = ~hit
            gid[lone] = len(roots) + singles + np.arange(int(lone.sum()))
            singles += int(lone.sum())
            # Arrow throughout (no Python string per record): the same values as group_table's frame.
            out = pa.table(
                {"key": table["key"], "group_id": pa.array(gid), "caption": table["caption"], "group_size": pa.array(size)}
            )
            del table
            writer.add(out)
            keep = gid < chosen
            if keep.any():
                picked.append(out.filter(pa.array(keep)).to_pandas())
        writer.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        writer.discard()  # a failure's partial file; nothing once closed
    columns = ["key", "group_id", "caption", "group_size"]
    members = (
        pd.concat(picked, ignore_index=True)
        if picked
        else pd.DataFrame({c: pd.Series([], dtype=object if c in ("key", "caption") else np.int64) for c in columns})
    )
    counts = GroupCounts(
        records=n, groups=len(roots) + n_single, duplicate_groups=len(roots), records_in_duplicate_groups=int(sizes.sum())
    )
    return select_top(members, top_k, min_group_size), counts, stats


def _lookup(roots: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each label, its index in ``roots`` (sorted) and whether it is one."""
    where = np.searchsorted(roots, labels)
    where = np.minimum(where, max(len(roots) - 1, 0))
    hit = roots[where] == labels if len(roots) else np.zeros(len(labels), dtype=bool)
    return where, hit


class _GroupsWriter:
    """``groups.parquet`` written a row group at a time, as ``DataFrame.to_parquet(index=False)``
    writes the whole frame: the same schema (pandas metadata included, taken from one row gone
    through pandas), row groups of :data:`PARQUET_ROW_GROUP` rows, each column one chunk (so
    the same pages), so the same bytes. Atomic: a temporary file of this writer's own (two
    processes never share one), renamed on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp: Path | None = None
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.schema: pa.Schema | None = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = pa.Table.from_pandas(table.slice(0, 1).to_pandas(), preserve_index=False).schema
        self.pending.append(table.cast(self.schema))
        self.rows += len(table)
        while self.rows >= PARQUET_ROW_GROUP:
            self._flush(PARQUET_ROW_GROUP)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, rows).combine_chunks(), table.slice(rows)
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self.tmp = Path(tmp)
            self.writer = pq.ParquetWriter(str(self.tmp), self.schema)
        self.writer.write_table(head)
        del head
        self.pending = [rest.combine_chunks()] if len(rest) else []
        self.rows = len(rest)

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
        if self.writer is None:
            raise RuntimeError(f"{self.path}: no records were written")
        self.writer.close()
        self.writer = None
        os.chmod(self.tmp, 0o666 & ~current_umask())  # mkstemp's 0600: outputs get a plain file's mode
        self.tmp.replace(self.path)
        self.tmp = None

    def discard(self) -> None:
        """Remove the temporary file of a writer not closed (a failure part-way)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):  # cleanup after a failure must not hide that failure
                self.writer.close()
            self.writer = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
