"""Generation for every model family (SD 1.x/2.x, SDXL, SD3, FLUX dev/schnell, PixArt-Sigma) through
its stock diffusers pipeline, on tiny random-weight models saved to disk: the stage by path with
each family's real config, every sample remade alone by regenerate, and the family's guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.families import random_pipelines

from .conftest import REPO, compose_config
from .families import CONFIGS, FAMILIES, TINY_SIZE

CAPTIONS = ["a red barn in a snowy field", "portrait of an astronaut cat"]
# The published settings each conf/model/*.yaml must carry: hub id, steps, guidance, side.
PUBLISHED = {
    "sd14": ("CompVis/stable-diffusion-v1-4", 50, 7.5, 512),
    "sd21": ("stabilityai/stable-diffusion-2-1", 50, 7.5, 768),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 50, 5.0, 1024),
    "sd3": ("stabilityai/stable-diffusion-3.5-medium", 40, 4.5, 1024),
    "flux_dev": ("black-forest-labs/FLUX.1-dev", 50, 3.5, 1024),
    "flux_schnell": ("black-forest-labs/FLUX.1-schnell", 4, 0.0, 1024),
    "pixart_sigma": ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 20, 4.5, 1024),
}
PIPELINE_CLASS = {family: spec[0] for family, spec in random_pipelines.MODELS.items()}


def assert_same_sample(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to batch-size rounding (as tests/test_generate.py): at most one grey level, on
    at most 1% of values; CPU kernels sum in a batch-dependent order."""
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"pixels differ by up to {diff.max()} levels"
    assert (diff > 0).mean() <= 0.01, f"{(diff > 0).mean():.1%} of pixel values differ"


def load(path: Path):
    from pipeline.models import Runtime, load_model

    return load_model(str(path), Runtime())


# --- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_configs_compose_with_the_published_settings(name):
    from pipeline.models import model_options

    model = compose_config("generate", [f"model={name}"]).model
    path, steps, guidance, side = PUBLISHED[name]
    assert (model.path, model.steps, model.guidance_scale, model.height, model.width) == (path, steps, guidance, side, side)
    assert model.allow_download is False, "nothing is downloaded unless asked"
    assert model_options(model)["path"] == path  # every key is one the model group takes
    text = (REPO / "conf" / "model" / f"{name}.yaml").read_text(encoding="utf-8")
    assert "allow_download=true" in text and "HF_HUB_OFFLINE" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_names_its_family_module(family):
    """Each conf/model/*.yaml names the module of the family its pipeline class is served by."""
    import importlib

    from pipeline.families import FAMILIES as REGISTRY

    served_by = REGISTRY[PIPELINE_CLASS[family]]
    text = (REPO / "conf" / "model" / f"{CONFIGS[family]}.yaml").read_text(encoding="utf-8")
    named = [line.split("pipeline/families/")[1].split(".py")[0] for line in text.splitlines() if "pipeline/families/" in line]
    assert named, "the config names no family module"
    module = importlib.import_module(f"pipeline.families.{named[-1]}")
    assert served_by in vars(module).values() and served_by.denoiser.__module__ == module.__name__


def test_sd21_config_states_v_prediction():
    model = compose_config("generate", ["model=sd21"]).model
    assert model.scheduler_kwargs.prediction_type == "v_prediction"


# --- generation by path, per family ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_by_path_and_regenerates_each_sample(family, tiny, tmp_path):
    """``python -m pipeline.generate model=<family's config> model.path=<dir> model.steps=2
    model.height=64 model.width=64``, 2 prompts x 2 samples in one batch of 4 that mixes them:
    4 PNGs of the asked size, a recipe naming the pipeline class and scheduler, and each sample
    remade alone from its row within one grey level."""
    from pipeline.generate import run as run_stage
    from pipeline.generate.regenerate import regenerate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    cfg = compose_config(
        "generate",
        [
            f"model={CONFIGS[family]}",
            f"model.path={tiny.path(family)}",
            "model.steps=2",
            f"model.height={TINY_SIZE}",
            f"model.width={TINY_SIZE}",
            f"prompts={prompts}",
            f"run_dir={tmp_path / 'run'}",
            "n_samples=2",
            "batch_size=4",
            "device=cpu",
            "progress=false",
            "png_workers=1",
        ],
    )
    summary = run_stage(cfg)
    out = tmp_path / "run" / "generations"
    pngs = sorted(out.glob("*/*.png"))
    assert summary.images == 4 and [p.relative_to(out).as_posix() for p in pngs] == [
        "00000/00000.png",
        "00000/00001.png",
        "00001/00000.png",
        "00001/00001.png",
    ]
    images = {p.relative_to(out).as_posix(): np.asarray(Image.open(p).convert("RGB")) for p in pngs}
    assert all(image.shape == (TINY_SIZE, TINY_SIZE, 3) for image in images.values())
    assert not np.array_equal(images["00000/00000.png"], images["00000/00001.png"]), "each sample has its own seed"
    assert not np.array_equal(images["00000/00000.png"], images["00001/00000.png"]), "the caption matters"

    table = pd.read_parquet(out / "prompts.parquet")
    expected_scheduler = random_pipelines.SCHEDULERS[family][0]
    assert set(table["pipeline_class"]) == {PIPELINE_CLASS[family]} and set(table["scheduler"]) == {expected_scheduler}
    row = table.iloc[0]
    assert (row["steps"], row["height"], row["width"], row["model"]) == (2, TINY_SIZE, TINY_SIZE, str(tiny.path(family)))
    assert row["guidance_scale"] == cfg.model.guidance_scale
    # What the budget report counts: FLUX runs one evaluation a step whatever its guidance
    # scale (3.5 for dev); the others two under classifier-free guidance (their configs' > 1).
    assert row["evaluations_per_step"] == (1 if family.startswith("flux") else 2)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["generation_evaluations"] == 4 * 2 * row["evaluations_per_step"]
    if family == "sd2":
        assert json.loads(row["scheduler_config"])["prediction_type"] == "v_prediction"
    for row in table.itertuples(index=False):
        for index in range(2):
            alone = regenerate(row._asdict(), index)
            assert_same_sample(alone, images[f"{row.prompt_id}/{index:05d}.png"])


# --- what each family's call gets --------------------------------------------------------------


@pytest.mark.slow
def test_embeddings_per_family_and_guidance(tiny):
    """Which tensors one caption becomes, and when negatives exist: classifier-free guidance for
    SD/SDXL/SD3/PixArt above 1, never for FLUX; PixArt's T5 mask marks the caption's tokens."""
    from pipeline.generate.sampling import PromptEncoder

    expected = {
        "sd2": {"prompt_embeds", "negative_prompt_embeds"},
        "sdxl": {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"},
        "sd3": {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"},
        "flux": {"prompt_embeds", "pooled_prompt_embeds"},
        "pixart": {"prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"},
    }
    for family, names in expected.items():
        pipe = load(tiny.path(family))
        encoder = PromptEncoder(pipe, guidance_scale=4.5)
        one = encoder.encode(CAPTIONS[0])
        assert set(one) == names, family
        assert all(t.shape[0] == 1 for t in one.values()), family
        assert encoder.encode(CAPTIONS[0]) is one, "encoded once, then cached"
        batch = encoder.batch_kwargs([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
        assert all(batch[n].shape[0] == 3 for n in names) and torch.equal(batch["prompt_embeds"][2], one["prompt_embeds"][0])
        without = PromptEncoder(pipe, guidance_scale=1.0).encode(CAPTIONS[0])
        assert not any(n.startswith("negative") for n in without), f"{family}: no guidance, no negatives"
    pixart = load(tiny.path("pixart"))
    mask = PromptEncoder(pixart, 4.5).encode(CAPTIONS[0])["prompt_attention_mask"][0]
    assert mask.shape == (300,) and 1 < int(mask.sum()) < 300 and mask[: int(mask.sum())].all()
    assert PromptEncoder(load(tiny.path("flux")), 3.5).encode(CAPTIONS[0])["prompt_embeds"].shape[1] == 512
    assert PromptEncoder(load(tiny.path("flux-schnell")), 0.0).encode(CAPTIONS[0])["prompt_embeds"].shape[1] == 256


@pytest.mark.slow
def test_flux_dev_embeds_the_guidance_scale_and_schnell_has_none(tiny):
    from pipeline.generate.sampling import PromptEncoder, SampleTask, SamplingSettings, sample_batch

    task = [SampleTask("00000", CAPTIONS[0], 0, 1234)]

    def sample(pipe, guidance):
        settings = SamplingSettings(steps=2, guidance_scale=guidance, height=TINY_SIZE, width=TINY_SIZE)
        return sample_batch(pipe, task, settings, PromptEncoder(pipe, guidance))[0]

    dev, schnell = load(tiny.path("flux")), load(tiny.path("flux-schnell"))
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert not np.array_equal(sample(dev, 3.5), sample(dev, 1.0)), "dev: the scale is an input of the transformer"
    assert np.array_equal(sample(schnell, 3.5), sample(schnell, 0.0)), "schnell: no guidance input"


def test_flux_refuses_a_negative_prompt_naming_the_key(tiny):
    from pipeline.generate.sampling import SamplingSettings, check_sampling

    with pytest.raises(ValueError, match="^negative_prompt: FLUX"):
        check_sampling(load(tiny.path("flux")), SamplingSettings(negative_prompt="blurry"))
    check_sampling(load(tiny.path("sd3")), SamplingSettings(negative_prompt="blurry"))


@pytest.mark.slow
def test_pixart_renders_at_the_asked_size_without_resolution_binning(tiny):
    """With binning, 64x96 would be rendered at the nearest size of PixArt's aspect-ratio table
    and then resized: the transformer must see the asked size's latents, 16x24, instead."""
    from pipeline.generate.sampling import PromptEncoder, SampleTask, SamplingSettings, sample_batch

    pipe = load(tiny.path("pixart"))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        settings = SamplingSettings(steps=2, guidance_scale=4.5, height=64, width=96)
        image = sample_batch(pipe, [SampleTask("00000", CAPTIONS[0], 0, 7)], settings, PromptEncoder(pipe, 4.5))[0]
    finally:
        hook.remove()
    assert image.shape == (64, 96, 3) and set(seen) == {(16, 24)}


def test_family_of_follows_the_class_and_its_parents():
    from pipeline.families import FLUX, OTHER, SDXL, family_of

    xl = type("StableDiffusionXLPipeline", (), {})
    custom = type("MyXLPipeline", (xl,), {})
    assert family_of(custom()) is SDXL
    assert family_of(type("FluxPipeline", (), {})()) is FLUX
    assert family_of(object()) is OTHER
