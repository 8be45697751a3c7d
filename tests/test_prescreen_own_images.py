"""The prescreen's own_images score: each caption against its own training images.

The training objective each family's adapter builds (as its scheduler noises), the score's
arithmetic, the exact evaluation count, the keep rule's combination with the caption-only score,
and the stage: every family by path, the training set required, a changed image rescored."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.cli import ConfigError
from pipeline.prescreen import PrescreenSettings
from pipeline.prescreen.own_images import chosen_keys, image_evaluations, keys_to_fetch, own_image_score
from pipeline.prescreen.ranking import rank_scores
from pipeline.prescreen.scoring import score_table
from pipeline.prompts import Prompt

from .conftest import compose_config
from .families import FAMILIES, TINY_SIZE
from .test_prescreen_families import family_overrides, load

CAPTIONS = ["a red barn in a snowy field", "portrait of an astronaut cat", "a bowl of lemons"]


def write_images(root, keys, size=TINY_SIZE, seed=0):
    """One random RGB image per key, ``<root>/<key>.png`` (the files layout)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for key in keys:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{key}.png")
    return root


def write_prompt_table(path, keys_per_prompt):
    from pipeline.layout import write_prompt_table as write

    frame = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(keys_per_prompt))],
            "caption": CAPTIONS[: len(keys_per_prompt)],
            "dup_count": [len(k) if k else 1 for k in keys_per_prompt],
            "keys": [list(k) if k is not None else None for k in keys_per_prompt],
        }
    )
    return write(frame, path)


# --- the training objective, as each family's scheduler noises -----------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_noised_input_and_target_are_the_schedulers(family, tiny):
    """``Denoiser.noised`` gives the scheduler's own noised input (DDPM ``add_noise``; Euler-type
    ``add_noise`` then ``scale_model_input``'s division by ``sqrt(sigma^2 + 1)``; rectified flow
    ``scale_noise``, packed for FLUX) and the target of its prediction type (noise, or the
    scheduler's ``get_velocity`` for v-prediction; ``noise - x0`` for flow)."""
    from pipeline.families import denoiser_for

    pipe = load(tiny.path(family))
    denoiser = denoiser_for(pipe, TINY_SIZE, TINY_SIZE, steps=4, guidance_scale=None)
    shape = denoiser.latent_shape()
    clean = torch.randn((2, *shape), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(2))
    t = denoiser.timesteps[1]
    x, target = denoiser.noised(clean, noise, t)
    scheduler = pipe.scheduler
    if hasattr(scheduler, "scale_noise"):  # rectified flow (SD3, FLUX)
        expected = scheduler.scale_noise(clean, t[None], noise)
        if family.startswith("flux"):
            expected = pipe._pack_latents(expected, 2, *shape)
        torch.testing.assert_close(x.float(), expected.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target, noise - clean)
    else:
        expected = scheduler.add_noise(clean, noise, t[None])
        if scheduler.init_noise_sigma > 1:  # Euler-type: x0 + sigma noise, scaled by the scheduler's scale_model_input
            sigma = scheduler.sigmas[scheduler.index_for_timestep(t)]
            expected = expected / (sigma**2 + 1) ** 0.5
        torch.testing.assert_close(x.float(), expected.float(), rtol=1e-5, atol=1e-5)
        if scheduler.config.prediction_type == "v_prediction":
            torch.testing.assert_close(target, scheduler.get_velocity(clean, noise, t[None]), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(target, noise)


# --- the score's arithmetic and bookkeeping ------------------------------------------------------


def test_score_is_the_log_ratio_and_nan_without_images():
    errors = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    score = own_image_score(errors)
    np.testing.assert_allclose(score[:3], [np.log(4.0), 0.0, np.log(1 / 3)])
    assert np.isnan(score[3])


def test_keys_chosen_are_the_first_distinct_ones_found():
    assert chosen_keys(["b", "a", "b", "c"], None, 2) == ["b", "a"]
    assert chosen_keys(["b", "a", "c"], {"a": 1, "c": 1}, 2) == ["a", "c"]
    assert chosen_keys(None, None, 2) == [] and chosen_keys(["x"], {}, 2) == []
    assert keys_to_fetch([["a", "b", "c"], None, ["d"]], 2) == {"a", "b", "d"}
    assert image_evaluations([2, 0, 1], levels=3, draws=2) == 2 * 3 * 2 * 3


def test_every_evaluation_is_counted(tiny):
    """The score table's own_images column gives exactly the denoiser evaluations made."""
    from pipeline.families import StableDiffusionDenoiser
    from pipeline.prescreen.scoring import score_prompts, table_evaluations

    pipe = load(tiny.path("sd"))
    keys = {"k0": None, "k1": None, "k2": None}
    images = {k: Image.new("RGB", (TINY_SIZE + 8, TINY_SIZE), (i * 60, 20, 200)) for i, k in enumerate(keys)}
    prompts = [
        Prompt("p0", CAPTIONS[0], 3, ("k0", "k1", "k2")),
        Prompt("p1", CAPTIONS[1], 1, ("k2", "missing")),
        Prompt("p2", CAPTIONS[2], 1, None),
    ]
    settings = PrescreenSettings(
        seeds=2, steps=4, batch_size=3, height=TINY_SIZE, width=TINY_SIZE, score="own_images", text_score="wen",
        images=2, image_levels=(0.0, 0.5), image_draws=2, min_robust_z=2.0,
    )  # fmt: skip
    made = []
    original = StableDiffusionDenoiser.predict

    def counting(self, x, t, conditioning):
        made.append(len(x))
        return original(self, x, t, conditioning)

    StableDiffusionDenoiser.predict = counting
    try:
        table = score_prompts(pipe, prompts, settings, progress=False, images=images)
    finally:
        StableDiffusionDenoiser.predict = original
    assert table.own_images.tolist() == [2, 1, 0]
    assert np.isfinite(table.score_own_images[:2]).all() and np.isnan(table.score_own_images[2])
    # Wen's (3 + 1) x 2, then 2 (caption, empty) x 3 images x 2 levels x 2 draws.
    assert sum(made) == table_evaluations(table, settings) == (3 + 1) * 2 + 2 * 3 * 2 * 2


def test_keep_rule_keeps_what_the_text_score_keeps_and_own_image_outliers():
    """Under own_images a prompt is kept when its text z, its own-image z or the robust z of their
    sum reaches the cut: the text score's kept set is kept whatever the own-image scores; a
    prompt with no image is ranked by its text z."""
    n = 41
    prompts = [Prompt(f"p{i}", f"c{i}", 1, None) for i in range(n)]
    # Two independent orderings of the same spread: no bulk prompt is high on both.
    spread = np.linspace(-1.0, 1.0, n - 4)
    wen = np.concatenate([10 + spread, [30.0, 10.0, 30.0, 10.0]])
    own = np.concatenate([0.1 + 0.1 * spread[::-1], [0.1, 0.5, np.nan, 0.1]])
    mad_wen, mad_own = 1.4826 * np.median(np.abs(spread)), 0.14826 * np.median(np.abs(spread))
    wen[-1] = 10 + 2.4 * mad_wen  # p40: robust z about 2.4 on both, under the cut of 3 on each
    own[-1] = 0.1 + 2.4 * mad_own
    columns = {"score_wen": wen, "score_own_images": own, "own_images": np.where(np.isnan(own), 0, 1)}
    table = score_table(prompts, columns, image_levels=own[:, None])
    text_only = rank_scores(score_table(prompts, {"score": wen, "score_wen": wen}), PrescreenSettings(min_robust_z=3.0))
    both = rank_scores(table, PrescreenSettings(score="own_images", text_score="wen", min_robust_z=3.0))
    assert set(text_only.prompt_id[text_only.kept]) == {"p37", "p39"}
    assert set(both.prompt_id[both.kept]) == {"p37", "p38", "p39", "p40"}
    row = both.set_index("prompt_id").loc["p39"]
    assert np.isnan(row.z_own_images) and np.isnan(row.z_both) and row.score == row.z_text
    row = both.set_index("prompt_id").loc["p40"]
    assert max(row.z_text, row.z_own_images) < 3.0 <= row.z_both == row.score


# --- the stage -----------------------------------------------------------------------------------


def test_own_images_needs_a_training_set(tmp_path):
    from pipeline.prescreen import stage

    prompts = write_prompt_table(tmp_path / "prompts.parquet", [["a"]])
    cfg = compose_config("prescreen", [f"prompts={prompts}", f"run_dir={tmp_path / 'run'}", "prescreen.score=own_images"])
    with pytest.raises(ConfigError, match=r"^prescreen.score: own_images .* set data="):
        stage.run(cfg)
    with pytest.raises(ConfigError, match=r"^prescreen.text_score: must be one of"):
        PrescreenSettings(score="own_images", text_score="own_images")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_scores_its_own_images_by_path(family, tiny, tmp_path):
    """``prescreen.score=own_images data=files data.path=<dir>``: each prompt with images gets a
    finite own-image score, one without ranks by its text z, and the summary counts the
    evaluations of both parts."""
    from pipeline.prescreen import stage

    images = write_images(tmp_path / "train", ["a", "b", "c"])
    prompts = write_prompt_table(tmp_path / "prompts.parquet", [["a", "b"], ["c"], None])
    overrides = family_overrides(family, tiny, prompts, tmp_path / "run") + [
        "prescreen.score=own_images",
        "prescreen.text_score=wen",
        "prescreen.image_levels=[0.5]",
        "prescreen.image_draws=1",
        "prescreen.min_robust_z=2",
        "prescreen.keep_fraction=null",
        "data=files",
        f"data.path={images}",
    ]
    table = stage.run(compose_config("prescreen", overrides)).table.set_index("prompt_id")
    assert table.own_images.to_dict() == {"p0": 2, "p1": 1, "p2": 0}
    assert np.isfinite(table.loc[["p0", "p1"], "score_own_images"]).all() and np.isnan(table.loc["p2", "score_own_images"])
    assert table.loc["p2", "score"] == table.loc["p2", "z_text"]
    summary = json.loads((tmp_path / "run" / "prescreen" / "summary.json").read_text())
    assert summary["unet_evaluations"] == (3 + 1) * 2 + 2 * 3 * 1 * 1


def test_changed_training_image_is_rescored(tiny, tmp_path):
    """The unit's settings hold the training set's identity: replacing an image rescores (a stale
    score is never served); an unchanged rerun does not."""
    from pipeline.prescreen import stage

    images = write_images(tmp_path / "train", ["a", "b"])
    prompts = write_prompt_table(tmp_path / "prompts.parquet", [["a"], ["b"]])
    overrides = family_overrides("sd", tiny, prompts, tmp_path / "run") + [
        "prescreen.score=own_images",
        "prescreen.image_draws=1",
        "data=files",
        f"data.path={images}",
    ]
    first = stage.run(compose_config("prescreen", overrides)).table.set_index("prompt_id")
    raw = tmp_path / "run" / "prescreen" / "scores" / "scores_0.parquet"
    written = raw.stat().st_mtime_ns
    again = stage.run(compose_config("prescreen", overrides)).table.set_index("prompt_id")
    assert raw.stat().st_mtime_ns == written
    pd.testing.assert_series_equal(first.score_own_images, again.score_own_images)
    write_images(tmp_path / "train", ["a"], seed=5)  # a different image under the same key
    os.utime(images / "a.png", ns=(written + 10**9, written + 10**9))
    changed = stage.run(compose_config("prescreen", overrides)).table.set_index("prompt_id")
    assert changed.loc["p0", "score_own_images"] != first.loc["p0", "score_own_images"]
    assert changed.loc["p1", "score_own_images"] == first.loc["p1", "score_own_images"]


def test_own_image_and_sum_z_are_taken_against_the_singletons():
    """Under own_images every z (text, own images, their sum) is standardised against the
    singleton prompts when there are at least ``reference_singletons``: adding duplicated
    prompts that score high on both leaves every singleton's z values, and its keep, unchanged."""

    def table(n_duplicated):
        n = 40
        spread = np.linspace(-1.0, 1.0, n)
        wen = np.concatenate([10 + spread, np.linspace(15, 30, n_duplicated)])
        own = np.concatenate([0.1 + 0.1 * spread[::-1], np.linspace(0.5, 2.0, n_duplicated)])
        prompts = [Prompt(f"s{i}", f"c{i}", 1, (f"k{i}",)) for i in range(n)]
        prompts += [Prompt(f"d{i}", f"d{i}", 40, (f"m{i}",)) for i in range(n_duplicated)]
        columns = {"score_wen": wen, "score_own_images": own, "own_images": np.ones(len(prompts))}
        return score_table(prompts, columns, image_levels=own[:, None])

    settings = PrescreenSettings(score="own_images", text_score="wen", keep_fraction=None, min_robust_z=1.0)
    few = rank_scores(table(2), settings).set_index("prompt_id")
    many = rank_scores(table(40), settings).set_index("prompt_id")
    singles = [f"s{i}" for i in range(40)]
    for column in ("z_text", "z_own_images", "z_both", "kept"):
        np.testing.assert_allclose(many.loc[singles, column].astype(float), few.loc[singles, column].astype(float), atol=1e-12)
    assert many.loc[[f"d{i}" for i in range(40)], "kept"].all()
