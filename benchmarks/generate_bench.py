"""Benchmark: the generator against a plain diffusers loop, on a model family's full architecture.

    .venv/bin/python benchmarks/generate_bench.py --tiny                 # seconds on a CPU
    .venv/bin/python benchmarks/generate_bench.py --tiny --family flux   # sd, sd2, sdxl, sd3, flux, flux-schnell, pixart
    python benchmarks/generate_bench.py --device cuda --steps 50 --n-images 256 --batch-size 32
    python benchmarks/generate_bench.py --device cuda --family sdxl --n-images 64 --batch-size 8
    python benchmarks/generate_bench.py --device cuda --dtype bfloat16 --compile --peak-tflops 756

``--family`` (default ``sd``) picks the model: its stock diffusers pipeline with the exact
architecture of the published model (:mod:`pipeline.families.random_pipelines`: SD v1.4's UNet
320/640/1280/1280 with cross-attention 768, AutoencoderKL, CLIP ViT-L/14 text encoder, CLIP's
BPE tokenizer and PNDM for ``sd``; SD 2.1, SDXL base, SD3.5 Medium, FLUX.1-dev/schnell and
PixArt-Sigma likewise) and random weights, so nothing is downloaded and the speed is that of
the real model. ``--tiny`` scales the same structure down to run in seconds on a CPU. Steps,
guidance and size default to the family's published ones (``conf/model/*.yaml``). Two
generators run on it in the same process:

* the plain diffusers loop, at diffusers' defaults: the pipeline as ``from_pretrained`` gives it
  (float32 unless ``--baseline-dtype``), one prompt per call, ``num_images_per_prompt=1``,
  PIL output saved to PNG in the loop (making the generator's images: the same size, without
  PixArt's resolution binning, and the same T5 length for FLUX);
* ``pipeline.generate.generate``: ``--dtype`` (auto: float16 on CUDA), SDPA attention, fused
  QKV, channels-last, TF32, text embeddings once per prompt, batches of ``--batch-size`` mixing
  prompts, uint8 conversion on the device, PNGs written by a thread pool.

It prints images/s of both and their ratio, and the share of the GPU's peak FLOP/s that the
denoiser (the UNet, or the transformer of SD3, FLUX and PixArt) reaches: its FLOP per
evaluation of one image are counted with ``torch.utils.flop_counter`` on its first call in a
one-step pipeline run at the benchmark's size with the family's full text context (SD v1.4 at
512x512, 77 tokens: 803 GFLOP), times 2 evaluations per step under classifier-free guidance
(FLUX: 1), times the steps. The result keys keep the name ``unet_*`` for every family.
``--peak-tflops`` defaults from the device name (dense 16-bit tensor-core peaks: H100 SXM 989,
H100 PCIe 756, H200 989, A100 312). The last line, ``RESULT {...}``, is the same as JSON.
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

from pipeline.families import random_pipelines as family_models

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

# SD v1.4's architecture (family "sd" at full size), as modules' keyword arguments.
SD14 = dict(
    resolution=512,
    unet=family_models.DENOISERS["sd"],
    vae=family_models.VAES["sd"],
    text={k: v for k, v in family_models.CLIP_L.items() if k != "hidden_act"},
    bpe_merges=family_models.CLIP_MERGES,
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_options(pipe) -> dict:
    """What the plain loop passes besides the prompt so that it makes the generator's images:
    the family's fixed call options (PixArt without resolution binning, FLUX's T5 length), less
    the negative prompt slot, which only applies with precomputed embeddings."""
    from pipeline.families import family_of

    return {k: v for k, v in family_of(pipe).call_options(pipe).items() if k != "negative_prompt"}


def denoiser_flops_per_eval(pipe, height: int, width: int, guidance: float) -> int:
    """FLOP of one denoiser evaluation for one image at ``height`` x ``width`` with the
    family's full text context (77 tokens for SD): counted on the first denoiser call of a
    one-step pipeline run (FlopCounterMode around its forward), divided by that call's batch
    (2 images' worth under classifier-free guidance)."""
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    forward, counts = denoiser.forward, []

    def counted(*args, **kwargs):
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        with FlopCounterMode(display=False) as counter:
            out = forward(*args, **kwargs)
        counts.append(counter.get_total_flops() // sample.shape[0])
        return out

    denoiser.forward = counted  # an instance attribute: nn.Module.__call__ runs it
    try:
        with torch.no_grad():
            pipe(
                PROMPTS[0],
                num_inference_steps=1,
                guidance_scale=guidance,
                height=height,
                width=width,
                output_type="latent",
                **plain_options(pipe),
            )
    finally:
        del denoiser.forward
    return int(counts[0])


def time_plain_loop(
    pipe, prompts: list[str], n_images: int, steps: int, guidance: float, size: int, out_dir: Path, device
) -> float:
    """Seconds per image of the obvious diffusers loop (one call per image, PIL, PNG in the loop)."""
    options = plain_options(pipe)

    def one(i: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(i)
        image = pipe(
            prompts[i % len(prompts)],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generator,
            **options,
        ).images[0]
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
    options = dict(
        model=f"random-{args.family}-architecture",
        settings=settings,
        runtime=runtime,
        batch_size=args.batch_size,
        png_workers=args.png_workers,
        progress=not args.quiet,
    )
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
    parser.add_argument(
        "--family",
        default="sd",
        choices=family_models.FAMILIES,
        help="the model family's architecture: " + ", ".join(f"{k} ({v[1]})" for k, v in family_models.MODELS.items()),
    )
    parser.add_argument("--tiny", action="store_true", help="the family's structure scaled down to run in seconds on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype", default="auto", help="the generator's dtype: auto (float16 on CUDA), float32, float16, bfloat16"
    )
    parser.add_argument(
        "--baseline-dtype", default="float32", help="the plain loop's dtype: float32 (diffusers' default) or 'same'"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the family's, e.g. 50 for sd; 4 with --tiny)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's, e.g. 7.5 for sd)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"image side (default: the family's, e.g. 512 for sd; {family_models.TINY_SIZE} with --tiny)",
    )
    parser.add_argument("--n-images", type=int, default=None, help="images made by the generator (default 256; 16 with --tiny)")
    parser.add_argument(
        "--baseline-images", type=int, default=None, help="images made by the plain loop (default 16; 4 with --tiny)"
    )
    parser.add_argument("--n-prompts", type=int, default=len(PROMPTS), help=f"distinct prompts (at most {len(PROMPTS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="the generator's batch (default 32; 8 with --tiny)")
    parser.add_argument("--png-workers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (the warm-up then takes minutes)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense 16-bit peak (default: from its name)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--out", default=None, help="where PNGs go (default: a temporary folder, deleted)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from pipeline.families import family_of
    from pipeline.models import Runtime, dtype_name, optimize_pipeline, resolve_device, resolve_dtype

    steps, guidance, size = family_models.DEFAULTS[args.family]
    args.steps = args.steps or (4 if args.tiny else steps)
    args.guidance = guidance if args.guidance is None else args.guidance
    args.resolution = args.resolution or (family_models.TINY_SIZE if args.tiny else size)
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

    def build(build_dtype: torch.dtype):
        return family_models.build_pipeline(args.family, tiny=args.tiny, device=device, dtype=build_dtype)

    import diffusers

    pipe = build(base_dtype if not args.skip_baseline else dtype)
    evals = args.steps * family_of(pipe).evaluations_per_step(pipe, args.guidance)
    print(f"command   : {' '.join(sys.argv)}")
    print(
        f"device    : {device_name} ({device}); torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} CPU threads"
    )
    print(
        f"model     : {type(pipe).__name__}, {'tiny ' + args.family + '-structured' if args.tiny else family_models.MODELS[args.family][1] + ' architecture'}, "
        f"random weights; {args.resolution}x{args.resolution}, {args.steps} steps, guidance {args.guidance} -> {evals} denoiser evaluations/image"
    )

    results: dict = dict(
        device=device_name,
        family=args.family,
        pipeline_class=type(pipe).__name__,
        tiny=args.tiny,
        steps=args.steps,
        resolution=args.resolution,
        guidance=args.guidance,
        dtype=dtype_name(dtype),
        batch_size=args.batch_size,
    )
    flops = denoiser_flops_per_eval(pipe, args.resolution, args.resolution, args.guidance)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if not args.skip_baseline:
            (out / "plain").mkdir(parents=True, exist_ok=True)
            s_plain = time_plain_loop(
                pipe, prompts, args.baseline_images, args.steps, args.guidance, args.resolution, out / "plain", device
            )
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.update(plain_images_per_s=1 / s_plain, plain_dtype=dtype_name(base_dtype), plain_images=args.baseline_images)
            print(
                f"plain diffusers loop   : {1 / s_plain:9.3f} images/s  ({s_plain:7.3f} s/image, {dtype_name(base_dtype)}, "
                f"1 prompt/call, {args.baseline_images} images)"
            )
            pipe = build(dtype)
        optimize_pipeline(pipe, Runtime(device=device.type, dtype=dtype_name(dtype), compile=args.compile))
        s_ours, n_made = time_generator(pipe, prompts, n_samples, args, dtype_name(dtype), out, device)
        results.update(generator_images_per_s=1 / s_ours, generator_images=n_made)
        print(
            f"memaudit generator     : {1 / s_ours:9.3f} images/s  ({s_ours:7.3f} s/image, {dtype_name(dtype)}, "
            f"batch {args.batch_size}, {len(prompts)} prompts mixed, {n_made} images)"
        )
        if not args.skip_baseline:
            results["speedup"] = s_plain / s_ours
            print(f"speed-up               : {s_plain / s_ours:9.2f}x")

    per_image = flops * evals
    achieved = per_image / s_ours
    results.update(unet_gflop_per_eval=flops / 1e9, unet_tflop_per_image=per_image / 1e12, unet_tflops_achieved=achieved / 1e12)
    print(
        f"denoiser FLOP          : {flops / 1e9:.1f} GFLOP/evaluation (one image, {args.resolution}x{args.resolution}) "
        f"x {evals} = {per_image / 1e12:.2f} TFLOP/image"
    )
    if peak:
        results.update(peak_tflops=peak, unet_peak_fraction=achieved / (peak * 1e12))
        note = "" if dtype in (torch.float16, torch.bfloat16) else " (the peak is 16-bit; float32 runs far below it)"
        print(
            f"denoiser throughput    : {achieved / 1e12:.1f} TFLOP/s = {100 * achieved / (peak * 1e12):.1f}% of the "
            f"{peak:.0f} TFLOP/s peak{note}"
        )
    else:
        print(f"denoiser throughput    : {achieved / 1e12:.3f} TFLOP/s (no peak known for this device: pass --peak-tflops)")
    print("RESULT " + json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
