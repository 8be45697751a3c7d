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
    brute force flag prompts, so that every shortcut has something to miss. Their distances to
    the training images are 0.47 and more: a verification threshold of 0.5 extracts few."""
    out = tmp_path_factory.mktemp("screen") / "run"
    args = ["--tiny", "--score", "own_images", "--threshold", "0.757", "--min-clique", "2", "--delta", "0.5", "--out", str(out)]
    result = bench.main(args)
    return result, out


@pytest.mark.slow
def test_budget_figures_follow_from_the_runs(tiny_run):
    result, out = tiny_run
    n, samples, steps = result["prompts"], result["n_samples"], result["steps"]
    assert result["brute_force"]["unet_evaluations"] == n * samples * steps * 2  # guidance 5: two UNet calls a step
    screened = result["screened"]
    # Each sampling tier's prompts are generated into their own folder, out/screened/<tier>/.
    table = pd.concat([pd.read_parquet(path) for path in sorted((out / "screened").glob("*/generations/prompts.parquet"))])
    assert sorted(table.prompt_id) == screened["kept"] and len(screened["kept"]) == n // 2  # keep 50% (--tiny: no z cut)
    # own_images: its text score, wen_levels at its one default level (0.125), 2 seeds a prompt and 2
    # unconditional ones for all; then each training image (at most 2 a prompt) scored, with and
    # without the caption, at the one default image level, one draw (every tiny prompt has its copies as keys).
    assert 0 < screened["prescreen_images"] <= 2 * n
    assert screened["prescreen_evaluations"] == (n + 1) * 2 + 2 * 1 * 1 * screened["prescreen_images"]
    assert screened["unet_evaluations"] == screened["prescreen_evaluations"] + int(table.n_generated.sum()) * steps * 2
    assert result["evaluation_fraction"] == pytest.approx(
        screened["unet_evaluations"] / result["brute_force"]["unet_evaluations"]
    )
    # Rounds end at 2, 4, 6 samples (1, 2, 4, 6 for a strong prompt, or sooner where a stop on the
    # verdict could apply); a prompt stopped before the budget did so for a reason.
    assert set(table.n_generated) <= set(range(1, samples + 1))
    assert screened["stopped_early"] == int(table.stopped_early.sum()) == int((table.stop_reason == "no_close_pairs").sum())
    assert screened["stopped_flagged"] == int((table.stop_reason == "flagged").sum())
    assert screened["stopped_out_of_reach"] == int((table.stop_reason == "out_of_reach").sum())
    assert screened["stopped_extracted"] == int((table.stop_reason == "extracted").sum())
    assert screened["stopped_unlikely"] == int((table.stop_reason == "unlikely").sum())
    assert screened["fewer_samples"] == sorted(table.prompt_id[table.stop_reason.isin(["extracted", "unlikely"])])
    stopped = sum(
        screened[k] for k in ("stopped_early", "stopped_flagged", "stopped_out_of_reach", "stopped_extracted", "stopped_unlikely")
    )
    assert stopped == int((table.n_generated < samples).sum())


@pytest.mark.slow
def test_screened_samples_are_the_brute_force_samples(tiny_run):
    """Each screened sample is brute force's sample of the same prompt and index: the same seed,
    so the same initial noise. Made in a batch of another size (a first round of one sample
    against brute force's batches), the float arithmetic may differ in its last bits, which can
    move a pixel across a rounding boundary: at most one grey level. A sample of another seed
    (the tiny model's samples are near-binary noise) differs by far more."""
    _, out = tiny_run
    screened = sorted((out / "screened").glob("*/generations/*/*.png"))
    assert screened
    for path in screened:
        twin = out / "brute" / "generations" / path.parent.name / path.name
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(twin), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, str(path)


@pytest.mark.slow
def test_recall_and_the_replayed_misses_agree(tiny_run):
    """Brute force found (flagged or extracted) prompts; the screened run finds exactly those
    that neither shortcut, replayed on brute force's samples, would have missed (same seeds give
    the same samples, and a stop once extracted finds the match brute force finds)."""
    result, out = tiny_run
    brute, screened = set(result["brute_force"]["found"]), set(result["screened"]["found"])
    assert brute, "the tiny run is meant to flag something; see the fixture"
    assert brute == set(result["brute_force"]["flagged"]) | set(result["brute_force"]["extracted"])
    assert screened == brute - set(result["missed"]["both"])
    assert set(result["missed"]["both"]) == set(result["missed"]["prescreen"]) | set(result["missed"]["adaptive"])
    assert set(result["missed"]["prescreen"]) == brute - set(result["screened"]["kept"])
    assert result["recall"] == pytest.approx(len(screened & brute) / len(brute))
    memorized = pd.read_parquet(out / "brute" / "detect" / "memorized.parquet")
    assert set(memorized.loc[memorized.flagged, "prompt_id"]) == set(result["brute_force"]["flagged"])
    pairs = pd.read_parquet(out / "brute" / "detect" / "extracted.parquet")
    assert set(pairs.loc[pairs.in_group.fillna(False).astype(bool), "prompt_id"]) == set(result["brute_force"]["extracted"])


@pytest.mark.slow
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
    truth = pd.DataFrame(
        {
            "original_id": [f"o{i}" for i in range(8)],
            "original_caption": [f"caption {i}" for i in range(8)],
            "band": ["heavy", "heavy", "mid", "mid", "single", "single", "single", "single"],
            "dup_count": [150, 150, 10, 10, 1, 1, 1, 1],
        }
    )
    all_multi = bench.demo_prompts(truth, 6)
    assert [p.prompt_id for p in all_multi[:4]] == ["o0", "o1", "o2", "o3"] and len(all_multi) == 6
    assert {p.dup_count for p in all_multi[4:]} == {1}
    few = bench.demo_prompts(truth, 3)
    assert [p.dup_count for p in few] == [150, 10, 1]  # one of each band


def test_seeds_print_each_row_and_the_worst_and_brute_force_extrapolates_exactly(bench, tmp_path, capsys):
    """--seeds 0,1 with brute force on the duplicated prompts and 2 of the singletons: a row per
    seed and the worst; brute force's cost is prompts x samples x steps x 2, exactly, although
    it sampled fewer prompts."""
    out = tmp_path / "seeds"
    result = bench.main(
        [
            "--tiny",
            "--threshold",
            "0.757",
            "--min-clique",
            "2",
            "--delta",
            "0.5",
            "--seeds",
            "0,1",
            "--brute-singletons",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    runs = result["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        n, samples, steps = r["prompts"], r["n_samples"], r["steps"]
        assert r["brute_force"]["unet_evaluations"] == n * samples * steps * 2
        assert (
            r["brute_force"]["singletons_sampled"] == 2 and r["brute_force"]["prompts_sampled"] == 4 + 2
        )  # 4 duplicated originals
        table = pd.read_parquet(out / f"seed_{r['seed']}" / "brute" / "generations" / "prompts.parquet")
        assert len(table) == 6 and int(table.n_generated.sum()) == 6 * samples
        assert r["evaluation_fraction"] == pytest.approx(r["screened"]["unet_evaluations"] / (n * samples * steps * 2))
        assert f"screen_bench seed {r['seed']}:" in printed
    worst = result["worst"]
    assert worst["evaluation_fraction"] == max(r["evaluation_fraction"] for r in runs)
    recalls = [r["recall"] for r in runs if r["recall"] == r["recall"]]
    assert worst["recall"] == min(recalls) if recalls else worst["recall"] != worst["recall"]
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] in (["0"], ["1"], ["worst"])]
    assert [row[0] for row in rows] == ["0", "1", "worst"]
    assert "targets on every seed:" in printed


def test_brute_cache_reuses_brute_force_samples_across_prompt_mixes(bench, tmp_path):
    """--brute-cache: a second run (another prompt mix of the same seed) links the samples the
    first made, makes only the missing ones, and they are the images a run from nothing makes."""
    cache = tmp_path / "cache"
    common = ["--tiny", "--threshold", "0.757", "--min-clique", "2", "--delta", "0.5", "--brute-cache", str(cache)]
    first = bench.main([*common, "--prompts", "6", "--out", str(tmp_path / "a")])
    assert first["brute_force"]["samples_reused"] == 0
    second = bench.main([*common, "--prompts", "8", "--out", str(tmp_path / "b")])
    n_samples = second["n_samples"]
    shared = set(pd.read_parquet(tmp_path / "a" / "brute" / "generations" / "prompts.parquet").prompt_id)
    made = set(pd.read_parquet(tmp_path / "b" / "brute" / "generations" / "prompts.parquet").prompt_id)
    assert second["brute_force"]["samples_reused"] == len(shared & made) * n_samples > 0
    fresh = bench.main(
        ["--tiny", "--threshold", "0.757", "--min-clique", "2", "--delta", "0.5", "--prompts", "8", "--out", str(tmp_path / "c")]
    )  # (the tiny model is built from a fixed seed)
    for path in sorted((tmp_path / "b" / "brute" / "generations").glob("*/*.png")):
        twin = tmp_path / "c" / "brute" / "generations" / path.parent.name / path.name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)), err_msg=str(path))
    assert second["brute_force"]["found"] == fresh["brute_force"]["found"]


def test_sampling_tiers_give_each_kept_prompt_one_rule(bench):
    """Each kept prompt gets exactly one tier: few_copies when its duplicate group is known and
    smaller than --min-copies (whatever its z), strong from the caption-only z at --strong-z,
    weak for the other groups of --min-copies or more, standard when the group size is unknown;
    prompts not kept get none. The strong tier's rule starts with --strong-first-round samples
    and holds a prompt until extracted, flagged or out of budget; the weak tier's starts with
    --weak-first-round, without the stop on an unlikely clique; the few_copies tier's with --few-first-round, held as the standard rule
    holds; the rest is the standard rule's."""
    scores = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "dup_count": pd.array([150, 40, 10, 40, 40, 3, 1, None], dtype="Int64"),
            "z_text": [9.0, 5.0, 2.5, 1.0, 0.5, 8.0, 1.0, 2.0],
            "kept": [True, True, True, True, False, True, True, True],
        }
    )
    args = bench.parse_args(["--score", "own_images"])
    assert bench.sampling_tiers(scores, args) == {
        "a": bench.STRONG,
        "b": bench.STRONG,
        "c": bench.WEAK,
        "d": bench.WEAK,
        "f": bench.FEW,  # a group under --min-copies, however high its z
        "g": bench.FEW,
        "h": bench.STANDARD,  # group size unknown
    }
    assert bench.sampling_tiers(scores, bench.parse_args(["--score", "own_images", "--min-copies", "1"]))["f"] == bench.STRONG
    args_no_strong = bench.parse_args(["--score", "own_images", "--strong-z", "none"])
    assert set(bench.sampling_tiers(scores, args_no_strong).values()) == {bench.WEAK, bench.FEW, bench.STANDARD}
    # A text-only score's table has robust_z for the caption-only z.
    text_only = scores.rename(columns={"z_text": "robust_z"})
    assert bench.sampling_tiers(text_only, bench.parse_args(["--score", "wen_levels"])) == bench.sampling_tiers(scores, args)
    rules = bench.tier_rules(args, {"format": "files", "path": "unused"})
    standard = bench.adaptive_rule(args, {"format": "files", "path": "unused"})
    assert rules[bench.STANDARD] == standard
    assert rules[bench.STRONG].first_round == args.strong_first_round
    assert rules[bench.STRONG].near_training == bench.HOLD_ALWAYS == 1.0  # tiled L2 of [0, 1] images is at most 1
    assert rules[bench.WEAK].first_round == args.weak_first_round
    assert standard.stop_when_unlikely and not rules[bench.WEAK].stop_when_unlikely
    assert rules[bench.FEW].first_round == args.few_first_round
    assert rules[bench.FEW].near_training == standard.near_training is not None
    for tier in (bench.STRONG, bench.WEAK, bench.FEW):
        assert rules[tier].rule == standard.rule and rules[tier].growth == standard.growth
        assert rules[tier].stop_when_extracted == standard.stop_when_extracted
    # Without training images nothing can hold a prompt: a first round needs a pair.
    unheld = bench.tier_rules(args, None)
    assert unheld[bench.STRONG].near_training is None and unheld[bench.STRONG].first_round == max(2, args.strong_first_round)
    assert unheld[bench.FEW].near_training is None and unheld[bench.FEW].first_round == max(2, args.few_first_round)


def test_the_keep_rule_is_the_prescreens(bench):
    """(b)'s prescreen is the pipeline's: --keep-z and --singleton-keep-z are
    prescreen.min_robust_z and prescreen.singleton_min_robust_z, and what no option sets (the
    robust z's reference, reference_singletons) is conf/prescreen.yaml's default."""
    from omegaconf import OmegaConf

    from .conftest import CONF

    args = bench.parse_args(["--keep-z", "2.25", "--singleton-keep-z", "3.75"])
    settings = bench.bench_prescreen_settings(args, seed=4)
    assert (settings.min_robust_z, settings.singleton_min_robust_z, settings.base_seed) == (2.25, 3.75, 4)
    conf = OmegaConf.load(CONF / "prescreen.yaml").prescreen
    assert settings.reference_singletons == conf.reference_singletons is not None
    assert bench.bench_prescreen_settings(bench.parse_args(["--singleton-keep-z", "none"]), 0).singleton_min_robust_z is None
