"""The first-step prescreen score (Wen et al.) on the shipped demo model."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from diffusers import DiffusionPipeline

from pipeline.prescreen import PrescreenSettings, choose_kept, prescreen, roc_auc, unet_evaluations
from pipeline.prompts import Prompt

from .conftest import SHIPPED_DEMO_MODEL, compose_config


@pytest.fixture(scope="module")
def demo_pipe():
    assert (SHIPPED_DEMO_MODEL / "model_index.json").exists(), f"the shipped demo model is missing from {SHIPPED_DEMO_MODEL}"
    pipe = DiffusionPipeline.from_pretrained(str(SHIPPED_DEMO_MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_images(pipe, run):
    """``(run(), images the UNet was called on while it ran)``: what the prescreen really evaluates."""
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    try:
        return run(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.slow
def test_heavily_duplicated_captions_score_above_singletons(demo_pipe, demo_set):
    truth = pd.read_parquet(demo_set / "ground_truth.parquet").drop_duplicates("original_id")
    heavy = truth[truth.band == "heavy"]
    singles = truth[truth.band == "single"].head(len(heavy))
    prompts = [Prompt(r.original_id, r.original_caption, int(r.dup_count)) for r in pd.concat([heavy, singles]).itertuples()]
    table = prescreen(demo_pipe, prompts, PrescreenSettings(seeds=2, keep_top=len(heavy)), progress=False)
    by_band = table.assign(heavy=table.dup_count == heavy.dup_count.iloc[0]).groupby("heavy").score.mean()
    assert by_band[True] > by_band[False]
    assert roc_auc(table.score.to_numpy(), (table.dup_count > 1).to_numpy()) > 0.5
    assert table.kept.sum() == len(heavy)
    assert list(table["rank"]) == list(range(len(table)))
    assert table.score.is_monotonic_decreasing


def test_score_depends_on_the_text_only_through_the_caption(demo_pipe):
    settings = PrescreenSettings(seeds=2, keep_top=1)
    prompts = [Prompt("a", "zubrak melino"), Prompt("b", "zubrak melino"), Prompt("c", "tesh vorla")]
    table = prescreen(demo_pipe, prompts, settings, progress=False).set_index("prompt_id")
    assert table.loc["a", "score"] == pytest.approx(table.loc["b", "score"], rel=1e-5)
    assert table.loc["a", "score"] != pytest.approx(table.loc["c", "score"], rel=1e-3)


@pytest.mark.slow
def test_shared_unconditional_prediction_gives_the_direct_score_for_fewer_evaluations(demo_pipe):
    """eps(x_T, "") is computed once per seed for all captions: the score is still the norm of
    eps(x_T, c) - eps(x_T, "") computed directly, and the UNet sees (captions + 1) * seeds images."""
    import torch

    from pipeline.prescreen import latent_shape, text_conditional_noise_norm

    settings = PrescreenSettings(seeds=2, steps=25, batch_size=4)
    captions = ["zubrak melino", "tesh vorla", "quen dasso"]
    per_seed, images_seen = unet_images(
        demo_pipe, lambda: text_conditional_noise_norm(demo_pipe, captions, settings, progress=False)
    )
    assert images_seen == unet_evaluations(len(captions), settings) == (3 + 1) * 2

    # The direct computation for caption 1, seed 1: both predictions in one batch of two.
    scheduler, unet = demo_pipe.scheduler, demo_pipe.unet
    scheduler.set_timesteps(settings.steps)
    timestep = scheduler.timesteps[0]
    x = torch.randn(latent_shape(demo_pipe, None, None), generator=torch.Generator().manual_seed(settings.base_seed + 1))
    x = scheduler.scale_model_input(x[None] * scheduler.init_noise_sigma, timestep)
    with torch.no_grad():
        text, _ = demo_pipe.encode_prompt([captions[1]], "cpu", 1, False)
        empty, _ = demo_pipe.encode_prompt([""], "cpu", 1, False)
        eps = unet(torch.cat([x, x]), timestep, encoder_hidden_states=torch.cat([empty, text])).sample
    assert per_seed[1, 1] == pytest.approx(float((eps[1] - eps[0]).norm()), rel=1e-4)


def test_heavy_prompt_aucs_leave_the_middle_out_against_singletons():
    from pipeline.prescreen import heavy_prompt_aucs

    dup = np.array([150, 150, 40, 40, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.95, 0.85, 0.2, 0.3, 0.1])  # moderately duplicated prompts score high too
    aucs = heavy_prompt_aucs(scores, dup, heavy_dup_count=100)
    assert aucs["heavy_vs_singletons"] == 1.0
    assert aucs["heavy_vs_rest"] == pytest.approx((4 + 3) / 10)  # 0.9 and 0.8 outrank 4 and 3 of the 5 others
    assert np.isnan(heavy_prompt_aucs(scores, np.full(7, 150.0), 100)["heavy_vs_singletons"])
    assert np.isnan(heavy_prompt_aucs(scores, np.array([150, np.nan, 1, 1, 1, 1, 1]), 100)["heavy_vs_rest"])


def test_keep_rules():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert choose_kept(scores, PrescreenSettings(keep_top=2)).tolist() == [False, True, False, True]
    assert choose_kept(scores, PrescreenSettings(score_threshold=0.6)).tolist() == [False, True, False, True]
    assert choose_kept(scores, PrescreenSettings(keep_top=3, score_threshold=0.6)).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="keep_top"):
        choose_kept(scores, PrescreenSettings())


def test_robust_z_keeps_the_outliers_of_a_bulk():
    from pipeline.prescreen import robust_z

    rng = np.random.default_rng(0)
    bulk = rng.normal(0.33, 0.02, size=200)  # unmemorized prompts
    scores = np.concatenate([bulk, [0.6, 0.9, 1.2]])  # three memorized outliers
    z = robust_z(scores)
    assert z[-3:].min() > 10 and np.median(z) == pytest.approx(0.0, abs=1e-9)
    kept = choose_kept(scores, PrescreenSettings(min_robust_z=3.5))
    assert kept[-3:].all() and kept[:200].sum() <= 2  # a normal bulk has ~0.02% beyond 3.5 sigma
    # The outliers barely move the scale: the same cut with ten times as many outliers keeps them all.
    crowded = np.concatenate([bulk, np.linspace(0.6, 1.2, 30)])
    assert choose_kept(crowded, PrescreenSettings(min_robust_z=3.5))[200:].all()
    # Combined with a count, both must hold.
    assert choose_kept(scores, PrescreenSettings(keep_top=2, min_robust_z=3.5)).sum() == 2
    # Ties: more than half equal falls back to the mean deviation; all equal gives zeros.
    assert robust_z(np.array([1.0, 1.0, 1.0, 5.0]))[-1] > 0
    assert not robust_z(np.full(4, 2.0)).any()


@pytest.mark.slow
@pytest.mark.parametrize("score", ["wen", "wen_levels"])
def test_ranks_merge_into_the_single_process_outputs(tmp_path, monkeypatch, score):
    """world_size=2, run as rank 0 then rank 1, writes one prescreen.parquet and selected.parquet
    over every prompt (robust z and kept set over all of them), as world_size=1 does; a rerun
    skips the scoring and redoes only the ranking. wen_levels' score compares prompts, so it is
    set only once every rank's norms are together."""
    from pipeline.executor import read_marker
    from pipeline.prescreen import stage, step

    captions = [
        "zubrak melino",
        "tesh vorla",
        "quen dasso",
        "a red barn in a snowy field",
        "portrait of a cat",
        "mill at dusk",
        "blue door",
    ]
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(captions))],
            "caption": captions,
            "dup_count": [12, 1, 4, 1, 12, 1, 1],
            "keys": [[f"k{i}a", f"k{i}b"] for i in range(len(captions))],
        }
    )
    prompts_path = tmp_path / "prompts.parquet"
    prompts.to_parquet(prompts_path)

    def run(run_dir, rank, world_size):
        overrides = [
            f"run_dir={run_dir}",
            f"prompts={prompts_path}",
            f"model.path={SHIPPED_DEMO_MODEL}",
            "device=cpu",
            "prescreen.seeds=2",
            "prescreen.steps=4",
            "prescreen.batch_size=4",
            "prescreen.keep_fraction=0.4",
            f"prescreen.score={score}",
            f"rank={rank}",
            f"world_size={world_size}",
        ]
        return stage.run(compose_config("prescreen", overrides)).table

    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 0, 1)
    assert run(two, 0, 2) is None, "rank 0 alone cannot rank every prompt"
    assert not (two / "prescreen" / "prescreen.parquet").exists()
    run(two, 1, 2)

    expected, got = (pd.read_parquet(d / "prescreen" / "prescreen.parquet") for d in (one, two))
    assert len(got) == len(captions)
    assert got["prompt_id"].tolist() == expected["prompt_id"].tolist()
    # Norms from other batch compositions agree to float32 rounding (rtol 1e-4); a robust z (the
    # robust_z column, and wen_levels' score) divides their differences by a MAD about a tenth
    # of them, so it agrees to 10x that.
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-4 if score == "wen" else 1e-3, atol=1e-6)
    np.testing.assert_allclose(got["robust_z"], expected["robust_z"], rtol=1e-3, atol=1e-6)
    assert got["kept"].tolist() == expected["kept"].tolist() and got["rank"].tolist() == expected["rank"].tolist()
    selected = [pd.read_parquet(d / "prescreen" / "selected.parquet") for d in (one, two)]
    assert selected[1]["prompt_id"].tolist() == selected[0]["prompt_id"].tolist() and len(selected[0]) == 3
    assert list(selected[1].columns[:4]) == ["prompt_id", "caption", "dup_count", "keys"]
    keys = dict(zip(prompts.prompt_id, prompts["keys"]))
    assert [list(k) for k in selected[1]["keys"]] == [keys[p] for p in selected[1]["prompt_id"]]
    summaries = [json.loads((d / "prescreen" / "summary.json").read_text()) for d in (one, two)]
    assert summaries[1]["prompts"] == summaries[0]["prompts"] == len(captions)
    assert summaries[1]["kept"] == summaries[0]["kept"] == 3
    settings = PrescreenSettings(seeds=2, score=score)
    passes = len(settings.level_values()) if score == "wen_levels" else 1
    assert summaries[0]["unet_evaluations"] == unet_evaluations(len(captions), settings) == (len(captions) + 1) * 2 * passes
    # one unconditional per rank, seed and timestep
    assert summaries[1]["unet_evaluations"] == summaries[0]["unet_evaluations"] + 2 * passes
    assert read_marker(two / "prescreen", "scores_1")["prompts"] == 3

    # A rerun with the same settings scores nothing (no model loaded) and ranks again.
    (two / "prescreen" / "prescreen.parquet").unlink()
    loaded = []
    original = step.load_prescreen_model
    monkeypatch.setattr(step, "load_prescreen_model", lambda cfg: loaded.append(cfg) or original(cfg))
    table = run(two, 0, 2)
    assert not loaded and table is not None
    assert pd.read_parquet(two / "prescreen" / "prescreen.parquet").equals(got)


@pytest.mark.slow
def test_anisotropy_adds_one_pass_at_the_low_noise_timestep(demo_pipe):
    """prescreen.score=anisotropy: Wen's norm from the same first-step passes, plus the alignment
    at the schedule's third-last timestep on the same input, computed directly for one caption
    and seed; the UNet sees twice Wen's images, (captions + 1) * seeds per timestep."""
    import torch

    from pipeline.prescreen import denoiser_scores, latent_shape, text_conditional_noise_norm
    from pipeline.prescreen.scores import guidance_alignment

    settings = PrescreenSettings(seeds=2, steps=25, batch_size=4, score="anisotropy", anisotropy_weight=2.0)
    captions = ["zubrak melino", "tesh vorla", "quen dasso"]
    per_seed, images_seen = unet_images(demo_pipe, lambda: denoiser_scores(demo_pipe, captions, settings, progress=False))
    assert images_seen == unet_evaluations(len(captions), settings) == 2 * (3 + 1) * 2
    np.testing.assert_array_equal(per_seed["wen"], text_conditional_noise_norm(demo_pipe, captions, settings, progress=False))
    np.testing.assert_allclose(per_seed["anisotropy"], per_seed["wen"] + 2.0 * per_seed["alignment"], rtol=1e-12)

    scheduler, unet = demo_pipe.scheduler, demo_pipe.unet
    scheduler.set_timesteps(settings.steps)
    first, low = scheduler.timesteps[0], scheduler.timesteps[-3]
    x = torch.randn(latent_shape(demo_pipe, None, None), generator=torch.Generator().manual_seed(settings.base_seed + 1))
    x = scheduler.scale_model_input(x[None] * scheduler.init_noise_sigma, first)
    with torch.no_grad():
        text, _ = demo_pipe.encode_prompt([captions[2]], "cpu", 1, False)
        empty, _ = demo_pipe.encode_prompt([""], "cpu", 1, False)
        eps = unet(torch.cat([x, x]), low, encoder_hidden_states=torch.cat([empty, text])).sample
    assert per_seed["alignment"][2, 1] == pytest.approx(float(guidance_alignment(eps[1:], eps[:1])), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_wen_levels_takes_the_strongest_outlier_over_noise_levels(demo_pipe):
    """prescreen.score=wen_levels: Wen's norm at the first timestep and at each level's timestep
    (computed directly here for one caption and seed), one pass of (captions + 1) * seeds images
    per level, and the score is the largest over levels of each level's robust z over prompts."""
    import torch

    from pipeline.prescreen import (
        denoiser_scores,
        latent_shape,
        rank_scores,
        robust_z,
        score_prompts,
        text_conditional_noise_norm,
    )

    settings = PrescreenSettings(seeds=2, steps=25, batch_size=4, score="wen_levels", levels=(0.5, 0.0, 0.25), keep_top=2)
    captions = ["zubrak melino", "tesh vorla", "quen dasso", "mill at dusk"]
    per_seed, images_seen = unet_images(demo_pipe, lambda: denoiser_scores(demo_pipe, captions, settings, progress=False))
    assert settings.level_values() == [0.0, 0.25, 0.5]
    # Without level 0, the first timestep is not evaluated: one pass per level given.
    alone = PrescreenSettings(seeds=2, steps=25, batch_size=4, score="wen_levels", levels=(0.25,))
    only, seen = unet_images(demo_pipe, lambda: denoiser_scores(demo_pipe, captions[:1], alone, progress=False))
    assert seen == unet_evaluations(1, alone) == (1 + 1) * 2 and "wen" not in only
    np.testing.assert_allclose(only["levels"][0, :, 0], per_seed["levels"][0, :, 1], rtol=1e-4)
    assert images_seen == unet_evaluations(len(captions), settings) == 3 * (4 + 1) * 2
    assert per_seed["levels"].shape == (4, 2, 3)
    np.testing.assert_array_equal(per_seed["levels"][:, :, 0], per_seed["wen"])
    np.testing.assert_array_equal(per_seed["wen"], text_conditional_noise_norm(demo_pipe, captions, settings, progress=False))

    scheduler, unet = demo_pipe.scheduler, demo_pipe.unet
    scheduler.set_timesteps(settings.steps)
    x = torch.randn(latent_shape(demo_pipe, None, None), generator=torch.Generator().manual_seed(settings.base_seed + 1))
    x = scheduler.scale_model_input(x[None] * scheduler.init_noise_sigma, scheduler.timesteps[0])
    with torch.no_grad():
        text, _ = demo_pipe.encode_prompt([captions[2]], "cpu", 1, False)
        empty, _ = demo_pipe.encode_prompt([""], "cpu", 1, False)
        for j, index in ((1, 6), (2, 12)):  # round(0.25 * 24), round(0.5 * 24)
            eps = unet(torch.cat([x, x]), scheduler.timesteps[index], encoder_hidden_states=torch.cat([empty, text])).sample
            assert per_seed["levels"][2, 1, j] == pytest.approx(float((eps[1] - eps[0]).norm()), rel=1e-4)

    prompts = [Prompt(f"p{i}", c) for i, c in enumerate(captions)]
    raw = score_prompts(demo_pipe, prompts, settings, progress=False)
    assert raw.score.isna().all(), "the score compares prompts: set when ranking, not per shard"
    table = rank_scores(raw, settings).set_index("prompt_id")
    norms = per_seed["levels"].mean(axis=1)
    expected = np.max(np.stack([robust_z(norms[:, j]) for j in range(3)], axis=1), axis=1)
    np.testing.assert_allclose(table.loc[[p.prompt_id for p in prompts], "score"], expected, rtol=1e-6)
    assert table.kept.sum() == 2


def test_strongest_outlier_and_level_positions():
    """An outlier at any one level ranks first; levels map to schedule positions by rounding."""
    from pipeline.prescreen import robust_z
    from pipeline.prescreen.scores import level_indexes, strongest_outlier

    bulk = np.linspace(1.0, 2.0, 9)
    first = np.append(bulk, 1.5)  # the last prompt is ordinary at the first level ...
    quarter = np.append(bulk, 9.0)  # ... and an outlier at the second
    score = strongest_outlier(np.stack([first, quarter], axis=1), robust_z)
    assert int(np.argmax(score)) == 9 and score[9] == pytest.approx(robust_z(quarter)[9])
    assert level_indexes(25, [0.0, 0.25, 1.0]) == [0, 6, 24]
    assert level_indexes(50, [0.25]) == [12]
    with pytest.raises(ValueError, match="prescreen.levels"):
        level_indexes(25, [1.5])


def test_prescreen_levels_config_errors_name_the_key():
    from omegaconf import OmegaConf

    from pipeline.cli import ConfigError
    from pipeline.prescreen.settings import prescreen_settings

    assert prescreen_settings(OmegaConf.create({"prescreen": {"levels": [0, 0.25]}})).levels == (0.0, 0.25)
    for bad in ([2.0], ["a"], [], "0.25", [True]):
        with pytest.raises(ConfigError, match="prescreen.levels"):
            prescreen_settings(OmegaConf.create({"prescreen": {"levels": bad}}))


def singleton_bulk_table(n_singletons: int, n_duplicated: int, score: str = "wen"):
    """A raw score table (:func:`pipeline.prescreen.scoring.score_table`) of ``n_singletons``
    singleton prompts (``dup_count`` 1, scores a fixed spread around 10) followed by
    ``n_duplicated`` prompts of 40 copies scoring far above them."""
    from pipeline.prescreen.scoring import score_table

    bulk = 10 + np.linspace(-1.0, 1.0, n_singletons)
    high = np.linspace(14.0, 30.0, n_duplicated)
    values = np.concatenate([bulk, high])
    prompts = [Prompt(f"s{i}", f"single {i}", 1) for i in range(n_singletons)]
    prompts += [Prompt(f"d{i}", f"copied {i}", 40) for i in range(n_duplicated)]
    if score == "wen_levels":
        return score_table(prompts, {"score_wen": values}, levels=values[:, None])
    return score_table(prompts, {"score": values, "score_wen": values})


@pytest.mark.parametrize("score", ["wen", "wen_levels"])
def test_robust_z_is_taken_against_the_singletons_whatever_the_share_of_duplicated_prompts(score):
    """With at least ``reference_singletons`` singleton prompts, every robust z is standardised
    against their median and MAD: a prompt's z, and so the kept set among the singletons, does
    not change when more duplicated prompts join the list."""
    from pipeline.prescreen import rank_scores, robust_z

    settings = PrescreenSettings(score=score, keep_fraction=None, min_robust_z=0.9)
    few = rank_scores(singleton_bulk_table(40, 2, score), settings).set_index("prompt_id")
    many = rank_scores(singleton_bulk_table(40, 40, score), settings).set_index("prompt_id")
    singles = [f"s{i}" for i in range(40)]
    np.testing.assert_allclose(many.loc[singles, "robust_z"], few.loc[singles, "robust_z"], rtol=0, atol=1e-12)
    bulk = 10 + np.linspace(-1.0, 1.0, 40)
    np.testing.assert_allclose(few.loc[singles, "robust_z"], robust_z(bulk), rtol=0, atol=1e-12)
    assert set(few.index[few.kept]) & set(singles) == set(many.index[many.kept]) & set(singles) != set()
    # Standardised over every prompt instead, the duplicated prompts move the singletons' z.
    every = rank_scores(singleton_bulk_table(40, 40, score), replace(settings, reference_singletons=None))
    assert not np.allclose(every.set_index("prompt_id").loc[singles, "robust_z"], few.loc[singles, "robust_z"])


def test_too_few_singletons_standardise_against_every_prompt():
    """Fewer singleton prompts than ``reference_singletons``: the robust z is over every prompt."""
    from pipeline.prescreen import rank_scores, robust_z

    table = singleton_bulk_table(10, 5)
    ranked = rank_scores(table, PrescreenSettings(keep_fraction=None, min_robust_z=3.5, reference_singletons=11))
    by_id = ranked.set_index("prompt_id").loc[table.prompt_id]
    np.testing.assert_allclose(by_id.robust_z, robust_z(table.score.to_numpy()), rtol=0, atol=1e-12)
    at_ten = rank_scores(table, PrescreenSettings(keep_fraction=None, min_robust_z=3.5, reference_singletons=10))
    reference = table.dup_count.to_numpy() == 1
    np.testing.assert_allclose(
        at_ten.set_index("prompt_id").loc[table.prompt_id].robust_z, robust_z(table.score.to_numpy(), reference), atol=1e-12
    )


def test_robust_z_reference_rows_set_the_scale():
    from pipeline.prescreen import robust_z
    from pipeline.prescreen.keep import reference_rows, singleton_rows

    scores = np.array([1.0, 2.0, 3.0, 50.0, 60.0])
    reference = np.array([True, True, True, False, False])
    # median 2, MAD 1 over the reference rows; every row on that scale.
    np.testing.assert_allclose(robust_z(scores, reference), (scores - 2.0) / 1.4826)
    np.testing.assert_allclose(robust_z(scores, np.zeros(5, dtype=bool)), robust_z(scores))
    with pytest.raises(ValueError, match="reference"):
        robust_z(scores, reference[:3])
    counts = pd.array([1, 1, None, 3, 1], dtype="Int64")
    assert singleton_rows(counts).tolist() == [True, True, False, False, True]
    assert reference_rows(counts, 3).tolist() == [True, True, False, False, True]
    assert reference_rows(counts, 4) is None and reference_rows(counts, None) is None


def test_singletons_have_their_own_cut():
    """``singleton_min_robust_z`` applies to the singleton prompts (``dup_count`` 1) alone; the
    others keep ``min_robust_z``; unset, every prompt has ``min_robust_z``."""
    z = np.array([2.6, 3.0, 3.6, 2.6, 3.0, 2.0])
    dup_count = pd.array([1, 1, 1, 3, 40, None], dtype="Int64")
    settings = PrescreenSettings(score="wen_levels", keep_fraction=None, min_robust_z=2.5, singleton_min_robust_z=3.5)
    assert choose_kept(z, settings, dup_count).tolist() == [False, False, True, True, True, False]
    assert choose_kept(z, replace(settings, singleton_min_robust_z=None), dup_count).tolist() == [True] * 5 + [False]
    assert choose_kept(z, settings).tolist() == [True] * 5 + [False]  # no dup_count: no prompt is a singleton
