"""The duplicate finder as a local multi-process array (hydra's joblib launcher, one process per
rank, each phase a separate launch as SLURM array tasks are): the same pairs and groups as one
process, the cells trained once (phase=train) rather than by every index task, the group task
sorting the records out of core, and every task's peak memory bounded by its share of the rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.embeddings_store import write_shard
from pipeline.dedup.buckets import WRITE_CHUNK, read_pairs
from pipeline.dedup.grouping import pair_scores
from pipeline.dedup.records import PARQUET_ROW_GROUP
from tests.conftest import REPO, stage_env

pytestmark = pytest.mark.slow

N, DIM, WORLD_SIZE, NPROBE, K = 120_000, 128, 4, 4, 32
GROUP_CHUNK = 20_000  # the array's group task: records per bucket of its sort, queries per step
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
    args = [
        sys.executable,
        "-m",
        "pipeline.dedup",
        "-m",
        "hydra/launcher=local",
        f"run_dir={run_dir}",
        "embedder=precomputed",
        f"embeddings_dir={embeddings}",
        "threshold=0.9",
        f"k={K}",
        "index.kind=ivf",
        f"index.nprobe={NPROBE}",
        "top_k=50",
        "evaluate=false",
        "progress=false",
        *overrides,
    ]
    done = subprocess.run(args, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)
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
    for phase in ("train", "index", "search", "group"):
        dedup(four, root / "emb", f"phase={phase}", f"world_size={WORLD_SIZE}", f"group_chunk_rows={GROUP_CHUNK}")
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
    # Planted-pair recall: at least 0.99.
    groups = pd.read_parquet(one / "dedup" / "groups.parquet")
    predicted = groups.set_index("key").loc[[f"{i:07d}" for i in range(N)], "group_id"].to_numpy()
    assert pair_scores(predicted, labels)["recall"] >= 0.99


def marker(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "dedup" / ".done" / f"{name}.json").read_text())


def test_cells_are_trained_once(runs):
    """One train task (rank 0) trained the cells; the index tasks loaded them: no k-means time,
    the train task's centroid digest; the other ranks of phase=train did nothing."""
    one, four, _ = runs
    train = marker(four, "train")
    assert train["kind"] == "ivf" and train["train_seconds"] > 0 and train["nlist"] == round(np.sqrt(NPROBE * N))
    assert train["centroids"] == marker(one, "train")["centroids"]  # the same cells as one process
    for rank in range(WORLD_SIZE):
        index = marker(four, f"index_{rank}")
        assert index["centroids"] == train["centroids"] and "train_seconds" not in index
    records = [json.loads((four / "dedup" / "memory" / f"train_{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["rank"] for r in records] == list(range(WORLD_SIZE)) and len({r["pid"] for r in records}) == WORLD_SIZE
    stats = [json.loads((four / "dedup" / "stats" / f"train_{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [s["done"] for s in stats] == [1] + [0] * (WORLD_SIZE - 1)


def test_group_task_sorts_records_in_buckets(runs):
    """The group task held one bucket of records at a time: ceil(N / chunk) buckets, the largest
    within twice the chunk (splitters from a sample of the keys)."""
    _, four, _ = runs
    group = marker(four, "group")
    assert group["record_buckets"] == -(-N // GROUP_CHUNK) and group["records_held_max"] <= 2 * GROUP_CHUNK


def test_every_task_holds_only_its_share(runs):
    """Bounds from arithmetic over the files each task holds, above the interpreter's baseline
    measured in this run (the group tasks of ranks 1-3: same launcher and imports, no work)."""
    one, four, _ = runs
    baseline = max(peak(four, "group", r) for r in range(1, WORLD_SIZE))
    row = DIM * 2  # float16, as stored
    # Working buffers of any size of set: a chunk of rows being assigned (float32, and faiss's
    # tile of similarities for it), a cell being joined.
    chunk = WRITE_CHUNK * DIM * 4 * 2
    nlist = np.sqrt(NPROBE * N)
    pairs = json.loads((four / "dedup" / "summary.json").read_text())["pairs"] * 2  # directed, at most
    share = {
        # The k-means sample (32 x nlist rows: float16 as read, float32 for faiss), the centroids.
        "train": 32 * nlist * DIM * (2 + 4) + nlist * DIM * 4,
        # Its rows, the centroids, its entries (~40 bytes per row x nprobe): no k-means sample.
        "index": N / WORLD_SIZE * row + nlist * DIM * 4 + N / WORLD_SIZE * NPROBE * 40,
        # Its buckets (N x nprobe / W rows); the cells being joined are a small part of them.
        "search": N * NPROBE / WORLD_SIZE * row,
        # A few int64 per row (union-find labels, the groups with duplicates); a step of pairs
        # (20 bytes each, three copies); a bucket of records (7-character keys and captions,
        # ~60 bytes each as Python strings, twice: as read and sorted) and up to a parquet row
        # group of output rows (~30 bytes each in Arrow).
        "group": N * 8 * 4
        + min(pairs, GROUP_CHUNK * K) * 20 * 3
        + 2 * GROUP_CHUNK * 60 * 2 * 2
        + min(N, PARQUET_ROW_GROUP) * 30 * 2,
    }
    for phase, data in share.items():
        ranks = [0] if phase in ("train", "group") else range(WORLD_SIZE)
        for rank in ranks:
            got = peak(four, phase, rank)
            bound = baseline + 2 * (data + chunk) / MIB
            assert got <= bound, (
                f"{phase} rank {rank}: {got:.0f} MiB > {bound:.0f}: baseline {baseline:.0f} + 2 x ({data / MIB:.0f} + {chunk / MIB:.0f}) MiB"
            )
    # The single process holds all N x nprobe bucket rows while searching: more than any task.
    assert peak(one, "all", 0) >= baseline + 0.8 * N * NPROBE * row / MIB
    assert max(peak(four, p, r) for p in ("train", "index", "search") for r in range(WORLD_SIZE)) < peak(one, "all", 0)


# ----------------------------------------------------------------------------------------
# phase=all as chained arrays from one command (submit=local)

CHAINED_BANDS = {"heavy": (3, 6), "mid": (3, 3), "single": (20, 1)}


def run_stage(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "pipeline.dedup",
        f"run_dir={run_dir}",
        f"data.path={data_dir / 'images'}",
        f"data.ground_truth={data_dir / 'ground_truth.parquet'}",
        "top_k=5",
        "progress=false",
        *overrides,
    ]
    done = subprocess.run(args, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_phase_all_as_local_array_equals_one_process(tmp_path):
    """`phase=all world_size=3 submit=local`, one command: every phase's three ranks ran as
    three processes, phase after phase, and wrote one process's groups and selection byte for byte."""
    from pipeline.demo.dataset import build_demo_dataset

    build_demo_dataset(tmp_path / "data", bands=CHAINED_BANDS)
    one, three = tmp_path / "one", tmp_path / "three"
    run_stage(one, tmp_path / "data", "phase=all", "world_size=1")
    done = run_stage(three, tmp_path / "data", "phase=all", "world_size=3", "submit=local")
    assert "groups selected" in done.stdout  # the group task's summary, printed by the command
    for name in ("groups.parquet", "selected.parquet"):
        assert (three / "dedup" / name).read_bytes() == (one / "dedup" / name).read_bytes(), name
    assert len(pd.read_parquet(one / "dedup" / "selected.parquet")) == 5
    for phase in ("embed", "index", "search"):
        records = [json.loads((three / "dedup" / "memory" / f"{phase}_{r}.json").read_text()) for r in range(3)]
        assert [(r["phase"], r["rank"], r["world_size"]) for r in records] == [(phase, r, 3) for r in range(3)]
        assert len({r["pid"] for r in records}) == 3  # a process per rank
    stats = json.loads((three / "dedup" / "stats.json").read_text())
    assert [stats[p]["world_size"] for p in ("embed", "train", "index", "search", "group")] == [3] * 5
    assert stats["embed"]["done"] == 3 and stats["group"]["done"] == 1
    summary = json.loads((three / "dedup" / "summary.json").read_text())
    assert summary["settings"]["world_size"] == 3 and summary["timing_seconds"]["embed"] > 0
    # A second command finds every unit done and changes nothing.
    stamp = (three / "dedup" / "groups.parquet").stat().st_mtime_ns
    run_stage(three, tmp_path / "data", "phase=all", "world_size=3", "submit=local")
    assert (three / "dedup" / "groups.parquet").stat().st_mtime_ns == stamp
