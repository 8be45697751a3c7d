"""How much the demo model reproduces its training images, by duplicate count.

For a few originals of each duplication band, sample the model with several seeds on the
original's caption and measure the distance to the training images with the near-copy rule
the detector uses (:mod:`pipeline.rule`: the paper's tiled L2 by default). The relation the
paper reports is that reproduction rises with the number of copies in the training set.

The demo set's copies are near-duplicates as on the web (cropped, shifted, recoloured,
re-encoded, captioned over), so a model that memorized an image reproduces one of its training
copies, not necessarily the pristine original. As in the paper, a sample counts as reproduced
when it is within the rule's threshold of a training image: ``distance`` is to the nearest training
copy of the caption's original; ``distance_original`` to the original itself is kept beside it.

    python -m pipeline.demo.evaluate model_dir=models/demo data_dir=data/demo

Writes ``memorization.csv`` (one row per sample) and ``memorization.png`` (reproduction
rate against duplicate count) into ``out_dir`` (default: the model folder) and prints a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.models import Runtime, load_model
from pipeline.rule import NearCopyRule

# The demo model as saved, on the CPU in float32 with none of the speed options: what this
# evaluation samples (its figures are in docs/demo.md), loaded as every stage loads.
PLAIN_CPU = Runtime(device="cpu", dtype="float32", attention="default", fuse_qkv=False, channels_last=False, tf32=False)


@dataclass
class EvalConfig:
    model_dir: str = "models/demo"
    data_dir: str = "data/demo"
    out_dir: str | None = None
    originals_per_band: int = 6
    seeds: int = 4
    steps: int = 25
    guidance_scale: float = 5.0
    # The near-copy rule (conf/rule.yaml): its metric measures, its threshold decides "reproduced".
    rule: NearCopyRule = field(default_factory=NearCopyRule)
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
    """One row per sample: band, dup_count, original_id, seed, distance (to the nearest training
    copy), nearest_key, distance_original, reproduced (distance < the rule's threshold)."""
    data_dir = Path(cfg.data_dir)
    ground_truth = pd.read_parquet(data_dir / "ground_truth.parquet")
    pipe = load_model({"path": cfg.model_dir}, PLAIN_CPU, path_key="model_dir")
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    picked = pick_originals(ground_truth, cfg.originals_per_band, cfg.seed)
    rows = picked.loc[picked.index.repeat(cfg.seeds)].reset_index(drop=True)
    rows["seed"] = np.tile(np.arange(cfg.seeds), len(picked)) + cfg.seed * 1000
    samples = sample_images(
        pipe, rows.original_caption.tolist(), rows.seed.tolist(), cfg.steps, cfg.guidance_scale, cfg.batch_size
    )
    # The model saw the originals downsampled to its resolution; compare at that resolution.
    originals = {
        oid: np.asarray(
            Image.open(data_dir / "originals" / f"{oid}.png")
            .convert("RGB")
            .resize((resolution, resolution), Image.Resampling.BOX)
        )
        for oid in picked.original_id
    }
    targets = np.stack([originals[oid] for oid in rows.original_id])
    # The diagonal pairs each sample with its own original (a few hundred rows: cheap).
    rows["distance_original"] = cfg.rule.distances(samples, targets).diagonal()
    nearest = []
    for oid, index in rows.groupby("original_id", sort=False).groups.items():
        copies = ground_truth[ground_truth.original_id == oid]
        images = np.stack([training_image(data_dir / "images", key, resolution) for key in copies.key])
        distances = cfg.rule.distances(samples[index], images)  # (samples of this original, its training copies)
        best = distances.argmin(axis=1)
        nearest.append(
            pd.DataFrame(
                {"distance": distances[np.arange(len(index)), best], "nearest_key": copies.key.to_numpy()[best]}, index=index
            )
        )
    rows = rows.join(pd.concat(nearest))
    rows["reproduced"] = rows.distance < cfg.rule.threshold
    return rows


def training_image(images_dir: Path, key: str, resolution: int) -> np.ndarray:
    """A training record's image as the model saw it: resized to ``resolution`` (uint8 (R, R, 3))."""
    matches = [p for p in images_dir.glob(f"{key}.*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}]
    if not matches:
        raise FileNotFoundError(
            f"{images_dir}: no image for training record {key!r} of the ground truth; rebuild with `make demo-data`"
        )
    with Image.open(matches[0]) as image:
        return np.asarray(image.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX))


def summarize(rows: pd.DataFrame, threshold: float = 0.15) -> pd.DataFrame:
    """Per band: copies, samples, reproduction rate and median distance to the nearest training
    copy, and the same two against the original alone (heaviest band first)."""
    table = (
        rows.groupby(["band", "dup_count"])
        .agg(
            samples=("distance", "size"),
            reproduced=("reproduced", "mean"),
            median_distance=("distance", "median"),
            reproduced_original=("distance_original", lambda d: float((d < threshold).mean())),
            median_distance_original=("distance_original", "median"),
        )
        .reset_index()
        .sort_values("dup_count", ascending=False)
    )
    return table.round(3)


def plot(table: pd.DataFrame, path: Path, threshold: float, title: str, metric_label: str = "tiled L2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(table.dup_count, table.reproduced, "o-", label="nearest training copy")
    axes[0].plot(table.dup_count, table.reproduced_original, "s--", label="the original")
    axes[0].legend()
    axes[0].set(xscale="log", xlabel="copies in training set", ylabel=f"share of samples < {threshold}", ylim=(-0.05, 1.05))
    axes[1].plot(table.dup_count, table.median_distance, "o-", label="nearest training copy")
    axes[1].plot(table.dup_count, table.median_distance_original, "s--", label="the original")
    axes[1].axhline(threshold, color="grey", linestyle=":", label="threshold")
    axes[1].set(xscale="log", xlabel="copies in training set", ylabel=f"median {metric_label}")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    import json

    import hydra
    from omegaconf import DictConfig, OmegaConf

    from pipeline.cli import CONF_DIR, stage_main
    from pipeline.rule import rule_from_config

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_demo")
    @stage_main("demo.evaluate")
    def _run(cfg: DictConfig) -> None:
        if not (Path(cfg.data_dir) / "ground_truth.parquet").is_file():
            raise FileNotFoundError(f"data_dir: no ground_truth.parquet in {cfg.data_dir} (build the demo set: make demo-data)")
        if not Path(cfg.model_dir).is_dir():
            raise FileNotFoundError(f"model_dir: {cfg.model_dir} is not a directory (train the demo model: make demo-model)")
        rule = rule_from_config(cfg)
        values = OmegaConf.to_container(cfg, resolve=True)
        for key in ("hydra", "rule", "metric"):
            values.pop(key, None)
        config = EvalConfig(**values, rule=rule)
        rows = evaluate(config)
        table = summarize(rows, rule.threshold)
        out_dir = Path(config.out_dir or config.model_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows.drop(columns=["original_caption"]).to_csv(out_dir / "memorization.csv", index=False)
        info_path = Path(config.model_dir) / "training.json"
        step = json.loads(info_path.read_text()).get("steps", "?") if info_path.exists() else "?"
        plot(
            table,
            out_dir / "memorization.png",
            rule.threshold,
            f"demo model at step {step}: reproduction vs duplication",
            rule.metric.display_label,
        )
        print(table.to_string(index=False))
        print(f"written {out_dir / 'memorization.csv'} and {out_dir / 'memorization.png'}")

    _run()


if __name__ == "__main__":
    main()
