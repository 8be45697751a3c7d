"""Stage 3: flag the prompts whose samples are copies of one image, then verify them.

For each prompt, the samples form a graph with an edge between two samples closer than
``rule.threshold`` under the rule's metric (the paper's tiled L2, or a CLIP cosine distance); a
prompt is flagged when the largest clique of that graph has at least ``rule.min_clique``
members (Carlini et al. 2023: many seeds converging on the same image is the signature of a
memorized training image; :mod:`pipeline.detect.screen`). The rule
(:class:`pipeline.rule.NearCopyRule`) is the one adaptive sampling and verification use. When a
training set is given (``data=``), every sample of every prompt is then compared with candidate
training images (:mod:`pipeline.detect.verify`), through the same metric: a prompt is
*extracted* when a sample reproduces one of its caption's (its duplicate group's; any, for a
prompt listed without one).

    python -m pipeline.detect run_name=demo                 # reads <run_dir>/generations
    python -m pipeline.detect generations_dir=/elsewhere data=files data.path=/laion

Outputs in ``<run_dir>/detect/``: ``memorized.parquet`` (a row per prompt: the clique verdict
and, when a training set is given, ``extracted``, ``samples_matched``, ``reproduction_rate``
with its 95% Wilson interval, ``samples_matched_other`` (samples reproducing only other captions'
training images) and the best match), ``extracted.parquet`` (a row per sample and
training image within the threshold) and ``matches/`` (when a training set is given),
``summary.json``, ``rejects.jsonl`` (unreadable samples; ``rejects_<rank>.jsonl`` per shard),
and per-prompt results under ``prompts/`` so that a rerun skips finished prompts. Without a
training set, when the duplicate finder read embeddings whose metadata holds URLs (LAION's),
``candidates.parquet`` lists the images verification needs (``url``, ``caption``, ``key``;
:mod:`pipeline.detect.download_list`) for img2dataset to download.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import CONF_DIR, ConfigError, setting, settings_from, stage_main
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.detect.candidates import EmbedderOnFirstUse
from pipeline.detect.download_list import has_urls, write_download_list
from pipeline.detect.screen import PROMPT_RESULTS, ScreenPrompts, find_memorized, screenable_prompts, stopped_under_another_rule
from pipeline.detect.verify import embeddings_folder, run_verify
from pipeline.executor import run_step
from pipeline.io import write_json
from pipeline.layout import (
    DOWNLOAD_LIST,
    EXTRACTED,
    MEMORIZED,
    PROMPTS_TABLE,
    SCREENED,
    SUMMARY,
    read_prompt_table,
    write_prompt_table,
)
from pipeline.rule import NearCopyRule, rule_from_config

__all__ = ["DetectSummary", "VerifySettings", "find_memorized", "main", "run", "run_detect", "stopped_under_another_rule"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifySettings:
    """The ``verify.*`` keys: where candidates come from and what counts as a reproduction."""

    dedup_dir: str | None = setting()  # the duplicate finder's folder (embeddings/, locations/)
    n_candidates: int = setting(minimum=0)  # nearest training images by embedding, per sample
    max_candidates: int = setting(minimum=1)  # candidates per prompt, its group first
    delta: float | None = setting(minimum=0)  # None: the rule's threshold
    exhaustive: bool | str = setting()  # true, false or auto (only when dedup_dir has nothing)
    embeddings_dir: str | None = setting(default=None)  # the precomputed embeddings it read, if any

    def __post_init__(self):
        if self.exhaustive not in (True, False, "auto"):
            raise ConfigError(f"verify.exhaustive: expected true, false or auto, got {self.exhaustive!r}")


@dataclass
class DetectSummary:
    """What the detector found in ``out_dir``. The counts are None while other shards are
    unfinished (``prompts``, ``flagged``) or without a training set (``extracted``,
    ``samples_matched``). Unpacks as ``(memorized, extracted)``: the two tables, or None."""

    out_dir: Path
    prompts: int | None = None  # prompts screened
    flagged: int | None = None  # prompts with a clique of rule.min_clique near-copies
    extracted: int | None = None  # prompts with a sample within delta of one of their training images
    samples_matched: int | None = None  # such samples, over every prompt
    memorized_table: pd.DataFrame | None = field(default=None, repr=False)
    extracted_pairs: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def memorized_path(self) -> Path:
        return self.out_dir / MEMORIZED

    @property
    def extracted_path(self) -> Path:
        return self.out_dir / EXTRACTED

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY

    def __iter__(self):
        return iter((self.memorized_table, self.extracted_pairs))


def run_detect(
    generations_dir: str | Path,
    out_dir: str | Path,
    rule: NearCopyRule,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    write: bool = True,
) -> pd.DataFrame | None:
    """Screen this shard's prompts with ``rule``; once every shard is done, ``memorized.parquet``
    and ``summary.json`` (``write=False``: the caller writes them, with verification's columns).

    Runs through the stage executor (:mod:`pipeline.executor`, :class:`ScreenPrompts`): each
    finished prompt is stored as ``<out_dir>/prompts/<prompt_id>.json`` with a completion
    marker, so a rerun skips it (and decides again when the rule or its samples changed). The
    step's finish, run by the shard that completes the last prompt, writes
    ``memorized.parquet`` (a prompt table: ``dup_count`` and ``keys`` come with each prompt
    from the generator's table, by ``prompt_id``) and ``summary.json``; the executor merges
    ``rejects.jsonl`` and ``stats.json``.

    Returns:
        The ``memorized.parquet`` table when all prompts are done, else ``None``.
    """
    rank, world_size = check_shard(rank, world_size)
    generations_dir, out_dir = Path(generations_dir), Path(out_dir)
    # Every shard reads the whole prompt table; rank 0 alone records the ids it skips, in its
    # executor reject file (merged into rejects.jsonl; each id listed once across reruns).
    id_rejects = RejectLog(out_dir / "rejects" / "rejects_0.jsonl", once=True) if rank == 0 else None
    prompts, generator_table = screenable_prompts(generations_dir, id_rejects)
    if prompts.empty:
        raise ValueError(
            f"generations_dir: no prompts ready to screen in {generations_dir} (no sub-folders, no {PROMPTS_TABLE}, "
            "or every prompt still being generated)"
        )
    step = ScreenPrompts(generations_dir, out_dir, prompts, generator_table, rule, progress)
    if step.other_rule:
        log.warning(
            "%d prompt(s) were stopped by adaptive sampling on a verdict taken with another near-copy rule than this "
            "detector's (%s), e.g. %s: their verdicts here may differ from a full run's; rerun the generator without "
            "adaptive sampling (or with the detector's rule) to complete them",
            len(step.other_rule),
            json.dumps(rule.describe()),
            step.other_rule[0],
        )
    ctx = run_step(step, step.results_dir, rank=rank, world_size=world_size, progress=progress, logs_dir=out_dir)
    if not ctx.all_done:
        log.info(
            "not every prompt is screened yet (other shards); memorized.parquet is written by the shard "
            "that finishes last, or by a rerun with world_size=1"
        )
        return None
    memorized = read_prompt_table(step.results_dir / SCREENED)
    if write:  # unchanged content leaves the files untouched (pipeline.io.atomic_path)
        write_prompt_table(memorized, out_dir / MEMORIZED)
        write_json(screen_summary(out_dir), out_dir / SUMMARY)
    return memorized


def screen_summary(out_dir: Path) -> dict[str, Any]:
    """The screening's counts and settings, as its finish wrote them."""
    return json.loads((out_dir / PROMPT_RESULTS / SUMMARY).read_text(encoding="utf-8"))


def record_verification(
    summary_path: Path, memorized: pd.DataFrame, extracted: pd.DataFrame, delta: float, rule: NearCopyRule
) -> dict[str, Any]:
    """``summary.json``: the screening's counts with verification's counts and threshold under
    ``verification``, where the report reads them; returns the latter."""
    summary = screen_summary(summary_path.parent)
    verification = {
        "delta": delta,
        "metric": rule.metric.describe(),
        "extracted": int(memorized["extracted"].sum()),
        "samples_matched": int(memorized["samples_matched"].sum()),
        "pairs": len(extracted),
        "samples_matched_other": int(memorized["samples_matched_other"].sum()),
    }
    write_json({**summary, "verification": verification}, summary_path)
    return verification


def run(cfg: DictConfig) -> DetectSummary:
    """The stage from its Hydra config: screen, then verify when ``data`` is given."""
    # 1. Read the settings before screening, which may take hours: a wrong value is reported at
    # once. The near-copy rule is every stage's (conf/rule.yaml, conf/metric/); metric=clip
    # builds its embedder here, which verification's embedding index then shares.
    rule = rule_from_config(cfg)
    verify = settings_from(VerifySettings, cfg, "verify.")
    delta = rule.threshold if verify.delta is None else verify.delta
    out_dir = Path(cfg.out_dir)
    summary = DetectSummary(out_dir)

    # 2. Screen this shard's prompts; memorized.parquet once every shard's are screened.
    data = cfg.get("data")
    memorized = run_detect(
        cfg.generations_dir, out_dir, rule, rank=cfg.rank, world_size=cfg.world_size, progress=cfg.progress, write=data is None
    )
    if memorized is None:
        return summary
    summary.prompts, summary.flagged, summary.memorized_table = len(memorized), int(memorized["flagged"].sum()), memorized
    print(f"{summary.flagged} of {len(memorized)} prompts flagged -> {summary.memorized_path}")

    # 3. Verify every prompt's samples against the training set, when one is given.
    if data is None:
        embeddings_dir = embeddings_folder(verify.dedup_dir, verify.embeddings_dir)
        if not has_urls(embeddings_dir):
            print("no training set given (data=...): verification skipped")
            return summary
        # Metadata with URLs but no images (LAION's): list the images verification needs.
        listed = write_download_list(
            memorized,
            cfg.generations_dir,
            embeddings_dir,
            out_dir / DOWNLOAD_LIST,
            EmbedderOnFirstUse(rule.metric, cfg.get("embedder")),
            verify.n_candidates,
            verify.max_candidates,
        )
        print(
            f"no training set given (data=...): verification skipped; the {len(listed)} training images it needs "
            f"for the {len(memorized)} prompts are listed in {out_dir / DOWNLOAD_LIST} (url, caption, key): download "
            "them with img2dataset and rerun with data=<format> data.path=<download> "
            f"data.key_table={out_dir / DOWNLOAD_LIST}"
        )
        return summary
    memorized, extracted = run_verify(
        memorized,
        cfg.generations_dir,
        out_dir,
        data=OmegaConf.to_container(data, resolve=True),
        dedup_dir=verify.dedup_dir,
        embeddings_dir=verify.embeddings_dir,
        embedder_factory=EmbedderOnFirstUse(rule.metric, cfg.get("embedder")),
        n_candidates=verify.n_candidates,
        max_candidates=verify.max_candidates,
        delta=delta,
        exhaustive=verify.exhaustive,
        metric=rule.metric,
        progress=cfg.progress,
    )
    write_prompt_table(memorized, summary.memorized_path)

    # 4. The summary's verification part (the report reads the verification threshold from there).
    counts = record_verification(summary.summary_path, memorized, extracted, delta, rule)
    summary.extracted, summary.samples_matched = counts["extracted"], counts["samples_matched"]
    summary.memorized_table, summary.extracted_pairs = memorized, extracted
    print(
        f"{summary.extracted} of {len(memorized)} prompts extracted: a sample within {delta:g} of one of "
        f"their caption's training images ({summary.samples_matched} samples in all) -> {summary.extracted_path}"
    )
    other = ~memorized["extracted"] & (memorized["samples_matched_other"] > 0)
    if other.any():
        print(
            f"{int(other.sum())} more prompt(s) not extracted have {int(memorized.loc[other, 'samples_matched_other'].sum())} "
            f"sample(s) within {delta:g} of another caption's training image (samples_matched_other; in_group false "
            f"in {EXTRACTED})"
        )
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="detect")
@stage_main("detect")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
