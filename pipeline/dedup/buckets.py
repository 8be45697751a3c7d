"""The IVF search of the array phases, with each task holding its share of the rows only:
cells trained on a sample, rows written to disk bucketed by cell, each search task joining
only its own cells, and pair files that the group phase streams.

Cell ``c`` of ``nlist`` belongs to (is joined by) search task ``c * world_size // nlist``: each
task owns a contiguous range of cells (:func:`owned_cells`).

The cells are trained once, by the train task (:func:`train_centroids` on a sample of the
rows), which writes ``<dedup>/index/centroids.npy``: float32 (nlist, dim), unit rows. Index task
``r`` of ``W`` loads them, reads its own rows (``shard_bounds(N, r, W)`` of the whole set, as
stored: float16, N/W x dim x 2 bytes), assigns them to their ``nprobe`` nearest cells and
writes, under ``<dedup>/index/``:

* ``assign_<r>.npy``: int32 (rows of rank r, nprobe), each row's cells, nearest first;
* ``buckets/owner_<o>/from_<r>.npy``, for every owner ``o``: float16 (m, dim), a copy of the
  row for each (row of rank r, probed cell owned by o), sorted by (cell, row); the stored
  values (normalised when read, as every phase reads rows);
* ``buckets/owner_<o>/from_<r>_entries.npy``: structured (m,) ``ENTRY``: ``row`` int64 (global
  row), ``cell`` int32, ``home`` bool (the cell is the row's nearest, so the row is stored in
  it: a *member*; every entry is a *query* of its cell).

The buckets hold ``nprobe`` copies of the set (N x nprobe x dim x 2 bytes over all owners);
a search with a new threshold reuses them, so they stay until the run folder is removed.

Search task ``o`` memory-maps the ``W`` files of ``owner_<o>`` and joins its cells one at a
time, the same rows in the same order as the in-memory join (:func:`~pipeline.dedup.index.cell_pairs`),
so it finds the same pairs: its resident memory is its own buckets (N x nprobe / W rows of
float16) and the cells being joined. Its pairs (each query's ``k`` best *within its cells*)
go to ``pairs/pairs_<o>.npy`` (``PAIR``, sorted by query); the group phase streams the pair
files by query range and keeps each query's ``k`` best over all of them (:func:`read_pairs`).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from pipeline.data.embeddings_store import EmbeddingRows, unit_rows
from pipeline.dedup.index import IndexSettings, Pairs, _cpus, cap_per_query, join_cell, kmeans_centroids, training_sample
from pipeline.io import atomic_write, write_npy

log = logging.getLogger(__name__)

# One entry of a bucket file: a (row, cell) pair.
ENTRY = np.dtype([("row", "<i8"), ("cell", "<i4"), ("home", "?")])
# One directed pair of a pair file.
PAIR = np.dtype([("i", "<i8"), ("j", "<i8"), ("similarity", "<f4")])
# Rows per chunk when copying rows into bucket files (64 MiB of float16 at 512-d).
WRITE_CHUNK = 1 << 16


def owned_cells(owner: int, nlist: int, world_size: int) -> tuple[int, int]:
    """Cells ``[c0, c1)`` joined by search task ``owner``: those with ``c * world_size // nlist == owner``."""
    return -(-owner * nlist // world_size), -(-(owner + 1) * nlist // world_size)


def bucket_paths(index_dir: str | Path, owner: int, source: int) -> tuple[Path, Path]:
    """``(rows, entries)`` files of the bucket index task ``source`` wrote for search task ``owner``."""
    folder = Path(index_dir) / "buckets" / f"owner_{owner}"
    return folder / f"from_{source}.npy", folder / f"from_{source}_entries.npy"


def centroids_digest(centroids: np.ndarray) -> str:
    """A digest of the centroids' bytes: the train marker holds it, index tasks check the file against it."""
    return hashlib.sha1(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()[:16]


def train_centroids(rows: EmbeddingRows, settings: IndexSettings) -> np.ndarray:
    """float32 (nlist, dim) centroids from the sample :func:`training_sample` draws, read from
    disk (only the sample is held: ``train_size`` x dim x 4 bytes). The same rows, settings and
    seed give the same centroids; the train phase runs it once for all index tasks."""
    nlist = settings.resolved_nlist(rows.n)
    sample = training_sample(rows.n, settings)
    return kmeans_centroids(unit_rows(rows.take(sample)), nlist, settings, rows.n)


def write_buckets(
    index_dir: str | Path, rank: int, world_size: int, stored: np.ndarray, first_row: int, assign: np.ndarray, nlist: int
) -> list[int]:
    """Write index task ``rank``'s bucket files for every owner (see the module doc).

    ``stored``: (m, dim) rows ``first_row .. first_row + m - 1`` as stored; ``assign``: int32
    (m, nprobe), their cells. Returns the entries written per owner.
    """
    m, nprobe = assign.shape
    rows = np.repeat(np.arange(first_row, first_row + m, dtype=np.int64), nprobe)
    cells = assign.ravel().astype(np.int32)
    home = np.zeros((m, nprobe), dtype=bool)
    home[:, 0] = True
    home = home.ravel()
    order = np.lexsort((rows, cells))  # by cell, then row; owners' cells are contiguous
    owner = cells[order].astype(np.int64) * world_size // nlist
    bounds = np.searchsorted(owner, np.arange(world_size + 1))
    counts = []
    for o in range(world_size):
        chosen = order[bounds[o] : bounds[o + 1]]
        rows_path, entries_path = bucket_paths(index_dir, o, rank)
        entries = np.empty(len(chosen), dtype=ENTRY)
        entries["row"], entries["cell"], entries["home"] = rows[chosen], cells[chosen], home[chosen]
        local = rows[chosen] - first_row
        atomic_write(rows_path, lambda tmp, local=local: _write_rows(tmp, stored, local))
        write_npy(entries, entries_path)
        counts.append(len(chosen))
    return counts


def _write_rows(path: Path, stored: np.ndarray, local: np.ndarray) -> None:
    """``stored[local]`` as an .npy file, copied a chunk at a time (never all copies at once)."""
    with open(path, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(stored.dtype),
            "fortran_order": False,
            "shape": (len(local), stored.shape[1]),
        }
        np.lib.format.write_array_header_1_0(f, header)
        for lo in range(0, len(local), WRITE_CHUNK):
            f.write(np.ascontiguousarray(stored[local[lo : lo + WRITE_CHUNK]]).tobytes())


def join_buckets(
    index_dir: str | Path,
    owner: int,
    world_size: int,
    nlist: int,
    threshold: float,
    k: int | None,
    threads: int | None = None,
    progress: bool = False,
) -> Pairs:
    """Search task ``owner``'s pairs: every query of its cells against the cells' members,
    capped to each query's ``k`` most similar (within these cells), sorted by query."""
    c0, c1 = owned_cells(owner, nlist, world_size)
    sources = []
    for source in range(world_size):
        rows_path, entries_path = bucket_paths(index_dir, owner, source)
        entries = np.load(entries_path, mmap_mode="r")
        stored = np.load(rows_path, mmap_mode="r")
        if len(entries) != len(stored):
            raise RuntimeError(f"{rows_path}: {len(stored)} rows for {len(entries)} entries; run phase=index again")
        sources.append((entries, stored, np.searchsorted(entries["cell"], np.arange(c0, c1 + 1))))

    def join(cell: int) -> list[Pairs]:
        at = cell - c0
        entries = np.concatenate([e[b[at] : b[at + 1]] for e, _, b in sources])
        if len(entries) == 0:
            return []
        stored = np.concatenate([s[b[at] : b[at + 1]] for _, s, b in sources])
        order = np.argsort(entries["row"], kind="stable")  # a row occurs once per cell
        q_rows = entries["row"][order]
        queries = unit_rows(stored[order])
        home = entries["home"][order]
        m_rows, members = q_rows[home], queries[home]
        return join_cell(q_rows, lambda part: queries[part], m_rows, lambda part: members[part], threshold, k)

    parts: list[Pairs] = []
    bar = tqdm(total=c1 - c0, desc="searching cells", unit="cell", disable=not progress, mininterval=1.0)
    # As in cell_pairs: cells in parallel, each product on one BLAS thread.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads or _cpus())) as pool:
        for found in pool.map(join, range(c0, c1)):
            parts.extend(found)
            bar.update()
    bar.close()
    return sort_by_query(cap_per_query(Pairs.concat(parts), k))


def sort_by_query(pairs: Pairs) -> Pairs:
    """The pairs ordered by query ``i`` (then, as :func:`cap_per_query` leaves them, by
    decreasing similarity); what the group phase's streaming needs."""
    order = np.argsort(pairs.i, kind="stable")
    return Pairs(pairs.i[order], pairs.j[order], pairs.similarity[order])


def write_pairs(path: str | Path, pairs: Pairs) -> None:
    """A pair file: structured ``PAIR`` (n,), sorted by ``i``."""
    pairs = sort_by_query(pairs)
    table = np.empty(len(pairs), dtype=PAIR)
    table["i"], table["j"], table["similarity"] = pairs.i, pairs.j, pairs.similarity
    write_npy(table, path)


def read_pairs(paths: list[Path], lo: int, hi: int, k: int | None) -> Pairs:
    """The pairs of queries ``[lo, hi)`` from every pair file (each sorted by query), keeping
    each query's ``k`` most similar over all files: for any split of a query's candidates
    over files, the ``k`` best of the files' ``k`` best are its ``k`` best."""
    parts = []
    for path in paths:
        table = np.load(path, mmap_mode="r")
        a, b = np.searchsorted(table["i"], [lo, hi])
        part = np.array(table[a:b])
        del table
        parts.append(Pairs(part["i"], part["j"], part["similarity"]))
    return cap_per_query(Pairs.concat(parts), k)
