"""A training set's location index: key -> where its image bytes lie, and reads by key through it.

The duplicate finder writes it while its embed phase reads every record anyway (or its
``locate`` phase, for a set whose embeddings were precomputed), one file per rank::

    <folder>/locations_<rank>.parquet   key, file, offset, row, size, sha1_prefix; sorted by key
    <folder>/index.json                 the data set it describes: format, root, image column;
                                        the rank files

Each rank file is sorted by key and written in row groups of :data:`ROW_GROUP_ROWS` rows, so
that :meth:`LocationIndex.lookup` reads only the footers and the row groups whose key range
(parquet's min/max statistics) holds a wanted key: its cost grows with the number of keys
wanted, not with the training set. :func:`read_located` then reads exactly those images: a
seek into a tar, one parquet row group, one file.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.images import BadImage, decode_image
from pipeline.data.location import Location, data_root, sha1_of
from pipeline.data.paths import UnsafePath, path_under
from pipeline.data.rejects import RejectLog

log = logging.getLogger(__name__)

MANIFEST = "index.json"
RANK_FILE = "locations_{rank}.parquet"
ROW_GROUP_ROWS = 1024
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("row", pa.int64()),
        ("size", pa.int64()),
        # The first 8 bytes of the image's SHA-1: a changed image is caught but for 1 in 2^64, and
        # a lookup reads 8 bytes a row rather than 40 hex characters.
        ("sha1_prefix", pa.binary(8)),
    ]
)
INDEXED_FORMATS = ("files", "webdataset", "parquet", "imagefolder")


def location_table(located: Iterable[tuple[str, Location | None]]) -> pa.Table:
    """A rank's records as a table sorted by key (:data:`SCHEMA`); a record without a location
    (a compressed tar's) has a null ``file``: it is in the set, to be found by streaming."""
    rows = sorted(((key, loc) for key, loc in located), key=lambda row: row[0])
    blank = Location(None)  # type: ignore[arg-type]
    rows = [(key, loc or blank) for key, loc in rows]
    return pa.table(
        {
            "key": [k for k, _ in rows],
            "file": [loc.file for _, loc in rows],
            "offset": [loc.offset for _, loc in rows],
            "row": [loc.row for _, loc in rows],
            "size": [loc.size for _, loc in rows],
            "sha1_prefix": [None if loc.sha1 is None else bytes.fromhex(loc.sha1)[:8] for _, loc in rows],
        },
        schema=SCHEMA,
    )


def write_rank_file(folder: Path, rank: int, table: pa.Table) -> Path:
    """Write rank ``rank``'s table atomically into ``folder``; returns its path."""
    from pipeline.io import atomic_write

    path = Path(folder) / RANK_FILE.format(rank=rank)
    # Dictionary encoding only where values repeat (shard names); digests are not compressed.
    options = {
        "use_dictionary": ["file"],
        "compression": {name: "NONE" if name == "sha1_prefix" else "SNAPPY" for name in SCHEMA.names},
    }
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, write_statistics=True, **options))
    return path


def describe(data: Mapping[str, Any]) -> dict[str, Any]:
    """What an index must match to be read for ``data`` (a ``data`` config): the format, the
    data set's root (resolved) and, for parquet, the image column."""
    described = {"format": data.get("format"), "root": str(data_root(str(data.get("path"))).resolve())}
    if data.get("format") == "parquet":
        described["image_column"] = data.get("image_column") or "jpg"
    return described


def write_manifest(folder: Path, data: Mapping[str, Any], world_size: int) -> Path:
    """Write ``index.json`` for ranks ``0..world_size-1`` and remove rank files beyond them
    (an earlier run's with more ranks)."""
    from pipeline.io import write_json

    folder = Path(folder)
    for stale in folder.glob(RANK_FILE.format(rank="*")):
        suffix = stale.name.removeprefix("locations_").removesuffix(".parquet")
        if not suffix.isdigit() or int(suffix) >= world_size:
            stale.unlink(missing_ok=True)
    files = [RANK_FILE.format(rank=r) for r in range(world_size)]
    rows = sum(pq.ParquetFile(folder / name).metadata.num_rows for name in files)
    manifest = {**describe(data), "files": files, "rows": rows}
    write_json(manifest, folder / MANIFEST)
    return folder / MANIFEST


class LocationIndex:
    """The location index in ``folder`` (see the module doc); open it with :meth:`open`."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]):
        self.folder = Path(folder)
        self.manifest = dict(manifest)
        self.files = [self.folder / name for name in manifest["files"]]

    @classmethod
    def open(cls, folder: str | Path | None, data: Mapping[str, Any]) -> tuple[LocationIndex | None, str]:
        """The index in ``folder`` when it describes the data set ``data``, and why not otherwise
        (``(None, reason)``; the reason is ``""`` with an index)."""
        if not folder:
            return None, "no location index given"
        folder = Path(str(folder))
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"no location index in {folder}"
        if data.get("format") not in INDEXED_FORMATS or not data.get("path"):
            return None, f"the data set's format {data.get('format')!r} has no location index"
        wanted = describe(data)
        differs = [name for name, value in wanted.items() if manifest.get(name) != value]
        if differs:
            name = differs[0]
            return None, f"the location index in {folder} describes {name} {manifest.get(name)!r}, not {wanted[name]!r}"
        if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
            return None, f"the location index in {folder} lists no usable files"
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            return None, f"the location index in {folder} lacks {missing[0]}"
        return cls(folder, manifest), ""

    def lookup(self, keys: Iterable[str]) -> dict[str, Location | None]:
        """The locations of those of ``keys`` that are indexed (None for a record that has no
        location: found by streaming); reads only the row groups whose key range holds one of them."""
        wanted = sorted(set(map(str, keys)))
        found: dict[str, Location] = {}
        if not wanted:
            return found
        wanted_array = pa.array(wanted, pa.string())
        for path in self.files:
            parquet = pq.ParquetFile(path, read_dictionary=["file"])  # a shard's name once, not per row
            key_column = parquet.schema_arrow.get_field_index("key")
            groups = []
            for group in range(parquet.metadata.num_row_groups):
                stats = parquet.metadata.row_group(group).column(key_column).statistics
                if stats is not None and stats.has_min_max:
                    if bisect.bisect_left(wanted, stats.min) == bisect.bisect_right(wanted, stats.max):
                        continue  # no wanted key in this group's range
                groups.append(group)
            if not groups:
                continue
            # Keys first (a small column); the rest only of the groups that hold a wanted key.
            # One thread: a thousand small groups cost more to hand out than to read.
            keys_read = parquet.read_row_groups(groups, columns=["key"], use_threads=False).column("key")
            hits = np.flatnonzero(pc.is_in(keys_read, value_set=wanted_array).to_numpy(zero_copy_only=False))
            if not len(hits):
                continue
            sizes = np.array([parquet.metadata.row_group(g).num_rows for g in groups])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            slot = np.searchsorted(starts, hits, side="right") - 1
            matched = sorted(set(slot.tolist()))
            payload = [name for name in SCHEMA.names if name != "key"]  # the keys are known from the first read
            table = parquet.read_row_groups([groups[i] for i in matched], columns=payload, use_threads=False)
            # Row numbers of the hits within the matched groups, read in that order.
            matched_starts = np.concatenate([[0], np.cumsum(sizes[matched])[:-1]])
            place = {g: start for g, start in zip(matched, matched_starts)}
            rows = [int(place[g] + (h - starts[g])) for g, h in zip(slot.tolist(), hits.tolist())]
            hit_keys = keys_read.take(pa.array(hits, pa.int64())).to_pylist()
            for key, row in zip(hit_keys, table.take(pa.array(rows, pa.int64())).to_pylist()):
                if row["file"] is None:
                    found[key] = None
                    continue
                sha1 = None if row["sha1_prefix"] is None else row["sha1_prefix"].hex()
                found[key] = Location(row["file"], row["offset"], row["row"], row["size"], sha1)
            if len(found) == len(wanted):
                break
        return found


def read_located(data: Mapping[str, Any], located: Mapping[str, Location], rejects: RejectLog) -> dict[str, Any]:
    """Decode the images at ``located`` (key -> location, from :meth:`LocationIndex.lookup`) in
    the data set ``data``: key -> RGB ``PIL.Image``.

    Tar members are read by seek, parquet rows a row group at a time (each group once), other
    formats file by file. A file gone, bytes whose size or SHA-1 differ from the index's (the
    set changed since it was indexed), or bytes that do not decode go to ``rejects`` with the
    reason; the image is then left out.
    """
    root = data_root(str(data["path"]))
    fmt = data.get("format")
    found: dict[str, Any] = {}
    by_file: dict[str, list[tuple[str, Location]]] = {}
    for key, loc in located.items():
        by_file.setdefault(loc.file, []).append((key, loc))
    for file, entries in sorted(by_file.items()):
        try:
            path = path_under(root, file)
            blobs = _read_blobs(path, fmt, entries, data)
        except (OSError, UnsafePath, pa.ArrowException) as err:
            for key, _ in entries:
                rejects.add(key, str(root / file), f"missing training image: its indexed file cannot be read ({err})")
            continue
        for key, loc in entries:
            blob = blobs.get(key)
            source = f"{root / file}" + (f":{loc.offset}" if fmt == "webdataset" else "")
            problem = _changed(blob, loc)
            if problem:
                rejects.add(key, source, f"training image changed since it was indexed: {problem}; rerun the duplicate finder")
                continue
            try:
                found[key] = decode_image(blob)
            except BadImage as err:
                rejects.add(key, source, str(err))
    return found


def _changed(blob: bytes | None, loc: Location) -> str:
    if blob is None:
        return "no image bytes at its location"
    if loc.size >= 0 and len(blob) != loc.size:
        return f"{len(blob)} bytes where the index says {loc.size}"
    if loc.sha1 is not None and not sha1_of(blob).startswith(loc.sha1):  # the index keeps a prefix
        return "its bytes' SHA-1 differs from the index's"
    return ""


def _read_blobs(path: Path, fmt: str, entries: list[tuple[str, Location]], data: Mapping[str, Any]) -> dict[str, bytes | None]:
    """The image bytes of ``entries`` (all in the file at ``path``), key -> bytes (None: none there)."""
    if fmt == "webdataset":
        out: dict[str, bytes | None] = {}
        with path.open("rb") as f:
            for key, loc in sorted(entries, key=lambda e: e[1].offset):
                f.seek(loc.offset)
                out[key] = f.read(max(loc.size, 0))
        return out
    if fmt == "parquet":
        column = data.get("image_column") or "jpg"
        parquet = pq.ParquetFile(path)
        out = {}
        for group in sorted({loc.offset for _, loc in entries}):
            values = parquet.read_row_group(group, columns=[column]).column(column)
            for key, loc in entries:
                if loc.offset == group:
                    value = values[loc.row].as_py() if 0 <= loc.row < len(values) else None
                    out[key] = value.get("bytes") if isinstance(value, dict) else value
        return out
    return {key: path.read_bytes() for key, _ in entries}  # files, imagefolder: one file per key
