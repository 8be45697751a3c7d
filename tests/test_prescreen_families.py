"""The prescreen for every model family (SD 1.x/2.x, SDXL, SD3, FLUX dev/schnell, PixArt-Sigma) on
tiny random-weight pipelines saved to disk: the stage by path with each family's real config,
the first step exactly as the stock pipeline takes it, FLUX's guidance, and both scores."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from .conftest import compose_config
from .families import CONFIGS, FAMILIES, TINY_SIZE, TinyModels

CAPTIONS = ["a red barn in a snowy field", "portrait of an astronaut cat"]


def family_overrides(family: str, tiny: TinyModels, prompts, run_dir) -> list[str]:
    """``model=<family's config> model.path=<dir> model.steps=2 model.height=64 model.width=64 prompts=<file>``."""
    return [
        f"model={CONFIGS[family]}",
        f"model.path={tiny.path(family)}",
        "model.steps=2",
        f"model.height={TINY_SIZE}",
        f"model.width={TINY_SIZE}",
        f"prompts={prompts}",
        f"run_dir={run_dir}",
        "device=cpu",
        "progress=false",
        "prescreen.seeds=2",
    ]


def write_captions(path, captions: list[str]):
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return path


def load(path):
    from pipeline.models import Runtime, load_model

    return load_model(str(path), Runtime())


def denoiser_module(pipe) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


# --- the stage by path, per family -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prescreens_by_path(family, tiny, tmp_path):
    """``python -m pipeline.prescreen model=<cfg> model.path=<dir> model.steps=2 model.height=64
    model.width=64 prompts=<2 captions>``: a finite score for each prompt; with
    ``prescreen.score=anisotropy`` both scores, finite, and twice the denoiser evaluations."""
    from pipeline.prescreen import stage

    prompts = write_captions(tmp_path / "prompts.txt", CAPTIONS)
    table = stage.run(compose_config("prescreen", family_overrides(family, tiny, prompts, tmp_path / "wen"))).table
    assert len(table) == 2 and np.isfinite(table.score).all() and (table.score > 0).all()
    assert table.score.tolist() == table.score_wen.tolist() and table.score_anisotropy.isna().all()
    summary = json.loads((tmp_path / "wen" / "prescreen" / "summary.json").read_text())
    assert summary["unet_evaluations"] == (2 + 1) * 2 and summary["score"] == "wen"

    overrides = family_overrides(family, tiny, prompts, tmp_path / "anisotropy") + ["prescreen.score=anisotropy"]
    both = stage.run(compose_config("prescreen", overrides)).table
    both = both.set_index("prompt_id").loc[table.prompt_id]
    assert np.isfinite(both[["score", "score_wen", "score_anisotropy", "alignment"]].to_numpy()).all()
    assert both.score.tolist() == both.score_anisotropy.tolist()
    assert both.alignment.between(-1, 1).all()
    np.testing.assert_allclose(both.score_wen, table.set_index("prompt_id").score_wen, rtol=1e-5)  # the same first-step passes
    summary = json.loads((tmp_path / "anisotropy" / "prescreen" / "summary.json").read_text())
    assert summary["unet_evaluations"] == 2 * (2 + 1) * 2


# --- the first step, as the stock pipeline takes it ----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_predictions_are_the_pipelines(family, tiny):
    """The adapter's conditional and unconditional predictions at the first timestep are the
    ones the stock pipeline's own first denoiser call makes from the same seed: classifier-free
    guidance families batch (unconditional, conditional); FLUX, which has none, is run on the
    caption and on "" at the same guidance scale."""
    from pipeline.families import denoiser_for, family_of

    pipe = load(tiny.path(family))
    seed, guidance = 7, (3.5 if family == "flux" else 4.5)
    outputs = []

    def first_output(module, args, out):
        if not outputs:
            outputs.append(out[0] if isinstance(out, tuple) else out.sample)

    # The generator's fixed call options, less PixArt's negative_prompt=None (it passes negative
    # embeddings instead; here the pipeline encodes its default "" itself).
    options = {name: value for name, value in family_of(pipe).call_options(pipe).items() if name != "negative_prompt"}

    def pipeline_first_step(caption: str) -> torch.Tensor:
        outputs.clear()
        hook = denoiser_module(pipe).register_forward_hook(first_output)
        try:
            pipe(
                caption,
                num_inference_steps=2,
                guidance_scale=guidance,
                height=TINY_SIZE,
                width=TINY_SIZE,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                **options,
            )
        finally:
            hook.remove()
        return outputs[0].float()

    denoiser = denoiser_for(pipe, TINY_SIZE, TINY_SIZE, steps=2, guidance_scale=guidance)
    x = denoiser.initial_noise([seed])
    with torch.no_grad():
        cond = denoiser.predict(x, denoiser.timesteps[0], denoiser.condition(CAPTIONS[0]))
        uncond = denoiser.predict(x, denoiser.timesteps[0], denoiser.unconditional())
    if family.startswith("flux"):
        expected_cond, expected_uncond = pipeline_first_step(CAPTIONS[0]), pipeline_first_step("")
        expected_cond, expected_uncond = (
            pipe._unpack_latents(e, TINY_SIZE, TINY_SIZE, pipe.vae_scale_factor) for e in (expected_cond, expected_uncond)
        )
    else:
        expected_uncond, expected_cond = pipeline_first_step(CAPTIONS[0]).chunk(2)
        if family == "pixart":  # learned variance: the sampler uses the noise half
            expected_uncond, expected_cond = expected_uncond[:, :4], expected_cond[:, :4]
    assert cond.shape == expected_cond.shape and cond.dtype == torch.float32
    torch.testing.assert_close(cond, expected_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uncond, expected_uncond, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, uncond), "the caption changes the prediction"


# --- FLUX's guidance embedding ----------------------------------------------------------------------


def test_flux_dev_scores_at_the_configs_guidance_and_schnell_has_none(tiny, tmp_path, monkeypatch):
    """FLUX-dev's transformer gets ``model.guidance_scale`` as its guidance input (another scale,
    another score); schnell gets none, and its score does not depend on the scale."""
    from pipeline.prescreen import stage, step

    prompts = write_captions(tmp_path / "prompts.txt", CAPTIONS)
    original = step.load_prescreen_model
    seen: list = []  # the transformer's guidance argument, call by call

    def load_watched(cfg):
        pipe = original(cfg)
        pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("guidance")), with_kwargs=True
        )
        return pipe

    monkeypatch.setattr(step, "load_prescreen_model", load_watched)

    def scores(family: str, guidance: float) -> np.ndarray:
        seen.clear()
        overrides = family_overrides(family, tiny, prompts, tmp_path / f"{family}_{guidance}") + [
            f"model.guidance_scale={guidance}"
        ]
        cfg = compose_config("prescreen", overrides)
        return stage.run(cfg).table.set_index("prompt_id").loc[["00000", "00001"], "score"].to_numpy()

    dev = scores("flux", 3.5)
    assert seen and all(g is not None and torch.all(g == 3.5) for g in seen), "dev: the config's guidance scale is embedded"
    assert not np.allclose(dev, scores("flux", 1.0)), "dev: the guidance scale is an input of the transformer"
    schnell = scores("flux-schnell", 0.0)
    assert seen and all(g is None for g in seen), "schnell: no guidance input"
    np.testing.assert_array_equal(schnell, scores("flux-schnell", 3.5))


# --- the caption, and nothing else, moves the score -------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_score_depends_on_the_text_only_through_the_caption(family, tiny):
    """Two different captions score differently; the same caption twice scores the same, up to
    rounding: its two copies sit at different places of one batch, and batched kernels may sum
    in a position-dependent order (a few float32 ulps, hence rel=1e-5)."""
    from pipeline.prescreen import PrescreenSettings, prescreen
    from pipeline.prompts import Prompt

    pipe = load(tiny.path(family))
    settings = PrescreenSettings(seeds=2, steps=2, height=TINY_SIZE, width=TINY_SIZE, keep_top=1, score="anisotropy")
    prompts = [Prompt("a", CAPTIONS[0]), Prompt("b", CAPTIONS[1]), Prompt("c", CAPTIONS[0])]
    table = prescreen(pipe, prompts, settings, progress=False).set_index("prompt_id")
    for column in ("score_wen", "alignment", "score_anisotropy"):
        assert table.loc["a", column] == pytest.approx(table.loc["c", column], rel=1e-5), (
            f"{column}: identical captions, identical scores"
        )
        assert table.loc["a", column] != pytest.approx(table.loc["b", column], rel=1e-4), f"{column}: the caption matters"


# --- the anisotropy score -----------------------------------------------------------------------------


def test_anisotropy_formula_on_known_tensors():
    """norm + weight x mean over positions of cos(uncond, cond - uncond) over channels, against a
    direct computation in float64 Python arithmetic; the functions run in float32, whose rounding
    (about 1e-7 relative per operation, over a few dozen operations) the 1e-5 tolerance covers."""
    from pipeline.prescreen.scores import anisotropy_score, conditional_difference_norm, guidance_alignment

    # One image, 2 channels, 1x2 positions: (B, C, H, W) = (1, 2, 1, 2).
    uncond = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    cond = torch.tensor([[[[2.0, -1.0]], [[1.0, 2.0]]]])
    # Guidance vectors per position (over channels): p0: (1, 1) against uncond (1, 0); p1: (-1, 0) against (0, 2).
    cos_p0 = (1 * 1 + 0 * 1) / (math.hypot(1, 0) * math.hypot(1, 1))  # 1/sqrt(2): aligned at 45 degrees
    cos_p1 = (0 * -1 + 2 * 0) / (math.hypot(0, 2) * math.hypot(-1, 0))  # 0: orthogonal
    norm = math.sqrt(1 + 1 + 1 + 0)  # || cond - uncond || over all four elements
    alignment = guidance_alignment(cond, uncond)
    assert alignment.shape == (1,) and alignment.item() == pytest.approx((cos_p0 + cos_p1) / 2, rel=1e-5)
    assert conditional_difference_norm(cond, uncond).item() == pytest.approx(norm, rel=1e-5)
    assert anisotropy_score(norm, alignment.item(), 2.0) == pytest.approx(norm + 2 * (cos_p0 + cos_p1) / 2, rel=1e-5)
    # A guidance vector along the unconditional prediction everywhere: alignment 1; against it: -1.
    assert guidance_alignment(3 * uncond + torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]]), uncond).item() == pytest.approx(
        1.0, rel=1e-6
    )
    assert guidance_alignment(0.5 * uncond, uncond).item() == pytest.approx(-1.0, rel=1e-6)


def test_anisotropy_score_ranks_and_keeps_by_its_column(tiny, tmp_path):
    """``prescreen.score=anisotropy``: ``score`` is ``score_anisotropy`` (= score_wen + weight x
    alignment), the table is sorted and the keep rule applied by it, and the summary holds both
    scores' ROC AUCs where dup_count is known."""
    from pipeline.prescreen import stage

    captions = CAPTIONS + ["a lighthouse on a cliff at sunset", "a bowl of fruit on a wooden table", "an old map of the world"]
    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt_id": [f"p{i}" for i in range(5)], "caption": captions, "dup_count": [150, 1, 150, 1, 1]}).to_parquet(
        prompts
    )
    overrides = family_overrides("sd3", tiny, prompts, tmp_path / "run") + [
        "prescreen.score=anisotropy",
        "prescreen.anisotropy_weight=5",
        "prescreen.keep_fraction=null",
        "prescreen.keep_top=2",
    ]
    table = stage.run(compose_config("prescreen", overrides)).table
    assert table.score.tolist() == table.score_anisotropy.tolist() and table.score.is_monotonic_decreasing
    np.testing.assert_allclose(table.score_anisotropy, table.score_wen + 5 * table.alignment, rtol=1e-6)
    assert set(table[table.kept].prompt_id) == set(table.nlargest(2, "score_anisotropy").prompt_id)
    selected = pd.read_parquet(tmp_path / "run" / "prescreen" / "selected.parquet")
    assert selected.score.tolist() == table[table.kept].score_anisotropy.tolist()
    summary = json.loads((tmp_path / "run" / "prescreen" / "summary.json").read_text())
    assert summary["score"] == "anisotropy"
    assert {"roc_auc_wen_heavy_vs_singletons", "roc_auc_anisotropy_heavy_vs_singletons", "roc_auc_heavy_vs_singletons"} <= set(
        summary
    )
    assert summary["roc_auc_heavy_vs_singletons"] == summary["roc_auc_anisotropy_heavy_vs_singletons"]


# --- what the prescreen refuses -------------------------------------------------------------------


def test_a_pipeline_of_no_family_is_one_line_naming_model_path():
    from pipeline.families import denoiser_for

    pipe = type("DiTPipeline", (), {"name_or_path": "/weights/dit"})()
    with pytest.raises(ValueError, match=r"^model\.path=/weights/dit: the prescreen cannot score a DiTPipeline") as err:
        denoiser_for(pipe, 64, 64, steps=2)
    assert "\n" not in str(err.value)
    lcm = type(
        "StableDiffusionPipeline",
        (),
        {"name_or_path": "/weights/lcm", "unet": SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=256))},
    )()
    with pytest.raises(ValueError, match=r"^model\.path=/weights/lcm: .*guidance embedding"):
        denoiser_for(lcm, 64, 64, steps=2)


def test_an_unknown_score_is_a_config_error_naming_the_key(tmp_path):
    from pipeline.cli import ConfigError
    from pipeline.prescreen.settings import prescreen_settings

    with pytest.raises(
        ConfigError, match=r"^prescreen\.score: must be one of wen, anisotropy, wen_levels, own_images; got 'norm'"
    ):
        prescreen_settings(compose_config("prescreen", ["prescreen.score=norm"]))
    assert prescreen_settings(compose_config("prescreen", [])).score == "wen"
