"""benchmarks/generate_bench.py: SD v1.4's exact architecture, and tiny runs of every family on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("generate_bench")


def test_sd14_architecture_has_the_published_sizes_and_flops(bench):
    """Parameter counts of SD v1.4's UNet, VAE and CLIP ViT-L/14 text encoder, and 803 GFLOP/UNet call."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel(**bench.SD14["unet"])
        vae = AutoencoderKL(**bench.SD14["vae"])
        text = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **bench.SD14["text"])
        )
        latents, step, context = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, step, context)
    assert counter.get_total_flops() / 1e9 == pytest.approx(803.3, rel=1e-3)


@pytest.mark.slow
def test_tiny_benchmark_runs_and_reports(bench, capsys):
    results = bench.main(
        [
            "--tiny",
            "--quiet",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--n-images",
            "8",
            "--n-prompts",
            "4",
            "--baseline-images",
            "2",
            "--batch-size",
            "4",
            "--peak-tflops",
            "0.01",
        ]
    )
    out = capsys.readouterr().out
    assert "plain diffusers loop" in out and "memaudit generator" in out and "speed-up" in out
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == pytest.approx(results)
    assert results["generator_images"] == 8 and results["plain_images"] == 2
    assert results["plain_images_per_s"] > 0 and results["generator_images_per_s"] > 0
    assert results["speedup"] == pytest.approx(results["generator_images_per_s"] / results["plain_images_per_s"])
    assert results["unet_gflop_per_eval"] > 0
    assert results["unet_tflop_per_image"] == pytest.approx(results["unet_gflop_per_eval"] * 2 * 2 / 1e3)
    assert results["unet_peak_fraction"] == pytest.approx(results["unet_tflops_achieved"] / 0.01)
    assert (results["family"], results["pipeline_class"]) == ("sd", "StableDiffusionPipeline")

    # The denoiser's FLOP per image, counted inside a one-step pipeline run under guidance
    # (batch 2), equal the UNet's own count at batch 1 with the full 77-token context.
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.families.random_pipelines import TINY_DENOISERS, TINY_SIZE

    unet = UNet2DConditionModel(**TINY_DENOISERS["sd"])
    side = TINY_SIZE // 4
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 4, side, side), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim))
    assert results["unet_gflop_per_eval"] == pytest.approx(counter.get_total_flops() / 1e9)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd3", "flux", "flux-schnell", "pixart"])
def test_tiny_benchmark_runs_for_every_family(bench, family, capsys):
    """``--tiny --family <family>``: the family's stock pipeline, both loops, its guidance rule
    (FLUX: one denoiser evaluation per step), at the family's published guidance."""
    results = bench.main(
        [
            "--tiny",
            "--family",
            family,
            "--quiet",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--n-images",
            "2",
            "--n-prompts",
            "2",
            "--baseline-images",
            "1",
            "--batch-size",
            "2",
        ]
    )
    assert "memaudit generator" in capsys.readouterr().out
    from pipeline.families.random_pipelines import DEFAULTS, MODELS, TINY_SIZE

    assert (results["family"], results["pipeline_class"]) == (family, MODELS[family][0])
    assert results["guidance"] == DEFAULTS[family][1] and results["resolution"] == TINY_SIZE
    assert results["generator_images"] == 2 and results["plain_images"] == 1 and results["speedup"] > 0
    evaluations = 1 if family.startswith("flux") else 2
    assert results["unet_gflop_per_eval"] > 0
    assert results["unet_tflop_per_image"] == pytest.approx(results["unet_gflop_per_eval"] * 2 * evaluations / 1e3)


def test_peak_defaults_from_the_device_name(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.default_peak(torch.device("cuda")) == (756.0, "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.default_peak(torch.device("cuda"))[0] == 989.0
    assert bench.default_peak(torch.device("cpu")) == (None, "cpu")
