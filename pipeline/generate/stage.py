"""Stage 2: many seeded samples per selected caption.

    python -m pipeline.generate                               # or: make generate ARGS="..."
    python -m pipeline.generate model=sd14 n_samples=500 batch_size=32
    python -m pipeline.generate prompts=my_prompts.txt n_samples=16
    python -m pipeline.generate -m hydra/launcher=local world_size=2      # 2 local processes
    python -m pipeline.generate -m hydra/launcher=slurm world_size=64     # a 64-task SLURM array
    python -m pipeline.generate adaptive.enabled=true                     # stop unpromising prompts early

Reads ``prompts`` (default ``<run_dir>/dedup/selected.parquet``; or a .txt/.csv/.parquet list,
see :mod:`pipeline.prompts`) and writes, for this shard's prompts (``rank`` of ``world_size``):

* ``<out_dir>/<prompt_id>/<index:05d>.png``: ``n_samples`` images per prompt, uint8 RGB;
* ``<out_dir>/prompts_<rank>-of-<world_size>.parquet``: the recipe of every sample (below),
  written before sampling starts, and ``<out_dir>/prompts.parquet``, the union of all shards'
  files (:func:`consolidate_prompts`, run at the end of every shard; safe to run any time);
* ``<out_dir>/.done/<prompt_id>.json``: written once all of a prompt's images exist, or once
  adaptive sampling stopped it;
* ``<out_dir>/budget.json``: UNet evaluations spent against brute force (:mod:`pipeline.budget`),
  also printed at the end of a run.

A rerun skips prompts with a marker and, for the others, makes only the missing images, which
are the same images since each one comes from its own seed. Every PNG is written atomically.

Adaptive sampling (``adaptive.enabled=true``, :mod:`pipeline.generate.adaptive`): a prompt's samples come
in rounds (16, 32, 64, ... by default), all active prompts' round together so that batches
still mix prompts; after a round, a prompt whose samples so far have no pair of near-copies
(under the near-copy rule the detector uses, :mod:`pipeline.rule`) stops there (marked done
with ``stopped_early``). Optional stops end a prompt once the detector's verdict is decided: a
clique of ``rule.min_clique`` exists (``stop_when_flagged``), or the remaining budget can no
longer complete one (``stop_when_out_of_reach``); rounds then also end where such a stop could
first apply. Two more take the verdict on fewer samples: ``stop_when_extracted`` (with a
training set, ``data=``) stops a prompt once a sample of a round is within the rule's threshold
of one of its own training images (its ``keys``; prompts without keys are not stopped that
way), and ``stop_when_unlikely`` once a statistical bound on its clique's growth falls short of
``rule.min_clique`` (a heuristic, see :mod:`pipeline.generate.adaptive`); ``near_training``
holds a prompt with a sample within that distance of one of its training images past the stops
on the flag. Its samples are the first ones of the brute-force run, with the same seeds. A
brute-force rerun over the folder fills stopped prompts up; an adaptive rerun with other
settings or another rule decides again from the samples on disk. A sample that cannot be read
back is left out of the checks (as the detector leaves it out) and recorded in
``<out_dir>/rejects.jsonl`` (merged from each rank's ``.logs/rejects/rejects_<rank>.jsonl``).

The stage runs through the stage executor (:mod:`pipeline.executor`), a unit per prompt: the
markers above are its completion markers, and ``.logs/stats/generate_<rank>.json`` its stats.

Recipe columns of ``prompts.parquet``, enough for :func:`pipeline.generate.regenerate.regenerate` to remake any sample:
``prompt_id``, ``prompt_index`` (position in the prompt list), ``caption``, ``dup_count`` and
``keys`` (carried from the prompt list: the duplicate group's training records, or null),
``n_samples``, ``seeds`` (list, one per sample: :func:`pipeline.generate.sampling.sample_seed` of
``base_seed``, prompt id and index, see ``seed_rule``), ``model`` (``model.path`` as given),
``pipeline_class``, ``scheduler`` (class name), ``scheduler_config`` (JSON), ``steps``,
``guidance_scale``, ``height``, ``width``, ``negative_prompt``, ``dtype``, ``generator_device``
and ``runtime`` (JSON: device and speed options, see :class:`pipeline.models.Runtime`); then
``adaptive`` (JSON of :meth:`pipeline.generate.adaptive.AdaptiveSettings.describe`: the settings
and, under ``rule``, the near-copy rule; null when off), ``n_generated`` (samples made so far, of
``n_samples``), ``stopped_early`` (stopped with no near-copy pair) and ``stop_reason``
(:mod:`pipeline.generate.adaptive`'s ``no_close_pairs``, ``flagged``, ``out_of_reach``, ``extracted``
or ``unlikely``; null when sampled in full).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.budget import format_budget, write_generation_budget
from pipeline.cli import CONF_DIR, ConfigError, config_int, config_number, stage_main
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.executor import StepContext, Unit, run_step
from pipeline.families import family_of
from pipeline.generate.adaptive import AdaptiveSettings, adaptive_settings
from pipeline.generate.rounds import RoundScheduler
from pipeline.generate.sampling import (
    SEED_RULE,
    PromptEncoder,
    SampleTask,
    SamplingSettings,
    check_sampling,
    resolve_size,
    sample_batch,
    sample_seed,
)
from pipeline.generations import (
    EXTRACTED,
    FLAGGED,
    NO_SIGN,
    OUT_OF_REACH,
    STOP_REASONS,
    UNLIKELY,
    Sample,
    consolidate_prompts,
    load_prompts,
    load_samples,
    marker_complete,
    marker_info,
    prompt_record,
    read_prompt_record,
    sample_files,
    sample_path,
    samples_present,
    shard_file,
    write_prompt_record,
)
from pipeline.identity import digest_of, model_identity
from pipeline.io import atomic_write, write_json, write_parquet
from pipeline.layout import normalise_keys
from pipeline.models import Runtime, load_model, make_runtime, resolve_device
from pipeline.prompts import Prompt, read_prompts, shard_prompts
from pipeline.rule import rule_from_config
from pipeline.text import display_text
from pipeline.training_images import GroupMatcher, training_set_identity

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
# Recipe fields that change what a sample looks like: a run directory holds one value of each.
PIXEL_KEYS = (
    "model", "pipeline_class", "scheduler", "scheduler_config", "steps", "guidance_scale", "height", "width",
    "negative_prompt", "dtype", "generator_device", "base_seed", "seed_rule", "model_identity",
)  # fmt: skip


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def recipe(
    pipe, model: str, settings: SamplingSettings, runtime: Runtime, base_seed: int, revision: str | None = None
) -> dict[str, Any]:
    """The per-run part of a prompt row: everything but the prompt and its seeds, with the
    model's identity (:func:`pipeline.identity.model_identity`: its weight files' names, sizes
    and modification times, so weights replaced at the same path are another model). Raises a
    ValueError naming the config key of a setting the model's family cannot honour."""
    check_sampling(pipe, settings)
    height, width = resolve_size(pipe, settings.height, settings.width)
    return {
        "model": str(model),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": _json({k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}),
        "steps": int(settings.steps),
        "guidance_scale": float(settings.guidance_scale),
        # Denoiser evaluations per image and step (2 under classifier-free guidance; FLUX: 1),
        # what the budget report counts.
        "evaluations_per_step": family_of(pipe).evaluations_per_step(pipe, settings.guidance_scale),
        "height": height,
        "width": width,
        "negative_prompt": settings.negative_prompt,
        "dtype": runtime.dtype,
        "generator_device": settings.generator_device,
        "base_seed": int(base_seed),
        "seed_rule": SEED_RULE,
        "runtime": _json(runtime.as_dict()),
        "model_identity": _json(model_identity(model, revision)),
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


def refuse_changed_prompts(out_dir: Path, prompts: Sequence[Prompt], records: dict[str, dict[str, Any]]) -> None:
    """Refuse (a ValueError naming the first prompt and the choice to make) when a prompt's
    folder holds samples made from another caption or recipe than ``records`` says now.

    Prompt ids are positions or ranks, so an edited prompt list or a new ranking gives an id
    another caption; regenerating would delete the evidence on disk, keeping it would label
    it with the wrong caption. A folder without a record (made by an older generator) is
    checked against the caption its prompt table lists.
    """
    listed = consolidate_prompts(out_dir, write=False)
    listed_captions = dict(zip(listed["prompt_id"].astype(str), listed["caption"])) if "caption" in listed.columns else {}
    changed = []
    for p in prompts:
        if not sample_files(out_dir, p.prompt_id):
            continue
        record = read_prompt_record(out_dir, p.prompt_id)
        if record is not None:
            if record.get("digest") != records[p.prompt_id]["digest"]:
                changed.append((p, record.get("caption")))
        elif p.prompt_id in listed_captions and listed_captions[p.prompt_id] != p.caption:
            changed.append((p, listed_captions[p.prompt_id]))
    if not changed:
        return
    p, then = changed[0]
    what = f"another caption ({display_text(then, 80)!r} then, {display_text(p.caption, 80)!r} now)" if then != p.caption \
        else "another recipe"
    more = f" ({len(changed)} prompts in all)" if len(changed) > 1 else ""
    raise ValueError(
        f"prompts: prompt {p.prompt_id}{more}: its samples in {out_dir / p.prompt_id} were made from {what}; "
        f"delete that folder to sample it anew, or use another run_name (or out_dir) to keep both"
    )


def write_png(path: Path, image: np.ndarray, compress_level: int) -> Path:
    """Write one uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", compress_level=compress_level))


def missing_samples(out_dir: Path, prompt_id: str, end: int, start: int = 0) -> list[int]:
    """Indexes in ``[start, end)`` of the samples of ``prompt_id`` with no PNG yet. From the
    start (``start`` 0), also clears the temporaries a killed run left in the prompt's folder."""
    folder = out_dir / prompt_id
    if not folder.is_dir():
        return list(range(start, end))
    if start == 0:
        for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write; only this rank owns the folder
            stale.unlink(missing_ok=True)
    return [i for i in range(start, end) if not sample_path(out_dir, prompt_id, i).exists()]


def read_samples(
    out_dir: Path, prompt_id: str, count: int, rejects: RejectLog | None = None, start: int = 0
) -> np.ndarray | list[np.ndarray]:
    """The samples ``[start, count)`` of ``prompt_id`` (default: the first ``count``) that can be
    read, as uint8 (k, H, W, 3) with k <= count - start (a list when their sizes differ). A
    sample that is missing or does not decode is skipped and recorded in ``rejects``, as the
    detector skips it (:func:`pipeline.generations.load_samples`)."""
    samples = [Sample(index, f"{prompt_id}/{sample_path(out_dir, prompt_id, index).name}") for index in range(start, count)]
    _, images = load_samples(out_dir, samples, rejects)
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    return images


@dataclass
class GenerationSummary:
    prompts: int  # this shard's prompts
    prompts_skipped: int  # already complete before this run
    images: int  # images made by this run
    seconds: float
    stopped_early: int = 0  # prompts this run stopped early with no sign of memorization (adaptive sampling)
    stopped_flagged: int = 0  # prompts this run stopped early because they were already flagged
    stopped_out_of_reach: int = 0  # prompts this run stopped because their budget could no longer complete a clique
    samples_rejected: int = 0  # samples adaptive sampling could not read back, left out of its checks (rejects.jsonl)
    stopped_extracted: int = 0  # prompts this run stopped once a sample reproduced one of their training images
    stopped_unlikely: int = 0  # prompts this run stopped because a clique was unlikely to complete (a heuristic)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# Where the generator's executor keeps its per-rank rejects and stats: a hidden folder, since
# the generations folder's sub-folders are prompts.
LOGS_DIR = ".logs"
REJECTS_FILE = "rejects.jsonl"


class GenerateStep:
    """The generator as a step of the stage executor (:mod:`pipeline.executor`): a unit per
    prompt of this shard, done once all its ``n_samples`` samples exist or adaptive sampling
    stopped it (its completion marker, which the detector reads, holds ``n_samples``,
    ``n_generated``, ``stopped_early``, ``stop_reason`` and, when stopped, the ``adaptive``
    settings). :meth:`run` samples every unfinished prompt's rounds
    (:class:`pipeline.generate.rounds.RoundScheduler`) in batches that mix prompts, writing PNGs on
    ``png_workers`` threads. With ``stop_when_extracted``, ``matcher`` compares each round's new
    samples with the training images of the prompt's ``keys`` (a prompt without keys is never
    stopped that way), and with ``near_training`` tells whether its samples came that near."""

    name = "generate"
    # Every rank's rejects, also those of runs with another world_size: prompts outlive it.
    rejects_per_world_size = False

    def __init__(self, pipe, rows: list[dict[str, Any]], out_dir: Path, *, settings: SamplingSettings, n_samples: int,
                 batch_size: int, adaptive: AdaptiveSettings | None, png_workers: int, png_compress_level: int,
                 on_batch: Callable[[list[SampleTask]], None] | None, matcher: GroupMatcher | None = None,
                 every_prompt: Sequence[tuple[str, str, list[str] | None]] = ()):  # fmt: skip
        self.pipe, self.rows, self.out_dir, self.settings = pipe, rows, out_dir, settings
        # (prompt_id, prompt digest, keys) of every rank's prompts, in prompt-list order.
        self.every_prompt = list(every_prompt) or [(row["prompt_id"], row["prompt_digest"], row["keys"]) for row in rows]
        self.n_samples, self.batch_size, self.adaptive = n_samples, batch_size, adaptive
        self.png_workers, self.png_compress_level = max(1, int(png_workers)), png_compress_level
        self.on_batch = on_batch
        self.matcher = matcher
        self.rejects_file = out_dir / REJECTS_FILE  # the executor merges the ranks' rejects there
        self.made = 0
        self.seconds = 0.0
        self.stops = dict.fromkeys(STOP_REASONS, 0)
        self.rejected: set[str] = set()

    def units(self) -> list[Unit]:
        adaptive = self.adaptive.describe() if self.adaptive is not None else None
        # stop_when_extracted decides by the prompt's training images: its keys decide its stop.
        extracted_stops = self.adaptive is not None and self.adaptive.stop_when_extracted
        return [
            Unit(prompt_id, {"n_samples": self.n_samples, "adaptive": adaptive, "prompt": digest,
                             "keys": keys if extracted_stops else None})  # fmt: skip
            for prompt_id, digest, keys in self.every_prompt
        ]

    def is_complete(self, unit: Unit, marker: dict[str, Any]) -> bool:
        """A prompt sampled in full serves any budget up to its own; one adaptive sampling
        stopped, only an adaptive run with the same settings (a brute-force rerun fills it up);
        either only for the caption and recipe its samples were made from."""
        settings = marker.get("settings")
        if not isinstance(settings, dict) or settings.get("prompt") != unit.settings["prompt"]:
            return False
        if marker.get("stop_reason") is not None and settings.get("keys") != unit.settings["keys"]:
            return False  # a stop taken against other training images
        return marker_complete(marker, self.n_samples, self.adaptive, any_rule=False) and samples_present(self.out_dir, unit.name, marker)

    def write_shard_file(self, rank: int, world_size: int) -> None:
        """The recipe rows plus each prompt's state (samples made so far, stopped early or not)
        as this shard's ``prompts_<rank>-of-<world_size>.parquet``."""
        out_dir, n_samples, rows = self.out_dir, self.n_samples, self.rows
        for row in rows:
            info = marker_info(out_dir, row["prompt_id"])
            if info is not None and marker_complete(info, n_samples):  # counts checked there
                row["n_generated"] = min(int(info.get("n_generated", n_samples)), n_samples)
                row["stopped_early"] = bool(info.get("stopped_early", False))
                row["stop_reason"] = info.get("stop_reason", NO_SIGN if row["stopped_early"] else None)
            else:
                row["n_generated"] = sum(sample_path(out_dir, row["prompt_id"], i).exists() for i in range(n_samples))
                row["stopped_early"] = False
                row["stop_reason"] = None
        write_parquet(pd.DataFrame(rows, columns=list(rows[0]) if rows else None), shard_file(out_dir, rank, world_size))

    def run(self, units: Sequence[Unit], ctx: StepContext) -> None:
        out_dir, n_samples, batch_size = self.out_dir, self.n_samples, self.batch_size
        by_name = {unit.name: unit for unit in units}
        seeds = {row["prompt_id"]: row["seeds"] for row in self.rows}
        captions = {row["prompt_id"]: row["caption"] for row in self.rows}
        groups = {row["prompt_id"]: normalise_keys(row.get("keys")) or [] for row in self.rows}

        def read_back(prompt_id: str, count: int):
            """The readable ones among a prompt's first ``count`` samples; a sample that cannot be
            read is left out of the checks, as the detector leaves it out, and recorded once."""
            return read_range(prompt_id, 0, count)

        def read_range(prompt_id: str, start: int, end: int):
            found = RejectLog()
            images = read_samples(out_dir, prompt_id, end, found, start=start)
            for entry in found.entries:
                if entry["key"] not in self.rejected:
                    self.rejected.add(entry["key"])
                    ctx.rejects.add(entry["key"], entry["source"], entry["reason"])
            return images

        def matches(prompt_id: str, start: int, end: int) -> bool:
            """Whether one of samples [start, end) reproduces one of the prompt's own training images."""
            if self.matcher is None or not groups[prompt_id]:
                return False
            return self.matcher.any_match(read_range(prompt_id, start, end), groups[prompt_id])

        def near(prompt_id: str, end: int) -> bool:
            """Whether one of the prompt's first ``end`` samples is within adaptive.near_training of one of its training images."""
            if self.matcher is None or not groups[prompt_id]:
                return False
            return self.matcher.any_match(read_range(prompt_id, 0, end), groups[prompt_id], within=self.adaptive.near_training)

        def finish(prompt_id: str, made: int, reason: str | None) -> None:
            # ``stopped_early`` means "stopped with no sign of memorization" (what a shortcut can
            # miss); a prompt stopped because it is already flagged has stop_reason "flagged".
            info: dict[str, Any] = {
                "n_samples": n_samples, "n_generated": made, "stopped_early": reason == NO_SIGN, "stop_reason": reason, "rank": ctx.rank,
            }  # fmt: skip
            if reason is not None:
                info["adaptive"] = self.adaptive.describe()
                self.stops[reason] += 1
            ctx.done(by_name[prompt_id], info)

        scheduler = RoundScheduler(
            n_samples, self.adaptive,
            missing=lambda prompt_id, start, end: missing_samples(out_dir, prompt_id, end, start=start),
            read=read_back, on_finish=finish, matches=matches, near=near,
        )  # fmt: skip
        queue: deque[SampleTask] = deque()
        queued_per_caption: Counter[str] = Counter()
        bar = tqdm(total=0, unit="img", desc=f"generate {ctx.rank}/{ctx.world_size}", disable=not ctx.progress, dynamic_ncols=True)

        def enqueue(tasks: list[SampleTask]) -> None:
            queue.extend(tasks)
            queued_per_caption.update(t.caption for t in tasks)
            bar.total += len(tasks)  # shown at the next update

        self.write_shard_file(ctx.rank, ctx.world_size)  # before sampling starts: the recipe is on disk whatever happens next
        for unit in units:
            enqueue(scheduler.start(unit.name, captions[unit.name], seeds[unit.name]))
        log.info(
            "generate: shard %d/%d: %d prompts to sample, %d images to make%s", ctx.rank, ctx.world_size, len(units), len(queue),
            f" in the first round (adaptive: rounds end at {scheduler.ends}"
            + (", or sooner where a stop on the verdict could apply)" if self.adaptive.needs_clique else ")")
            if self.adaptive is not None else "",
        )  # fmt: skip

        encoder = PromptEncoder(self.pipe, self.settings.guidance_scale, self.settings.negative_prompt)
        pending: list[tuple[str, Future]] = []

        def settle(wait_all: bool) -> None:
            """Check finished writes (raising any write error) and queue what the scheduler then asks for."""
            nonlocal pending
            still = []
            for prompt_id, future in pending:
                if wait_all or future.done():
                    future.result()
                    enqueue(scheduler.written(prompt_id))
                else:
                    still.append((prompt_id, future))
            pending = still

        # PNG encoding runs in threads (zlib releases the GIL), so the accelerator never waits on it.
        with ThreadPoolExecutor(max_workers=self.png_workers, thread_name_prefix="png") as writers, ctx.track_time("sampling"):
            try:
                while queue or pending:
                    if len(queue) < batch_size and pending:
                        # Prompts whose round is being written may queue their next round: wait, so
                        # that batches stay full (with adaptive off, this happens once, at the end).
                        settle(wait_all=True)
                        continue
                    batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
                    images = sample_batch(self.pipe, batch, self.settings, encoder)
                    queued_per_caption.subtract(t.caption for t in batch)
                    # Embeddings of a caption are dropped once none of its samples is queued, so
                    # memory stays flat over long prompt lists (a later round encodes it again).
                    encoder.forget({t.caption for t in batch if queued_per_caption[t.caption] <= 0})
                    for task, image in zip(batch, images):
                        path = sample_path(out_dir, task.prompt_id, task.index)
                        pending.append((task.prompt_id, writers.submit(write_png, path, image, self.png_compress_level)))
                    self.made += len(batch)
                    settle(wait_all=False)
                    # Bound the images held in memory when the writers fall behind.
                    while len(pending) > 4 * max(batch_size, self.png_workers):
                        pending[0][1].result()
                        settle(wait_all=False)
                    bar.update(len(batch))
                    ctx.stat("images", len(batch))
                    if self.on_batch is not None:
                        self.on_batch(batch)
            finally:
                bar.close()
        self.seconds = ctx.seconds["sampling"]


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
    adaptive: AdaptiveSettings | None = None,
    matcher: GroupMatcher | None = None,
    model_revision: str | None = None,
) -> GenerationSummary:
    """Make the missing samples of this shard's ``prompts`` into ``out_dir``; see the module doc.

    ``prompts`` is the full list (every rank passes the same); this call takes shard ``rank``
    and runs it through the stage executor (:class:`GenerateStep`), which skips the prompts
    already complete. ``on_batch(tasks)`` is called after each batch is handed to the PNG
    writers (for tests and monitoring; an exception there stops the run as a crash would,
    leaving it resumable). ``matcher``: the training images for ``adaptive.stop_when_extracted``
    (required by it), compared with the samples of prompts that carry ``keys``.
    """
    if int(n_samples) < 1:
        raise ValueError(f"n_samples: must be at least 1, got {n_samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    n_samples, batch_size = int(n_samples), int(batch_size)
    if adaptive is not None and not adaptive.enabled:
        adaptive = None
    if adaptive is not None and adaptive.stop_when_extracted and matcher is None:
        raise ValueError("adaptive.stop_when_extracted: needs a training set to compare samples with (data=...)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_of = {p.prompt_id: i for i, p in enumerate(prompts)}
    mine = shard_prompts(list(prompts), rank, world_size)
    run_recipe = recipe(pipe, model, settings, runtime, base_seed, revision=model_revision)
    check_settings(out_dir, run_recipe)
    recipe_digest = digest_of({k: run_recipe[k] for k in PIXEL_KEYS})
    records = {p.prompt_id: prompt_record(p.caption, settings.negative_prompt, recipe_digest) for p in prompts}
    refuse_changed_prompts(out_dir, mine, records)
    for p in mine:
        if (read_prompt_record(out_dir, p.prompt_id) or {}).get("digest") != records[p.prompt_id]["digest"]:
            write_prompt_record(out_dir, p.prompt_id, records[p.prompt_id])
    rows = [
        {
            "prompt_id": p.prompt_id,
            "prompt_index": index_of[p.prompt_id],
            "caption": p.caption,
            "dup_count": p.dup_count,
            "keys": None if p.keys is None else list(p.keys),
            "n_samples": n_samples,
            "seeds": [sample_seed(base_seed, p.prompt_id, i) for i in range(n_samples)],
            **run_recipe,
            "adaptive": _json(adaptive.describe()) if adaptive is not None else None,
            "prompt_digest": records[p.prompt_id]["digest"],
        }
        for p in mine
    ]

    if adaptive is not None and adaptive.stop_when_extracted:
        without = sum(not row["keys"] for row in rows)
        if without:
            log.info("generate: %d of %d prompts carry no training keys (no duplicate group): stop_when_extracted cannot "
                     "stop them", without, len(rows))
    step = GenerateStep(
        pipe, rows, out_dir, settings=settings, n_samples=n_samples, batch_size=batch_size, adaptive=adaptive,
        png_workers=png_workers, png_compress_level=png_compress_level, on_batch=on_batch,
        matcher=matcher if adaptive is not None and adaptive.stop_when_extracted else None,
        every_prompt=[(p.prompt_id, records[p.prompt_id]["digest"], None if p.keys is None else list(p.keys)) for p in prompts],
    )  # fmt: skip
    ctx = run_step(step, out_dir, rank=rank, world_size=world_size, progress=progress, logs_dir=out_dir / LOGS_DIR)
    # This shard's prompts as they now stand, and the union of every shard's so far (safe at any time).
    step.write_shard_file(rank, world_size)
    consolidate_prompts(out_dir)
    stops = step.stops
    summary = GenerationSummary(
        len(mine), ctx.skipped, step.made, step.seconds,
        stops[NO_SIGN], stops[FLAGGED], stops[OUT_OF_REACH], len(step.rejected), stops[EXTRACTED], stops[UNLIKELY],
    )  # fmt: skip
    if step.rejected:
        log.warning("generate: %d sample(s) could not be read back and were left out of adaptive sampling's checks: %s",
                    len(step.rejected), ctx.rejects.summary())
    log.info("generate: made %d images in %.1f s (%.2f images/s)%s", step.made, step.seconds, summary.images_per_s,
             f"; {stops[NO_SIGN]} prompts stopped early with no near-copy pair, {stops[FLAGGED]} once flagged, "
             f"{stops[OUT_OF_REACH]} once a clique was out of reach, {stops[EXTRACTED]} once extracted, "
             f"{stops[UNLIKELY]} once a clique was unlikely"
             if adaptive is not None else "")
    return summary


def run(cfg) -> GenerationSummary:
    """Everything ``python -m pipeline.generate`` does, from a composed config.

    The config is read first, so that a wrong value is reported (a ConfigError naming its key)
    before the prompts are read or the model is loaded.
    """
    n_samples = config_int(cfg, "n_samples", minimum=1)
    batch_size = config_int(cfg, "batch_size", minimum=1)
    base_seed = config_int(cfg, "seed")
    rank, world_size = check_shard(cfg.rank, cfg.world_size)
    max_prompts = config_int(cfg, "max_prompts", minimum=1, optional=True)
    png_workers = config_int(cfg, "png_workers")
    png_compress_level = config_int(cfg, "png_compress_level", minimum=0, maximum=9)
    m = cfg.model
    settings = SamplingSettings(
        steps=config_int(cfg, "model.steps", minimum=1),
        guidance_scale=config_number(cfg, "model.guidance_scale"),
        height=config_int(cfg, "model.height", minimum=1, optional=True),
        width=config_int(cfg, "model.width", minimum=1, optional=True),
        negative_prompt=cfg.negative_prompt,
        generator_device=cfg.generator_device,
    )
    adaptive = adaptive_settings(cfg.get("adaptive"))
    data = cfg.get("data")
    if adaptive.enabled and adaptive.stop_when_extracted and data is None:
        raise ConfigError("adaptive.stop_when_extracted: needs a training set to compare samples with: set data= (data=demo, "
                          "data=files data.path=...)")
    matcher = None
    if adaptive.enabled:  # the near-copy rule matters (and its metric is built) only then
        adaptive = replace(adaptive, rule=rule_from_config(cfg))
        if adaptive.stop_when_extracted:
            # Verification's threshold is the rule's here (the detector's verify.delta defaults to it too).
            data = OmegaConf.to_container(data, resolve=True)
            matcher = GroupMatcher(data, adaptive.rule.metric, adaptive.rule.threshold)
            adaptive = replace(adaptive, training_set=training_set_identity(data))
    prompts = read_prompts(cfg.prompts, caption_column=cfg.caption_column, limit=max_prompts)
    device = resolve_device(cfg.device)
    runtime = make_runtime(
        device,
        cfg.dtype,
        attention=cfg.attention,
        fuse_qkv=bool(cfg.fuse_qkv),
        channels_last=bool(cfg.channels_last),
        tf32=bool(cfg.tf32),
        compile=bool(cfg.compile),
    )
    # Every model.* loading key (path, allow_download, revision, variant, scheduler,
    # scheduler_kwargs), as the prescreen loads it too.
    pipe = load_model(m, runtime, device=device)
    summary = generate(
        pipe,
        prompts,
        cfg.out_dir,
        model=m.path,
        settings=settings,
        runtime=runtime,
        n_samples=n_samples,
        base_seed=base_seed,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        png_workers=png_workers,
        png_compress_level=png_compress_level,
        progress=bool(cfg.progress),
        adaptive=adaptive,
        matcher=matcher,
        model_revision=m.get("revision"),
    )
    # The budget covers every prompt of the folder so far (other shards' too).
    budget_cfg = cfg.get("budget") or {}
    report = write_generation_budget(
        cfg.out_dir, load_prompts(cfg.out_dir), cfg.prompts, budget_cfg.get("brute_force_memorized")
    )
    print(format_budget(report))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
@stage_main("generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
