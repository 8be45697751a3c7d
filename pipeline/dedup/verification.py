"""The verify phase's work: each task decides its share of the candidate pairs from both images.

Task ``r`` of ``W`` owns the candidate pairs whose smaller row lies in its query rows
``shard_bounds(N, r, W)`` (each undirected pair once, whichever files and directions the search
wrote it in). It streams the search's pair files ``chunk_rows`` queries at a time, keeping each
query's ``k`` best over all files as the group phase would (:func:`read_pairs`), and keeps its
own pairs, each once: ``(i, j)`` with ``i < j``, sorted.

It then verifies them in chunks of pairs touching at most ``chunk_images`` distinct images:
the chunk's images are fetched by key (``fetch``), prepared once each
(:func:`~pipeline.dedup.pair_verify.prepare`) and every pair of the chunk compared
(:func:`~pipeline.dedup.pair_verify.compare`); the chunk's images are dropped before the next
one. A pair one of whose images could not be fetched is not verified (it is counted apart).

Resident memory: the task's own candidate pairs (3 numbers each), ``chunk_rows`` queries'
pairs while streaming, and ``chunk_images`` images with their prepared arrays. The verified
pairs (``pairs/pairs_<r>.npy``'s layout, under ``verified/``) span components that do not
depend on ``W``, on ``chunk_rows`` nor on ``chunk_images`` (a pair between rows already joined is
not compared, so which pairs span them may): the group phase's groups are those of one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.dedup.buckets import read_pairs
from pipeline.dedup.index import Pairs, query_ranks
from pipeline.dedup.pair_verify import VerifySettings, ambiguity_score, ambiguous, compare, grey_and_vivid, prepare

Fetch = Callable[[list[str]], Mapping[str, Image.Image]]


def owned_candidates(
    pair_files: list[Path],
    n: int,
    lo: int,
    hi: int,
    k: int | None,
    chunk_rows: int,
    threshold: float | None = None,
    neighbours: int = 0,
) -> Pairs:
    """The candidate pairs ``(i, j)``, ``i < j``, with ``lo <= i < hi``, each once, sorted by
    ``(i, j)``; ``similarity`` the pair's (the larger where its two directions differ).

    With ``threshold``, a pair the search found is a candidate when its similarity reaches it
    or when either image has the other among its ``neighbours`` most similar (the search's
    own threshold, lower, is then the neighbours' floor); without, every pair found is one."""
    parts = []
    for start in range(0, n, chunk_rows):
        found = read_pairs(pair_files, start, min(start + chunk_rows, n), k)
        if threshold is not None and len(found):
            order, rank = query_ranks(found)
            keep = order[(found.similarity[order] >= threshold) | (rank < neighbours)]
            found = Pairs(found.i[keep], found.j[keep], found.similarity[keep])
        low, high = np.minimum(found.i, found.j), np.maximum(found.i, found.j)
        mine = (low >= lo) & (low < hi) & (low != high)
        parts.append(Pairs(low[mine], high[mine], found.similarity[mine]))
    pairs = Pairs.concat(parts)
    if len(pairs) == 0:
        return pairs
    order = np.lexsort((-pairs.similarity, pairs.j, pairs.i))
    i, j, sim = pairs.i[order], pairs.j[order], pairs.similarity[order]
    first = np.r_[True, (np.diff(i) != 0) | (np.diff(j) != 0)]
    return Pairs(i[first], j[first], sim[first])


def pair_chunks(i: np.ndarray, j: np.ndarray, chunk_images: int) -> Iterable[slice]:
    """Consecutive slices of the pairs, each touching at most ``chunk_images`` (>= 2) distinct rows."""
    start, seen = 0, set()
    for e in range(len(i)):
        new = {int(i[e]), int(j[e])} - seen
        if len(seen) + len(new) > chunk_images:
            yield slice(start, e)
            start, seen = e, set()
            new = {int(i[e]), int(j[e])}
        seen |= new
    if start < len(i):
        yield slice(start, len(i))


@dataclass
class VerifyCounts:
    """What one task's verification did: ``candidates`` (its pairs), ``verified`` (kept),
    ``unfetched`` (pairs not verified: an image could not be fetched), ``skipped`` (pairs not
    compared: their rows were joined by verified pairs already), ``ambiguous`` (matches kept
    apart: see :func:`best_for_grey`), ``images`` fetched,
    ``chunks``, ``seconds`` (fetching, preparing, comparing) and ``compare_seconds``."""

    candidates: int = 0
    verified: int = 0
    unfetched: int = 0
    skipped: int = 0
    ambiguous: int = 0
    images: int = 0
    chunks: int = 0
    seconds: float = 0.0
    compare_seconds: float = 0.0

    @property
    def seconds_per_pair(self) -> float:
        """Seconds per pair compared (fetching and preparing the images included)."""
        compared = self.candidates - self.unfetched - self.skipped
        return self.seconds / compared if compared > 0 else 0.0


class _Components:
    """Connected components of the rows joined so far (a union-find over a dict: only the rows
    of the task's pairs)."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, row: int) -> int:
        parent = self.parent
        root = row
        while parent.get(root, root) != root:
            root = parent[root]
        while row != root:
            parent[row], row = root, parent.get(row, row)
        return root

    def same(self, a: int, b: int) -> bool:
        return self.find(a) == self.find(b)

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# An ambiguous match (:func:`~pipeline.dedup.pair_verify.ambiguous`): a pair, its score
# (:func:`~pipeline.dedup.pair_verify.ambiguity_score`), and which of its images are grey.
AMBIGUOUS = np.dtype([("i", "<i8"), ("j", "<i8"), ("score", "<f4"), ("grey_i", "?"), ("grey_j", "?")])


def best_for_grey(table: np.ndarray) -> np.ndarray:
    """Which ambiguous matches (``AMBIGUOUS`` rows) count: those that are the best (highest
    score, ties all kept) of a grey image among all its ambiguous matches. bool, one per row.

    Depends only on the set of rows, not on their order nor on how they were split over tasks."""
    if len(table) == 0:
        return np.zeros(0, dtype=bool)
    ends = np.concatenate([table["i"][table["grey_i"]], table["j"][table["grey_j"]]])
    scores = np.concatenate([table["score"][table["grey_i"]], table["score"][table["grey_j"]]])
    rows, inverse = np.unique(ends, return_inverse=True)
    best = np.full(len(rows), -np.inf, dtype=np.float64)
    np.maximum.at(best, inverse, scores)

    def is_best(end: np.ndarray, grey: np.ndarray) -> np.ndarray:
        at = np.clip(np.searchsorted(rows, end), 0, max(len(rows) - 1, 0))
        return grey & (rows[at] == end) & (table["score"] >= best[at])

    return is_best(table["i"], table["grey_i"]) | is_best(table["j"], table["grey_j"])


def verify_candidates(
    pairs: Pairs,
    key_of: Callable[[np.ndarray], list[str]],
    fetch: Fetch,
    settings: VerifySettings,
    chunk_images: int,
    progress: bool = False,
) -> tuple[Pairs, np.ndarray, VerifyCounts]:
    """The candidate ``pairs`` that :func:`~pipeline.dedup.pair_verify.compare` finds to be one
    picture, in their order; the ambiguous matches among them (``AMBIGUOUS`` rows: a grey image
    with one in colour, or of a smooth picture, :func:`~pipeline.dedup.pair_verify.ambiguous`),
    kept apart for :func:`best_for_grey`; and what it took.

    Within each chunk the pairs are compared most similar first, and a pair whose rows are
    already joined by pairs verified before it (in this call) is not compared: it would change
    no connected component. A grey image and one of vivid colour are always compared (their
    match is ambiguous, and which is the grey image's best depends on all of them; a grey
    image's matches with a smooth picture, ambiguous too, are compared unless joined already).
    The kept pairs and ambiguous matches therefore span the same components as every matching
    pair would, whatever the chunks; which pairs are kept may differ.

    ``key_of(rows)``: the keys of rows (int64); ``fetch(keys)``: ``{key: image}`` for the keys it
    found. At most ``chunk_images`` images are held at once.
    """
    counts = VerifyCounts(candidates=len(pairs))
    joined = _Components()
    unsure: list[tuple] = []
    keep = np.zeros(len(pairs), dtype=bool)
    started = time.perf_counter()
    bar = tqdm(total=len(pairs), desc="verifying pairs", unit="pair", disable=not progress, mininterval=1.0)
    for part in pair_chunks(pairs.i, pairs.j, chunk_images):
        rows = np.unique(np.r_[pairs.i[part], pairs.j[part]])
        keys = key_of(rows)
        images = fetch(sorted(set(keys)))
        prepared = {int(r): prepare(images[key], settings) for r, key in zip(rows, keys) if key in images}
        del images
        counts.images += len(prepared)
        counts.chunks += 1
        compared = time.perf_counter()
        # The likeliest first: once two rows are joined by verified pairs, a pair between them
        # changes no group and is not compared, unless it is a grey image and one of vivid
        # colour: its match is ambiguous, and which is the grey image's best depends on all.
        for e in part.start + np.argsort(-pairs.similarity[part], kind="stable"):
            a, b = prepared.get(int(pairs.i[e])), prepared.get(int(pairs.j[e]))
            if a is None or b is None:
                counts.unfetched += 1
                continue
            ambiguous_pair = grey_and_vivid((not a.coloured, not b.coloured), max(a.chroma_level, b.chroma_level), settings)
            if not ambiguous_pair and joined.same(int(pairs.i[e]), int(pairs.j[e])):
                counts.skipped += 1
                continue
            verdict = compare(a, b, settings)
            if not verdict.match:
                continue
            if ambiguous(verdict, settings):
                unsure.append((int(pairs.i[e]), int(pairs.j[e]), ambiguity_score(verdict, settings), *verdict.grey))
                continue
            keep[e] = True
            joined.join(int(pairs.i[e]), int(pairs.j[e]))
        counts.compare_seconds += time.perf_counter() - compared
        bar.update(part.stop - part.start)
        del prepared
    bar.close()
    counts.seconds = time.perf_counter() - started
    counts.verified = int(keep.sum())
    counts.ambiguous = len(unsure)
    table = np.array(sorted(unsure), dtype=AMBIGUOUS)
    return Pairs(pairs.i[keep], pairs.j[keep], pairs.similarity[keep]), table, counts


def keys_of_rows(metadata_files: list[Path], offsets: np.ndarray, rows: np.ndarray) -> list[str]:
    """The ``key`` of each of ``rows`` (global row numbers, int64), from the embedding shards'
    metadata files (``offsets``: the first global row of each shard, then the total), reading
    only the shards the rows fall in, one at a time."""
    import pyarrow.parquet as pq

    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=object)
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    for s in np.unique(shard_of):
        where = np.flatnonzero(shard_of == s)
        column = pq.read_table(metadata_files[s], columns=["key"]).column("key")
        local = rows[where] - offsets[s]
        out[where] = [str(v) for v in column.take(local).to_pylist()]
    return out.tolist()
