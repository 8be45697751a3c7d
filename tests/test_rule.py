"""The near-copy rule: its verdict, its description (stored with samples, compared to tell rules
apart), its one place in the configs, and a new metric in one file applied by every stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import ConfigError
from pipeline.embedders.base import Embedder
from pipeline.metrics import REGISTRY, ClipDistance, TiledL2, metric_named
from pipeline.rule import NearCopyRule, rule_from_config

from .conftest import CONF, REPO, SHIPPED_DEMO_MODEL, compose_config, stage_env
from .rms_metric import WholeImageRMS

TEST_CONF = REPO / "tests" / "conf"  # holds metric/rms.yaml, the new metric's config entry
SEARCH_RMS = [f"hydra.searchpath=[file://{TEST_CONF}]", "metric=rms"]


class _Named(Embedder):
    """An embedder for rules that are described but never measure."""

    name = "named"
    dim = 1

    def embed(self, images):
        return np.ones((len(images), 1), dtype=np.float32)


# --- the verdict ---------------------------------------------------------------------------


def test_verdict_on_a_hand_made_matrix():
    # Samples 0-3 pairwise close, 4 close to 0 only, 5 far from all.
    d = np.full((6, 6), 0.5)
    d[np.ix_([0, 1, 2, 3], [0, 1, 2, 3])] = 0.05
    d[0, 1] = d[1, 0] = 0.02
    d[0, 2] = d[2, 0] = 0.03
    d[0, 4] = d[4, 0] = 0.1
    np.fill_diagonal(d, 0)
    verdict = NearCopyRule(threshold=0.15, min_clique=4).verdict(d)
    assert verdict["members"] == [0, 1, 2, 3] and verdict["flagged"]
    assert verdict["representative"] == 0  # smallest mean distance to the other members
    assert verdict["max_pair_distance"] == pytest.approx(0.05)
    assert verdict["median_pair_distance"] == pytest.approx(np.median(d[np.triu_indices(6, 1)]))
    assert verdict["clique_exact"]
    assert not NearCopyRule(threshold=0.15, min_clique=5).verdict(d)["flagged"]
    empty = NearCopyRule(threshold=0.15, min_clique=10).verdict(np.zeros((0, 0)))
    assert empty["clique_size"] == 0 and empty["representative"] == -1 and not empty["flagged"]
    # The near-copy graph the verdict searches: closer than the threshold, no self-pairs.
    close = NearCopyRule(threshold=0.15).near_copies(d)
    assert close.sum() == 2 * (6 + 1) and not close.diagonal().any()
    # The clique search budget is the rule's: a budget too small to prove the maximum says so.
    rng = np.random.default_rng(2)
    dense = np.where(np.triu(rng.random((200, 200)) < 0.5, 1), 0.0, 1.0)
    dense = np.minimum(dense, dense.T)
    assert not NearCopyRule(threshold=0.5, max_clique_steps=10).verdict(dense)["clique_exact"]


def test_threshold_defaults_to_the_metric_and_mistakes_name_their_key():
    assert NearCopyRule().threshold == 0.15 and NearCopyRule(ClipDistance(_Named())).threshold == 0.05
    assert NearCopyRule(threshold="0.2").threshold == 0.2
    for bad, key in (
        (dict(threshold=0), "rule.threshold"),
        (dict(min_clique=1), "rule.min_clique"),
        (dict(max_clique_steps=0), "rule.max_clique_steps"),
        (dict(metric="tiled_l2"), "metric"),
    ):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
            NearCopyRule(**bad)
    with pytest.raises(ConfigError, match=r"^metric\.grid: must be at least 1, got 0"):
        TiledL2(grid=0)
    with pytest.raises(ConfigError, match=r"^embedder: metric=clip needs an embedder"):
        ClipDistance()
    with pytest.raises(ConfigError, match=r"^metric: unknown metric 'l1'; expected one of \['clip', .*'tiled_l2'"):
        metric_named("l1")
    assert metric_named("tiled_l2", grid=2) == TiledL2(grid=2) and REGISTRY["rms"] is WholeImageRMS


# --- describing and comparing rules --------------------------------------------------------


def test_a_rule_is_described_whole_and_compared_by_its_description():
    rule = NearCopyRule()
    assert rule.describe() == {
        "metric": "tiled_l2",
        "grid": 4,
        "size": None,
        "threshold": 0.15,
        "min_clique": 10,
        "max_clique_steps": 200_000,
    }
    assert rule.matches(json.loads(json.dumps(rule.describe())))  # as stored: JSON
    assert rule.matches(NearCopyRule(TiledL2(device="cpu"), threshold=0.15).describe())  # the device changes no verdict
    others = [
        NearCopyRule(TiledL2(grid=2)),
        NearCopyRule(TiledL2(size=64)),
        NearCopyRule(threshold=0.1),
        NearCopyRule(min_clique=9),
        NearCopyRule(max_clique_steps=10),
        NearCopyRule(WholeImageRMS()),
        NearCopyRule(ClipDistance(_Named()), threshold=0.15),
    ]
    for other in others:
        assert not rule.matches(other.describe()) and not other.matches(rule.describe()), other
    assert NearCopyRule(ClipDistance(_Named())).describe()["embedder"] == "named"
    assert not rule.matches(None) and not rule.matches("tiled_l2") and not rule.matches({**rule.describe(), "extra": 1})


def test_the_rule_is_configured_once():
    """min_clique and grid are each set in exactly one conf file, and every stage composes the same rule."""
    keys = {"min_clique": [], "grid": []}
    for path in sorted(CONF.rglob("*.yaml")):
        for line in path.read_text(encoding="utf-8").splitlines():
            found = re.match(r"\s*(min_clique|grid):", line)
            if found:
                keys[found.group(1)].append(path.relative_to(CONF).as_posix())
    assert keys == {"min_clique": ["rule.yaml"], "grid": ["metric/tiled_l2.yaml"]}
    rules = {
        stage: rule_from_config(compose_config(stage, ["experiment=demo"] if stage != "evaluate_demo" else []))
        for stage in ("generate", "detect", "evaluate_demo")
    }
    assert {json.dumps(rule.describe()) for rule in rules.values()} == {json.dumps(NearCopyRule().describe())}
    # One override changes it for every stage.
    for stage in ("generate", "detect", "evaluate_demo"):
        rule = rule_from_config(compose_config(stage, ["metric.grid=8", "rule.min_clique=5"]))
        assert (rule.metric.grid, rule.min_clique) == (8, 5)
    # The detector's former keys, added with "+", are refused rather than ignored.
    for old, new in (("min_clique", "rule.min_clique"), ("threshold", "rule.threshold"), ("grid", "metric.grid")):
        with pytest.raises(ConfigError, match=rf"^{old}: moved: .* set {re.escape(new)} "):
            rule_from_config(compose_config("detect", [f"+{old}=9"]))


# --- a new metric in one file: adaptive sampling, detection and verification all use it ----

SIDE = 32  # the shipped demo model's resolution


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BICUBIC))


def one_tile_changed(base: np.ndarray, tile: int, rng: np.random.Generator) -> np.ndarray:
    """``base`` with one tile of its 4 x 4 grid replaced by noise: far from ``base`` in tiled L2
    (that tile differs a lot), close in whole-image RMS (1/16 of the pixels differ)."""
    out = base.copy()
    side = SIDE // 4
    row, col = divmod(tile, 4)
    block = out[row * side : (row + 1) * side, col * side : (col + 1) * side].astype(int)
    out[row * side : (row + 1) * side, col * side : (col + 1) * side] = np.clip(
        block + rng.choice([-80, 80], block.shape), 0, 255
    )
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Prompt 00000's first 4 samples each change a different tile of one image; prompt
    00001's are unrelated. A training set holds that image and a distractor."""
    rng = np.random.default_rng(0)
    base = smooth_image(rng)
    samples = {
        "00000": np.stack([one_tile_changed(base, tile, rng) for tile in (0, 5, 10, 15)]),
        "00001": np.stack([smooth_image(rng) for _ in range(4)]),
    }
    rms, tiled = WholeImageRMS(), TiledL2()
    upper = np.triu_indices(4, 1)
    # The premise: whole-image RMS calls 00000's samples near-copies (and the training image's),
    # tiled L2 calls none of them so; 00001's are far apart under both.
    assert rms.distances(samples["00000"])[upper].max() < 0.15 < tiled.distances(samples["00000"])[upper].min()
    assert rms.distances(samples["00000"], base[None]).max() < 0.15 < tiled.distances(samples["00000"], base[None]).min()
    assert min(rms.distances(samples["00001"])[upper].min(), tiled.distances(samples["00001"])[upper].min()) > 0.15
    root = tmp_path_factory.mktemp("planted")
    train = root / "train"
    train.mkdir()
    for key, image in (("original", base), ("distractor", smooth_image(rng))):
        Image.fromarray(image).save(train / f"{key}.png")
        (train / f"{key}.txt").write_text(key, encoding="utf-8")
    prompts = root / "prompts.txt"
    prompts.write_text("a memorized caption\nan ordinary caption\n", encoding="utf-8")
    return {"samples": samples, "base": base, "train": train, "prompts": prompts}


def generate_stage(planted, run_dir: Path, overrides: list[str]):
    """``python -m pipeline.generate`` from the composed configs, over a generations folder
    whose first round (4 samples a prompt) exists already: only the round checks decide."""
    from pipeline.generate import run as run_generate
    from pipeline.generations import sample_path

    for pid in ("00000", "00001"):
        for i, image in enumerate(planted["samples"][pid]):
            path = sample_path(run_dir / "generations", pid, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    cfg = compose_config(
        "generate",
        [
            f"run_dir={run_dir}",
            f"prompts={planted['prompts']}",
            f"model.path={SHIPPED_DEMO_MODEL}",
            "model.steps=2",
            "n_samples=8",
            "adaptive.enabled=true",
            "adaptive.first_round=4",
            "adaptive.stop_when_flagged=true",
            "rule.min_clique=3",
            "progress=false",
            "device=cpu",
            *overrides,
        ],
    )
    summary = run_generate(cfg)
    return summary, pd.read_parquet(run_dir / "generations" / "prompts.parquet").set_index("prompt_id")


@pytest.mark.slow
def test_a_metric_in_one_file_is_used_by_adaptive_sampling_detection_and_verification(planted, tmp_path):
    from pipeline.detect import run as run_detect_stage
    from pipeline.detect.verify import fit_to

    # (a) Adaptive sampling: under whole-image RMS the first round of 00000 is already a clique
    # of 3: it stops as flagged; under tiled L2 (the default) it has no near-copy pair.
    summary, table = generate_stage(planted, tmp_path / "rms", SEARCH_RMS)
    assert summary.images == 0 and (summary.stopped_flagged, summary.stopped_early) == (1, 1)
    assert table.loc["00000", "stop_reason"] == "flagged" and table.loc["00001", "stop_reason"] == "no_close_pairs"
    stored = json.loads(table.loc["00000", "adaptive"])["rule"]
    assert stored == NearCopyRule(WholeImageRMS(), min_clique=3).describe() and stored["metric"] == "rms"
    _, control = generate_stage(planted, tmp_path / "tiled", [])
    assert control["stop_reason"].tolist() == ["no_close_pairs", "no_close_pairs"]

    # (b) Detection and (c) verification, through the stage's command line: RMS flags 00000
    # (clique of 4) and its representative matches the training image, at the RMS distance.
    env = stage_env()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.detect",
            f"run_dir={tmp_path / 'rms'}",
            "data=files",
            f"data.path={planted['train']}",
            "rule.min_clique=3",
            "progress=false",
            "device=cpu",
            *SEARCH_RMS,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    detect_dir = tmp_path / "rms" / "detect"
    memorized = pd.read_parquet(detect_dir / "memorized.parquet").set_index("prompt_id")
    assert memorized["flagged"].to_dict() == {"00000": True, "00001": False}
    assert memorized.loc["00000", "clique_size"] == 4
    summary_json = json.loads((detect_dir / "summary.json").read_text())
    assert summary_json["settings"]["metric"] == "rms" and summary_json["stopped_under_another_rule"] == []
    # Every sample is verified under RMS: each pair in extracted.parquet is at its RMS distance.
    extracted = pd.read_parquet(detect_dir / "extracted.parquet")
    assert bool(memorized.loc["00000", "extracted"]) and memorized.loc["00000", "best_train_key"] == "original"
    best = planted["samples"]["00000"][int(memorized.loc["00000", "best_sample"])]
    fitted = np.asarray(fit_to(Image.fromarray(planted["base"]), best.shape[:2]))[None]
    assert memorized.loc["00000", "best_distance"] == pytest.approx(WholeImageRMS().distances(best[None], fitted)[0, 0])
    assert TiledL2().distances(best[None], fitted)[0, 0] > 0.15  # tiled L2 would not have matched it
    for row in extracted[extracted["prompt_id"] == "00000"].itertuples():
        sample = planted["samples"]["00000"][int(row.sample)]
        assert row.distance == pytest.approx(WholeImageRMS().distances(sample[None], fitted)[0, 0])

    # The tiled L2 detector on the same samples flags nothing, and names the prompt adaptive
    # sampling stopped under the other rule.
    cfg = compose_config(
        "detect",
        [f"run_dir={tmp_path / 'rms'}", "out_dir=${run_dir}/detect_tiled", "rule.min_clique=3", "progress=false", "device=cpu"],
    )
    tiled, _ = run_detect_stage(cfg)
    assert not tiled["flagged"].any()
    assert json.loads((tmp_path / "rms" / "detect_tiled" / "summary.json").read_text())["stopped_under_another_rule"] == ["00000"]


def test_the_earlier_verdict_function_still_answers():
    """``pipeline.detect.find_memorized`` (the earlier API) gives the rule's verdict."""
    from pipeline.detect import find_memorized

    d = np.full((5, 5), 0.5)
    d[np.ix_([0, 1, 2], [0, 1, 2])] = 0.05
    np.fill_diagonal(d, 0)
    verdict = find_memorized(d, threshold=0.15, min_clique=3)
    assert verdict["members"] == [0, 1, 2] and verdict["flagged"]
    assert not find_memorized(d, threshold=0.15, min_clique=4)["flagged"]
