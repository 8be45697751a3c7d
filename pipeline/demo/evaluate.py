"""How much the demo model reproduces its training images, by duplicate count.

For a few originals of each duplication band, sample the model with several seeds on the
original's caption and measure the paper's tiled L2 distance to the original. The relation
the paper reports is that reproduction rises with the number of copies in the training set.

    python -m pipeline.demo.evaluate model_dir=models/demo data_dir=data/demo

Writes ``memorization.csv`` (one row per sample) and ``memorization.png`` (reproduction
rate against duplicate count) into ``out_dir`` (default: the model folder) and prints a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipeline.distance import tiled_l2


@dataclass
class EvalConfig:
    model_dir: str = "models/demo"
    data_dir: str = "data/demo"
    out_dir: str | None = None
    originals_per_band: int = 6
    seeds: int = 4
    steps: int = 25
    guidance_scale: float = 3.0
    threshold: float = 0.15
    batch_size: int = 64
    seed: int = 0


def pick_originals(ground_truth: pd.DataFrame, per_band: int, seed: int) -> pd.DataFrame:
    """Up to ``per_band`` originals of each band: original_id, original_caption, band, dup_count."""
    originals = ground_truth.drop_duplicates("original_id")[["original_id", "original_caption", "band", "dup_count"]]
    per_band_picks = [g.sample(n=min(per_band, len(g)), random_state=seed) for _, g in originals.groupby("band")]
    picked = pd.concat(per_band_picks).sort_values(["dup_count", "original_id"], ascending=[False, True])
    return picked.reset_index(drop=True)


@torch.no_grad()
def sample_images(pipe, captions: list[str], seeds: list[int], steps: int, guidance_scale: float, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) samples, one per (caption, seed); each is fixed by its seed alone."""
    out = []
    for start in range(0, len(captions), batch_size):
        batch_captions = captions[start : start + batch_size]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        images = pipe(
            batch_captions, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np"
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate(cfg: EvalConfig) -> pd.DataFrame:
    """One row per sample: band, dup_count, original_id, seed, distance, reproduced."""
    data_dir = Path(cfg.data_dir)
    ground_truth = pd.read_parquet(data_dir / "ground_truth.parquet")
    pipe = DiffusionPipeline.from_pretrained(cfg.model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    picked = pick_originals(ground_truth, cfg.originals_per_band, cfg.seed)
    rows = picked.loc[picked.index.repeat(cfg.seeds)].reset_index(drop=True)
    rows["seed"] = np.tile(np.arange(cfg.seeds), len(picked)) + cfg.seed * 1000
    samples = sample_images(pipe, rows.original_caption.tolist(), rows.seed.tolist(), cfg.steps, cfg.guidance_scale, cfg.batch_size)
    # The model saw the originals downsampled to its resolution; compare at that resolution.
    originals = {
        oid: np.asarray(Image.open(data_dir / "originals" / f"{oid}.png").convert("RGB").resize((resolution, resolution), Image.Resampling.BOX))
        for oid in picked.original_id
    }
    targets = np.stack([originals[oid] for oid in rows.original_id])
    # The diagonal pairs each sample with its own original (a few hundred rows: cheap).
    rows["distance"] = tiled_l2(samples, targets).diagonal()
    rows["reproduced"] = rows.distance < cfg.threshold
    return rows


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per band: copies, samples, reproduction rate, median distance (heaviest band first)."""
    table = (
        rows.groupby(["band", "dup_count"])
        .agg(samples=("distance", "size"), reproduced=("reproduced", "mean"), median_distance=("distance", "median"))
        .reset_index()
        .sort_values("dup_count", ascending=False)
    )
    return table.round(3)


def plot(table: pd.DataFrame, path: Path, threshold: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(table.dup_count, table.reproduced, "o-")
    axes[0].set(xscale="log", xlabel="copies in training set", ylabel=f"share of samples < {threshold}", ylim=(-0.05, 1.05))
    axes[1].plot(table.dup_count, table.median_distance, "o-")
    axes[1].axhline(threshold, color="grey", linestyle="--", label="threshold")
    axes[1].set(xscale="log", xlabel="copies in training set", ylabel="median tiled L2 to original")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    import json

    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate_demo")
    def _run(cfg: DictConfig) -> None:
        values = OmegaConf.to_container(cfg, resolve=True)
        values.pop("hydra", None)
        config = EvalConfig(**values)
        rows = evaluate(config)
        table = summarize(rows)
        out_dir = Path(config.out_dir or config.model_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows.drop(columns=["original_caption"]).to_csv(out_dir / "memorization.csv", index=False)
        info_path = Path(config.model_dir) / "training.json"
        step = json.loads(info_path.read_text()).get("steps", "?") if info_path.exists() else "?"
        plot(table, out_dir / "memorization.png", config.threshold, f"demo model at step {step}: reproduction vs duplication")
        print(table.to_string(index=False))
        print(f"written {out_dir / 'memorization.csv'} and {out_dir / 'memorization.png'}")

    _run()


if __name__ == "__main__":
    main()
