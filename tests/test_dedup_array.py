"""The duplicate finder as a local multi-process array (hydra's joblib launcher, one process per
rank, each phase a separate launch as SLURM array tasks are): the same pairs and groups as one
process, and every task's peak memory bounded by its share of the rows (issue 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.dedup.buckets import WRITE_CHUNK, read_pairs
from pipeline.dedup.embeddings_store import write_shard
from pipeline.dedup.grouping import pair_scores
from tests.conftest import REPO

pytestmark = pytest.mark.slow

N, DIM, WORLD_SIZE, NPROBE, K = 120_000, 128, 4, 4, 32
SHARDS = (50_000, 30_000, 40_000)  # uneven, and not aligned with the ranks' row ranges
MIB = 1 << 20


def planted(n: int, dim: int, n_groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: ``n_groups`` clusters of 2-20 members (cosine ~0.96), the rest random; labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 21, n_groups)
    labels = np.concatenate([np.repeat(np.arange(n_groups), sizes), np.arange(n_groups, n_groups + n - sizes.sum())])
    x = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x += rng.standard_normal(x.shape, dtype=np.float32) * (0.2 / np.sqrt(dim)) * (labels < n_groups)[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order], labels[order]


def dedup(run_dir: Path, embeddings: Path, *overrides: str) -> None:
    args = [sys.executable, "-m", "pipeline.dedup", "-m", "hydra/launcher=local", f"run_dir={run_dir}", "embedder=precomputed",
            f"embeddings_dir={embeddings}", "threshold=0.9", f"k={K}", "index.kind=ivf", f"index.nprobe={NPROBE}",
            "top_k=50", "evaluate=false", "progress=false", *overrides]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def peak(run_dir: Path, phase: str, rank: int) -> float:
    return json.loads((run_dir / "dedup" / "memory" / f"{phase}_{rank}.json").read_text())["peak_rss_mib"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup_array")
    vectors, labels = planted(N, DIM, 3000)
    start = 0
    for shard, size in enumerate(SHARDS):
        keys = [f"{i:07d}" for i in range(start, start + size)]
        write_shard(root / "emb", shard, vectors[start : start + size], pd.DataFrame({"key": keys, "caption": keys}))
        start += size
    one, four = root / "one", root / "four"
    dedup(one, root / "emb", "phase=all", "world_size=1")
    for phase in ("index", "search", "group"):
        dedup(four, root / "emb", f"phase={phase}", f"world_size={WORLD_SIZE}")
    return one, four, labels


def test_array_finds_the_same_pairs_and_groups(runs):
    one, four, labels = runs
    for name in ("groups.parquet", "selected.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(four / "dedup" / name), pd.read_parquet(one / "dedup" / name), obj=name)
    # Each query's K best over all tasks' files are the K best of the single search.
    single = read_pairs([one / "dedup" / "pairs" / "pairs_0.npy"], 0, N, K)
    array = read_pairs([four / "dedup" / "pairs" / f"pairs_{r}.npy" for r in range(WORLD_SIZE)], 0, N, K)
    assert len(single) > 10_000
    assert set(zip(array.i.tolist(), array.j.tolist())) == set(zip(single.i.tolist(), single.j.tolist()))
    summaries = [json.loads((run / "dedup" / "summary.json").read_text()) for run in (one, four)]
    assert summaries[0]["pairs"] == summaries[1]["pairs"] and summaries[1]["settings"]["world_size"] == WORLD_SIZE
    # Planted-pair recall: the 0.99.
    groups = pd.read_parquet(one / "dedup" / "groups.parquet")
    predicted = groups.set_index("key").loc[[f"{i:07d}" for i in range(N)], "group_id"].to_numpy()
    assert pair_scores(predicted, labels)["recall"] >= 0.99


def test_every_task_holds_only_its_share(runs):
    """Bounds from arithmetic over the files each task holds, above the interpreter's baseline
    measured in this run (the group tasks of ranks 1-3: same launcher and imports, no work)."""
    one, four, _ = runs
    baseline = max(peak(four, "group", r) for r in range(1, WORLD_SIZE))
    row = DIM * 2  # float16, as stored
    # Working buffers of any size of set: a chunk of rows being assigned (float32, and faiss's
    # tile of similarities for it), a cell being joined.
    chunk = WRITE_CHUNK * DIM * 4 * 2
    share = {
        # Its rows, the k-means sample (32 x nlist rows, float32), its entries (~40 bytes per row x nprobe).
        "index": N / WORLD_SIZE * row + 32 * np.sqrt(NPROBE * N) * DIM * 4 + N / WORLD_SIZE * NPROBE * 40,
        # Its buckets (N x nprobe / W rows); the cells being joined are a small part of them.
        "search": N * NPROBE / WORLD_SIZE * row,
        # A few int64 per row (union-find, sizes, order), the keys and captions (Python strings
        # of 7 characters, ~60 bytes each, twice: as read and in key order).
        "group": N * 8 * 4 + N * 60 * 2 * 2,
    }
    for phase, data in share.items():
        ranks = [0] if phase == "group" else range(WORLD_SIZE)
        for rank in ranks:
            got = peak(four, phase, rank)
            bound = baseline + 2 * (data + chunk) / MIB
            assert got <= bound, f"{phase} rank {rank}: {got:.0f} MiB > {bound:.0f}: baseline {baseline:.0f} + 2 x ({data / MIB:.0f} + {chunk / MIB:.0f}) MiB"
    # The single process holds all N x nprobe bucket rows while searching: more than any task.
    assert peak(one, "all", 0) >= baseline + 0.8 * N * NPROBE * row / MIB
    assert max(peak(four, p, r) for p in ("index", "search") for r in range(WORLD_SIZE)) < peak(one, "all", 0)
