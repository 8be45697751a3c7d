"""Benchmark: tiled L2 for all pairs of a prompt's samples, against a per-pair numpy loop.

    nice -n 10 .venv/bin/python benchmarks/detect_bench.py              # 500 images at 512 x 512
    .venv/bin/python benchmarks/detect_bench.py --n 40 --size 64        # a quick check

The detector needs the distance of every pair of a prompt's samples (500 in the paper: 124,750
pairs). The obvious implementation loops over pairs in numpy; :func:`pipeline.distance.tiled_l2`
does them all with batched matrix products. Both run here on the same random images: the loop
on ``--loop-pairs`` random pairs (its time per pair, extrapolated to all pairs; images converted
to float once beforehand, in its favour), ``tiled_l2`` on all pairs, on the CPU and, when there
is one, the GPU. The two are also checked to agree on the sampled pairs.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipeline.distance import tiled_l2


def per_pair_numpy(a: np.ndarray, b: np.ndarray, grid: int) -> float:
    """The obvious per-pair computation: float (H, W, 3) images in [0, 1]."""
    h, w, c = a.shape
    diff = a - b
    per_tile = (diff * diff).reshape(grid, h // grid, grid, w // grid, c).mean(axis=(1, 3, 4))
    return float(np.sqrt(per_tile.max()))


def time_loop(images: np.ndarray, pairs: np.ndarray, grid: int) -> tuple[float, np.ndarray]:
    floats = images.astype(np.float32) / 255.0
    start = time.perf_counter()
    values = np.array([per_pair_numpy(floats[i], floats[j], grid) for i, j in pairs])
    return (time.perf_counter() - start) / len(pairs), values


def time_tiled(images: np.ndarray, grid: int, device: str, repeats: int) -> tuple[float, np.ndarray]:
    tiled_l2(images[:4], grid=grid, device=device)  # warm-up (threads, CUDA context)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        distances = tiled_l2(images, grid=grid, device=device)
        best = min(best, time.perf_counter() - start)
    return best, distances


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="images (all n(n-1)/2 pairs are compared)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--grid", type=int, default=4, help="tiles per side")
    parser.add_argument("--loop-pairs", type=int, default=200, help="pairs timed for the per-pair loop")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of tiled_l2 (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when there is one")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(args.n, args.size, args.size, 3), dtype=np.uint8)
    all_pairs = args.n * (args.n - 1) // 2
    upper = np.argwhere(np.triu(np.ones((args.n, args.n), dtype=bool), k=1))
    pairs = upper[rng.choice(len(upper), size=min(args.loop_pairs, len(upper)), replace=False)]

    print(
        f"{args.n} images of {args.size}x{args.size}, {args.grid}x{args.grid} tiles: {all_pairs:,} pairs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs"
    )
    per_pair, loop_values = time_loop(images, pairs, args.grid)
    loop_total = per_pair * all_pairs
    print(
        f"per-pair numpy loop : {per_pair * 1e3:8.3f} ms/pair on {len(pairs)} pairs -> {loop_total:9.2f} s for all pairs (extrapolated)"
    )

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    for device in devices:
        seconds, distances = time_tiled(images, args.grid, device, args.repeats)
        error = np.abs(distances[pairs[:, 0], pairs[:, 1]] - loop_values).max()
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(
            f"tiled_l2 [{name}]: {seconds:9.3f} s for all pairs -> {loop_total / seconds:8.1f}x faster than the loop "
            f"(max difference on the sampled pairs {error:.1e})"
        )


if __name__ == "__main__":
    main()
