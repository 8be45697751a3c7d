"""The demo model: its parts, the shipped weights, and resumable training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from pipeline.demo.dataset import build_demo_dataset
from pipeline.demo.model import DemoModelConfig, build_pipeline, build_tokenizer, pixels_to_latents
from pipeline.demo.train import TrainConfig, train

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo"
TINY = dict(unet_channels=(16, 32), cross_attention_levels=(False, True), norm_num_groups=8, resolution=16, text_width=32)


def test_identity_vae_decodes_latents_back_to_pixels():
    pipe = build_pipeline(DemoModelConfig(**TINY))
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    decoded = pipe.vae.decode(pixels_to_latents(pixels)).sample
    assert torch.allclose(decoded, pixels, atol=1e-5)
    assert pipe.vae_scale_factor == 1


def test_tokenizer_keeps_captions_apart_and_truncates():
    tokenizer = build_tokenizer(n_merges=4000, max_tokens=24)
    a = tokenizer("zubrak melino tesh").input_ids
    b = tokenizer("zubrak melino tash").input_ids
    assert a != b
    assert a[0] == tokenizer.bos_token_id and a[-1] == tokenizer.eos_token_id
    long = tokenizer(" ".join(["word"] * 100), truncation=True, max_length=24).input_ids
    assert len(long) == 24


@pytest.mark.slow
def test_shipped_model_loads_offline_and_samples(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (SHIPPED / "model_index.json").exists(), f"the shipped demo model is missing from {SHIPPED}"
    pipe = DiffusionPipeline.from_pretrained(str(SHIPPED), local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.thresholding  # see build_scheduler
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def sample(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(["a caption"] * len(seeds), generator=generators, num_inference_steps=4, output_type="np").images

    first = sample([1, 2])
    assert first.shape == (2, size, size, 3)
    # Unclipped sampling on the cosine schedule blows up at the first step into 0/255 pixels.
    assert ((first < 0.02) | (first > 0.98)).mean() < 0.2
    assert 0.0 <= first.min() and first.max() <= 1.0
    again = sample([2])
    # A sample depends on its seed only, up to the batch-size rounding the README documents:
    # within one grey level (1/255) of the same seed made inside a batch.
    assert np.abs(again[0] - first[1]).max() <= 1 / 255
    assert np.abs(first[0] - first[1]).mean() > 1e-3


def test_shipped_model_is_small_and_documented():
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    assert size < 30 * 2**20
    info = json.loads((SHIPPED / "training.json").read_text())
    for key in ("command", "commit", "steps", "seed", "train_seconds"):
        assert key in info


@pytest.fixture(scope="module")
def tiny_demo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo_dataset(out, seed=1, image_size=16, bands={"heavy": (2, 6), "single": (6, 1)})
    return out / "images"


def test_learning_rate_warms_up_then_decays_linearly():
    from pipeline.demo.train import learning_rate_factor

    cfg = TrainConfig(warmup_steps=10, decay_start=100, decay_steps=50, decay_to=0.2)
    assert learning_rate_factor(cfg, 0) == pytest.approx(0.1)
    assert learning_rate_factor(cfg, 100) == 1.0
    assert learning_rate_factor(cfg, 125) == pytest.approx(0.6)
    assert learning_rate_factor(cfg, 150) == learning_rate_factor(cfg, 10_000) == pytest.approx(0.2)
    assert learning_rate_factor(TrainConfig(warmup_steps=10), 10_000) == 1.0  # no decay by default


def test_interrupted_training_resumes_to_the_same_weights(tiny_demo_set, tmp_path):
    model = DemoModelConfig(**TINY)
    common = dict(
        data_path=str(tiny_demo_set),
        batch_size=4,
        checkpoint_every=2,
        log_every=1,
        warm_start=False,
        model=model,
        warmup_steps=1,
        decay_start=1,
        decay_steps=2,
        decay_to=0.1,
    )
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), steps=4, **common))
    train(TrainConfig(out_dir=str(tmp_path / "resumed"), steps=2, **common))  # "interrupted" after step 2
    (tmp_path / "resumed" / "memorization.csv").write_text("kept\n")  # an evaluation's output beside the model
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), steps=4, **common))
    assert (resumed / "memorization.csv").read_text() == "kept\n"  # the export keeps what it does not write
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    info = json.loads((resumed / "training.json").read_text())
    assert info["steps"] == 4
    assert info["learning_rate_now"] == pytest.approx(1e-4)  # decayed to a tenth by step 3, resumed with it
    assert "decay_start=1" in info["command"]
    assert DiffusionPipeline.from_pretrained(str(resumed), local_files_only=True).unet.config.sample_size == 16


@pytest.mark.slow
def test_shipped_model_reproduces_heavy_duplicates_more_than_singletons(demo_set):
    """The relation the paper reports: the more copies in training, the closer the samples."""
    import pandas as pd
    from PIL import Image

    from pipeline.demo.evaluate import sample_images
    from pipeline.distance import tiled_l2

    pipe = DiffusionPipeline.from_pretrained(str(SHIPPED), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    truth = pd.read_parquet(demo_set / "ground_truth.parquet").drop_duplicates("original_id")
    picked = pd.concat([truth[truth.band == "heavy"], truth[truth.band == "single"].head(6)])
    captions = [c for c in picked.original_caption for _ in range(2)]
    originals = [o for o in picked.original_id for _ in range(2)]
    samples = sample_images(pipe, captions, list(range(len(captions))), steps=25, guidance_scale=5.0, batch_size=32)
    size = samples.shape[1]
    targets = np.stack(
        [
            np.asarray(Image.open(demo_set / "originals" / f"{o}.png").resize((size, size), Image.Resampling.BOX))
            for o in originals
        ]
    )
    distance = tiled_l2(samples, targets).diagonal()
    heavy = np.array([o in set(truth[truth.band == "heavy"].original_id) for o in originals])
    assert np.median(distance[heavy]) + 0.1 < np.median(distance[~heavy])


@pytest.mark.slow
def test_evaluation_measures_each_sample_against_its_originals_training_copies(demo_set):
    import pandas as pd

    from pipeline.demo.evaluate import EvalConfig, evaluate, summarize

    rows = evaluate(
        EvalConfig(model_dir=str(SHIPPED), data_dir=str(demo_set), originals_per_band=1, seeds=2, steps=4, guidance_scale=5.0)
    )
    truth = pd.read_parquet(demo_set / "ground_truth.parquet")
    assert len(rows) == 2 * truth.band.nunique()
    copies = truth.groupby("original_id").key.apply(set)
    # The nearest training image is one of the caption's original's own copies.
    assert all(key in copies[oid] for oid, key in zip(rows.original_id, rows.nearest_key))
    assert rows.distance.between(0, 1).all() and rows.distance_original.between(0, 1).all()
    assert (rows.reproduced == (rows.distance < 0.15)).all()
    table = summarize(rows)
    assert list(table.dup_count) == sorted(table.dup_count, reverse=True)
    assert {"reproduced", "median_distance", "reproduced_original", "median_distance_original"} <= set(table.columns)
