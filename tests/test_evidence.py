"""Per-sample verification finds what the clique misses, and only what is there.

Five prompts of 24 samples each, planted so that each exercises one case: samples spread over
three training variants of one image (largest clique 8: not flagged, every sample a
reproduction), 3 of 24 samples reproducing a training image, a clique of an image that is not
in the training set (flagged, nothing reproduced), a true clique of a training image, and a
prompt with nothing. The detector's command line must get every prompt's ``flagged``,
``extracted`` and ``samples_matched`` exactly as an independent reference computes them: a
per-pair float64 tiled L2 loop over every (sample, training image) pair, and networkx's
clique search over the samples.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.detect.verify import fit_to
from pipeline.distance import tiled_l2_pair

from .test_detect import near_copy, smooth_image

# One detector command line over 120 planted samples.
pytestmark = pytest.mark.slow
SIZE = 32
N = 24
THRESHOLD, MIN_CLIQUE = 0.15, 10  # the defaults of conf/rule.yaml and conf/metric/tiled_l2.yaml


def build(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(16)
    variants = [smooth_image(rng, SIZE) for _ in range(3)]
    few, outside, true = (smooth_image(rng, SIZE) for _ in range(3))
    plan = {  # prompt -> the image each sample copies (None: a fresh image)
        "spread": [variants[i // 8] for i in range(N)],
        "few": [few if i in (2, 11, 20) else None for i in range(N)],
        "outside": [outside if i < 12 else None for i in range(N)],
        "true": [true if i % 2 == 0 else None for i in range(N)],
        "nothing": [None] * N,
    }
    generations = root / "generations"
    for pid, sources in plan.items():
        (generations / pid).mkdir(parents=True)
        for i, source in enumerate(sources):
            image = near_copy(rng, source) if source is not None else smooth_image(rng, SIZE)
            Image.fromarray(image).save(generations / pid / f"{i:05d}.png")
    pd.DataFrame({"prompt_id": list(plan), "caption": [f"caption of {pid}" for pid in plan]}).to_parquet(
        generations / "prompts.parquet"
    )
    train = root / "train" / "part0"
    train.mkdir(parents=True)
    for i, image in enumerate([*variants, few, true, *(smooth_image(rng, SIZE) for _ in range(15))]):
        Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC).save(train / f"{i:05d}.png")
        (train / f"{i:05d}.txt").write_text(f"training caption {i}", encoding="utf-8")
    return generations, root / "train"


def reference(generations: Path, train: Path) -> pd.DataFrame:
    training = [Image.open(path) for path in sorted(train.rglob("*.png"))]
    rows = []
    for folder in sorted(p for p in generations.iterdir() if p.is_dir()):
        samples = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))]
        matched = sum(
            min(tiled_l2_pair(sample, np.asarray(fit_to(image, sample.shape[:2]))) for image in training) <= THRESHOLD
            for sample in samples
        )
        graph = nx.Graph()
        graph.add_nodes_from(range(len(samples)))
        graph.add_edges_from(
            (i, j)
            for i in range(len(samples))
            for j in range(i + 1, len(samples))
            if tiled_l2_pair(samples[i], samples[j]) < THRESHOLD
        )
        clique = max(len(c) for c in nx.find_cliques(graph))
        rows.append(
            {"prompt_id": folder.name, "flagged": clique >= MIN_CLIQUE, "extracted": matched > 0, "samples_matched": matched}
        )
    return pd.DataFrame(rows).set_index("prompt_id")


def test_every_prompt_gets_flagged_extracted_and_samples_matched_right(tmp_path):
    generations, train = build(tmp_path)
    expected = reference(generations, train)
    # The planted cases are what they should be (so the comparison below covers each one).
    assert expected.to_dict("index") == {
        "few": {"flagged": False, "extracted": True, "samples_matched": 3},
        "nothing": {"flagged": False, "extracted": False, "samples_matched": 0},
        "outside": {"flagged": True, "extracted": False, "samples_matched": 0},
        "spread": {"flagged": False, "extracted": True, "samples_matched": N},
        "true": {"flagged": True, "extracted": True, "samples_matched": 12},
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.detect",
            f"run_dir={tmp_path}",
            f"generations_dir={generations}",
            "data=files",
            f"data.path={train}",
            "progress=false",
            "device=cpu",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    memorized = pd.read_parquet(tmp_path / "detect" / "memorized.parquet").set_index("prompt_id").sort_index()
    got = memorized[["flagged", "extracted", "samples_matched"]].astype(
        {"flagged": bool, "extracted": bool, "samples_matched": int}
    )
    pd.testing.assert_frame_equal(got, expected.sort_index(), check_dtype=False)
    pairs = pd.read_parquet(tmp_path / "detect" / "extracted.parquet")
    assert pairs.groupby("prompt_id")["sample"].nunique().to_dict() == {"few": 3, "spread": N, "true": 12}
    assert (pairs["distance"] <= THRESHOLD).all()
