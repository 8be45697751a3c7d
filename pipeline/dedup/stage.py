"""Stage 1, the duplicate finder: group a training set's near-duplicate images, rank the groups.

    python -m pipeline.dedup                                  # the demo set, offline embedder
    python -m pipeline.dedup data=files data.path=/data/laion embedder=open_clip \\
        embedder.pretrained=/weights/ViT-L-14.pt embedder.model_name=ViT-L-14
    python -m pipeline.dedup embedder=precomputed embeddings_dir=/data/laion_emb   # LAION's own
    python -m pipeline.dedup world_size=4 submit=local        # every phase as 4 processes here
    python -m pipeline.dedup world_size=256 submit=slurm hydra/launcher=slurm_cpu \\
        hydra.launcher.partition=cpu embedder=precomputed embeddings_dir=/data/laion_emb

Reads the data set through the data layer and writes ``<run_dir>/dedup/``:

* ``embeddings/img_emb/img_emb_<rank>.npy`` + ``embeddings/metadata/metadata_<rank>.parquet``
  (clip-retrieval layout; not written when ``embeddings_dir`` supplies them);
* ``groups.parquet``: one row per record: ``key``, ``group_id`` (0 = the largest group),
  ``caption``, ``group_size``;
* ``selected.parquet``: the ``top_k`` largest groups: ``prompt_id`` ("00000"...),
  ``caption`` (the group's most common), ``dup_count``, ``keys``; the generator's input;
* ``rejects.jsonl`` (records skipped, with the reason), ``stats.json`` and ``summary.json``;
* ``memory/<phase>_<rank>.json``: the peak resident memory of the task that ran that phase for
  that rank (``peak_rss_mib``), to size array tasks;
* ``index/`` (the IVF cells and bucket files), ``pairs/pairs_<rank>.npy`` (candidate pairs)
  and ``verified/pairs_<rank>.npy`` (those verified from both images), the intermediate files; ``group_tmp.<host>.<pid>.*/``, the group phase's scratch, removed when it ends.

Nothing is written into ``data.path`` or ``embeddings_dir``: an output folder inside either is refused.

The work runs in six phases (:mod:`pipeline.dedup.phases`: embed, train, index, search, verify,
group),
each a step of the stage executor whose units are skipped when their markers say they are done
with the same settings (:mod:`pipeline.dedup.units`): a rerun resumes, and a changed setting
redoes the phases it decides. ``phase=all`` runs them in order: in this process
(``world_size=1``), or as arrays of ``world_size`` tasks, phase after phase, with
``submit=local`` (processes here) or ``submit=slurm`` (one SLURM array per phase, each after
the previous one; :mod:`pipeline.dedup.launch`). One phase (``phase=search``) runs for
``rank``, as one task of an array launched by hand (``-m hydra/launcher=slurm_cpu``).

No task holds the whole set of embeddings nor every record's strings, and the pairs, groups,
their ids and the selection do not depend on ``world_size`` nor on ``group_chunk_rows``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import CONF_DIR, ConfigError, settings_from, stage_main
from pipeline.data.sharding import check_shard
from pipeline.dedup.grouping import GROUP_CHUNK_ROWS
from pipeline.dedup.inputs import writes_into
from pipeline.dedup.launch import hydra_launcher, run_local, submit_slurm
from pipeline.dedup.memory import peak_rss_mib, reset_peak_rss
from pipeline.dedup.phases import Embed, Group, Index, Locate, Search, Train, Verify
from pipeline.dedup.settings import (
    PHASES,
    SINGLE_TASK_PHASES,
    DedupSettings,
    RunSettings,
    embedder_identity,
    settings_from_config,
)
from pipeline.dedup.summary import DedupSummary, format_summary, stored_summary
from pipeline.dedup.units import DedupRun
from pipeline.embedders.base import Embedder
from pipeline.executor import all_done, run_step
from pipeline.io import write_json
from pipeline.layout import GROUPS, SELECTED

log = logging.getLogger(__name__)


def run_dedup(
    out_dir: str | Path,
    settings: DedupSettings,
    *,
    data: Mapping[str, Any] | None = None,
    embedder: Embedder | None = None,
    embedder_id: Any = None,
    embeddings_dir: str | Path | None = None,
    phase: str = "all",
    rank: int = 0,
    world_size: int = 1,
    ground_truth: str | Path | None = None,
    progress: bool = True,
    group_chunk_rows: int = GROUP_CHUNK_ROWS,
    locate: bool = False,
) -> dict | None:
    """Run ``phase`` of the duplicate finder for ``rank`` of ``world_size`` in this process.

    Args:
        out_dir: the stage's folder, ``<run_dir>/dedup``.
        data: a ``data`` config (format, path, reader options), for the embed phase.
        embedder: embeds the images (not needed with ``embeddings_dir``).
        embedder_id: what identifies the embedding (its config); default ``embedder.name``.
        embeddings_dir: a clip-retrieval folder of precomputed embeddings to use instead.
        ground_truth: a parquet with ``key`` and ``original_id``: evaluate the groups.
        group_chunk_rows: the group phase's queries per step and records per sort bucket (its memory, not its result).
        locate: with ``embeddings_dir``, write the location index of ``data`` (phase locate).

    Returns ``summary.json``'s content (for ``all`` and ``group`` on rank 0), else None.
    """
    # 1. Check the request
    if phase not in ("all", *PHASES):
        raise ValueError(f"phase: must be one of all, {', '.join(PHASES)}; got {phase!r}")
    rank, world_size = check_shard(rank, world_size)
    if phase == "all" and world_size != 1:
        raise ValueError(
            f"phase=all runs every phase in this process and needs world_size=1; with world_size={world_size} pass "
            "submit=local or submit=slurm, or run phase=embed, phase=train, phase=index, phase=search, phase=verify, "
            "phase=group in turn"
        )
    if int(group_chunk_rows) < 1:
        raise ValueError(f"group_chunk_rows: must be >= 1, got {group_chunk_rows}")
    if ground_truth is not None and not Path(ground_truth).exists():
        raise FileNotFoundError(f"data.ground_truth: {ground_truth} does not exist")
    out = Path(out_dir)
    # Precomputed embeddings: the data set is not read, unless its locations are indexed.
    data_path = None if embeddings_dir and not locate else (data or {}).get("path")
    problem = writes_into(out, {"data.path": data_path, "embeddings_dir": embeddings_dir})
    if problem:
        raise ValueError(problem)

    # 2. The phases, sharing one run's units and settings
    dedup = DedupRun(out, settings, data, embedder, embedder_id, embeddings_dir, world_size, int(group_chunk_rows), locate)
    group = Group(dedup, ground_truth)
    steps = {
        "embed": Embed(dedup),
        "locate": Locate(dedup),
        "train": Train(dedup),
        "index": Index(dedup),
        "search": Search(dedup),
        "verify": Verify(dedup),
        "group": group,
    }

    # 3. Run this rank's share of each phase in order
    for name in PHASES if phase == "all" else (phase,):
        if name in SINGLE_TASK_PHASES and rank != 0:
            log.info("phase=%s runs on rank 0 only; nothing to do on rank %d", name, rank)
        if name == "embed" and dedup.precomputed is None and not all_done(out, [dedup.embed_unit(rank)]):
            # The shard is embedded afresh: its rejects list only this run's.
            (out / "rejects" / f"rejects_{rank}.jsonl").unlink(missing_ok=True)
        run_step(steps[name], out, rank=rank, world_size=world_size, progress=progress)

    # 4. Record this task's peak memory
    write_json(
        {"phase": phase, "rank": rank, "world_size": world_size, "pid": os.getpid(), "peak_rss_mib": peak_rss_mib()},
        out / "memory" / f"{phase}_{rank}.json",
    )

    # 5. The summary: this process's grouping, or the stored one
    if phase not in ("all", "group") or rank != 0:
        return None
    if group.summary is not None:
        return group.summary
    log.info("group: already done, skipping")
    return stored_summary(out, ground_truth)


def run(cfg: DictConfig) -> DedupSummary:
    """The stage for one command: this process's phase and rank, or (``submit``) every rank of
    every phase as chained arrays."""
    # 1. Read the settings
    settings = settings_from_config(cfg)
    how = settings_from(RunSettings, cfg)
    out = Path(str(cfg.out_dir))
    summary = DedupSummary(how.phase, how.rank, how.world_size, out, out / GROUPS, out / SELECTED)
    phases = list(PHASES) if how.phase == "all" else [how.phase]
    if how.phase == "all" and not (how.embeddings_dir and how.locate):
        phases.remove("locate")  # the embed phase writes the locations

    # 2. Arrays: every rank of every phase, each phase once the previous one is complete
    if how.submit is not None:
        if how.rank != 0:
            raise ConfigError(f"rank: submit={how.submit} runs every rank; leave rank=0, got {how.rank}")
        config = OmegaConf.to_container(cfg, resolve=True)
        if how.submit == "local":
            summary.report = run_local(run_rank, config, phases, how.world_size)[-1]
        else:
            launcher, folder = hydra_launcher(cfg.run_dir)
            summary.jobs = submit_slurm(run_rank, config, phases, how.world_size, launcher, folder)
            for phase, job in summary.jobs.items():
                print(f"dedup: phase={phase}: SLURM array job {job} ({how.world_size} tasks)")
        return summary

    # 3. The embedder (for images) and the labelled sample (to evaluate the groups)
    embedder = None
    if not how.embeddings_dir and how.phase in ("all", "embed"):
        if "_target_" not in cfg.embedder:
            raise ConfigError(
                f"embedder={cfg.embedder.get('name', '?')} reads precomputed embeddings: pass embeddings_dir=<folder>"
            )
        embedder = hydra.utils.instantiate(cfg.embedder)
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False) if cfg.get("data") else None
    ground_truth = (data or {}).get("ground_truth") if how.evaluate else None
    if ground_truth and how.embeddings_dir and not Path(ground_truth).exists():
        # Precomputed embeddings need no data set, so the data group (data=demo by default) may not exist here.
        log.info("groups not evaluated: data.ground_truth %s does not exist", ground_truth)
        ground_truth = None

    # 4. Run the phase(s) for this rank
    summary.report = run_dedup(
        out,
        settings,
        data=data,
        embedder=embedder,
        embedder_id=embedder_identity(cfg.embedder),
        embeddings_dir=how.embeddings_dir,
        phase=how.phase,
        rank=how.rank,
        world_size=how.world_size,
        ground_truth=ground_truth,
        progress=how.progress,
        group_chunk_rows=how.group_chunk_rows,
        locate=how.locate,
    )

    # 5. Say what was found
    if summary.report is not None:
        print(format_summary(summary.report))
    return summary


def run_rank(config: dict, phase: str, rank: int) -> dict | None:
    """One task of a launched array: ``phase`` for ``rank`` (``config``: the command's resolved
    config, as plain containers); returns ``summary.json``'s content from the group task."""
    reset_peak_rss()  # a worker runs one phase after another: each records its own peak
    cfg = OmegaConf.create({**config, "phase": phase, "rank": rank, "submit": None})
    return run(cfg).report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="dedup")
@stage_main("dedup")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
