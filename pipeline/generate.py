"""Stage 2: many seeded samples per selected caption.

    python -m pipeline.generate                               # or: make generate ARGS="..."
    python -m pipeline.generate model=sd14 n_samples=500 batch_size=32
    python -m pipeline.generate prompts=my_prompts.txt n_samples=16
    python -m pipeline.generate -m hydra/launcher=local world_size=2      # 2 local processes
    python -m pipeline.generate -m hydra/launcher=slurm world_size=64     # a 64-task SLURM array

Reads ``prompts`` (default ``<run_dir>/dedup/selected.parquet``; or a .txt/.csv/.parquet list,
see :mod:`pipeline.prompts`) and writes, for this shard's prompts (``rank`` of ``world_size``):

* ``<out_dir>/<prompt_id>/<index:05d>.png``: ``n_samples`` images per prompt, uint8 RGB;
* ``<out_dir>/prompts_<rank>-of-<world_size>.parquet``: the recipe of every sample (below),
  written before sampling starts, and ``<out_dir>/prompts.parquet``, the union of all shards'
  files (:func:`consolidate_prompts`, run at the end of every shard; safe to run any time);
* ``<out_dir>/.done/<prompt_id>.json``: written once all of a prompt's images exist.

A rerun skips prompts with a marker and, for the others, makes only the missing images, which
are the same images since each one comes from its own seed. Every PNG is written atomically.

Recipe columns of ``prompts.parquet``, enough for :func:`regenerate` to remake any sample:
``prompt_id``, ``prompt_index`` (position in the prompt list), ``caption``, ``dup_count``,
``n_samples``, ``seeds`` (list, one per sample: :func:`pipeline.sampling.sample_seed` of
``base_seed``, prompt id and index, see ``seed_rule``), ``model`` (``model.path`` as given),
``pipeline_class``, ``scheduler`` (class name), ``scheduler_config`` (JSON), ``steps``,
``guidance_scale``, ``height``, ``width``, ``negative_prompt``, ``dtype``, ``generator_device``
and ``runtime`` (JSON: device and speed options, see :class:`pipeline.models.Runtime`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.io import atomic_write, is_done, mark_done, marker_path, write_json, write_parquet
from pipeline.models import ModelLoadError, Runtime, build_scheduler, dtype_name, load_pipeline, optimize_pipeline, resolve_device, resolve_dtype
from pipeline.prompts import Prompt, PromptsError, read_prompts, shard_prompts
from pipeline.sampling import (
    SEED_RULE,
    PromptEncoder,
    SampleTask,
    SamplingSettings,
    iter_batches,
    resolve_size,
    sample_batch,
    sample_seed,
)

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.parquet"
SETTINGS_FILE = "settings.json"
# Recipe fields that change what a sample looks like: a run directory holds one value of each.
PIXEL_KEYS = (
    "model", "pipeline_class", "scheduler", "scheduler_config", "steps", "guidance_scale", "height", "width",
    "negative_prompt", "dtype", "generator_device", "base_seed", "seed_rule",
)  # fmt: skip


def sample_path(out_dir: str | Path, prompt_id: str, index: int) -> Path:
    return Path(out_dir) / prompt_id / f"{index:05d}.png"


def shard_file(out_dir: str | Path, rank: int, world_size: int) -> Path:
    return Path(out_dir) / f"prompts_{rank}-of-{world_size}.parquet"


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def recipe(pipe, model: str, settings: SamplingSettings, runtime: Runtime, base_seed: int) -> dict[str, Any]:
    """The per-run part of a prompt row: everything but the prompt and its seeds."""
    height, width = resolve_size(pipe, settings.height, settings.width)
    return {
        "model": str(model),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": _json({k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}),
        "steps": int(settings.steps),
        "guidance_scale": float(settings.guidance_scale),
        "height": height,
        "width": width,
        "negative_prompt": settings.negative_prompt,
        "dtype": runtime.dtype,
        "generator_device": settings.generator_device,
        "base_seed": int(base_seed),
        "seed_rule": SEED_RULE,
        "runtime": _json(runtime.as_dict()),
    }


def check_settings(out_dir: Path, run_recipe: dict[str, Any]) -> None:
    """Refuse to add samples made differently to an existing generations folder.

    Samples of one run directory must be comparable (and a resumed prompt must get the same
    images), so the first run records its pixel-deciding settings and later runs must match.
    """
    wanted = {k: run_recipe[k] for k in PIXEL_KEYS}
    path = out_dir / SETTINGS_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        diffs = [k for k in PIXEL_KEYS if recorded.get(k) != wanted[k]]
        if diffs:
            detail = "; ".join(f"{k}: {recorded.get(k)!r} then, {wanted[k]!r} now" for k in diffs)
            raise ValueError(
                f"run_dir: {out_dir} holds samples made with other settings ({detail}). "
                "Use another run_name, or delete that folder to start over."
            )
    else:
        write_json(wanted, path)


def write_png(path: Path, image: np.ndarray, compress_level: int) -> Path:
    """Write one uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", compress_level=compress_level))


def missing_samples(out_dir: Path, prompt_id: str, n_samples: int) -> list[int]:
    """Indexes of the samples of ``prompt_id`` with no PNG yet; clears temporaries of a killed run."""
    folder = out_dir / prompt_id
    if not folder.is_dir():
        return list(range(n_samples))
    for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write; only this rank owns the folder
        stale.unlink(missing_ok=True)
    return [i for i in range(n_samples) if not sample_path(out_dir, prompt_id, i).exists()]


def prompt_done(out_dir: Path, prompt_id: str, n_samples: int) -> bool:
    if not is_done(out_dir, prompt_id):
        return False
    info = json.loads(marker_path(out_dir, prompt_id).read_text(encoding="utf-8") or "{}")
    return int(info.get("n_samples", 0)) >= n_samples


@dataclass
class GenerationSummary:
    prompts: int  # this shard's prompts
    prompts_skipped: int  # already complete before this run
    images: int  # images made by this run
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def generate(
    pipe,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    *,
    model: str,
    settings: SamplingSettings,
    runtime: Runtime,
    n_samples: int,
    base_seed: int = 0,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    png_workers: int = 4,
    png_compress_level: int = 6,
    progress: bool = True,
    on_batch: Callable[[list[SampleTask]], None] | None = None,
) -> GenerationSummary:
    """Make the missing samples of this shard's ``prompts`` into ``out_dir``; see the module doc.

    ``prompts`` is the full list (every rank passes the same); this call takes shard ``rank``.
    ``on_batch(tasks)`` is called after each batch is handed to the PNG writers (for tests and
    monitoring; an exception there stops the run as a crash would, leaving it resumable).
    """
    if int(n_samples) < 1:
        raise ValueError(f"n_samples: must be at least 1, got {n_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_of = {p.prompt_id: i for i, p in enumerate(prompts)}
    mine = shard_prompts(list(prompts), rank, world_size)
    run_recipe = recipe(pipe, model, settings, runtime, base_seed)
    check_settings(out_dir, run_recipe)
    rows = [
        {
            "prompt_id": p.prompt_id,
            "prompt_index": index_of[p.prompt_id],
            "caption": p.caption,
            "dup_count": p.dup_count,
            "n_samples": int(n_samples),
            "seeds": [sample_seed(base_seed, p.prompt_id, i) for i in range(n_samples)],
            **run_recipe,
        }
        for p in mine
    ]
    write_parquet(pd.DataFrame(rows, columns=list(rows[0]) if rows else None), shard_file(out_dir, rank, world_size))

    tasks: list[SampleTask] = []
    remaining: dict[str, int] = {}
    skipped = 0
    for p, row in zip(mine, rows):
        if prompt_done(out_dir, p.prompt_id, n_samples):
            skipped += 1
            continue
        todo = missing_samples(out_dir, p.prompt_id, n_samples)
        if not todo:  # all images were written but the run stopped before the marker
            mark_done(out_dir, p.prompt_id, {"n_samples": int(n_samples)})
            continue
        remaining[p.prompt_id] = len(todo)
        tasks += [SampleTask(p.prompt_id, p.caption, i, row["seeds"][i]) for i in todo]
    log.info(
        "generate: shard %d/%d: %d prompts, %d already complete, %d images to make",
        rank, world_size, len(mine), skipped, len(tasks),
    )  # fmt: skip

    start = time.perf_counter()
    made = 0
    pending: list[tuple[str, Future]] = []

    def settle(wait_all: bool) -> None:
        """Check finished writes (raising any write error) and mark prompts whose images all exist."""
        nonlocal pending
        still = []
        for prompt_id, future in pending:
            if wait_all or future.done():
                future.result()
                remaining[prompt_id] -= 1
                if remaining[prompt_id] == 0:
                    mark_done(out_dir, prompt_id, {"n_samples": int(n_samples), "rank": rank})
            else:
                still.append((prompt_id, future))
        pending = still

    bar = tqdm(total=len(tasks), unit="img", desc=f"generate {rank}/{world_size}", disable=not progress, dynamic_ncols=True)
    # PNG encoding runs in threads (zlib releases the GIL), so the accelerator never waits on it.
    with ThreadPoolExecutor(max_workers=max(1, int(png_workers)), thread_name_prefix="png") as writers:
        try:
            for batch, images in iter_batches(pipe, tasks, settings, batch_size):
                for task, image in zip(batch, images):
                    path = sample_path(out_dir, task.prompt_id, task.index)
                    pending.append((task.prompt_id, writers.submit(write_png, path, image, png_compress_level)))
                made += len(batch)
                settle(wait_all=False)
                # Bound the images held in memory when the writers fall behind.
                while len(pending) > 4 * max(int(batch_size), int(png_workers)):
                    pending[0][1].result()
                    settle(wait_all=False)
                bar.update(len(batch))
                bar.set_postfix({"images/s": f"{made / (time.perf_counter() - start):.2f}"}, refresh=False)
                if on_batch is not None:
                    on_batch(batch)
            settle(wait_all=True)
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    consolidate_prompts(out_dir)
    summary = GenerationSummary(len(mine), skipped, made, seconds)
    log.info("generate: made %d images in %.1f s (%.2f images/s)", made, seconds, summary.images_per_s)
    return summary


def consolidate_prompts(out_dir: str | Path) -> pd.DataFrame:
    """Union every shard's ``prompts_*-of-*.parquet`` into ``prompts.parquet``; returns it.

    Safe to call at any time and from several processes: shard files are replaced atomically,
    so each is read whole, and so is the result. A prompt listed by several files (runs with
    different ``world_size`` over the same folder) keeps the row with the most samples.
    Returns an empty frame, and writes nothing, when no shard has started yet.
    """
    out_dir = Path(out_dir)
    frames = [pd.read_parquet(f) for f in sorted(out_dir.glob("prompts_*-of-*.parquet"))]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    merged = pd.concat(frames, ignore_index=True)
    merged = merged.sort_values(["prompt_index", "n_samples"], ascending=[True, False], kind="stable")
    merged = merged.drop_duplicates("prompt_id", keep="first").reset_index(drop=True)
    write_parquet(merged, out_dir / PROMPTS_FILE)
    return merged


def load_prompts(out_dir: str | Path, complete_only: bool = False) -> pd.DataFrame:
    """The consolidated prompt table; with ``complete_only``, only prompts whose marker exists."""
    table = consolidate_prompts(out_dir)
    if complete_only and len(table):
        done = [prompt_done(Path(out_dir), pid, n) for pid, n in zip(table["prompt_id"], table["n_samples"])]
        table = table[np.asarray(done, dtype=bool)].reset_index(drop=True)
    return table


_PIPELINES: dict[tuple, Any] = {}


def pipeline_for(row, device: str | None = None, model_path: str | None = None):
    """The pipeline a prompt row was made with, loaded once per process and kept.

    ``device`` overrides the recorded device (e.g. ``"cpu"`` to check GPU samples on a
    laptop: same noise, as generators live on ``generator_device``, but expect rounding
    differences); ``model_path`` overrides ``model`` (the model moved).
    """
    runtime = Runtime(**json.loads(row["runtime"]))
    if device is not None:
        runtime = Runtime(**{**runtime.as_dict(), "device": str(device)})
    path = model_path or row["model"]
    key = (path, row["scheduler"], row["scheduler_config"], json.dumps(runtime.as_dict(), sort_keys=True))
    if key not in _PIPELINES:
        torch_device = resolve_device(runtime.device)
        pipe = load_pipeline(path, torch_dtype=resolve_dtype(runtime.dtype, torch_device), device=torch_device)
        pipe.scheduler = build_scheduler(row["scheduler"], json.loads(row["scheduler_config"]))
        _PIPELINES[key] = optimize_pipeline(pipe, runtime)
    return _PIPELINES[key]


def regenerate(row, sample_index: int, pipe=None, *, device: str | None = None, model_path: str | None = None) -> np.ndarray:
    """Remake sample ``sample_index`` of a ``prompts.parquet`` row: uint8 array (height, width, 3).

    ``row`` is a row of the table (a pandas Series or a dict). The model is loaded as recorded
    (see :func:`pipeline_for`) unless ``pipe`` is given; a given ``pipe`` gets the row's
    scheduler. ``PIL.Image.fromarray`` of the result shows it.
    """
    if pipe is None:
        pipe = pipeline_for(row, device=device, model_path=model_path)
    else:
        pipe.scheduler = build_scheduler(row["scheduler"], json.loads(row["scheduler_config"]))
    seeds = row["seeds"]
    if not 0 <= int(sample_index) < len(seeds):
        raise IndexError(f"sample_index: {sample_index} is outside 0..{len(seeds) - 1} for prompt {row['prompt_id']}")
    settings = SamplingSettings(
        steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        height=int(row["height"]),
        width=int(row["width"]),
        negative_prompt=row["negative_prompt"],
        generator_device=row["generator_device"],
    )
    task = SampleTask(row["prompt_id"], row["caption"], int(sample_index), int(seeds[int(sample_index)]))
    encoder = PromptEncoder(pipe, settings.guidance_scale, settings.negative_prompt)
    return sample_batch(pipe, [task], settings, encoder)[0]


def run(cfg) -> GenerationSummary:
    """Everything ``python -m pipeline.generate`` does, from a composed config."""
    prompts = read_prompts(cfg.prompts, caption_column=cfg.caption_column, limit=cfg.max_prompts)
    device = resolve_device(cfg.device)
    torch_dtype = resolve_dtype(cfg.dtype, device)
    runtime = Runtime(
        device=device.type,
        dtype=dtype_name(torch_dtype),
        attention=cfg.attention,
        fuse_qkv=bool(cfg.fuse_qkv),
        channels_last=bool(cfg.channels_last),
        tf32=bool(cfg.tf32),
        compile=bool(cfg.compile),
    )
    m = cfg.model
    pipe = load_pipeline(
        m.path,
        allow_download=bool(m.allow_download),
        torch_dtype=torch_dtype,
        device=device,
        scheduler=m.scheduler,
        scheduler_kwargs=dict(m.scheduler_kwargs or {}),
        revision=m.revision,
        variant=m.variant,
    )
    optimize_pipeline(pipe, runtime)
    settings = SamplingSettings(
        steps=int(m.steps),
        guidance_scale=float(m.guidance_scale),
        height=m.height,
        width=m.width,
        negative_prompt=cfg.negative_prompt,
        generator_device=cfg.generator_device,
    )
    return generate(
        pipe,
        prompts,
        cfg.out_dir,
        model=m.path,
        settings=settings,
        runtime=runtime,
        n_samples=int(cfg.n_samples),
        base_seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        rank=int(cfg.rank),
        world_size=int(cfg.world_size),
        png_workers=int(cfg.png_workers),
        png_compress_level=int(cfg.png_compress_level),
        progress=bool(cfg.progress),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (PromptsError, ModelLoadError, ValueError) as err:
        # A config mistake: the message names the key; a traceback would only bury it.
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
