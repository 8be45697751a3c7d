"""The detector and verification on hand-made generation sets and a tiny training set.

``build_run`` writes a small audit run (generations, a training set in the files layout, the
duplicate finder's selected.parquet); test_report.py and test_notebook.py reuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.clique import max_clique
from pipeline.data.rejects import RejectLog
from pipeline.detect import run_detect
from pipeline.detect import screen as detect_module
from pipeline.detect.verify import EmbeddingIndex, fetch_training_images, fit_to, run_verify
from pipeline.distance import tiled_l2_pair
from pipeline.embedders.base import Embedder
from pipeline.generations import list_samples, read_prompts
from pipeline.metrics import ClipDistance, metric_named
from pipeline.rule import NearCopyRule
from pipeline.stats import wilson_interval

GEN_SIZE = 32
TRAIN_SIZE = 64
SAMPLES = 30
# prompt id -> planted near-copies of one image among SAMPLES samples.
PLANTED = {"00000": 12, "00001": 9, "00002": 0}
CAPTIONS = {"00000": "<script>alert('x')</script> a memorized caption", "00001": "nine copies", "00002": "all different"}
ORIGINAL_KEY = {"00000": "part0/00007", "00001": "part1/00003"}


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth colour image, uint8 (size, size, 3): far (> 0.2 tiled L2) from any other."""
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def near_copy(rng: np.random.Generator, image: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def build_generations(
    root: Path, originals: dict[str, np.ndarray], rng: np.random.Generator, table: bool = True
) -> dict[str, list[int]]:
    """Write the generator's layout; returns the sample indices of each prompt's near-copies."""
    planted_at = {}
    for prompt_id, copies in PLANTED.items():
        folder = root / prompt_id
        folder.mkdir(parents=True)
        positions = sorted(rng.choice(SAMPLES, size=copies, replace=False).tolist())
        planted_at[prompt_id] = positions
        for index in range(SAMPLES):
            if index in positions:
                image = near_copy(rng, originals[prompt_id])
            else:
                image = smooth_image(rng, GEN_SIZE)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
    if table:
        rows = [
            {"prompt_id": pid, "caption": CAPTIONS[pid], "seed": seed, "sample": seed}
            for pid in PLANTED
            for seed in range(SAMPLES)
        ]
        pd.DataFrame(rows).to_parquet(root / "prompts.parquet")
    return planted_at


def build_training_set(root: Path, originals: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """img2dataset files layout in two sub-folders; the originals at TRAIN_SIZE among distractors."""
    for part in ("part0", "part1"):
        (root / part).mkdir(parents=True)
        for i in range(10):
            image = smooth_image(rng, TRAIN_SIZE)
            Image.fromarray(image).save(root / part / f"{i:05d}.jpg", quality=95)
            (root / part / f"{i:05d}.txt").write_text(f"distractor {part} {i}", encoding="utf-8")
    for prompt_id, key in ORIGINAL_KEY.items():
        big = Image.fromarray(originals[prompt_id]).resize((TRAIN_SIZE, TRAIN_SIZE), Image.Resampling.BICUBIC)
        big.save(root / f"{key}.jpg", quality=95)
        (root / f"{key}.txt").write_text(CAPTIONS[prompt_id], encoding="utf-8")
    # A shifted copy of the first original: related, but not the training image itself.
    shifted = np.roll(np.asarray(Image.open(root / f"{ORIGINAL_KEY['00000']}.jpg")), TRAIN_SIZE // 3, axis=1)
    Image.fromarray(shifted).save(root / "part0/00009.jpg", quality=95)


def build_run(root: Path, seed: int = 0, table: bool = True, selected: bool = True) -> dict:
    """A run directory with generations, a training set and the duplicate finder's selection."""
    rng = np.random.default_rng(seed)
    originals = {pid: smooth_image(rng, GEN_SIZE) for pid in PLANTED}
    run_dir = root / "run"
    planted_at = build_generations(run_dir / "generations", originals, rng, table=table)
    train = root / "train"
    build_training_set(train, originals, rng)
    if selected:
        rows = [
            {
                "prompt_id": "00000",
                "caption": CAPTIONS["00000"],
                "dup_count": 40,
                "keys": [ORIGINAL_KEY["00000"], "part0/00009", "part0/00001"],
            },
            {"prompt_id": "00001", "caption": CAPTIONS["00001"], "dup_count": 10, "keys": ["part1/00004"]},
            {"prompt_id": "00002", "caption": CAPTIONS["00002"], "dup_count": 1, "keys": ["part1/00005"]},
        ]
        (run_dir / "dedup").mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(run_dir / "dedup" / "selected.parquet")
        if table:  # as the generator does, the prompt table carries each prompt's group forward
            generated = pd.read_parquet(run_dir / "generations" / "prompts.parquet")
            carried = pd.DataFrame(rows)[["prompt_id", "dup_count", "keys"]]
            generated.merge(carried, on="prompt_id", how="left").to_parquet(run_dir / "generations" / "prompts.parquet")
    return {"run_dir": run_dir, "train": train, "planted_at": planted_at, "originals": originals}


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path)


def detect(run, **settings):
    return run_detect(run["run_dir"] / "generations", run["run_dir"] / "detect", NearCopyRule(**settings), progress=False)


def test_flags_exactly_the_prompt_with_twelve_near_copies(run):
    memorized = detect(run).set_index("prompt_id")
    assert list(memorized.index) == ["00000", "00001", "00002"]
    assert memorized["flagged"].to_dict() == {"00000": True, "00001": False, "00002": False}
    assert memorized.loc["00000", "clique_size"] == 12
    assert memorized.loc["00001", "clique_size"] == 9
    assert memorized.loc["00002", "clique_size"] == 1
    assert list(memorized.loc["00000", "members"]) == run["planted_at"]["00000"]
    assert list(memorized.loc["00001", "members"]) == run["planted_at"]["00001"]
    assert memorized.loc["00000", "representative"] in run["planted_at"]["00000"]
    assert memorized.loc["00000", "representative_file"] == f"00000/{memorized.loc['00000', 'representative']:05d}.png"
    assert memorized.loc["00000", "max_pair_distance"] < 0.15 < memorized.loc["00000", "median_pair_distance"]
    assert (memorized["n_samples"] == SAMPLES).all() and (memorized["n_rejected"] == 0).all()
    assert memorized.loc["00000", "caption"] == CAPTIONS["00000"]
    summary = json.loads((run["run_dir"] / "detect" / "summary.json").read_text())
    assert summary["flagged"] == 1 and summary["prompts"] == 3


def test_verdict_stops_taken_under_another_rule_are_named(run, caplog):
    """Adaptive sampling's "flagged"/"out_of_reach" stops are lossless only under the detector's
    own rule; prompts stopped under another one are warned about and listed in summary.json.
    The generator stores its whole rule with the samples, so any difference counts, the
    metric's parameters and the clique search budget included."""
    from pipeline.detect import stopped_under_another_rule
    from pipeline.generate.adaptive import AdaptiveSettings
    from pipeline.metrics import TiledL2

    def stored(**rule):
        return json.dumps(AdaptiveSettings(enabled=True, rule=NearCopyRule(**rule)).describe())

    table = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d", "e", "f", "g"],
            "stop_reason": ["flagged", "out_of_reach", "no_close_pairs", None, "out_of_reach", "flagged", "flagged"],
            "adaptive": [
                stored(),
                stored(min_clique=8),
                stored(min_clique=8),
                None,
                stored(threshold=0.2),
                stored(metric=TiledL2(size=64)),
                stored(max_clique_steps=10),
            ],
        }
    )
    assert stopped_under_another_rule(table, NearCopyRule()) == ["b", "e", "f", "g"]
    assert stopped_under_another_rule(table, NearCopyRule(min_clique=8)) == ["a", "e", "f", "g"]
    assert stopped_under_another_rule(table, NearCopyRule(TiledL2(size=64))) == ["a", "b", "e", "g"]
    assert stopped_under_another_rule(table, NearCopyRule(ClipDistance(CentredPixels()), threshold=0.05)) == [
        "a",
        "b",
        "e",
        "f",
        "g",
    ]
    assert stopped_under_another_rule(table.drop(columns="stop_reason"), NearCopyRule()) == []

    # Folders made before the whole rule was stored hold the adaptive section's own threshold,
    # min_clique and grid (tiled L2 at the samples' size, the default clique search).
    legacy = {"threshold": 0.15, "min_clique": 10, "grid": 4}
    table["adaptive"] = [
        json.dumps(legacy),
        json.dumps(legacy | {"min_clique": 8}),
        json.dumps(legacy | {"min_clique": 8}),
        None,
        json.dumps(legacy | {"threshold": 0.2}),
        json.dumps(legacy | {"grid": 2}),
        json.dumps(legacy),
    ]
    assert stopped_under_another_rule(table, NearCopyRule()) == ["b", "e", "f"]
    assert stopped_under_another_rule(table, NearCopyRule(min_clique=8)) == ["a", "e", "f", "g"]
    assert stopped_under_another_rule(table, NearCopyRule(ClipDistance(CentredPixels()), threshold=0.05)) == [
        "a",
        "b",
        "e",
        "f",
        "g",
    ]

    # In a run: the generations' table says prompt 00001 was stopped out of reach under min_clique 8.
    path = run["run_dir"] / "generations" / "prompts.parquet"
    generations = pd.read_parquet(path)
    generations["stop_reason"] = np.where(generations.prompt_id == "00001", "out_of_reach", None)
    generations["adaptive"] = stored(min_clique=8)
    generations.to_parquet(path)
    with caplog.at_level("WARNING", logger="pipeline.detect"):
        detect(run)
    assert "1 prompt(s) were stopped by adaptive sampling" in caplog.text and "00001" in caplog.text
    summary = json.loads((run["run_dir"] / "detect" / "summary.json").read_text())
    assert summary["stopped_under_another_rule"] == ["00001"]


def test_min_clique_and_threshold_decide(run):
    assert detect(run, min_clique=9)["flagged"].tolist() == [True, True, False]
    # At a threshold below the near-copies' distances no prompt has a clique.
    tight = detect(run, threshold=0.005)
    assert not tight["flagged"].any() and (tight["clique_size"] == 1).all()


def test_rerun_skips_done_prompts_and_redoes_changed_settings(run, monkeypatch):
    first = detect(run)
    calls = []
    original = detect_module.detect_prompt

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(detect_module, "detect_prompt", counting)
    again = detect(run)
    assert calls == []
    pd.testing.assert_frame_equal(first, again)
    # A prompt whose result was lost is redone alone.
    (run["run_dir"] / "detect" / "prompts" / ".done" / "00001.json").unlink()
    detect(run)
    assert calls == ["00001"]
    calls.clear()
    detect(run, min_clique=9)
    assert sorted(calls) == ["00000", "00001", "00002"]


def test_shards_split_prompts_and_the_last_one_writes_the_table(run):
    gen, out = run["run_dir"] / "generations", run["run_dir"] / "detect"
    assert run_detect(gen, out, NearCopyRule(), rank=0, world_size=2, progress=False) is None
    assert not (out / "memorized.parquet").exists()
    done = sorted(p.stem for p in (out / "prompts" / ".done").glob("*.json"))
    assert done == ["00000", "00002"]
    sharded = run_detect(gen, out, NearCopyRule(), rank=1, world_size=2, progress=False)
    whole = run_detect(gen, run["run_dir"] / "detect_whole", NearCopyRule(), progress=False)
    pd.testing.assert_frame_equal(sharded, whole)
    with pytest.raises(ValueError, match="rank"):
        run_detect(gen, out, NearCopyRule(), rank=2, world_size=2)


def test_corrupt_samples_are_skipped_and_recorded(run):
    gen = run["run_dir"] / "generations"
    diverse = next(i for i in range(SAMPLES) if i not in run["planted_at"]["00000"])
    (gen / "00000" / f"{diverse:05d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (gen / "00002" / "00004.png").write_bytes(b"")
    memorized = detect(run).set_index("prompt_id")
    assert memorized.loc["00000", "n_samples"] == SAMPLES - 1
    assert memorized.loc["00000", "n_rejected"] == 1 and memorized.loc["00002", "n_rejected"] == 1
    assert bool(memorized.loc["00000", "flagged"])
    rejects = [json.loads(line) for line in (run["run_dir"] / "detect" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rejects) == sorted([f"00000/{diverse:05d}.png", "00002/00004.png"])
    assert all(r["reason"] for r in rejects)


def test_folder_without_prompts_table_uses_folder_names(tmp_path):
    run = build_run(tmp_path, table=False)
    prompts = read_prompts(run["run_dir"] / "generations")
    assert prompts["prompt_id"].tolist() == list(PLANTED) and (prompts["caption"] == "").all()
    assert detect(run)["flagged"].tolist() == [True, False, False]


def test_samples_of_other_tools_are_numbered_by_name_order(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.webp", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [(s.index, s.file) for s in list_samples(tmp_path, "p")] == [(0, "p/a.jpg"), (1, "p/b.png"), (2, "p/c.webp")]
    with pytest.raises(FileNotFoundError, match="generations_dir"):
        read_prompts(tmp_path / "missing")
    with pytest.raises(ValueError, match="no prompts"):
        run_detect(tmp_path / "p", tmp_path / "out", NearCopyRule(), progress=False)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="metric"):
        metric_named("l1")
    with pytest.raises(ValueError, match="min_clique"):
        NearCopyRule(min_clique=1)


class CentredPixels(Embedder):
    """A real, if crude, embedder: the centred 8 x 8 thumbnail as a unit vector."""

    name = "centred-pixels-8"
    dim = 8 * 8 * 3

    def embed(self, images):
        vectors = np.stack(
            [np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32) / 255 - 0.5 for im in images]
        )
        vectors = vectors.reshape(len(images), -1)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_clip_metric_goes_through_the_embedder(run):
    memorized = run_detect(
        run["run_dir"] / "generations",
        run["run_dir"] / "detect",
        NearCopyRule(ClipDistance(CentredPixels()), threshold=0.05),
        progress=False,
    )
    assert memorized["flagged"].tolist() == [True, False, False]
    assert memorized["clique_size"].tolist()[:2] == [12, 9]
    with pytest.raises(ValueError, match="embedder"):
        NearCopyRule(ClipDistance())


def random_graph(rng, n, p):
    a = np.triu(rng.random((n, n)) < p, 1)
    return a | a.T


def test_max_clique_matches_networkx_on_random_graphs():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, p = int(rng.integers(1, 35)), float(rng.uniform(0.05, 0.95))
        adjacency = random_graph(rng, n, p)
        result = max_clique(adjacency)
        reference, _ = nx.max_weight_clique(nx.from_numpy_array(adjacency.astype(int)), weight=None)
        assert result.exact and result.size == len(reference)
        assert all(adjacency[i, j] for i in result.members for j in result.members if i != j)


def test_max_clique_is_fast_on_the_graphs_detection_makes():
    rng = np.random.default_rng(1)
    sparse = random_graph(rng, 500, 0.02)
    planted = rng.choice(500, 15, replace=False)
    sparse[np.ix_(planted, planted)] = True
    np.fill_diagonal(sparse, False)
    result = max_clique(sparse)
    assert result.exact and result.members == sorted(planted.tolist())
    complete = ~np.eye(500, dtype=bool)
    assert max_clique(complete).size == 500


def test_max_clique_budget_gives_a_valid_lower_bound():
    adjacency = random_graph(np.random.default_rng(2), 200, 0.5)
    result = max_clique(adjacency, max_steps=10)
    assert not result.exact and result.size >= 2
    assert all(adjacency[i, j] for i in result.members for j in result.members if i != j)
    with pytest.raises(ValueError, match="symmetric"):
        max_clique(np.triu(np.ones((3, 3), dtype=bool), 1))


# --- verification -----------------------------------------------------------------------


def verify(run, memorized, **options):
    """(memorized with the verification columns, indexed by prompt id; the extracted pairs)."""
    data = {"format": "files", "path": str(run["train"])}
    table, pairs = run_verify(
        memorized, run["run_dir"] / "generations", run["run_dir"] / "detect", data, progress=False, **options
    )
    return table.set_index("prompt_id"), pairs


def reference_matches(run, delta: float = 0.15) -> dict[str, set[int]]:
    """An independent reference: per prompt, the samples within ``delta`` of any training
    image, one pair at a time with the per-pair float64 tiled L2 (no batching, no candidates)."""
    training = [Image.open(path) for path in sorted(run["train"].rglob("*.jpg"))]
    found = {}
    for pid in PLANTED:
        found[pid] = set()
        for path in sorted((run["run_dir"] / "generations" / pid).glob("*.png")):
            sample = np.asarray(Image.open(path).convert("RGB"))
            if min(tiled_l2_pair(sample, np.asarray(fit_to(t, sample.shape[:2]))) for t in training) <= delta:
                found[pid].add(int(path.stem))
    return found


def test_every_sample_is_verified_against_the_group(run):
    memorized = detect(run, min_clique=9)
    table, pairs = verify(run, memorized, dedup_dir=run["run_dir"] / "dedup")
    assert list(table.index) == ["00000", "00001", "00002"]  # every prompt, flagged or not
    assert table["flagged"].tolist() == [True, True, False]  # the clique verdict is unchanged
    # 00000: its 12 planted near-copies reproduce the original, and nothing else does.
    assert table.loc["00000", "extracted"] and table.loc["00000", "samples_matched"] == PLANTED["00000"]
    assert set(pairs.loc[pairs["prompt_id"] == "00000", "sample"]) == set(run["planted_at"]["00000"])
    assert set(pairs["train_key"]) == {ORIGINAL_KEY["00000"]} and (pairs["distance"] <= 0.15).all()
    assert table.loc["00000", "best_train_key"] == ORIGINAL_KEY["00000"] and table.loc["00000", "best_distance"] < 0.05
    assert table.loc["00000", "best_sample"] in run["planted_at"]["00000"]
    assert table["best_in_group"].tolist() == [True, True, True]  # their groups are their only candidates here
    assert table.loc["00000", "best_sample_file"] == f"00000/{table.loc['00000', 'best_sample']:05d}.png"
    assert table.loc["00000", "n_candidates"] == 3 and table.loc["00000", "samples_verified"] == SAMPLES
    # 00001's group does not hold its original: compared, but nothing matches.
    assert not table.loc["00001", "extracted"] and table.loc["00001", "samples_matched"] == 0
    assert table.loc["00001", "best_train_key"] == "part1/00004" and table.loc["00001", "best_distance"] > 0.15
    # The rate and its 95% Wilson interval (pipeline.stats, tested against published values).
    assert table.loc["00000", "reproduction_rate"] == PLANTED["00000"] / SAMPLES
    low, high = wilson_interval(PLANTED["00000"], SAMPLES)
    assert (table.loc["00000", "reproduction_ci_low"], table.loc["00000", "reproduction_ci_high"]) == (low, high)
    assert table.loc["00002", "reproduction_rate"] == 0 and table.loc["00002", "reproduction_ci_low"] == 0
    match = Image.open(run["run_dir"] / "detect" / "matches" / "00000.png")
    assert match.size == (TRAIN_SIZE, TRAIN_SIZE)
    assert not (run["run_dir"] / "detect" / "matches" / "00001.png").exists()


def test_a_reproduction_of_another_captions_image_is_reported_apart(run):
    """A prompt whose samples reproduce a training image outside its duplicate group is not
    extracted (its caption's training data did not come back) but the reproductions are counted
    (``samples_matched_other``), listed (``in_group`` false) and get a match image: nothing is dropped."""
    memorized = detect(run)  # 00001's group (part1/00004) does not hold the original its samples copy
    table, pairs = verify(run, memorized, dedup_dir=run["run_dir"] / "dedup", exhaustive=True)
    assert table.loc["00000", "extracted"] and table.loc["00000", "samples_matched"] == PLANTED["00000"]
    assert table.loc["00000", "samples_matched_other"] == 0 and table.loc["00000", "best_in_group"]
    assert not table.loc["00001", "extracted"] and table.loc["00001", "samples_matched"] == 0
    assert table.loc["00001", "samples_matched_other"] == PLANTED["00001"]
    assert table.loc["00001", "reproduction_rate"] == 0
    assert table.loc["00001", "best_train_key"] == ORIGINAL_KEY["00001"] and not table.loc["00001", "best_in_group"]
    theirs = pairs[pairs["prompt_id"] == "00001"]
    assert set(theirs["sample"]) == set(run["planted_at"]["00001"]) and not theirs["in_group"].any()
    assert pairs.loc[pairs["prompt_id"] == "00000", "in_group"].all()
    assert (run["run_dir"] / "detect" / "matches" / "00001.png").exists()
    # Without groups, nothing says which images are a prompt's own: every match is.
    ungrouped, _ = verify(run, memorized.assign(keys=None), dedup_dir=run["run_dir"] / "dedup", exhaustive=True)
    assert ungrouped.loc["00001", "extracted"] and ungrouped.loc["00001", "samples_matched"] == PLANTED["00001"]
    assert (ungrouped["samples_matched_other"] == 0).all()


def test_exhaustive_verification_matches_an_independent_per_pair_reference(run):
    memorized = detect(run).assign(keys=None)  # prompts that came without their groups
    table, pairs = verify(run, memorized, dedup_dir=run["run_dir"] / "no-dedup-here")
    reference = reference_matches(run)
    assert reference["00000"] == set(run["planted_at"]["00000"]) and reference["00001"] == set(run["planted_at"]["00001"])
    for pid in PLANTED:
        assert set(pairs.loc[pairs["prompt_id"] == pid, "sample"]) == reference[pid], pid
        assert table.loc[pid, "samples_matched"] == len(reference[pid])
        assert table.loc[pid, "extracted"] == bool(reference[pid])
    # 00001 is not flagged at min_clique 10 (9 copies), yet its reproductions are found.
    assert not table.loc["00001", "flagged"] and table.loc["00001", "extracted"]
    assert table.loc["00001", "best_train_key"] == ORIGINAL_KEY["00001"]
    assert (table["n_candidates"] == 20).all()  # every training image
    assert table["best_in_group"].isna().all()  # no group to be in


def embedding_shards(run, embedder, dedup):
    """The training set's embeddings as two shards under ``<dedup>/embeddings``; their keys."""
    records = sorted(p.relative_to(run["train"]).with_suffix("").as_posix() for p in run["train"].rglob("*.jpg"))
    images = [Image.open(run["train"] / f"{key}.jpg") for key in records]
    for rank, part in enumerate((slice(0, 12), slice(12, None))):
        (dedup / "embeddings" / "img_emb").mkdir(parents=True, exist_ok=True)
        (dedup / "embeddings" / "metadata").mkdir(parents=True, exist_ok=True)
        np.save(dedup / "embeddings" / "img_emb" / f"img_emb_{rank}.npy", embedder.embed(images[part]).astype(np.float16))
        pd.DataFrame({"key": records[part]}).to_parquet(dedup / "embeddings" / "metadata" / f"metadata_{rank}.parquet")
    return records


def test_verification_uses_the_embedding_index(run):
    memorized = detect(run).assign(keys=None)  # no duplicate group: the index alone gives candidates
    embedder = CentredPixels()
    dedup = run["run_dir"] / "dedup2"
    records = embedding_shards(run, embedder, dedup)
    index = EmbeddingIndex.load(dedup / "embeddings")
    assert len(index) == len(records) == 20
    table, _ = verify(run, memorized, dedup_dir=dedup, embedder_factory=lambda: embedder, n_candidates=1, exhaustive=False)
    # Each sample's nearest training image: a planted copy's is its original.
    assert table.loc["00000", "best_train_key"] == ORIGINAL_KEY["00000"]
    assert table.loc["00000", "samples_matched"] == PLANTED["00000"]
    assert (table["n_candidates"] <= SAMPLES).all()
    capped, _ = verify(
        run, memorized, dedup_dir=dedup, embedder_factory=lambda: embedder, n_candidates=4, max_candidates=2, exhaustive=False
    )
    assert (capped["n_candidates"] <= 2).all()
    with pytest.raises(ValueError, match="embedder"):
        index.search(np.ones((1, 5), dtype=np.float32), 3)


def test_verification_searches_the_embedding_index_once_whatever_the_passes(run, monkeypatch):
    memorized = detect(run).assign(keys=None)
    embedder = CentredPixels()
    dedup = run["run_dir"] / "dedup3"
    embedding_shards(run, embedder, dedup)
    searches = []
    search = EmbeddingIndex.search

    def counted(self, queries, k):
        searches.append(len(queries))
        return search(self, queries, k)

    monkeypatch.setattr(EmbeddingIndex, "search", counted)
    options = {"dedup_dir": dedup, "embedder_factory": lambda: embedder, "n_candidates": 2, "exhaustive": False}
    one_by_one, pairs = verify(run, memorized, prompts_per_pass=1, **options)
    # A search reads every shard: one for every prompt's samples, not one per pass of one prompt.
    assert searches == [len(memorized) * SAMPLES]
    shutil.rmtree(run["run_dir"] / "detect" / "verify")
    together, together_pairs = verify(run, memorized, prompts_per_pass=64, **options)
    pd.testing.assert_frame_equal(one_by_one, together)
    pd.testing.assert_frame_equal(pairs, together_pairs)


def test_verification_is_reused_when_nothing_changed(run):
    memorized = detect(run)
    first, _ = verify(run, memorized, dedup_dir=run["run_dir"] / "dedup")
    (run["run_dir"] / "detect" / "matches" / "00000.png").unlink()
    again, _ = verify(run, memorized, dedup_dir=run["run_dir"] / "dedup")
    pd.testing.assert_frame_equal(first, again)
    assert not (run["run_dir"] / "detect" / "matches" / "00000.png").exists()  # not recomputed
    # Through the stage executor, a unit per prompt: its stats say every unit was skipped.
    stats = json.loads((run["run_dir"] / "detect" / "stats" / "verify_0.json").read_text())
    assert (stats["units"], stats["skipped"], stats["done"]) == (3, 3, 0)
    # Another threshold redoes every prompt: the match image is back; none is left where nothing matches.
    verify(run, memorized, dedup_dir=run["run_dir"] / "dedup", delta=0.1)
    assert (run["run_dir"] / "detect" / "matches" / "00000.png").exists()
    strict, _ = verify(run, memorized, dedup_dir=run["run_dir"] / "dedup", delta=1e-6)
    assert not strict["extracted"].any() and not (run["run_dir"] / "detect" / "matches" / "00000.png").exists()


def test_fetch_training_images_reports_missing_and_corrupt_keys(run):
    (run["train"] / "part0" / "00002.jpg").write_bytes(b"garbage")
    rejects = RejectLog()
    data = {"format": "files", "path": str(run["train"])}
    found = fetch_training_images(data, ["part0/00001", "part0/00002", "nope/123"], rejects)
    assert set(found) == {"part0/00001"}
    assert {e["key"]: e["reason"].split(":")[0] for e in rejects.entries} == {
        "part0/00002": "corrupt image",
        "nope/123": "missing training image",
    }


@pytest.mark.slow
def test_command_line_detect(run, tmp_path):
    import subprocess
    import sys

    run_dir = run["run_dir"]
    shutil.rmtree(run_dir / "detect", ignore_errors=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.detect",
            f"run_dir={run_dir}",
            "data=files",
            f"data.path={run['train']}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 3 prompts flagged" in result.stdout
    memorized = pd.read_parquet(run_dir / "detect" / "memorized.parquet")
    assert memorized["flagged"].tolist() == [True, False, False]
    assert memorized["extracted"].tolist() == [True, False, False]
    assert memorized["samples_matched"].tolist() == [PLANTED["00000"], 0, 0]
    extracted = pd.read_parquet(run_dir / "detect" / "extracted.parquet")
    assert set(extracted["train_key"]) == {ORIGINAL_KEY["00000"]} and len(extracted) == PLANTED["00000"]
    assert (
        f"1 of 3 prompts extracted: a sample within 0.15 of one of their caption's training images ({PLANTED['00000']} samples in all)"
        in result.stdout
    )
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.detect", f"run_dir={run_dir}", "metric=l1"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    # metric= picks a config of the group conf/metric/ (one per metric): Hydra names the
    # unknown choice and lists the metrics there, as for any config group.
    assert bad.returncode != 0 and "Could not find 'metric/l1'" in bad.stderr and "Traceback" not in bad.stderr
    assert "Available options in 'metric':\n\tclip\n\tsscd\n\ttiled_l2\n" in bad.stderr
