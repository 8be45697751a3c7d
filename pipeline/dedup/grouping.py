"""From near-duplicate pairs to groups, the selected top groups, and their evaluation.

A group is a connected component of the pair graph: near-duplicates of near-duplicates
belong together, whatever their captions. Groups are numbered by size (0 the largest); the
top ``K`` with at least ``min_group_size`` members become the generator's prompts, each
with its most common caption.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.dedup.buckets import read_pairs
from pipeline.dedup.index import Pairs

# Queries per step of the group phase's stream over the pair files, and records per bucket of
# its out-of-core sort of the keys and captions (pipeline.dedup.records).
GROUP_CHUNK_ROWS = 1 << 18


def connected_groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` rows, given edges ``i[e] -- j[e]`` (int arrays).

    Labels are ``0..n_components-1`` in no particular order; see :func:`group_table`.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"pairs refer to rows outside 0..{n - 1}")
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


class UnionFind:
    """Connected components of ``n`` rows over edges given a batch at a time (out of core: the
    edges are never all held), holding one int64 per row: ``parent``.

    Every edge hooks the larger of its two roots under the smaller, so a root is its
    component's smallest row and parent pointers only decrease (no cycles).
    """

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The roots of ``rows`` (int64); points ``rows`` straight at them (path compression)."""
        root = self.parent[rows]
        while True:
            up = self.parent[root]
            moved = up != root
            if not moved.any():
                break
            root[moved] = up[moved]
        self.parent[rows] = root
        return root

    def union(self, i: np.ndarray, j: np.ndarray) -> None:
        """Join the components of ``i[e]`` and ``j[e]`` for every edge ``e``."""
        n = len(self.parent)
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
            raise ValueError(f"pairs refer to rows outside 0..{n - 1}")
        while len(i):
            ri, rj = self.find(i), self.find(j)
            apart = ri != rj
            i, j, ri, rj = i[apart], j[apart], ri[apart], rj[apart]
            # A root with several edges takes the smallest; the others join on the next pass.
            np.minimum.at(self.parent, np.maximum(ri, rj), np.minimum(ri, rj))

    def labels(self, step: int = 1 << 20) -> np.ndarray:
        """Each row's component (its smallest row), int64 (n,): ``parent`` itself, made flat."""
        for lo in range(0, len(self.parent), step):
            self.find(np.arange(lo, min(lo + step, len(self.parent))))
        return self.parent


def stream_components(
    n: int, pair_files: list[Path], k: int | None, scratch: Path, chunk_rows: int = GROUP_CHUNK_ROWS
) -> tuple[np.ndarray, int]:
    """Connected components over the pair files, out of core: ``(labels, pairs)``.

    The files (structured, sorted by query; :func:`~pipeline.dedup.buckets.write_pairs`) are
    read ``chunk_rows`` queries at a time, each query keeping its ``k`` best over all files,
    and fed to a union-find holding one int64 per row. ``labels``: int64 (n,), each row's
    component (its smallest row). ``pairs``: the distinct undirected pairs, counted from
    ``lo * n + hi`` keys spilled to ``scratch`` by ``lo`` range (one range held at a time;
    ``scratch`` is removed afterwards).
    """
    finder = UnionFind(n)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    spills = [scratch / f"keys_{p}.bin" for p in range(-(-n // chunk_rows))]
    for lo in range(0, n, chunk_rows):
        pairs = read_pairs(pair_files, lo, min(lo + chunk_rows, n), k)
        finder.union(pairs.i, pairs.j)
        low, high = np.minimum(pairs.i, pairs.j), np.maximum(pairs.i, pairs.j)
        keys, part = low * n + high, low // chunk_rows
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(spills) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(spills[p], "ab") as f:
                f.write(keys[order[bounds[p] : bounds[p + 1]]].tobytes())
    n_pairs = sum(len(np.unique(np.fromfile(path, dtype=np.int64))) for path in spills if path.exists())
    shutil.rmtree(scratch, ignore_errors=True)
    return finder.labels(), n_pairs


def group_pairs(metadata: pd.DataFrame, pairs: Pairs, top_k: int, min_group_size: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(groups, selected)`` from the metadata (key, caption; row i = embedding i) and pairs.

    ``groups`` lists the records by key (then caption), so that it, the group ids and the
    selection are the same however the records were split over ranks and read back.
    """
    return group_labels(metadata, connected_groups(len(metadata), pairs.i, pairs.j), top_k, min_group_size)


def group_labels(
    metadata: pd.DataFrame, labels: np.ndarray, top_k: int, min_group_size: int = 2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`group_pairs` from each row's component label (int, any values below ``len(metadata)``)."""
    order = record_order(metadata["key"], metadata["caption"])
    keys, captions = metadata["key"].to_numpy()[order], metadata["caption"].to_numpy()[order]
    groups = group_table(keys, captions, np.asarray(labels)[order], presorted=True)
    return groups, select_top(groups, top_k, min_group_size)


def group_table(keys: Sequence[str], captions: Sequence[str], labels: np.ndarray, presorted: bool = False) -> pd.DataFrame:
    """One row per record (in the order given): ``key``, ``group_id``, ``caption``, ``group_size``.

    ``group_id`` ranks groups by size, largest first; groups of equal size are ordered by
    their smallest key (then caption). Ids therefore depend on the records, not on the order
    they come in (e.g. how they were split over ranks): the same on every run, and group 0 is
    the most duplicated image. ``presorted``: the records are given in :func:`record_order`
    already (saves sorting them again).
    """
    labels = np.asarray(labels)
    if not len(keys) == len(captions) == len(labels):
        raise ValueError(f"{len(keys)} keys, {len(captions)} captions and {len(labels)} labels")
    key_values = pd.Series(keys, dtype=str).to_numpy()
    caption_values = pd.Series(captions, dtype=str).to_numpy()
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    # Each record's position in (key, caption) order; a group's tie-break is its members' first.
    # presorted: the records come in that order already (what the stage passes).
    if presorted:
        position = np.arange(len(labels), dtype=np.int64)
    else:
        position = np.empty(len(labels), dtype=np.int64)
        position[record_order(key_values, caption_values)] = np.arange(len(labels))
    first = np.full(len(sizes), len(labels), dtype=np.int64)
    np.minimum.at(first, labels, position)
    present = np.flatnonzero(sizes)
    ranked = present[np.lexsort((first[present], -sizes[present]))]
    group_id = np.empty(len(sizes), dtype=np.int64)
    group_id[ranked] = np.arange(len(ranked))
    return pd.DataFrame(
        {
            "key": key_values,
            "group_id": group_id[labels],
            "caption": caption_values,
            "group_size": sizes[labels].astype(np.int64),
        }
    )


def record_order(keys: Sequence[str], captions: Sequence[str]) -> np.ndarray:
    """The permutation that sorts records by key, then caption (stable): an order that does not
    depend on the order the records were read in.

    Sorted by Arrow (UTF-8 bytes compare as code points do, so the order is Python's): it
    holds the strings compactly, where a pandas sort of millions of records takes a few
    hundred bytes each.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.table(
        {
            "key": pa.array(pd.Series(keys, dtype=str).to_numpy(), pa.large_string()),
            "caption": pa.array(pd.Series(captions, dtype=str).to_numpy(), pa.large_string()),
        }
    )
    return pc.sort_indices(table, sort_keys=[("key", "ascending"), ("caption", "ascending")]).to_numpy().astype(np.int64)


def most_common_caption(captions: Sequence[str]) -> str:
    """The caption most members carry (ties: the alphabetically first, for determinism)."""
    counts = Counter(captions)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def select_top(groups: pd.DataFrame, top_k: int, min_group_size: int = 2) -> pd.DataFrame:
    """The ``top_k`` largest groups with at least ``min_group_size`` members, largest first.

    Returns one row per group: ``prompt_id`` (zero-padded rank, "00000" the largest),
    ``caption`` (the group's most common caption), ``dup_count``, ``keys`` (its members,
    sorted), ``group_id``, ``n_captions`` (distinct captions in the group).
    """
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0, got {top_k}")
    if min_group_size < 1:
        raise ValueError(f"min_group_size: must be >= 1, got {min_group_size}")
    big = groups[groups["group_size"] >= min_group_size]
    chosen = np.sort(big["group_id"].unique())[:top_k]  # group ids are already ranked by size
    rows = []
    members = big[big["group_id"].isin(chosen)].groupby("group_id", sort=True)
    width = max(5, len(str(max(len(chosen) - 1, 0))))
    for rank, (group_id, frame) in enumerate(members):
        captions = frame["caption"].tolist()
        rows.append(
            {
                "prompt_id": f"{rank:0{width}d}",
                "caption": most_common_caption(captions),
                "dup_count": int(len(frame)),
                "keys": sorted(frame["key"].tolist()),
                "group_id": int(group_id),
                "n_captions": int(len(set(captions))),
            }
        )
    columns = ["prompt_id", "caption", "dup_count", "keys", "group_id", "n_captions"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------
# Evaluation against a ground truth (the demo set's, or any labelled sample)


def pair_scores(predicted: Sequence, truth: Sequence) -> dict[str, float]:
    """Pair precision and recall of a grouping against true groups (labels per record).

    A pair of records is a *predicted* pair when they share a predicted group and a *true*
    pair when they share a true group. Precision: correct / predicted pairs; recall:
    correct / true pairs (1.0 when there are none). Counted from the contingency table, so
    a 150-member group costs nothing.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted labels but {len(truth)} true labels")
    pred_codes = pd.factorize(pd.Series(predicted))[0]
    true_codes = pd.factorize(pd.Series(truth))[0]

    def pairs(counts: np.ndarray) -> int:
        counts = counts.astype(np.int64)
        return int((counts * (counts - 1) // 2).sum())

    joint = pd.DataFrame({"predicted": pred_codes, "true": true_codes}).value_counts()
    correct = pairs(joint.to_numpy())
    predicted_pairs = pairs(np.bincount(pred_codes)) if len(pred_codes) else 0
    true_pairs = pairs(np.bincount(true_codes)) if len(true_codes) else 0
    return {
        "precision": correct / predicted_pairs if predicted_pairs else 1.0,
        "recall": correct / true_pairs if true_pairs else 1.0,
        "correct_pairs": correct,
        "predicted_pairs": predicted_pairs,
        "true_pairs": true_pairs,
    }


def evaluate_groups(
    groups: pd.DataFrame,
    ground_truth: pd.DataFrame,
    selected: pd.DataFrame | None = None,
    truth_column: str = "original_id",
) -> dict:
    """Score ``groups`` (key, group_id) against ``ground_truth`` (key, ``truth_column``).

    Ground-truth records missing from ``groups`` (rejected, or not embedded) count as
    singletons, so they cost recall. With ``selected``, also checks the selection: for each
    selected group its majority true label, and whether the selected groups are the most
    duplicated true groups (``top_k_match``: the share of the top-K true labels, by true
    count, that the selection found; ties in true count are resolved in the selection's
    favour).

    Returns a dict: precision, recall, correct/predicted/true pairs, n_records, n_missing
    (and ``selection``, ``top_k_match`` with ``selected``).
    """
    for frame, name, column in ((groups, "groups", "group_id"), (ground_truth, "ground truth", truth_column)):
        for needed in ("key", column):
            if needed not in frame.columns:
                raise ValueError(f"{name}: no {needed!r} column (columns: {list(frame.columns)})")
    truth = ground_truth[["key", truth_column]].astype({"key": str})
    merged = truth.merge(groups[["key", "group_id"]].astype({"key": str}), on="key", how="left")
    missing = merged["group_id"].isna()
    predicted = merged["group_id"].astype("object").where(~missing, ["missing:" + k for k in merged["key"]])
    scores = pair_scores(predicted.astype(str).tolist(), merged[truth_column].astype(str).tolist())
    scores.update({"n_records": int(len(merged)), "n_missing": int(missing.sum())})
    if selected is not None and len(selected):
        label_of = dict(zip(truth["key"], truth[truth_column].astype(str)))
        true_count = truth[truth_column].astype(str).value_counts()
        rows = []
        for row in selected.itertuples():
            labels = Counter(label_of.get(str(k)) for k in row.keys)
            label, hits = labels.most_common(1)[0]
            rows.append(
                {
                    "prompt_id": row.prompt_id,
                    "dup_count": int(row.dup_count),
                    "true_label": label,
                    "true_count": int(true_count.get(label, 0)) if label is not None else 0,
                    "purity": hits / len(row.keys),
                }
            )
        scores["selection"] = rows
        k = len(selected)
        kth_count = true_count.iloc[min(k, len(true_count)) - 1]
        eligible = set(true_count[true_count >= kth_count].index)  # the top K, ties included
        found = {r["true_label"] for r in rows} & eligible
        scores["top_k_match"] = len(found) / min(k, len(true_count))
    return scores
