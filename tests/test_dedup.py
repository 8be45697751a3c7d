"""The duplicate finder: pair search, grouping, evaluation, and the stage on small demo sets."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.embeddings_store import read_embeddings, read_metadata, unit_rows, write_shard
from pipeline.dedup import DedupSettings, format_summary, run_dedup, shard_bounds
from pipeline.dedup.buckets import join_buckets, read_pairs, write_buckets, write_pairs
from pipeline.dedup.grouping import UnionFind, connected_groups, evaluate_groups, group_table, pair_scores, select_top
from pipeline.dedup.index import IndexSettings, cell_pairs, exact_pairs, exact_pairs_blocked, find_pairs, train_cells
from pipeline.dedup.pair_verify import VerifySettings
from pipeline.dedup.settings import VerifyStage
from pipeline.demo.dataset import build_demo_dataset
from pipeline.embedders.thumbnail import ThumbnailEmbedder

from .conftest import REPO, stage_env

# A small demo set: 2 originals x 30 copies, 3 x 8, 4 x 3, and 60 singletons (156 records).
SMALL_BANDS = {"heavy": (2, 30), "mid": (3, 8), "low": (4, 3), "single": (60, 1)}


def clustered_vectors(n: int, dim: int, n_groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: ``n_groups`` tight clusters of 2-20 members (cosine ~0.95), the rest random."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 21, n_groups)
    labels = np.concatenate([np.repeat(np.arange(n_groups), sizes), np.arange(n_groups, n_groups + n - sizes.sum())])
    bases = rng.standard_normal((labels.max() + 1, dim))
    x = bases[labels] / np.linalg.norm(bases[labels], axis=1, keepdims=True)
    x += rng.standard_normal(x.shape) * (0.2 / np.sqrt(dim)) * (labels < n_groups)[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order].astype(np.float32), labels[order]


def brute_force_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def partition(groups: pd.DataFrame) -> set[frozenset[str]]:
    return {frozenset(frame["key"]) for _, frame in groups.groupby("group_id")}


# ----------------------------------------------------------------------------------------
# Pair search


def test_exact_pairs_are_every_pair_above_the_threshold():
    x, _ = clustered_vectors(700, 24, 30)
    expected = brute_force_pairs(x, 0.8)
    pairs = exact_pairs(x, 0.8, k=None, query_batch=128)
    assert pairs.undirected() == expected
    assert (pairs.similarity >= 0.8).all() and (pairs.i != pairs.j).all()
    # With k, each query keeps its k most similar neighbours above the threshold.
    capped = exact_pairs(x, 0.8, k=3, query_batch=100)
    per_query = np.bincount(capped.i, minlength=len(x))
    assert per_query.max() <= 3
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    for q in np.flatnonzero(per_query)[:50]:
        above = np.sort(sims[q][sims[q] >= 0.8])[::-1][:3]
        np.testing.assert_allclose(np.sort(capped.similarity[capped.i == q])[::-1], above, atol=1e-5)


def test_ivf_pairs_recall_and_sharding():
    x, _ = clustered_vectors(4000, 32, 150, seed=1)
    expected = brute_force_pairs(x, 0.85)
    settings = IndexSettings(kind="ivf", nlist=40, nprobe=4)
    cells = train_cells(x, settings)
    assert cells.assign.shape == (4000, 4) and cells.centroids.shape == (40, 32)
    pairs = cell_pairs(x, cells, 0.85, k=None, threads=2)
    found = pairs.undirected()
    assert found <= expected  # every pair found is a real one
    assert len(found) / len(expected) >= 0.99
    # Query shards (what ranks do) together find exactly what one search finds.
    halves = [cell_pairs(x, cells, 0.85, None, *shard_bounds(len(x), r, 3)) for r in range(3)]
    assert set().union(*(h.undirected() for h in halves)) == found
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_k_cap_keeps_big_groups_connected():
    """200 copies of one image with k=5: few pairs, one group."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(16)
    x = base + rng.standard_normal((200, 16)) * 0.02
    x = np.vstack([x, rng.standard_normal((50, 16))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for settings in (IndexSettings(kind="exact"), IndexSettings(kind="ivf", nlist=4, nprobe=2)):
        pairs = find_pairs(x, 0.9, k=5, settings=settings)
        assert np.bincount(pairs.i).max() <= 5
        labels = connected_groups(len(x), pairs.i, pairs.j)
        assert len(set(labels[:200])) == 1 and len(set(labels[200:])) == 50


def test_index_settings_and_threshold_errors_name_the_key():
    with pytest.raises(ValueError, match="index.kind"):
        IndexSettings(kind="hnsw")
    with pytest.raises(ValueError, match="index.nprobe"):
        IndexSettings(nprobe=0)
    assert IndexSettings(exact_max=10).resolved_kind(11) == "ivf"
    assert IndexSettings(exact_max=10).resolved_kind(10) == "exact"
    with pytest.raises(ValueError, match="threshold"):
        DedupSettings(threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        DedupSettings(threshold=None)
    with pytest.raises(ValueError, match="^k:"):
        DedupSettings(threshold=0.9, k=0)


# ----------------------------------------------------------------------------------------
# Grouping and evaluation


def test_groups_are_connected_components_ranked_by_size():
    keys = [f"k{i}" for i in range(8)]
    captions = ["a dog", "a dog", "dog wallpaper", "a cat", "a cat", "x", "y", "a dog"]
    # 0-1, 1-2, 2-7 chain (different captions, one group); 3-4; 5 and 6 alone.
    labels = connected_groups(8, np.array([0, 1, 7, 3]), np.array([1, 2, 2, 4]))
    groups = group_table(keys, captions, labels)
    assert groups.set_index("key")["group_id"].to_dict() == {
        "k0": 0,
        "k1": 0,
        "k2": 0,
        "k7": 0,
        "k3": 1,
        "k4": 1,
        "k5": 2,
        "k6": 3,
    }
    selected = select_top(groups, top_k=5)
    assert selected["prompt_id"].tolist() == ["00000", "00001"]  # singletons are not selected
    assert selected["caption"].tolist() == ["a dog", "a cat"]  # the most common caption
    assert selected["dup_count"].tolist() == [4, 2]
    assert selected["keys"].iloc[0] == ["k0", "k1", "k2", "k7"]
    assert select_top(groups, top_k=1, min_group_size=1)["dup_count"].tolist() == [4]


def test_pair_scores_count_pairs():
    # predicted {a,b}, {c,d}; true {a,b,c}, {d}: predicted pairs ab, cd; true pairs ab, ac, bc.
    scores = pair_scores(["p", "p", "q", "q"], ["t", "t", "t", "u"])
    assert (scores["correct_pairs"], scores["predicted_pairs"], scores["true_pairs"]) == (1, 2, 3)
    assert scores["precision"] == pytest.approx(1 / 2) and scores["recall"] == pytest.approx(1 / 3)
    assert pair_scores(["a", "b"], ["c", "d"])["precision"] == 1.0  # no pairs: nothing wrong


# ----------------------------------------------------------------------------------------
# The stage on a small demo set


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_demo")
    build_demo_dataset(root, seed=3, bands=SMALL_BANDS)
    return root


def files_data(root: Path) -> dict:
    return {"format": "files", "path": str(root / "images")}


@pytest.fixture(scope="module")
def small_run(small_demo, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "dedup"
    embedder = ThumbnailEmbedder()
    summary = run_dedup(
        out,
        DedupSettings(threshold=embedder.threshold, top_k=4),
        data=files_data(small_demo),
        embedder=embedder,
        ground_truth=small_demo / "ground_truth.parquet",
        progress=False,
    )
    return out, summary


def test_groups_match_the_planted_duplicates(small_demo, small_run):
    out, summary = small_run
    truth = pd.read_parquet(small_demo / "ground_truth.parquet")
    groups = pd.read_parquet(out / "groups.parquet")
    # Count pairs the slow way, independently of pair_scores.
    group_of = dict(zip(groups["key"], groups["group_id"]))
    original_of = dict(zip(truth["key"], truth["original_id"]))
    same_pred = same_true = both = 0
    for a, b in itertools.combinations(truth["key"], 2):
        p, t = group_of[a] == group_of[b], original_of[a] == original_of[b]
        same_pred, same_true, both = same_pred + p, same_true + t, both + (p and t)
    evaluation = summary["evaluation"]
    assert (evaluation["correct_pairs"], evaluation["predicted_pairs"], evaluation["true_pairs"]) == (both, same_pred, same_true)
    assert evaluation["precision"] >= 0.95 and evaluation["recall"] >= 0.95, evaluation
    assert evaluation["n_missing"] == 0


def test_selected_are_the_most_duplicated_originals(small_demo, small_run):
    out, _ = small_run
    truth = pd.read_parquet(small_demo / "ground_truth.parquet")
    selected = pd.read_parquet(out / "selected.parquet")
    assert selected["prompt_id"].tolist() == ["00000", "00001", "00002", "00003"]
    assert selected["dup_count"].is_monotonic_decreasing
    original_of = truth.set_index("key")["original_id"]
    band_of = truth.drop_duplicates("original_id").set_index("original_id")["band"]
    caption_of = truth.drop_duplicates("original_id").set_index("original_id")["original_caption"]
    majority = []
    for keys in selected["keys"]:
        counts = original_of[list(keys)].value_counts()
        assert counts.iloc[0] / len(keys) >= 0.95  # a group is one original's copies
        majority.append(counts.index[0])
    # The two originals copied 30 times come first (each group holding >= 95% of its copies),
    # then two of the three copied 8 times.
    assert [band_of[o] for o in majority] == ["heavy", "heavy", "mid", "mid"] and len(set(majority)) == 4
    for original, count in zip(majority, selected["dup_count"]):
        assert count >= 0.95 * (original_of == original).sum()
    # The caption is the one most copies carry: the original's.
    assert selected["caption"].tolist() == [caption_of[o] for o in majority]


def test_outputs_follow_the_run_directory_contract(small_demo, small_run):
    out, summary = small_run
    truth = pd.read_parquet(small_demo / "ground_truth.parquet")
    groups = pd.read_parquet(out / "groups.parquet")
    assert list(groups.columns[:3]) == ["key", "group_id", "caption"]
    assert sorted(groups["key"]) == sorted(truth["key"])
    assert groups.set_index("key")["caption"].to_dict() == truth.set_index("key")["caption"].to_dict()
    selected = pd.read_parquet(out / "selected.parquet")
    assert list(selected.columns[:4]) == ["prompt_id", "caption", "dup_count", "keys"]
    assert selected["prompt_id"].map(type).eq(str).all()
    emb = np.load(out / "embeddings" / "img_emb" / "img_emb_0.npy")
    meta = pd.read_parquet(out / "embeddings" / "metadata" / "metadata_0.parquet")
    assert emb.dtype == np.float16 and emb.shape == (len(truth), ThumbnailEmbedder().dim) and len(meta) == len(truth)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert {"key", "caption"} <= set(meta.columns)
    assert (out / "rejects.jsonl").read_text() == ""
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["records_read"] == len(truth) and on_disk["rejected"] == 0
    assert on_disk["largest_groups"][0]["dup_count"] == 30
    assert on_disk["settings"]["index"]["resolved_kind"] == "exact"
    assert set(on_disk["timing_seconds"]) >= {"embed", "train", "index", "search", "group", "total"}
    text = format_summary(summary)
    assert "pair precision" in text and "2 groups with" not in text


def test_rerun_skips_done_work_and_a_new_threshold_redoes_only_the_search(small_demo, tmp_path):
    out = tmp_path / "dedup"
    embedder = ThumbnailEmbedder()

    def run(threshold):
        return run_dedup(
            out, DedupSettings(threshold=threshold, top_k=3), data=files_data(small_demo), embedder=embedder, progress=False
        )

    run(0.84)
    emb_file = out / "embeddings" / "img_emb" / "img_emb_0.npy"
    marks = {p.name: p.stat().st_mtime_ns for p in (out / ".done").iterdir()}
    stamp = emb_file.stat().st_mtime_ns
    run(0.84)
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".done").iterdir()} == marks  # nothing redone
    summary = run(0.99)
    assert emb_file.stat().st_mtime_ns == stamp  # the embeddings stay
    assert marker_mtime(out, "search_0") != marks["search_0.json"]
    assert summary["settings"]["threshold"] == 0.99
    loose = run_dedup(out, DedupSettings(threshold=0.5, top_k=3), embedder=embedder, data=files_data(small_demo), progress=False)
    assert loose["pairs"] > summary["pairs"]


def marker_mtime(out: Path, name: str) -> int:
    return (out / ".done" / f"{name}.json").stat().st_mtime_ns


def test_sharded_phases_give_the_same_groups(small_demo, small_run, tmp_path):
    """world_size=2 run phase by phase (as a SLURM array would) == the single run."""
    out = tmp_path / "dedup"
    embedder = ThumbnailEmbedder()
    settings = DedupSettings(threshold=embedder.threshold, top_k=4)
    common = dict(data=files_data(small_demo), embedder=embedder, world_size=2, progress=False)
    run_dedup(out, settings, phase="embed", rank=1, **common)
    with pytest.raises(RuntimeError, match="embed_0"):
        run_dedup(out, settings, phase="index", rank=0, **common)
    run_dedup(out, settings, phase="embed", rank=0, **common)
    with pytest.raises(RuntimeError, match="phase=train"):
        run_dedup(out, settings, phase="index", rank=0, **common)
    assert run_dedup(out, settings, phase="train", rank=1, **common) is None and not (out / ".done" / "train.json").exists()
    run_dedup(out, settings, phase="train", rank=0, **common)
    with pytest.raises(RuntimeError, match="index"):
        run_dedup(out, settings, phase="search", rank=0, **common)
    for phase in ("index", "search", "verify"):
        for rank in (0, 1):
            run_dedup(out, settings, phase=phase, rank=rank, **common)
    assert run_dedup(out, settings, phase="group", rank=1, **common) is None  # rank 0's job
    summary = run_dedup(out, settings, phase="group", rank=0, **common)
    assert sorted(p.name for p in (out / "embeddings" / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    single = pd.read_parquet(small_run[0] / "groups.parquet")
    assert partition(pd.read_parquet(out / "groups.parquet")) == partition(single)
    selected = pd.read_parquet(out / "selected.parquet")
    pd.testing.assert_series_equal(selected["dup_count"], pd.read_parquet(small_run[0] / "selected.parquet")["dup_count"])
    assert summary["records_read"] == len(single)
    with pytest.raises(ValueError, match="world_size"):
        run_dedup(out, settings, phase="all", **common)


def test_verify_array_with_two_images_a_chunk_gives_the_groups_of_one_process(small_demo, small_run, tmp_path):
    """Pairs verified by 2 tasks, each holding 2 images at a time, give the single run's groups;
    each task fetched its images a pair at a time and verified only its own share."""
    embedder = ThumbnailEmbedder()
    settings = DedupSettings(threshold=embedder.threshold, top_k=4, verify=VerifyStage(chunk_images=2))
    out = tmp_path / "dedup"
    common = dict(data=files_data(small_demo), embedder=embedder, world_size=2, progress=False)
    for phase in ("embed", "train", "index", "search", "verify", "group"):
        for rank in (0, 1):
            run_dedup(out, settings, phase=phase, rank=rank, **common)
    assert partition(pd.read_parquet(out / "groups.parquet")) == partition(pd.read_parquet(small_run[0] / "groups.parquet"))
    markers = [json.loads((out / ".done" / f"verify_{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((small_run[0] / ".done" / "verify_0.json").read_text())
    assert sum(m["candidates"] for m in markers) == single["candidates"] > 0
    for m in markers:
        assert m["chunks"] >= m["compared"] > 0  # at most 2 images a chunk: one pair each
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verification"]["enabled"] and summary["verification"]["candidates"] == single["candidates"]


def test_verifying_searches_at_the_candidate_threshold(small_demo, small_run, tmp_path):
    """The search proposes every pair at or above verify.candidate_threshold (below
    ``threshold``); without verification it keeps to ``threshold``."""
    embedder = ThumbnailEmbedder()
    loose = embedder.threshold - 0.1
    for verify, floor in (
        (VerifyStage(candidate_threshold=loose), loose),
        (VerifyStage(enabled=False, candidate_threshold=loose), embedder.threshold),
    ):
        out = tmp_path / f"verify_{verify.enabled}" / "dedup"
        shutil.copytree(small_run[0] / "embeddings", out / "embeddings")
        settings = DedupSettings(threshold=embedder.threshold, k=None, top_k=4, verify=verify)
        run_dedup(out, settings, data=files_data(small_demo), embedder=embedder, phase="all", progress=False)
        pairs = np.load(out / "pairs" / "pairs_0.npy")
        vectors = read_embeddings(out / "embeddings")
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -2)
        assert pairs["similarity"].min() >= floor - 1e-3
        assert len(pairs) == int((sims >= floor).sum()) > 0


def test_a_changed_verifier_setting_redoes_verify_and_group_only(small_demo, small_run, tmp_path):
    out = tmp_path / "dedup"
    shutil.copytree(small_run[0], out)
    embedder = ThumbnailEmbedder()
    stricter = VerifyStage(pair=VerifySettings(min_structure=1.0, min_tone=1.0, max_colour=0.0, max_changed=0.0))
    settings = DedupSettings(threshold=embedder.threshold, top_k=4, verify=stricter)
    summary = run_dedup(out, settings, data=files_data(small_demo), embedder=embedder, progress=False)
    done = [json.loads((out / "stats" / f"{p}_0.json").read_text())["done"] for p in ("embed", "search", "verify", "group")]
    assert done == [0, 0, 1, 1]
    # No pair of distinct images passes correlations of exactly 1 with nothing changed.
    assert (
        summary["verification"]["verified"] < json.loads((small_run[0] / "summary.json").read_text())["verification"]["verified"]
    )


def test_precomputed_embeddings_without_images_are_not_verified(small_run, tmp_path, caplog):
    embedder = ThumbnailEmbedder()
    settings = DedupSettings(threshold=embedder.threshold, top_k=4)
    with caplog.at_level("INFO", logger="pipeline.dedup.phases"):
        summary = run_dedup(tmp_path / "dedup", settings, embeddings_dir=small_run[0] / "embeddings", progress=False)
    assert summary["verification"] == {"enabled": False, "threshold": embedder.threshold}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify: off")]
    assert lines == [
        f"verify: off (precomputed embeddings and no images); groups join the embedder's pairs at threshold {embedder.threshold:.3f}"
    ]
    with pytest.raises(ValueError, match="verify.enabled: verifying pairs needs their images"):
        run_dedup(
            tmp_path / "again",
            DedupSettings(threshold=0.9, verify=VerifyStage(enabled=True)),
            embeddings_dir=small_run[0] / "embeddings",
        )


def test_world_size_does_not_change_groups_or_selection(small_demo, small_run, tmp_path):
    """Records split over 2 ranks (record i on rank i % 2) and read back rank by rank give the
    same groups.parquet and selected.parquet as one process, ties between equal-size groups
    included: 24 groups with min_group_size=1 select the 9 duplicate groups, then singletons."""
    embedder = ThumbnailEmbedder()
    settings = DedupSettings(threshold=embedder.threshold, top_k=24, min_group_size=1)
    single = tmp_path / "single"
    shutil.copytree(small_run[0], single)  # embedded and searched already: only the grouping is redone
    one = run_dedup(single, settings, data=files_data(small_demo), embedder=embedder, progress=False)
    sharded = tmp_path / "sharded"
    common = dict(data=files_data(small_demo), embedder=embedder, world_size=2, progress=False)
    summaries = [
        run_dedup(sharded, settings, phase=phase, rank=rank, **common)
        for phase in ("embed", "train", "index", "search", "verify", "group")
        for rank in (0, 1)
    ]
    two = summaries[-2]  # group on rank 0
    assert one["selected"] == 24 and one["duplicate_groups"] == 9
    for name in ("groups.parquet", "selected.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(sharded / name), pd.read_parquet(single / name), obj=name)
    assert two["largest_groups"] == one["largest_groups"]
    # Groups of equal size are ranked by their smallest key; the records are listed by key.
    groups = pd.read_parquet(single / "groups.parquet")
    assert groups["key"].is_monotonic_increasing
    firsts = groups.groupby("group_id").agg(size=("group_size", "first"), first=("key", "min"))
    assert firsts.sort_values(["size", "first"], ascending=[False, True]).index.tolist() == firsts.index.tolist()


def test_precomputed_embeddings_give_the_same_groups(small_run, tmp_path):
    source, _ = small_run
    out = tmp_path / "dedup"
    summary = run_dedup(out, DedupSettings(threshold=0.84, top_k=4), embeddings_dir=source / "embeddings", progress=False)
    assert not (out / "embeddings").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "groups.parquet"), pd.read_parquet(source / "groups.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "selected.parquet"), pd.read_parquet(source / "selected.parquet"))
    assert summary["settings"]["embedder"]["name"] == "precomputed"


def test_ivf_index_through_the_stage(small_demo, small_run, tmp_path):
    settings = DedupSettings(threshold=0.84, top_k=4, index=IndexSettings(kind="ivf", nlist=6, nprobe=3))
    summary = run_dedup(
        tmp_path / "dedup",
        settings,
        embeddings_dir=small_run[0] / "embeddings",
        ground_truth=small_demo / "ground_truth.parquet",
        progress=False,
    )
    assert summary["settings"]["index"]["resolved_kind"] == "ivf" and summary["settings"]["index"]["nlist"] == 6
    assert (tmp_path / "dedup" / "index" / "assign_0.npy").exists() and (tmp_path / "dedup" / "index" / "centroids.npy").exists()
    assert summary["evaluation"]["recall"] >= 0.95 and summary["evaluation"]["precision"] >= 0.95


@pytest.mark.slow
def test_open_clip_end_to_end_and_from_precomputed(tmp_path):
    """A random ViT-B-32 through the whole stage; its embeddings read back give the same groups."""
    import torch

    from pipeline.embedders.openclip import OpenClipEmbedder

    build_demo_dataset(tmp_path / "tiny", seed=5, bands={"heavy": (1, 8), "low": (2, 3), "single": (10, 1)})
    torch.manual_seed(0)
    embedder = OpenClipEmbedder("ViT-B-32", pretrained=None, device="cpu", batch_size=16)
    settings = DedupSettings(threshold=0.995, top_k=3, batch_size=16)
    first = run_dedup(tmp_path / "a", settings, data=files_data(tmp_path / "tiny"), embedder=embedder, progress=False)
    emb = np.load(tmp_path / "a" / "embeddings" / "img_emb" / "img_emb_0.npy")
    assert emb.shape == (24, 512) and emb.dtype == np.float16 and first["records_embedded"] == 24
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert first["settings"]["embedder"] == {"name": "open_clip:ViT-B-32:random", "dim": 512}
    second = run_dedup(tmp_path / "b", settings, embeddings_dir=tmp_path / "a" / "embeddings", progress=False)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a" / "groups.parquet"), pd.read_parquet(tmp_path / "b" / "groups.parquet")
    )
    assert first["groups"] == second["groups"]


def test_bad_records_are_rejected_and_recorded(small_demo, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(small_demo / "images", images)
    (images / "000005.jpg").write_bytes(b"not a jpeg at all")
    (images / "000007.txt").unlink()
    summary = run_dedup(
        tmp_path / "dedup",
        DedupSettings(threshold=0.84),
        data={"format": "files", "path": str(images)},
        embedder=ThumbnailEmbedder(),
        progress=False,
    )
    rejects = [json.loads(line) for line in (tmp_path / "dedup" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rejects) == ["000005", "000007"]
    assert summary["rejected"] == 2 and summary["records_read"] == summary["records_embedded"] + 2
    assert set(summary["rejected_by_reason"]) == {"corrupt image", "missing caption"}
    assert "000005" not in set(pd.read_parquet(tmp_path / "dedup" / "groups.parquet")["key"])


def test_clear_errors_for_bad_inputs(small_run, tmp_path):
    settings = DedupSettings(threshold=0.84)
    with pytest.raises(FileNotFoundError, match="data.ground_truth"):
        run_dedup(tmp_path / "a", settings, embeddings_dir=small_run[0] / "embeddings", ground_truth=tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="embedder"):
        run_dedup(tmp_path / "b", settings, data={"format": "files", "path": str(tmp_path / "data")})
    with pytest.raises(FileNotFoundError, match="embeddings_dir"):
        run_dedup(tmp_path / "c", settings, embeddings_dir=tmp_path / "empty")
    # A metadata file that does not match its embeddings: the error names the files.
    broken = tmp_path / "broken"
    write_shard(broken, 0, np.eye(3, dtype=np.float32), pd.DataFrame({"key": ["a", "b", "c"], "caption": ["x", "y", "z"]}))
    pd.DataFrame({"key": ["a"], "caption": ["x"]}).to_parquet(broken / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="img_emb_0.npy has 3 rows but .*metadata_0.parquet has 1"):
        read_embeddings(broken)
    pd.DataFrame({"key": ["a", "b", "c"]}).to_parquet(broken / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="lacks columns \\['caption'\\]"):
        read_metadata(broken)


def test_evaluate_groups_counts_missing_records_against_recall():
    truth = pd.DataFrame({"key": ["a", "b", "c", "d"], "original_id": ["o1", "o1", "o1", "o2"]})
    groups = pd.DataFrame({"key": ["a", "b", "d"], "group_id": [0, 0, 1]})  # "c" was rejected
    scores = evaluate_groups(groups, truth)
    assert scores["n_missing"] == 1 and scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 / 3)


def test_make_dedup_entry_point(small_demo, tmp_path):
    """``python -m pipeline.dedup`` with Hydra overrides prints the summary and the evaluation."""
    env = stage_env()
    args = [
        sys.executable,
        "-m",
        "pipeline.dedup",
        f"run_dir={tmp_path}",
        f"data.path={small_demo / 'images'}",
        f"data.ground_truth={small_demo / 'ground_truth.parquet'}",
        "top_k=3",
        "progress=false",
    ]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ground truth: pair precision" in done.stdout
    assert len(pd.read_parquet(tmp_path / "dedup" / "selected.parquet")) == 3
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.dedup", f"run_dir={tmp_path / 'x'}", "embedder=precomputed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "embeddings_dir" in bad.stderr


@pytest.mark.slow
def test_full_demo_set_groups_and_selection(demo_set, tmp_path):
    """The full demo set: pair precision and recall >= 0.95; the top 6 and 12 selected
    groups are the 6 originals copied 150 times, then the 6 copied 40 times."""
    embedder = ThumbnailEmbedder()
    summary = run_dedup(
        tmp_path / "dedup",
        DedupSettings(threshold=embedder.threshold, top_k=12),
        data=files_data(demo_set),
        embedder=embedder,
        ground_truth=demo_set / "ground_truth.parquet",
        progress=False,
    )
    evaluation = summary["evaluation"]
    assert evaluation["precision"] >= 0.95 and evaluation["recall"] >= 0.95, evaluation
    truth = pd.read_parquet(demo_set / "ground_truth.parquet")
    band_of = truth.drop_duplicates("original_id").set_index("original_id")["band"]
    chosen = [row["true_label"] for row in evaluation["selection"]]
    assert [band_of[o] for o in chosen] == ["heavy"] * 6 + ["high"] * 6
    assert len(set(chosen)) == 12 and evaluation["top_k_match"] == 1.0
    assert all(row["purity"] >= 0.95 for row in evaluation["selection"])


# ----------------------------------------------------------------------------------------
# The array phases' pieces: blocked exact search, bucket join, streamed components


def test_blocked_exact_search_equals_one_block():
    x, _ = clustered_vectors(900, 24, 40, seed=4)
    for k in (None, 3):
        whole = exact_pairs(x, 0.8, k=k, query_batch=128)
        blocked = exact_pairs_blocked(lambda lo, hi: x[lo:hi], len(x), 0.8, k, 100, 700, query_batch=64, database_block=250)
        expected = {(i, j) for i, j in zip(whole.i.tolist(), whole.j.tolist()) if 100 <= i < 700}
        assert set(zip(blocked.i.tolist(), blocked.j.tolist())) == expected


def test_bucket_join_finds_the_in_memory_pairs(tmp_path):
    """Rows bucketed by 3 index tasks and joined by 3 search tasks, each query keeping its k
    best over the tasks' files: exactly the pairs (and similarities) of the in-memory join."""
    x, _ = clustered_vectors(3000, 32, 120, seed=5)
    stored = x.astype(np.float16)
    vectors = unit_rows(stored)  # what every phase reads
    cells = train_cells(vectors, IndexSettings(kind="ivf", nlist=30, nprobe=3))
    for k in (None, 4):
        expected = cell_pairs(vectors, cells, 0.85, k=k, threads=2)
        world_size = 3
        for rank in range(world_size):
            lo, hi = shard_bounds(len(x), rank, world_size)
            write_buckets(tmp_path / "index", rank, world_size, stored[lo:hi], lo, cells.assign[lo:hi], cells.nlist)
        files = []
        for owner in range(world_size):
            files.append(tmp_path / "pairs" / f"pairs_{owner}.npy")
            write_pairs(files[-1], join_buckets(tmp_path / "index", owner, world_size, cells.nlist, 0.85, k, threads=2))
        got = read_pairs(files, 0, len(x), k)
        assert len(got) == len(expected) > 100
        found = dict(zip(zip(got.i.tolist(), got.j.tolist()), got.similarity.tolist()))
        assert found == dict(zip(zip(expected.i.tolist(), expected.j.tolist()), expected.similarity.tolist()))


def test_union_find_over_edge_batches_gives_the_connected_components():
    rng = np.random.default_rng(6)
    n = 5000
    i, j = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    finder = UnionFind(n)
    for lo in range(0, len(i), 700):  # edges a batch at a time, as the group phase streams them
        finder.union(i[lo : lo + 700], j[lo : lo + 700])
    labels = finder.labels()
    reference = connected_groups(n, i, j)
    assert len(set(zip(labels.tolist(), reference.tolist()))) == len(set(reference.tolist())) == len(set(labels.tolist()))
    assert (labels <= np.arange(n)).all() and (labels[labels] == labels).all()  # roots: each component's smallest row
    with pytest.raises(ValueError, match="outside"):
        finder.union(np.array([0]), np.array([n]))


# ----------------------------------------------------------------------------------------
# Cells trained once (phase=train), and the group phase's records sorted out of core


def test_cells_are_trained_once_and_index_tasks_only_load_them(small_run, tmp_path, monkeypatch):
    """phase=train (rank 0) trains the cells; index tasks load them and never run k-means; an
    index task without them refuses naming phase=train; the array equals phase=all."""
    import pipeline.dedup.buckets as buckets_module
    import pipeline.dedup.index as index_module
    import pipeline.dedup.phases as phases_module

    emb = small_run[0] / "embeddings"
    settings = DedupSettings(threshold=0.84, top_k=4, index=IndexSettings(kind="ivf", nlist=6, nprobe=3))
    one = tmp_path / "one"
    run_dedup(one, settings, embeddings_dir=emb, progress=False)
    out = tmp_path / "two"
    common = dict(embeddings_dir=emb, world_size=2, progress=False)
    with pytest.raises(RuntimeError, match=r"run phase=train first"):
        run_dedup(out, settings, phase="index", rank=1, **common)
    run_dedup(out, settings, phase="train", rank=1, **common)  # rank 1: nothing to do
    assert not (out / "index" / "centroids.npy").exists()
    run_dedup(out, settings, phase="train", rank=0, **common)
    train = json.loads((out / ".done" / "train.json").read_text())
    assert train["kind"] == "ivf" and train["nlist"] == 6 and (out / "index" / "centroids.npy").exists()

    def no_kmeans(*args, **kwargs):
        raise AssertionError("an index task trained k-means")

    for module in (phases_module, buckets_module, index_module):
        for name in ("train_centroids", "kmeans_centroids", "train_cells"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_kmeans)
    for phase in ("index", "search", "verify", "group"):
        for rank in (0, 1):
            run_dedup(out, settings, phase=phase, rank=rank, **common)
    markers = [json.loads((out / ".done" / f"index_{r}.json").read_text()) for r in (0, 1)]
    assert {m["centroids"] for m in markers} == {train["centroids"]} and not any("train_seconds" in m for m in markers)
    for name in ("groups.parquet", "selected.parquet"):
        assert (out / name).read_bytes() == (one / name).read_bytes(), name
    monkeypatch.undo()
    # A rerun skips train; new index settings make index refuse until train has run again.
    stamp = marker_mtime(out, "train")
    run_dedup(out, settings, phase="train", rank=0, **common)
    assert marker_mtime(out, "train") == stamp
    other = DedupSettings(threshold=0.84, top_k=4, index=IndexSettings(kind="ivf", nlist=5, nprobe=3))
    with pytest.raises(RuntimeError, match=r"run phase=train first .*other embeddings or index settings"):
        run_dedup(out, other, phase="index", rank=0, **common)
    # Centroids gone: train redoes them (its marker alone does not count).
    (out / "index" / "centroids.npy").unlink()
    run_dedup(out, settings, phase="train", rank=0, **common)
    assert marker_mtime(out, "train") != stamp and (out / "index" / "centroids.npy").exists()


def test_group_sorts_records_out_of_core_with_the_same_bytes(tmp_path, monkeypatch):
    """With buckets of 250 records, the group phase never holds all keys and captions (nor
    reads them whole) and writes exactly the in-memory path's groups.parquet and selection, byte for byte:
    repeated keys, missing and non-ASCII captions, singletons selected (min_group_size=1)."""
    import pipeline.data.embeddings_store as store_module
    from pipeline.dedup.grouping import group_labels, stream_components

    rng = np.random.default_rng(7)
    x, _ = clustered_vectors(3000, 32, 150, seed=7)
    keys = np.array([f"k{v:05d}" for v in rng.permutation(3000)], dtype=object)
    keys[rng.choice(3000, 20, replace=False)] = "same"
    keys[rng.choice(3000, 10, replace=False)] = "é-ü"
    # Long, distinct captions: over a parquet page (1 MiB), so that page boundaries are tested too.
    captions = np.array([f"caption {i % 37} ✓ " + "".join(rng.choice(list("abcdefgh "), 400)) for i in range(3000)], dtype=object)
    captions[rng.choice(3000, 40, replace=False)] = None
    for shard, (lo, hi) in enumerate([(0, 1100), (1100, 1900), (1900, 3000)]):
        write_shard(tmp_path / "emb", shard, x[lo:hi], pd.DataFrame({"key": keys[lo:hi], "caption": captions[lo:hi]}))
    settings = DedupSettings(threshold=0.85, top_k=200, min_group_size=1)
    out = tmp_path / "dedup"

    def whole(*args, **kwargs):
        raise AssertionError("the group phase read every record's key and caption at once")

    import pipeline.dedup.phases as phases_module

    monkeypatch.setattr(store_module, "read_metadata", whole)
    monkeypatch.setattr(phases_module, "read_metadata", whole, raising=False)
    summary = run_dedup(out, settings, embeddings_dir=tmp_path / "emb", group_chunk_rows=250, progress=False)
    monkeypatch.undo()
    marker = json.loads((out / ".done" / "group.json").read_text())
    assert marker["record_buckets"] == 12 and marker["records_held_max"] <= 2 * 250 + 20
    # The in-memory path on the same pairs.
    labels, _ = stream_components(3000, [out / "pairs" / "pairs_0.npy"], settings.k, tmp_path / "scratch")
    groups, selected = group_labels(read_metadata(tmp_path / "emb"), labels, settings.top_k, settings.min_group_size)
    for frame, name in ((groups, "groups.parquet"), (selected, "selected.parquet")):
        frame.to_parquet(tmp_path / name, index=False)
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    sizes = groups.drop_duplicates("group_id")["group_size"]
    assert summary["groups"] == len(sizes) and summary["duplicate_groups"] == int((sizes >= 2).sum()) > 50
    assert summary["records_in_duplicate_groups"] == int(sizes[sizes >= 2].sum()) and summary["selected"] == 200
