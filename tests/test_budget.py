"""The budget report: UNet evaluations against brute force, and what each shortcut misses."""

import json
import math

import pandas as pd
import pytest

from pipeline.budget import (
    brute_force_evaluations,
    evaluations_per_sample,
    format_budget,
    generation_budget,
    missed_by_shortcuts,
    prescreen_evaluations,
    write_generation_budget,
)
from pipeline.prescreen import PrescreenSettings, unet_evaluations


def prompts_table(made, budget=32, steps=25, guidance=5.0, stopped=None):
    ids = [f"{i:05d}" for i in range(len(made))]
    stopped = stopped if stopped is not None else [m < budget for m in made]
    return pd.DataFrame(
        {
            "prompt_id": ids,
            "n_samples": budget,
            "steps": steps,
            "guidance_scale": guidance,
            "n_generated": made,
            "stopped_early": stopped,
            "adaptive": '{"first_round": 8}',
        }
    )


def test_evaluation_counts_follow_the_sampler():
    assert evaluations_per_sample(50, 7.5) == 100  # classifier-free guidance: two UNet calls a step
    assert evaluations_per_sample(50, 1.0) == 50
    assert brute_force_evaluations(1000, 500, 50, 7.5) == 50_000_000
    # One conditional evaluation per prompt and seed, one unconditional per seed shared by all prompts.
    assert prescreen_evaluations(44, 4) == unet_evaluations(44, PrescreenSettings(seeds=4)) == 44 * 4 + 4
    assert prescreen_evaluations(0, 4) == 0


def test_adaptive_run_against_brute_force():
    report = generation_budget(prompts_table([32, 8, 8, 8]))
    assert report["brute_force_evaluations"] == 4 * 32 * 50
    assert report["generation_evaluations"] == report["unet_evaluations"] == (32 + 24) * 50
    assert report["fraction"] == pytest.approx(56 / 128)
    assert (report["prompts"], report["prompts_sampled"], report["prompts_stopped_early"]) == (4, 4, 3)
    assert (report["samples"], report["samples_brute_force"]) == (56, 128)

    # A run of another tool's or an older generator's table: every prompt fully sampled.
    plain = prompts_table([32, 32]).drop(columns=["n_generated", "stopped_early"])
    assert generation_budget(plain)["fraction"] == 1.0
    assert generation_budget(prompts_table([32], guidance=1.0))["brute_force_evaluations"] == 32 * 25
    # The generator records its family's evaluations per step: FLUX-dev embeds its guidance
    # scale and runs one evaluation a step, which the guidance scale alone would count twice.
    flux = prompts_table([32], guidance=3.5).assign(evaluations_per_step=1)
    assert generation_budget(flux)["brute_force_evaluations"] == 32 * 25


def test_prescreen_cost_and_dropped_prompts_count():
    # 44 prompts scored with 4 seeds, 11 kept and sampled adaptively.
    report = generation_budget(prompts_table([32] * 3 + [8] * 8), prescreen={"prompts": 44, "unet_evaluations": 352})
    brute = brute_force_evaluations(44, 32, 25, 5.0)
    assert report["brute_force_evaluations"] == brute and report["samples_brute_force"] == 44 * 32
    assert report["unet_evaluations"] == 352 + (96 + 64) * 50
    assert report["fraction"] == pytest.approx((352 + 160 * 50) / brute)
    assert report["prompts"] == 44 and report["prompts_sampled"] == 11
    with pytest.raises(ValueError, match="prescreen"):
        generation_budget(prompts_table([32] * 3), prescreen={"prompts": 2, "unet_evaluations": 16})
    with pytest.raises(ValueError, match="n_samples"):
        generation_budget(pd.DataFrame({"prompt_id": ["a"]}))


def test_missed_flagged_prompts_per_shortcut():
    memorized = pd.DataFrame({"prompt_id": ["a", "b", "c", "d", "e"], "flagged": [True, True, True, False, True]})
    prescreen = pd.DataFrame({"prompt_id": ["a", "b", "c", "d", "e"], "kept": [True, False, True, True, True]})
    # Adaptive ran on the kept prompts only (a combined run): b is unknown to it.
    adaptive = pd.DataFrame({"prompt_id": ["a", "c", "d", "e"], "stopped_early": [False, True, True, False]})
    out = missed_by_shortcuts(memorized, prescreen, adaptive)
    assert out["flagged"] == 4 and out["flagged_ids"] == ["a", "b", "c", "e"]
    assert out["prescreen"]["missed"] == ["b"] and out["prescreen"]["recall"] == 0.75
    assert out["adaptive"]["missed"] == ["c"] and out["adaptive"]["unknown"] == ["b"]
    assert out["adaptive"]["recall"] == 0.5
    assert out["both"]["missed"] == ["b", "c"] and out["both"]["unknown"] == [] and out["both"]["recall"] == 0.5
    only = missed_by_shortcuts(memorized, prescreen=prescreen)
    assert "adaptive" not in only and "both" not in only
    nothing = missed_by_shortcuts(memorized.assign(flagged=False), prescreen, adaptive)
    assert nothing["flagged"] == 0 and math.isnan(nothing["both"]["recall"])
    with pytest.raises(ValueError, match="flagged"):
        missed_by_shortcuts(pd.DataFrame({"prompt_id": ["a"]}))


def test_written_report_reads_the_prescreen_beside_the_prompts(tmp_path):
    prescreen_dir = tmp_path / "prescreen"
    prescreen_dir.mkdir()
    (prescreen_dir / "summary.json").write_text(json.dumps({"prompts": 6, "unet_evaluations": 48}))
    table = pd.DataFrame({"prompt_id": [f"{i:05d}" for i in range(6)], "kept": [True] * 3 + [False] * 3})
    table.to_parquet(prescreen_dir / "prescreen.parquet")
    memorized = pd.DataFrame({"prompt_id": ["00000", "00001", "00004"], "flagged": [True, True, True]})
    memorized.to_parquet(tmp_path / "memorized.parquet")

    generations = prompts_table([32, 8, 32])  # prompts 00000-00002, 00001 stopped early
    report = write_generation_budget(
        tmp_path / "gen", generations, prescreen_dir / "selected.parquet", tmp_path / "memorized.parquet"
    )
    assert json.loads((tmp_path / "gen" / "budget.json").read_text())["unet_evaluations"] == report["unet_evaluations"]
    assert report["prompts"] == 6 and report["prescreen_evaluations"] == 48
    missed = report["missed"]
    assert missed["prescreen"]["missed"] == ["00004"]
    assert missed["adaptive"]["missed"] == ["00001"] and missed["adaptive"]["unknown"] == ["00004"]
    assert missed["both"]["n_missed"] == 2
    text = format_budget(report)
    assert f"{report['unet_evaluations']:,} UNet evaluations of {report['brute_force_evaluations']:,}" in text
    assert "prescreen missed 1" in text and "adaptive missed 1 (+1 unknown)" in text

    # Prompts not from a prescreen, no adaptive rule recorded: neither shortcut is reported.
    plain = generations.assign(adaptive=None)
    report = write_generation_budget(tmp_path / "gen2", plain, tmp_path / "list.txt", tmp_path / "memorized.parquet")
    assert report["prescreen_evaluations"] == 0 and report["prompts"] == 3
    assert set(report["missed"]) == {"flagged", "flagged_ids", "extracted_ids", "found"}
    with pytest.raises(ValueError, match="budget.brute_force_memorized"):
        write_generation_budget(tmp_path / "gen3", plain, None, tmp_path / "nowhere.parquet")


def test_stops_on_fewer_samples_are_counted_and_named():
    """Prompts stopped once extracted or unlikely took their verdict on fewer samples than the
    budget: counted apart and listed; an "extracted" stop is no miss (the prompt is found), an
    "unlikely" one is when brute force found the prompt."""
    table = prompts_table([8, 12, 32, 10]).assign(
        stop_reason=["extracted", "unlikely", None, "no_close_pairs"], stopped_early=[False, False, False, True]
    )
    report = generation_budget(table)
    assert (report["prompts_stopped_extracted"], report["prompts_stopped_unlikely"], report["prompts_stopped_early"]) == (1, 1, 1)
    assert report["fewer_samples"] == ["00000", "00001"] and report["samples"] == 8 + 12 + 32 + 10
    text = format_budget(report)
    assert "1 once extracted" in text and "1 once a clique was unlikely" in text and "00000, 00001" in text

    # Brute force flagged 00002 and extracted 00000 and 00001 (flagged too) and 00003.
    memorized = pd.DataFrame(
        {
            "prompt_id": ["00000", "00001", "00002", "00003"],
            "flagged": [False, True, True, False],
            "extracted": [True, True, False, True],
        }
    )
    out = missed_by_shortcuts(memorized, adaptive=table)
    assert out["flagged"] == 2 and out["extracted_ids"] == ["00000", "00001", "00003"] and out["found"] == 4
    assert out["adaptive"]["missed"] == ["00001", "00003"] and out["adaptive"]["recall"] == 0.5
    assert "of the 4 prompts brute force flagged or extracted" in format_budget({**report, "missed": out})
