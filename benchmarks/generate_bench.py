"""Benchmark: the generator against a plain diffusers loop, on Stable Diffusion v1.x's architecture.

    .venv/bin/python benchmarks/generate_bench.py --tiny                 # seconds on a CPU
    python benchmarks/generate_bench.py --device cuda --steps 50 --n-images 256 --batch-size 32
    python benchmarks/generate_bench.py --device cuda --dtype bfloat16 --compile --peak-tflops 756

The model has SD v1.4's exact architecture (UNet 320/640/1280/1280 with cross-attention 768,
AutoencoderKL, CLIP ViT-L/14 text encoder, CLIP's BPE tokenizer, PNDM) and random weights,
so nothing is downloaded and the speed is that of the real model. Two generators run on it in
the same process:

* the plain diffusers loop, at diffusers' defaults: the pipeline as ``from_pretrained`` gives it
  (float32 unless ``--baseline-dtype``), one prompt per call, ``num_images_per_prompt=1``,
  PIL output saved to PNG in the loop;
* ``pipeline.generate.generate``: ``--dtype`` (auto: float16 on CUDA), SDPA attention, fused
  QKV, channels-last, TF32, text embeddings once per prompt, batches of ``--batch-size`` mixing
  prompts, uint8 conversion on the device, PNGs written by a thread pool.

It prints images/s of both and their ratio, and the share of the GPU's peak FLOP/s that the
UNet reaches: UNet FLOP per evaluation are counted with ``torch.utils.flop_counter`` on one
forward pass at batch 1 (SD v1.4 at 512x512, 77 tokens: 803 GFLOP), times 2 evaluations per
step with classifier-free guidance, times the steps. ``--peak-tflops`` defaults from the
device name (dense 16-bit tensor-core peaks: H100 SXM 989, H100 PCIe 756, H200 989, A100 312).
The last line, ``RESULT {...}``, is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense 16-bit (bf16/fp16) tensor-core peaks in TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]

SD14 = dict(
    resolution=512,
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    bpe_merges=49152 - 256 - 2,  # CLIP's full vocabulary: 49,408 tokens
)

# The same structure, scaled down to run in seconds on a CPU.
TINY = dict(
    resolution=32,
    unet=dict(
        SD14["unet"],
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=8,
    ),
    vae=dict(
        SD14["vae"],
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ),
    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
    bpe_merges=2000,
)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a bowl of fruit on a wooden table, oil painting",
    "the living room of a modern house, interior design catalogue",
    "portrait of a smiling woman in a red coat",
    "a lighthouse on a cliff at sunset",
    "a golden retriever puppy sitting in the grass",
    "an old map of the world with sea monsters",
    "a bottle of perfume on a marble counter, product photo",
]


def build_sd_pipeline(arch: dict, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``StableDiffusionPipeline`` of architecture ``arch`` with random weights (seeded)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds on a GPU for 1B parameters
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **arch["text"],
            )
        )
    # SD v1.x's scheduler config; PNDM is the pipeline's default sampler (the paper's).
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=tokenizer, unet=unet.to(dtype),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_flops_per_eval(pipe, height: int, width: int) -> int:
    """FLOP of one UNet evaluation at batch 1 with the tokenizer's full context (77 for SD)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    factor = pipe.vae_scale_factor
    param = next(unet.parameters())
    latents = torch.randn(1, unet.config.in_channels, height // factor, width // factor, device=param.device, dtype=param.dtype)
    context = torch.randn(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([500], device=param.device), context)
    return int(counter.get_total_flops())


def time_plain_loop(pipe, prompts: list[str], n_images: int, steps: int, guidance: float, size: int, out_dir: Path, device) -> float:
    """Seconds per image of the obvious diffusers loop (one call per image, PIL, PNG in the loop)."""
    def one(i: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(i)
        image = pipe(prompts[i % len(prompts)], num_inference_steps=steps, guidance_scale=guidance,
                     height=size, width=size, generator=generator).images[0]  # fmt: skip
        image.save(out_dir / f"{i:05d}.png")

    one(0)  # warm-up: kernels, allocator
    synchronize(device)
    start = time.perf_counter()
    for i in range(n_images):
        one(i + 1)
    synchronize(device)
    return (time.perf_counter() - start) / n_images


def time_generator(pipe, prompts: list[str], n_samples: int, args, dtype_name: str, out_dir: Path, device) -> tuple[float, int]:
    """Seconds per image of ``pipeline.generate.generate`` (after a warm-up run of one full batch)."""
    from pipeline.generate import generate
    from pipeline.generate.sampling import SamplingSettings
    from pipeline.models import Runtime
    from pipeline.prompts import Prompt

    runtime = Runtime(device=device.type, dtype=dtype_name, compile=args.compile)
    settings = SamplingSettings(steps=args.steps, guidance_scale=args.guidance, height=args.resolution, width=args.resolution)
    items = [Prompt(f"{i:05d}", p) for i, p in enumerate(prompts)]
    options = dict(model="random-sd-architecture", settings=settings, runtime=runtime, batch_size=args.batch_size,
                   png_workers=args.png_workers, progress=not args.quiet)  # fmt: skip
    generate(pipe, items, out_dir / "warmup", n_samples=math.ceil(args.batch_size / len(items)), base_seed=1, **options)
    synchronize(device)
    start = time.perf_counter()
    summary = generate(pipe, items, out_dir / "timed", n_samples=n_samples, **options)
    synchronize(device)
    return (time.perf_counter() - start) / summary.images, summary.images


def default_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak, name
    return None, name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a scaled-down SD architecture that runs in seconds on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="the generator's dtype: auto (float16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--baseline-dtype", default="float32", help="the plain loop's dtype: float32 (diffusers' default) or 'same'")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 with --tiny)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 512; 32 with --tiny)")
    parser.add_argument("--n-images", type=int, default=None, help="images made by the generator (default 256; 16 with --tiny)")
    parser.add_argument("--baseline-images", type=int, default=None, help="images made by the plain loop (default 16; 4 with --tiny)")
    parser.add_argument("--n-prompts", type=int, default=len(PROMPTS), help=f"distinct prompts (at most {len(PROMPTS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="the generator's batch (default 32; 8 with --tiny)")
    parser.add_argument("--png-workers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (the warm-up then takes minutes)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense 16-bit peak (default: from its name)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--out", default=None, help="where PNGs go (default: a temporary folder, deleted)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from pipeline.demo.model import build_tokenizer
    from pipeline.models import dtype_name, resolve_device, resolve_dtype

    arch = TINY if args.tiny else SD14
    args.steps = args.steps or (4 if args.tiny else 50)
    args.resolution = args.resolution or arch["resolution"]
    args.n_images = args.n_images or (16 if args.tiny else 256)
    args.baseline_images = args.baseline_images or (4 if args.tiny else 16)
    args.batch_size = args.batch_size or (8 if args.tiny else 32)
    prompts = PROMPTS[: max(1, min(args.n_prompts, len(PROMPTS)))]
    n_samples = math.ceil(args.n_images / len(prompts))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    base_dtype = dtype if args.baseline_dtype == "same" else resolve_dtype(args.baseline_dtype, device)
    peak, device_name = default_peak(device)
    peak = args.peak_tflops or peak
    evals = args.steps * (2 if args.guidance > 1 else 1)

    import diffusers

    print(f"command   : {' '.join(sys.argv)}")
    print(f"device    : {device_name} ({device}); torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"python {platform.python_version()}, {torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"model     : {'tiny SD-structured' if args.tiny else 'SD v1.4 architecture'}, random weights; "
          f"{args.resolution}x{args.resolution}, {args.steps} steps, guidance {args.guidance} -> {evals} UNet evaluations/image")  # fmt: skip

    tokenizer = build_tokenizer(arch["bpe_merges"], 77)
    results: dict = dict(device=device_name, tiny=args.tiny, steps=args.steps, resolution=args.resolution,
                         guidance=args.guidance, dtype=dtype_name(dtype), batch_size=args.batch_size)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if not args.skip_baseline:
            pipe = build_sd_pipeline(arch, tokenizer, device, base_dtype)
            flops = unet_flops_per_eval(pipe, args.resolution, args.resolution)
            (out / "plain").mkdir(parents=True, exist_ok=True)
            s_plain = time_plain_loop(pipe, prompts, args.baseline_images, args.steps, args.guidance, args.resolution, out / "plain", device)
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.update(plain_images_per_s=1 / s_plain, plain_dtype=dtype_name(base_dtype), plain_images=args.baseline_images)
            print(f"plain diffusers loop   : {1 / s_plain:9.3f} images/s  ({s_plain:7.3f} s/image, {dtype_name(base_dtype)}, "
                  f"1 prompt/call, {args.baseline_images} images)")  # fmt: skip
        pipe = build_sd_pipeline(arch, tokenizer, device, dtype)
        if args.skip_baseline:
            flops = unet_flops_per_eval(pipe, args.resolution, args.resolution)
        from pipeline.models import Runtime, optimize_pipeline

        optimize_pipeline(pipe, Runtime(device=device.type, dtype=dtype_name(dtype), compile=args.compile))
        s_ours, n_made = time_generator(pipe, prompts, n_samples, args, dtype_name(dtype), out, device)
        results.update(generator_images_per_s=1 / s_ours, generator_images=n_made)
        print(f"memaudit generator     : {1 / s_ours:9.3f} images/s  ({s_ours:7.3f} s/image, {dtype_name(dtype)}, "
              f"batch {args.batch_size}, {len(prompts)} prompts mixed, {n_made} images)")  # fmt: skip
        if not args.skip_baseline:
            results["speedup"] = s_plain / s_ours
            print(f"speed-up               : {s_plain / s_ours:9.2f}x")

    per_image = flops * evals
    achieved = per_image / s_ours
    results.update(unet_gflop_per_eval=flops / 1e9, unet_tflop_per_image=per_image / 1e12, unet_tflops_achieved=achieved / 1e12)
    print(f"UNet FLOP              : {flops / 1e9:.1f} GFLOP/evaluation (batch 1, {args.resolution}x{args.resolution}, 77 tokens) "
          f"x {evals} = {per_image / 1e12:.2f} TFLOP/image")  # fmt: skip
    if peak:
        results.update(peak_tflops=peak, unet_peak_fraction=achieved / (peak * 1e12))
        note = "" if dtype in (torch.float16, torch.bfloat16) else " (the peak is 16-bit; float32 runs far below it)"
        print(f"UNet throughput        : {achieved / 1e12:.1f} TFLOP/s = {100 * achieved / (peak * 1e12):.1f}% of the "
              f"{peak:.0f} TFLOP/s peak{note}")  # fmt: skip
    else:
        print(f"UNet throughput        : {achieved / 1e12:.3f} TFLOP/s (no peak known for this device: pass --peak-tflops)")
    print("RESULT " + json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
