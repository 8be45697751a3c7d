"""benchmarks/screen_bench.py: brute force against prescreen + adaptive sampling, on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("screen_bench")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    """The --tiny run. The random model's samples are near-binary noise whose pair distances
    cluster at 0.736, 0.75, 0.764...; a threshold between 0.75 and 0.764 and cliques of 2 make
    brute force flag some prompts and not others, so that every shortcut has something to miss."""
    out = tmp_path_factory.mktemp("screen") / "run"
    result = bench.main(["--tiny", "--threshold", "0.757", "--min-clique", "2", "--out", str(out)])
    return result, out


def test_budget_figures_follow_from_the_runs(tiny_run):
    result, out = tiny_run
    n, samples, steps = result["prompts"], result["n_samples"], result["steps"]
    assert result["brute_force"]["unet_evaluations"] == n * samples * steps * 2  # guidance 5: two UNet calls a step
    screened = result["screened"]
    table = pd.read_parquet(out / "screened" / "generations" / "prompts.parquet")
    assert sorted(table.prompt_id) == screened["kept"] and len(screened["kept"]) == n // 2  # keep 50% (--tiny: no z cut)
    assert screened["prescreen_evaluations"] == (n + 1) * 2  # 2 seeds a prompt, and 2 unconditional ones for all
    assert screened["unet_evaluations"] == screened["prescreen_evaluations"] + int(table.n_generated.sum()) * steps * 2
    assert result["evaluation_fraction"] == pytest.approx(screened["unet_evaluations"] / result["brute_force"]["unet_evaluations"])
    # Rounds end at 2, 4, 6 samples (or sooner where a stop on the verdict could apply); a prompt
    # stopped before the budget did so for a reason.
    assert set(table.n_generated) <= set(range(2, samples + 1))
    assert screened["stopped_early"] == int(table.stopped_early.sum()) == int((table.stop_reason == "no_close_pairs").sum())
    assert screened["stopped_flagged"] == int((table.stop_reason == "flagged").sum())
    assert screened["stopped_out_of_reach"] == int((table.stop_reason == "out_of_reach").sum())
    stopped = screened["stopped_early"] + screened["stopped_flagged"] + screened["stopped_out_of_reach"]
    assert stopped == int((table.n_generated < samples).sum())


def test_screened_samples_are_the_brute_force_samples(tiny_run):
    _, out = tiny_run
    screened = sorted((out / "screened" / "generations").glob("*/*.png"))
    assert screened
    for path in screened:
        twin = out / "brute" / "generations" / path.parent.name / path.name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)), err_msg=str(path))


def test_recall_and_the_replayed_misses_agree(tiny_run):
    """Brute force flagged prompts; the screened run flags exactly those that neither shortcut,
    replayed on brute force's samples, would have missed (same seeds give the same samples)."""
    result, out = tiny_run
    brute, screened = set(result["brute_force"]["flagged"]), set(result["screened"]["flagged"])
    assert brute, "the tiny run is meant to flag something; see the fixture"
    assert screened == brute - set(result["missed"]["both"])
    assert set(result["missed"]["both"]) == set(result["missed"]["prescreen"]) | set(result["missed"]["adaptive"])
    assert set(result["missed"]["prescreen"]) == brute - set(result["screened"]["kept"])
    assert result["recall"] == pytest.approx(len(screened & brute) / len(brute))
    memorized = pd.read_parquet(out / "brute" / "detect" / "memorized.parquet")
    assert set(memorized.loc[memorized.flagged, "prompt_id"]) == brute


def test_printed_table_and_result_line(bench, tiny_run, capsys, tmp_path):
    result, _ = tiny_run
    assert 0.0 <= result["roc_auc_heavy_vs_rest"] <= 1.0 and 0.0 <= result["roc_auc_heavy_vs_singletons"] <= 1.0
    assert set(result["targets"]) == {"roc_auc>=0.95", "recall>=0.95", "fraction<=0.10"}
    json.dumps(result)  # JSON-ready
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(SystemExit, match="--out"):
        bench.main(["--tiny", "--out", str(tmp_path / "busy")])


def test_prompt_list_covers_every_band(bench):
    truth = pd.DataFrame({
        "original_id": [f"o{i}" for i in range(8)],
        "original_caption": [f"caption {i}" for i in range(8)],
        "band": ["heavy", "heavy", "mid", "mid", "single", "single", "single", "single"],
        "dup_count": [150, 150, 10, 10, 1, 1, 1, 1],
    })  # fmt: skip
    all_multi = bench.demo_prompts(truth, 6)
    assert [p.prompt_id for p in all_multi[:4]] == ["o0", "o1", "o2", "o3"] and len(all_multi) == 6
    assert {p.dup_count for p in all_multi[4:]} == {1}
    few = bench.demo_prompts(truth, 3)
    assert [p.dup_count for p in few] == [150, 10, 1]  # one of each band
