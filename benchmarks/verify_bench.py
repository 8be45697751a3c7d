"""Benchmark: per-sample verification, batched (``sample_distances``) against the per-pair loop.

    .venv/bin/python benchmarks/verify_bench.py --quick                   # seconds
    .venv/bin/python benchmarks/verify_bench.py --device cpu              # 500 x 200 at 512 x 512
    python benchmarks/verify_bench.py --device cuda --loop-pairs 2000

Verification compares every sample of a flagged prompt with that prompt's candidate training
images: ``--samples`` uint8 samples of ``--size`` x ``--size`` against ``--candidates`` PIL
training images of assorted sizes and aspect ratios (so that the center-crop-and-resize of
:func:`pipeline.detect.verify.fit_to` does real work), all synthetic, seeded and in memory.
A few samples are planted near-copies of a candidate (the candidate fitted to the sample size,
plus Gaussian noise of a few levels up to one near the threshold), so that the matches under
``--threshold`` are not an empty set.

Two ways to get the (samples, candidates) distance matrix run in the same process:

* batched: :func:`pipeline.detect.verify.sample_distances` with ``TiledL2(device=...)``, which
  fits each candidate once and compares it with all samples in batched matrix products;
* the per-pair loop a user would write: for each (sample, candidate) pair, fit the candidate
  to the sample's size and take :func:`pipeline.distance.tiled_l2_pair` (float64 numpy). At
  the default size it would run for tens of minutes, so it is timed on ``--loop-pairs`` random
  pairs (plus every planted pair) and its time per pair is extrapolated to all pairs.

On the loop's pairs the two are checked to agree within ``TOLERANCE`` and to find the same
matches under ``--threshold``. The table gives pairs, seconds, pairs/s and peak memory; the
speed-up is batched over the loop (also over the loop with each candidate fitted only once).
The last line, ``RESULT {...}``, is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image

from pipeline.detect.verify import fit_batch, fit_to, sample_distances
from pipeline.distance import tiled_l2_pair
from pipeline.metrics import TiledL2
from pipeline.models import resolve_device

# The batched result may differ from the loop's by at most this. Both methods see the very
# same fitted pixels (one fit_to); only the arithmetic differs. The batched float32 products
# round ||a||^2 + ||b||^2 - 2a.b relative to the (centred) tile norms, so the error in the
# distance d grows as 1/d and is largest just above pipeline.distance.REFINE_BELOW = 0.02
# (closer pairs are redone in float64). At 512 px (49,152 values a tile) unrelated pairs
# (d 0.3-0.7) agree to about 1e-7 as pipeline.distance says (median 7e-8, max 4e-7), but a
# near-copy at d = 0.047 was off by 6.6e-7, i.e. about 1.5e-6 at d = 0.02. Hence 2e-6, not
# 1e-6: the worst float32 pair with a margin, yet 5 orders below the threshold (0.15).
TOLERANCE = 2e-6
# Candidate shapes as (height, width) multiples of the sample side: square, landscape,
# portrait, smaller (upscaled by the fit) and larger than the sample, 16:9.
SHAPES = [(1.0, 1.0), (1.0, 1.5), (1.5, 1.0), (0.75, 1.0), (1.0, 4 / 3), (1.25, 1.25), (0.6, 0.6), (1.0, 16 / 9)]
# Noise (standard deviation in uint8 levels) of the planted near-copies: an exact copy, clear
# matches, one just under and one just over the 0.15 threshold (noise/255 is about the
# distance), and one clearly over.
PLANTED_NOISE = [0.0, 4.0, 12.0, 36.0, 40.0, 60.0]
QUICK = dict(samples=12, candidates=10, size=64, loop_pairs=2000)
DEFAULTS = dict(samples=500, candidates=200, size=512, loop_pairs=2000)


def smooth_image(rng: np.random.Generator, height: int, width: int, grain: float = 12.0) -> np.ndarray:
    """A random photo-like image: uint8 (height, width, 3) in [0, 255], a bicubic upscale of
    a 6 x 6 colour grid plus per-pixel noise of standard deviation ``grain`` levels."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = base + rng.normal(0.0, grain, (height, width, 3)).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def build_workload(n_samples: int, n_candidates: int, size: int, seed: int):
    """``(samples, candidates, planted)``.

    samples: uint8 (n_samples, size, size, 3). candidates: n_candidates RGB PIL images, sizes
    from :data:`SHAPES`. planted: (sample, candidate, noise) of the near-copies, sample =
    fit_to(candidate) + Gaussian noise, at most ``len(PLANTED_NOISE)`` of them.
    """
    rng = np.random.default_rng(seed)
    candidates = []
    for _ in range(n_candidates):
        fh, fw = SHAPES[rng.integers(len(SHAPES))]
        candidates.append(Image.fromarray(smooth_image(rng, max(1, round(fh * size)), max(1, round(fw * size)))))
    samples = np.empty((n_samples, size, size, 3), dtype=np.uint8)
    for i in range(n_samples):
        samples[i] = smooth_image(rng, size, size)
    n_planted = min(len(PLANTED_NOISE), n_samples, n_candidates)
    planted = []
    for i, k, noise in zip(
        rng.choice(n_samples, n_planted, replace=False), rng.choice(n_candidates, n_planted, replace=False), PLANTED_NOISE
    ):
        fitted = np.asarray(fit_to(candidates[k], (size, size)), dtype=np.float32)
        samples[i] = np.clip(np.rint(fitted + rng.normal(0.0, noise, fitted.shape)), 0, 255).astype(np.uint8)
        planted.append((int(i), int(k), noise))
    return samples, candidates, planted


def per_pair_loop(samples: np.ndarray, candidates: list[Image.Image], pairs: np.ndarray, grid: int):
    """The obvious loop: per (sample, candidate) pair, fit the candidate to the sample's size,
    then :func:`tiled_l2_pair`. Returns ``(distances float64 (len(pairs),), fit seconds,
    distance seconds)``."""
    values = np.empty(len(pairs), dtype=np.float64)
    fit_seconds = distance_seconds = 0.0
    for n, (i, k) in enumerate(pairs):
        start = time.perf_counter()
        fitted = np.asarray(fit_to(candidates[k], samples[i].shape[:2]))
        middle = time.perf_counter()
        values[n] = tiled_l2_pair(samples[i], fitted, grid=grid)
        fit_seconds += middle - start
        distance_seconds += time.perf_counter() - middle
    return values, fit_seconds, distance_seconds


def loop_pairs(n_samples: int, n_candidates: int, count: int, planted: list, rng: np.random.Generator) -> np.ndarray:
    """int (P, 2) (sample, candidate) pairs for the loop: every planted pair, plus random
    distinct pairs up to ``count`` in all (every pair when there are no more than that)."""
    total = n_samples * n_candidates
    chosen = {i * n_candidates + k for i, k, _ in planted}
    if count >= total:
        flat = np.arange(total)
    else:
        extra = rng.choice(total, min(total, count + len(chosen)), replace=False)
        flat = np.array(sorted(chosen) + [f for f in extra if f not in chosen][: max(0, count - len(chosen))])
    rng.shuffle(flat)
    return np.stack([flat // n_candidates, flat % n_candidates], axis=1)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help=f"samples of the prompt (default {DEFAULTS['samples']})")
    parser.add_argument(
        "--candidates", type=int, default=None, help=f"candidate training images (default {DEFAULTS['candidates']})"
    )
    parser.add_argument("--size", type=int, default=None, help=f"sample side in pixels (default {DEFAULTS['size']})")
    parser.add_argument("--loop-pairs", type=int, default=None, help="random pairs timed for the per-pair loop (default 2000)")
    parser.add_argument("--device", default="auto", help="the batched metric's device: auto, cpu, cuda")
    parser.add_argument("--grid", type=int, default=4, help="tiles per side")
    parser.add_argument("--threshold", type=float, default=0.15, help="a pair at most this far apart is a match")
    parser.add_argument("--chunk", type=int, default=256, help="candidates per batched call of sample_distances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="12 samples, 10 candidates, 64 px, every pair in the loop: seconds")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size % args.grid:
        parser.error(f"--size {args.size} must be a multiple of --grid {args.grid} (else the two methods tile differently)")
    device = resolve_device(args.device)
    metric = TiledL2(grid=args.grid, device=str(device))
    total = args.samples * args.candidates

    start = time.perf_counter()
    samples, candidates, planted = build_workload(args.samples, args.candidates, args.size, args.seed)
    shapes = sorted({im.size for im in candidates}, key=lambda wh: wh[0] * wh[1])
    print(f"command  : {' '.join(sys.argv[:1] + (argv if argv is not None else sys.argv[1:]))}")
    print(
        f"machine  : {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; batched on {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; torch {torch.__version__}"
    )
    print(
        f"workload : {args.samples} samples {args.size}x{args.size} uint8 x {args.candidates} candidates "
        f"({len(shapes)} sizes, WxH {shapes[0][0]}x{shapes[0][1]} .. {shapes[-1][0]}x{shapes[-1][1]}) = {total:,} pairs; "
        f"{len(planted)} planted near-copies; built in {time.perf_counter() - start:.1f} s"
    )

    # Warm-up (torch threads, CUDA context) outside the timings.
    sample_distances(samples[:2], candidates[:2], metric)

    size = samples.shape[1:3]
    start = time.perf_counter()
    fit_batch(candidates, size)
    fit_seconds = time.perf_counter() - start

    rss_before = peak_rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    batched = sample_distances(samples, candidates, metric, chunk=args.chunk)
    batched_seconds = time.perf_counter() - start
    rss_peak = peak_rss_gb()
    gpu_peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None

    rng = np.random.default_rng(args.seed + 1)
    pairs = loop_pairs(args.samples, args.candidates, args.loop_pairs, planted, rng)
    start = time.perf_counter()
    loop_values, loop_fit, loop_distance = per_pair_loop(samples, candidates, pairs, args.grid)
    loop_seconds = time.perf_counter() - start
    per_pair = loop_seconds / len(pairs)
    loop_total = per_pair * total
    # The same loop with each candidate fitted once up front (fit time measured above).
    hoisted_total = fit_seconds + loop_distance / len(pairs) * total

    on_pairs = batched[pairs[:, 0], pairs[:, 1]]
    worst = int(np.abs(on_pairs - loop_values).argmax())
    max_diff = float(abs(on_pairs[worst] - loop_values[worst]))
    batched_matches = {(int(i), int(k)) for (i, k), d in zip(pairs, on_pairs) if d <= args.threshold}
    loop_matches = {(int(i), int(k)) for (i, k), d in zip(pairs, loop_values) if d <= args.threshold}
    identical = batched_matches == loop_matches
    margin = float(np.abs(loop_values - args.threshold).min())
    all_matches = int((batched <= args.threshold).sum())
    extrapolated = len(pairs) < total
    speedup, speedup_hoisted = loop_total / batched_seconds, hoisted_total / batched_seconds

    memory = f"RSS peak {rss_peak:.2f} GB (was {rss_before:.2f} GB)" + (
        f"; GPU {gpu_peak:.2f} GB" if gpu_peak is not None else ""
    )
    note = " (extrapolated)" if extrapolated else ""
    rows = [
        ("batched sample_distances", total, batched_seconds, memory),
        (
            f"  of which fitting {args.candidates} candidates",
            args.candidates,
            fit_seconds,
            f"{100 * fit_seconds / batched_seconds:.0f}% of batched (fit_batch timed alone, images/s)",
        ),
        (
            "per-pair loop, timed pairs",
            len(pairs),
            loop_seconds,
            f"fit {1e3 * loop_fit / len(pairs):.2f} + tiled_l2_pair {1e3 * loop_distance / len(pairs):.2f} ms/pair",
        ),
        (f"per-pair loop, all pairs{note}", total, loop_total, ""),
        (f"loop, candidates fitted once{note}", total, hoisted_total, "fit once + tiled_l2_pair per pair"),
    ]
    print(f"{'method':<44} {'pairs':>9} {'seconds':>10} {'pairs/s':>11}  notes")
    for name, count, seconds, notes in rows:
        print(f"{name:<44} {count:>9,} {seconds:>10.2f} {count / seconds:>11,.1f}  {notes}")
    how = f"the loop timed on {len(pairs):,} of {total:,} pairs and extrapolated per pair" if extrapolated else "every pair timed"
    print(
        f"speed-up : {speedup:.1f}x, batched over the per-pair loop ({how}); "
        f"{speedup_hoisted:.1f}x over the loop with candidates fitted once"
    )
    print(
        f"agreement: max |batched - loop| = {max_diff:.1e} on the loop's {len(pairs):,} pairs, at distance "
        f"{loop_values[worst]:.4f} (tolerance {TOLERANCE:.0e}: "
        f"{'OK' if max_diff <= TOLERANCE else 'EXCEEDED'})"
    )
    print(
        f"matches  : under {args.threshold} on the loop's pairs: batched {len(batched_matches)}, loop {len(loop_matches)}, "
        f"identical: {'yes' if identical else 'NO'} (closest loop distance to the threshold: {margin:.1e} away); "
        f"batched on all pairs: {all_matches}"
    )
    planted_text = ", ".join(f"noise {noise:g}: {batched[i, k]:.4f}" for i, k, noise in planted)
    print(f"planted  : batched distance of each planted near-copy to its candidate: {planted_text}")

    result = {
        "samples": args.samples,
        "candidates": args.candidates,
        "size": args.size,
        "pairs": total,
        "device": str(device),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batched_seconds": batched_seconds,
        "batched_pairs_per_s": total / batched_seconds,
        "fit_seconds": fit_seconds,
        "fit_share": fit_seconds / batched_seconds,
        "peak_rss_gb": rss_peak,
        "peak_rss_before_gb": rss_before,
        "gpu_peak_gb": gpu_peak,
        "loop_pairs": len(pairs),
        "loop_seconds": loop_seconds,
        "loop_seconds_per_pair": per_pair,
        "loop_fit_seconds": loop_fit,
        "loop_distance_seconds": loop_distance,
        "loop_total_seconds": loop_total,
        "loop_extrapolated": extrapolated,
        "hoisted_total_seconds": hoisted_total,
        "speedup": speedup,
        "speedup_hoisted": speedup_hoisted,
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "threshold": args.threshold,
        "matches_batched": sorted(batched_matches),
        "matches_loop": sorted(loop_matches),
        "matches_identical": identical,
        "threshold_margin": margin,
        "matches_all_pairs": all_matches,
        "planted": [[i, k, noise, float(batched[i, k])] for i, k, noise in planted],
    }
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
