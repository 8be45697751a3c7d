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
* ``<out_dir>/prompts_<rank>-of-<world_size>.parquet``: the recipe of every sample
  (:mod:`pipeline.generate.recipe`), written before sampling starts, and
  ``<out_dir>/prompts.parquet``, the union of all shards' files (:func:`consolidate_prompts`,
  run at the end of every shard; safe to run any time);
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

The stage runs through the stage executor (:mod:`pipeline.executor`), a unit per prompt
(:class:`pipeline.generate.step.GenerateStep`): the markers above are its completion markers,
and ``.logs/stats/generate_<rank>.json`` its stats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.budget import format_budget, write_generation_budget
from pipeline.cli import CONF_DIR, ConfigError, config_number, settings_from, stage_main
from pipeline.data.sharding import check_shard
from pipeline.executor import run_step
from pipeline.generate.adaptive import AdaptiveSettings, adaptive_settings
from pipeline.generate.recipe import check_settings, pixel_settings, prompt_rows, recipe
from pipeline.generate.samples_on_disk import record_prompts, refuse_changed_prompts
from pipeline.generate.sampling import SampleTask, SamplingSettings
from pipeline.generate.settings import GenerateSettings, GenerationSummary, RuntimeSettings
from pipeline.generate.step import GenerateStep
from pipeline.generations import (
    EXTRACTED,
    FLAGGED,
    NO_SIGN,
    OUT_OF_REACH,
    UNLIKELY,
    consolidate_prompts,
    load_prompts,
    prompt_record,
)
from pipeline.identity import digest_of
from pipeline.layout import GENERATION_LOGS
from pipeline.models import Runtime, load_model, make_runtime, resolve_device
from pipeline.prompts import Prompt, read_prompts, shard_prompts
from pipeline.rule import rule_from_config
from pipeline.training_images import GroupMatcher, training_set_identity, with_location_index

log = logging.getLogger(__name__)

# Where the generator's executor keeps its per-rank rejects and stats.
LOGS_DIR = GENERATION_LOGS


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
    # 1. Check the arguments.
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
    mine = shard_prompts(list(prompts), rank, world_size)

    # 2. The recipe: refused when the folder holds samples of another one, or prompts of other captions.
    run_recipe = recipe(pipe, model, settings, runtime, base_seed, revision=model_revision)
    check_settings(out_dir, run_recipe)
    recipe_digest = digest_of(pixel_settings(run_recipe))
    records = {p.prompt_id: prompt_record(p.caption, settings.negative_prompt, recipe_digest) for p in prompts}
    refuse_changed_prompts(out_dir, mine, records)
    record_prompts(out_dir, mine, records)
    digests = {pid: record["digest"] for pid, record in records.items()}
    rows = prompt_rows(
        mine,
        {p.prompt_id: i for i, p in enumerate(prompts)},
        run_recipe,
        n_samples=n_samples,
        base_seed=base_seed,
        adaptive=adaptive,
        digests=digests,
    )
    if adaptive is not None and adaptive.stop_when_extracted:
        without = sum(not row["keys"] for row in rows)
        if without:
            log.info(
                "generate: %d of %d prompts carry no training keys (no duplicate group): stop_when_extracted cannot stop them",
                without,
                len(rows),
            )

    # 3. Sample this shard's prompts through the executor.
    step = GenerateStep(
        pipe,
        rows,
        out_dir,
        settings=settings,
        n_samples=n_samples,
        batch_size=batch_size,
        adaptive=adaptive,
        png_workers=png_workers,
        png_compress_level=png_compress_level,
        on_batch=on_batch,
        matcher=matcher if adaptive is not None and adaptive.stop_when_extracted else None,
        every_prompt=[(p.prompt_id, digests[p.prompt_id], None if p.keys is None else list(p.keys)) for p in prompts],
    )
    ctx = run_step(step, out_dir, rank=rank, world_size=world_size, progress=progress, logs_dir=out_dir / LOGS_DIR)

    # 4. This shard's prompts as they now stand, and the union of every shard's so far (safe at any time).
    step.write_shard_file(rank, world_size)
    consolidate_prompts(out_dir)
    stops = step.stops
    summary = GenerationSummary(
        len(mine),
        ctx.skipped,
        step.made,
        step.seconds,
        stops[NO_SIGN],
        stops[FLAGGED],
        stops[OUT_OF_REACH],
        len(step.rejected),
        stops[EXTRACTED],
        stops[UNLIKELY],
    )
    if step.rejected:
        log.warning(
            "generate: %d sample(s) could not be read back and were left out of adaptive sampling's checks: %s",
            len(step.rejected),
            ctx.rejects.summary(),
        )
    log.info(
        "generate: made %d images in %.1f s (%.2f images/s)%s",
        step.made,
        step.seconds,
        summary.images_per_s,
        f"; {stops[NO_SIGN]} prompts stopped early with no near-copy pair, {stops[FLAGGED]} once flagged, "
        f"{stops[OUT_OF_REACH]} once a clique was out of reach, {stops[EXTRACTED]} once extracted, "
        f"{stops[UNLIKELY]} once a clique was unlikely"
        if adaptive is not None
        else "",
    )
    return summary


def run(cfg) -> GenerationSummary:
    """Everything ``python -m pipeline.generate`` does, from a composed config.

    The config is read first, so that a wrong value is reported (a ConfigError naming its key)
    before the prompts are read or the model is loaded.
    """
    # 1. Read the settings.
    options = settings_from(GenerateSettings, cfg)
    rank, world_size = check_shard(cfg.rank, cfg.world_size)
    sampling = settings_from(SamplingSettings, cfg)
    speed = settings_from(RuntimeSettings, cfg)
    adaptive = adaptive_settings(cfg.get("adaptive"))

    # 2. The near-copy rule and the training images adaptive sampling stops on.
    data = cfg.get("data")
    if adaptive.enabled and adaptive.stop_when_extracted and data is None:
        raise ConfigError(
            "adaptive.stop_when_extracted: needs a training set to compare samples with: set data= (data=demo, "
            "data=files data.path=...)"
        )
    matcher = None
    if adaptive.enabled:  # the near-copy rule matters (and its metric is built) only then
        adaptive = replace(adaptive, rule=rule_from_config(cfg))
        if adaptive.stop_when_extracted:
            # Verification's threshold is the rule's here (the detector's verify.delta defaults to it too).
            data = with_location_index(OmegaConf.to_container(data, resolve=True), cfg.get("dedup_dir"))
            cache_mb = config_number(cfg, "training_cache_mb", minimum=0, optional=True)
            max_bytes = None if cache_mb is None else int(cache_mb * 2**20)
            matcher = GroupMatcher(data, adaptive.rule.metric, adaptive.rule.threshold, max_bytes=max_bytes)
            adaptive = replace(adaptive, training_set=training_set_identity(data))

    # 3. Read the prompts and load the model (every model.* loading key, as the prescreen loads it).
    prompts = read_prompts(cfg.prompts, caption_column=cfg.caption_column, limit=options.max_prompts)
    device = resolve_device(speed.device)
    runtime = make_runtime(
        device,
        speed.dtype,
        attention=speed.attention,
        fuse_qkv=speed.fuse_qkv,
        channels_last=speed.channels_last,
        tf32=speed.tf32,
        compile=speed.compile,
    )
    pipe = load_model(cfg.model, runtime, device=device)

    # 4. Sample this shard's prompts.
    summary = generate(
        pipe,
        prompts,
        cfg.out_dir,
        model=cfg.model.path,
        settings=sampling,
        runtime=runtime,
        n_samples=options.n_samples,
        base_seed=options.seed,
        batch_size=options.batch_size,
        rank=rank,
        world_size=world_size,
        png_workers=options.png_workers,
        png_compress_level=options.png_compress_level,
        progress=options.progress,
        adaptive=adaptive,
        matcher=matcher,
        model_revision=cfg.model.get("revision"),
    )

    # 5. The budget, over every prompt of the folder so far (other shards' too).
    budget_cfg = cfg.get("budget") or {}
    report = write_generation_budget(cfg.out_dir, load_prompts(cfg.out_dir), cfg.prompts, budget_cfg.get("brute_force_memorized"))
    print(format_budget(report))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
@stage_main("generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
