"""A training set's location index: key -> where its image bytes lie, and reads by key through it.

The duplicate finder writes it while its embed phase reads every record anyway (or its
``locate`` phase, for a set whose embeddings were precomputed), one file per rank::

    <folder>/locations_<rank>.parquet   key, file, offset, row, size, sha1_prefix; sorted by key
    <folder>/index.json                 the data set it describes: format, root, image column;
                                        the rank files

Beside each rank file, a directory for lookups by key (numpy arrays read as memory maps):
``locations_<rank>.hash.npy`` (each key's 64-bit hash, sorted), ``.entries.npy`` (the rows in
that order, with a second 64-bit hash of the key to confirm it) and ``.names.npy`` (the files
the rows name). :meth:`LocationIndex.lookup` binary-searches it: a few pages per key wanted,
whatever the training set's size. Without it (a file name above :data:`MAX_NAME_BYTES`), the
rank file is read instead: it is sorted by key in row groups of :data:`ROW_GROUP_ROWS` rows,
and only the groups whose key range (parquet's min/max statistics) holds a wanted key are read. :func:`read_located` then reads exactly those images: a
seek into a tar, one parquet row group, one file.
"""

from __future__ import annotations

import bisect
import hashlib
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
from pipeline.io import atomic_write, write_json, write_npy

log = logging.getLogger(__name__)

MANIFEST = "index.json"
RANK_FILE = "locations_{rank}.parquet"
ROW_GROUP_ROWS = 1024
DIRECTORY = ("hash", "entries", "names")  # locations_<rank>.<part>.npy
MAX_NAME_BYTES = 1024  # a file name longer than this leaves a rank without a directory
ENTRY = np.dtype(
    [("check", "<u8"), ("file", "<i8"), ("offset", "<i8"), ("row", "<i8"), ("size", "<i8"), ("sha1", "S8"), ("flags", "u1")]
)
LOCATED, DIGESTED = 1, 2  # ENTRY flags: the record has a location; its digest is known
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
    path = Path(folder) / RANK_FILE.format(rank=rank)
    # Dictionary encoding only where values repeat (shard names); digests are not compressed.
    options = {
        "use_dictionary": ["file"],
        "compression": {name: "NONE" if name == "sha1_prefix" else "SNAPPY" for name in SCHEMA.names},
    }
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, write_statistics=True, **options))
    _write_directory(path, table)
    return path


def key_hashes(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each key (the halves of its 128-bit BLAKE2b): uint64 (N,) each."""
    digests = b"".join(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest() for key in keys)
    halves = np.frombuffer(digests, dtype="<u8").reshape(-1, 2) if keys else np.zeros((0, 2), "<u8")
    return halves[:, 0].copy(), halves[:, 1].copy()


def _directory_path(path: Path, part: str) -> Path:
    return path.with_name(path.name.replace(".parquet", f".{part}.npy"))


def _write_directory(path: Path, table: pa.Table) -> None:
    """The lookup directory of the rank file at ``path`` (see the module doc); none, and any old
    one removed, when a file name is longer than :data:`MAX_NAME_BYTES`."""
    for part in DIRECTORY:
        _directory_path(path, part).unlink(missing_ok=True)
    files = table.column("file")
    names = pc.unique(files.drop_null())
    longest = max((len(n.encode("utf-8", "surrogatepass")) for n in names.to_pylist()), default=1)
    if longest > MAX_NAME_BYTES:
        return
    order_hash, check = key_hashes(table.column("key").to_pylist())
    entries = np.zeros(table.num_rows, ENTRY)
    entries["check"] = check
    entries["file"] = pc.fill_null(pc.index_in(files, value_set=names), -1).to_numpy()
    for name in ("offset", "row", "size"):
        entries[name] = table.column(name).to_numpy()
    sha1 = table.column("sha1_prefix")
    entries["sha1"] = [b"" if value is None else value for value in sha1.to_pylist()]
    entries["flags"] = np.where(files.is_valid().to_numpy(zero_copy_only=False), LOCATED, 0) | np.where(
        sha1.is_valid().to_numpy(zero_copy_only=False), DIGESTED, 0
    )
    order = np.argsort(order_hash, kind="stable")
    encoded = np.array([n.encode("utf-8", "surrogatepass") for n in names.to_pylist()], dtype=f"S{max(longest, 1)}")
    # The rank file's name is the directory's: parts are written first, the hashes last.
    for part, array in (("names", encoded), ("entries", entries[order]), ("hash", order_hash[order])):
        write_npy(array, _directory_path(path, part))


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
    folder = Path(folder)
    for stale in folder.glob(RANK_FILE.format(rank="*")):
        suffix = stale.name.removeprefix("locations_").removesuffix(".parquet")
        if not suffix.isdigit() or int(suffix) >= world_size:
            stale.unlink(missing_ok=True)
            for part in DIRECTORY:
                _directory_path(stale, part).unlink(missing_ok=True)
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
        location: found by streaming), through each rank's directory, or its rank file where it
        has none."""
        wanted = sorted(set(map(str, keys)))
        found: dict[str, Location | None] = {}
        hashes = key_hashes(wanted) if wanted else None
        for path in self.files:
            if len(found) == len(wanted):
                break
            if all(_directory_path(path, part).is_file() for part in DIRECTORY):
                found.update(_search_directory(path, wanted, *hashes))
            else:
                found.update(_search_rank_file(path, wanted))
        return found


def _search_rank_file(path: Path, wanted: list[str]) -> dict[str, Location | None]:
    """``wanted`` (sorted) in the rank file at ``path``: only the row groups whose key range
    (parquet's min/max statistics) holds one of them are read."""
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
        return {}
    table = parquet.read_row_groups(groups, use_threads=False)  # one thread: small groups
    table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(wanted, pa.string())))
    found: dict[str, Location | None] = {}
    for row in table.to_pylist():
        sha1 = None if row["sha1_prefix"] is None else row["sha1_prefix"].hex()
        located = row["file"] is not None
        found[row["key"]] = Location(row["file"], row["offset"], row["row"], row["size"], sha1) if located else None
    return found


def _search_directory(path: Path, wanted: list[str], high: np.ndarray, low: np.ndarray) -> dict[str, Location | None]:
    """Binary search of ``wanted`` (with their :func:`key_hashes`) in the directory of the rank
    file at ``path``, its arrays memory-mapped: a few pages read per key."""
    hashes = np.load(_directory_path(path, "hash"), mmap_mode="r", allow_pickle=False)
    entries = np.load(_directory_path(path, "entries"), mmap_mode="r", allow_pickle=False)
    names = np.load(_directory_path(path, "names"), mmap_mode="r", allow_pickle=False)
    found: dict[str, Location | None] = {}
    for key, first, second, at in zip(wanted, high, low, np.searchsorted(hashes, high)):
        while at < len(hashes) and hashes[at] == first:
            entry = entries[at]
            if entry["check"] == second:
                if not entry["flags"] & LOCATED:
                    found[key] = None
                else:
                    sha1 = bytes(entry["sha1"]).ljust(8, b"\0").hex() if entry["flags"] & DIGESTED else None
                    name = bytes(names[entry["file"]]).decode("utf-8", "surrogatepass")
                    found[key] = Location(name, int(entry["offset"]), int(entry["row"]), int(entry["size"]), sha1)
                break
            at += 1
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
        groups = sorted({loc.offset for _, loc in entries if 0 <= loc.offset < parquet.metadata.num_row_groups})
        # The groups holding a wanted row, in one read of the image column (one thread: small groups).
        values = parquet.read_row_groups(groups, columns=[column], use_threads=False).column(column) if groups else None
        start, sizes = {}, 0
        for group in groups:
            start[group], sizes = sizes, sizes + parquet.metadata.row_group(group).num_rows
        out = {}
        for key, loc in entries:
            inside = loc.offset in start and 0 <= loc.row < parquet.metadata.row_group(loc.offset).num_rows
            value = values[start[loc.offset] + loc.row].as_py() if inside else None
            out[key] = value.get("bytes") if isinstance(value, dict) else value
        return out
    return {key: path.read_bytes() for key, _ in entries}  # files, imagefolder: one file per key
