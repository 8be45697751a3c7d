"""Near-duplicate pairs among unit vectors, by exact or approximate (IVF) search with faiss.

A pair is ``(i, j, similarity)``: rows ``i`` (the query) and ``j != i`` of the embedding
matrix whose cosine similarity is at least ``threshold``; with ``k``, only each query's ``k``
most similar rows are kept (a cap that bounds the output when an image has thousands of
copies: connected components need only a few edges per member). A search covers the query
rows ``[start, stop)`` of the full set, so that ranks of a SLURM array split the work. No
search ever materialises more than a block of similarities at a time.

Two kinds of index:

* ``exact``: ``faiss.IndexFlatIP`` over all rows, queried in batches (``knn`` with ``k + 1``
  for the query itself, or ``range_search`` when ``k`` is None). Cost N^2 * dim.
* ``ivf``: the rows are partitioned into ``nlist`` cells by spherical k-means (``faiss.Kmeans``),
  every row is stored in its nearest cell, and a query compares itself with the rows of its
  ``nprobe`` nearest cells, the way ``faiss.IndexIVFFlat`` does. Because the queries *are*
  the database (a self-join), the comparison runs cell by cell: all queries probing a cell
  against all rows stored in it, one matrix product each. That is the same arithmetic as
  ``IndexIVFFlat.search`` but at BLAS speed: on 1M x 512 vectors on a busy 2-core machine
  the join took 27-37 s where ``IndexIVFFlat.search`` with the same cells would take
  430-650 s (benchmarks/dedup_bench.py measures both). Cost about
  N * dim * (nlist + nprobe * N / nlist), least at ``nlist = sqrt(nprobe * N)``.

``auto`` picks ``exact`` up to ``exact_max`` rows and ``ivf`` above.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf")
# Similarities computed per block of the cell join (32 MiB of float32).
BLOCK_ENTRIES = 1 << 23
# Rows per database block of the blocked exact search (256 MiB of float32 at 256-d).
DATABASE_BLOCK = 1 << 18


@dataclass
class IndexSettings:
    """How pairs are searched (the ``index`` config group of ``conf/dedup.yaml``).

    Attributes:
        kind: ``auto``, ``exact`` or ``ivf``.
        exact_max: ``auto`` uses exact search up to this many rows.
        nlist: IVF cells; None: ``sqrt(nprobe * N)``, which balances the two costs.
        nprobe: cells each query looks in (more: higher recall, slower).
        train_size: rows sampled to train k-means; None: ``32 * nlist``.
        niter: k-means iterations.
        seed: sampling and k-means seed.
        query_batch: queries per batch of the exact search.
        threads: IVF cells searched at once; None: the CPUs this process may use.
    """

    kind: str = "auto"
    exact_max: int = 50_000
    nlist: int | None = None
    nprobe: int = 4
    train_size: int | None = None
    niter: int = 10
    seed: int = 0
    query_batch: int = 16384
    threads: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index.kind: must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for name in ("exact_max", "nprobe", "niter", "query_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"index.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "train_size", "threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"index.{name}: must be >= 1 or null, got {getattr(self, name)}")

    def resolved_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "exact" if n <= self.exact_max else "ivf"

    def resolved_nlist(self, n: int) -> int:
        nlist = self.nlist if self.nlist is not None else round(math.sqrt(self.nprobe * n))
        return int(max(1, min(nlist, n)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pairs:
    """Directed pairs: query row ``i``, neighbour row ``j``, their cosine ``similarity``."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray

    @classmethod
    def empty(cls) -> Pairs:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: list[Pairs]) -> Pairs:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.i for p in parts]).astype(np.int64),
            np.concatenate([p.j for p in parts]).astype(np.int64),
            np.concatenate([p.similarity for p in parts]).astype(np.float32),
        )

    def __len__(self) -> int:
        return len(self.i)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"i": self.i, "j": self.j, "similarity": self.similarity})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Pairs:
        return cls(frame["i"].to_numpy(np.int64), frame["j"].to_numpy(np.int64), frame["similarity"].to_numpy(np.float32))

    def undirected(self) -> set[tuple[int, int]]:
        """The pairs as a set of ``(min, max)`` row tuples (for tests and evaluation)."""
        lo, hi = np.minimum(self.i, self.j), np.maximum(self.i, self.j)
        return set(zip(lo.tolist(), hi.tolist()))


def query_ranks(pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """``(order, rank)``: the pairs' order by query, most similar first (ties: lower row first,
    so any split of the pairs ranks alike), and each ordered pair's rank among its query's
    neighbours (0: the most similar); int64 ``(len(pairs),)`` each."""
    order = np.lexsort((pairs.j, -pairs.similarity, pairs.i))
    i = pairs.i[order]
    starts = np.r_[0, np.flatnonzero(np.diff(i)) + 1]
    rank = np.arange(len(i)) - np.repeat(starts, np.diff(np.r_[starts, len(i)]))
    return order, rank


def cap_per_query(pairs: Pairs, k: int | None) -> Pairs:
    """Keep each query's ``k`` most similar neighbours (ties: lower row first); None keeps all."""
    if k is None or len(pairs) == 0:
        return pairs
    order, rank = query_ranks(pairs)
    keep = order[rank < k]
    return Pairs(pairs.i[keep], pairs.j[keep], pairs.similarity[keep])


# ----------------------------------------------------------------------------------------
# Exact search


def exact_pairs(
    vectors: np.ndarray,
    threshold: float,
    k: int | None = None,
    start: int = 0,
    stop: int | None = None,
    query_batch: int = 16384,
    progress: bool = False,
) -> Pairs:
    """Pairs of query rows ``[start, stop)`` against all rows, by brute force (IndexFlatIP).

    ``vectors``: float32 (N, dim), unit rows. ``k``: None for every neighbour above the threshold.
    """
    vectors = _as_float32(vectors)
    n = len(vectors)
    return exact_pairs_blocked(lambda lo, hi: vectors[lo:hi], n, threshold, k, start, stop, query_batch, max(1, n), progress)


def exact_pairs_blocked(
    read: Callable[[int, int], np.ndarray],
    n: int,
    threshold: float,
    k: int | None = None,
    start: int = 0,
    stop: int | None = None,
    query_batch: int = 16384,
    database_block: int = DATABASE_BLOCK,
    progress: bool = False,
) -> Pairs:
    """:func:`exact_pairs` holding one block of ``database_block`` rows and one batch of
    queries at a time: ``read(lo, hi)`` returns rows ``[lo, hi)`` as float32 unit rows.

    Per block, each query keeps its ``k + 1`` most similar rows (or all above the threshold);
    the blocks' results are then capped to ``k`` per query, which is the top ``k`` overall.
    With one block (``database_block >= n``) this is one ``IndexFlatIP`` over all rows.
    """
    import faiss

    stop = n if stop is None else stop
    # range_search keeps similarities strictly above the radius; step just below the threshold.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    parts = []
    blocks = range(0, n, database_block)
    bar = tqdm(total=len(blocks) * len(range(start, stop, query_batch)), desc="exact search", unit="batch", disable=not progress)
    for d0 in blocks:
        d1 = min(d0 + database_block, n)
        index = faiss.IndexFlatIP(0)
        database = None
        for lo in range(start, stop, query_batch):
            hi = min(lo + query_batch, stop)
            queries = read(lo, hi)
            if database is None:
                database = read(d0, d1)
                index = faiss.IndexFlatIP(database.shape[1])
                index.add(database)
            if k is None:
                lims, sims, ids = index.range_search(queries, radius)
                i = np.repeat(np.arange(lo, hi), np.diff(lims.astype(np.int64)))
                j, s = ids.astype(np.int64) + d0, sims
            else:
                sims, ids = index.search(queries, min(k + 1, d1 - d0))  # + 1: the query finds itself
                i = np.broadcast_to(np.arange(lo, hi)[:, None], ids.shape).ravel()
                j, s = np.where(ids >= 0, ids + d0, -1).ravel(), sims.ravel()
            keep = (j >= 0) & (j != i) & (s >= threshold)
            parts.append(Pairs(i[keep], j[keep], s[keep]))
            bar.update()
        del index, database
    bar.close()
    return cap_per_query(Pairs.concat(parts), k)


# ----------------------------------------------------------------------------------------
# IVF: cells by k-means, joined cell by cell


@dataclass
class Cells:
    """A partition of the rows into k-means cells.

    Attributes:
        centroids: float32 (nlist, dim), unit rows.
        assign: int32 (N, nprobe): each row's ``nprobe`` most similar centroids, most
            similar first; ``assign[:, 0]`` is the cell the row is stored in.
    """

    centroids: np.ndarray
    assign: np.ndarray

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def nprobe(self) -> int:
        return self.assign.shape[1]

    def save(self, directory: str | Path) -> None:
        from pipeline.io import write_npy

        directory = Path(directory)
        for name, array in (("centroids", self.centroids), ("assign", self.assign)):
            write_npy(array, directory / f"{name}.npy")

    @classmethod
    def load(cls, directory: str | Path) -> Cells:
        directory = Path(directory)
        return cls(np.load(directory / "centroids.npy"), np.load(directory / "assign.npy"))


def training_sample(n: int, settings: IndexSettings) -> np.ndarray:
    """Sorted rows (int64) of the ``n`` that k-means trains on: ``train_size`` (default
    ``32 * nlist``) drawn without replacement with ``settings.seed``, or all rows."""
    nlist = settings.resolved_nlist(n)
    sample_size = min(n, settings.train_size or 32 * nlist)
    if sample_size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(settings.seed).choice(n, sample_size, replace=False)).astype(np.int64)


def kmeans_centroids(sample: np.ndarray, nlist: int, settings: IndexSettings, n: int | None = None) -> np.ndarray:
    """float32 (nlist, dim) unit centroids by spherical k-means on ``sample`` (float32 unit
    rows), seeded by ``settings.seed``: the same sample gives the same centroids. ``n``: the
    rows the sample was drawn from (for the log)."""
    import faiss

    sample = _as_float32(sample)
    dim = sample.shape[1]
    kmeans = faiss.Kmeans(
        dim,
        nlist,
        niter=settings.niter,
        seed=settings.seed,
        spherical=True,
        verbose=False,
        # Fewer than faiss's advised 39 points per centroid is fine here: the cells only
        # need to be compact, not optimal, and recall is governed by nprobe.
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, len(sample) // nlist + 1),
    )
    log.info("index: k-means, %d cells from %d of %d rows", nlist, len(sample), n or len(sample))
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign_cells(
    centroids: np.ndarray, vectors: np.ndarray, nprobe: int, step: int = 65536, progress: bool = False
) -> np.ndarray:
    """int32 (len(vectors), nprobe): each row's ``nprobe`` most similar centroids (float32
    (nlist, dim)), most similar first; ``vectors``: (N, dim) unit rows, ``step`` rows at a time."""
    import faiss

    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    assign = np.empty((len(vectors), nprobe), dtype=np.int32)
    for lo in tqdm(range(0, len(vectors), step), desc="assigning cells", unit="batch", disable=not progress):
        assign[lo : lo + step] = quantizer.search(_as_float32(vectors[lo : lo + step]), nprobe)[1]
    return assign


def train_cells(vectors: np.ndarray, settings: IndexSettings, progress: bool = False) -> Cells:
    """Spherical k-means on a sample of the rows, then every row's ``nprobe`` nearest cells."""
    vectors = _as_float32(vectors)
    n = len(vectors)
    nlist = settings.resolved_nlist(n)
    sample = training_sample(n, settings)
    centroids = kmeans_centroids(vectors[sample] if len(sample) < n else vectors, nlist, settings, n)
    return Cells(centroids, assign_cells(centroids, vectors, min(settings.nprobe, nlist), progress=progress))


def cell_pairs(
    vectors: np.ndarray,
    cells: Cells,
    threshold: float,
    k: int | None = None,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Pairs:
    """Pairs of query rows ``[start, stop)``: each against the rows stored in its nprobe cells.

    ``threads``: cells joined at once (None: the CPUs this process may use).
    """
    vectors = _as_float32(vectors)
    n = len(vectors)
    stop = n if stop is None else stop
    if len(cells.assign) != n:
        raise ValueError(f"index: the cells cover {len(cells.assign)} rows but there are {n} embeddings; rebuild the index")
    nlist = cells.nlist
    # Rows stored per cell (its members) and queries probing it, each as a sorted run.
    home = cells.assign[:, 0]
    members = np.argsort(home, kind="stable")
    member_bounds = np.searchsorted(home[members], np.arange(nlist + 1))
    probe_cells = cells.assign[start:stop].ravel()
    probe_rows = np.repeat(np.arange(start, stop), cells.nprobe)
    order = np.argsort(probe_cells, kind="stable")
    probers = probe_rows[order]
    prober_bounds = np.searchsorted(probe_cells[order], np.arange(nlist + 1))

    def join(cell: int) -> list[Pairs]:
        mem = members[member_bounds[cell] : member_bounds[cell + 1]]
        pro = probers[prober_bounds[cell] : prober_bounds[cell + 1]]
        return join_cell(pro, lambda part: vectors[pro[part]], mem, lambda part: vectors[mem[part]], threshold, k)

    # Cells are joined in parallel, each product on one BLAS thread: per-cell products are
    # small, and BLAS's own threads on them cost more than they give (3x slower measured on
    # a busy 2-core machine).
    parts: list[Pairs] = []
    bar = tqdm(total=nlist, desc="searching cells", unit="cell", disable=not progress, mininterval=1.0)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads or _cpus())) as pool:
        for found in pool.map(join, range(nlist)):
            parts.extend(found)
            bar.update()
    bar.close()
    return cap_per_query(Pairs.concat(parts), k)


def join_cell(
    q_rows: np.ndarray,
    queries: Callable[[np.ndarray], np.ndarray],
    m_rows: np.ndarray,
    members: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    k: int | None,
) -> list[Pairs]:
    """The pairs of one cell: queries (global rows ``q_rows``, ascending) against its members
    (global rows ``m_rows``, ascending), one matrix product per block of at most
    ``BLOCK_ENTRIES`` similarities. ``queries(part)`` / ``members(part)`` return the float32
    unit rows of ``q_rows[part]`` / ``m_rows[part]`` (``part`` a slice).

    The in-memory join (:func:`cell_pairs`) and the array tasks' join of bucket files
    (:mod:`pipeline.dedup.buckets`) both call this with the same rows in the same order, so
    they compute the same similarities.
    """
    found: list[Pairs] = []
    if len(m_rows) == 0 or len(q_rows) == 0:
        return found
    member_block = min(len(m_rows), BLOCK_ENTRIES)
    query_block = max(1, BLOCK_ENTRIES // member_block)
    for q0 in range(0, len(q_rows), query_block):
        q_part = q_rows[q0 : q0 + query_block]
        q_vectors = queries(slice(q0, q0 + query_block))
        for m0 in range(0, len(m_rows), member_block):
            m_part = m_rows[m0 : m0 + member_block]
            sims = q_vectors @ members(slice(m0, m0 + member_block)).T
            r, c = _above(sims, threshold, k)
            i, j = q_part[r], m_part[c]
            keep = i != j
            found.append(Pairs(i[keep], j[keep], sims[r[keep], c[keep]]))
    return found


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (SLURM, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _above(sims: np.ndarray, threshold: float, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of ``sims >= threshold``; with ``k``, at most ``k + 1`` per row
    (the most similar; + 1 as the query may find itself), so that a cell full of copies of
    one image cannot pile up pairs."""
    mask = sims >= threshold
    if k is not None and sims.shape[1] > k + 1:
        heavy = np.flatnonzero(np.count_nonzero(mask, axis=1) > k + 1)
        if len(heavy):
            top = np.argpartition(-sims[heavy], k, axis=1)[:, : k + 1]
            capped = np.zeros((len(heavy), sims.shape[1]), dtype=bool)
            np.put_along_axis(capped, top, True, axis=1)
            mask[heavy] &= capped
    return np.nonzero(mask)


def find_pairs(
    vectors: np.ndarray,
    threshold: float,
    k: int | None = None,
    settings: IndexSettings | None = None,
    start: int = 0,
    stop: int | None = None,
    cells: Cells | None = None,
    progress: bool = False,
) -> Pairs:
    """Near-duplicate pairs of query rows ``[start, stop)`` with whichever index ``settings`` picks.

    ``vectors``: float32 (N, dim), unit rows. ``cells``: a prebuilt partition for ``ivf``
    (trained here when None).
    """
    settings = settings or IndexSettings()
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: a cosine similarity must be in [-1, 1], got {threshold}")
    if k is not None and k < 1:
        raise ValueError(f"k: must be >= 1 or null (every neighbour above the threshold), got {k}")
    kind = settings.resolved_kind(len(vectors))
    if kind == "exact":
        return exact_pairs(vectors, threshold, k, start, stop, settings.query_batch, progress)
    cells = cells if cells is not None else train_cells(vectors, settings, progress)
    return cell_pairs(vectors, cells, threshold, k, start, stop, progress, settings.threads)


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) array, got shape {vectors.shape}")
    return vectors
