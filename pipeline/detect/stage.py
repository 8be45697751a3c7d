"""Stage 3: flag the prompts whose samples are copies of one image, then verify them.

For each prompt, the samples form a graph with an edge between two samples closer than
``rule.threshold`` under the rule's metric (the paper's tiled L2, or a CLIP cosine distance); a
prompt is flagged when the largest clique of that graph has at least ``rule.min_clique``
members (Carlini et al. 2023: many seeds converging on the same image is the signature of a
memorized training image). The rule (:class:`pipeline.rule.NearCopyRule`) is the one adaptive
sampling and verification use. When a training set is given (``data=``), every sample of every
prompt is then compared with candidate training images (:mod:`pipeline.detect.verify`), through
the same metric: a prompt is *extracted* when a sample reproduces one of its caption's
(its duplicate group's; any, for a prompt listed without one).

    python -m pipeline.detect run_name=demo                 # reads <run_dir>/generations
    python -m pipeline.detect generations_dir=/elsewhere data=files data.path=/laion

Outputs in ``<run_dir>/detect/``: ``memorized.parquet`` (a row per prompt: the clique verdict
and, when a training set is given, ``extracted``, ``samples_matched``, ``reproduction_rate``
with its 95% Wilson interval, ``samples_matched_other`` (samples reproducing only other captions'
training images) and the best match), ``extracted.parquet`` (a row per sample and
training image within the threshold) and ``matches/`` (when a training set is given), ``summary.json``, ``rejects.jsonl`` (unreadable
samples; ``rejects_<rank>.jsonl`` per shard), and per-prompt results under ``prompts/`` so that
a rerun skips finished prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.cli import CONF_DIR, config_int, config_number, stage_main
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.embedders.base import Embedder
from pipeline.executor import StepContext, Unit, run_step
from pipeline.generations import (
    FLAGGED,
    OUT_OF_REACH,
    PROMPTS_FILE,
    list_samples,
    load_prompts,
    load_samples,
    prompt_done,
    read_prompts,
    samples_identity,
    stored_rule,
)
from pipeline.io import unsafe_name, write_json, write_parquet
from pipeline.layout import carried, prompt_columns, write_prompt_table
from pipeline.rule import NearCopyRule, rule_from_config

log = logging.getLogger(__name__)

MEMORIZED_COLUMNS = [
    "prompt_id", "caption", "n_samples", "n_rejected", "clique_size", "flagged", "members",
    "member_files", "representative", "representative_file", "max_pair_distance",
    "median_pair_distance", "clique_exact",
]  # fmt: skip


def find_memorized(distances: np.ndarray, threshold: float, min_clique: int, max_steps: int | None = None) -> dict[str, Any]:
    """The verdict on one prompt's (n, n) tiled-L2 distances: :meth:`NearCopyRule.verdict`
    under ``threshold`` and ``min_clique`` (kept for callers of the earlier API)."""
    options = {} if max_steps is None else {"max_clique_steps": max_steps}
    return NearCopyRule(threshold=threshold, min_clique=min_clique, **options).verdict(distances)


def detect_prompt(
    generations_dir: str | Path,
    prompt_id: str,
    caption: str,
    rule: NearCopyRule,
    rejects: RejectLog | None = None,
) -> dict[str, Any]:
    """Read one prompt's samples and decide with ``rule``; returns its row of ``memorized.parquet``.

    Samples that cannot be read are skipped and recorded in ``rejects``."""
    rejects = rejects if rejects is not None else RejectLog()
    before = len(rejects)
    listed = list_samples(generations_dir, prompt_id, rejects)
    samples, images = load_samples(generations_dir, listed, rejects)
    verdict = rule.verdict(rule.distances(images) if images else np.zeros((0, 0)))
    if not verdict["clique_exact"]:
        log.warning("prompt %s: the clique search stopped after rule.max_clique_steps=%d; clique_size %d is a lower bound",
                    prompt_id, rule.max_clique_steps, verdict["clique_size"])
    positions = verdict.pop("members")
    position = verdict.pop("representative")
    return {
        "prompt_id": prompt_id,
        "caption": caption,
        "n_samples": len(samples),
        "n_rejected": len(rejects) - before,
        **verdict,
        "members": [samples[i].index for i in positions],
        "member_files": [samples[i].file for i in positions],
        "representative": samples[position].index if position >= 0 else -1,
        "representative_file": samples[position].file if position >= 0 else "",
    }


def screenable_prompts(generations_dir: Path, rejects: RejectLog | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prompts of a generations folder that are ready to screen: (prompt_id, caption), and
    the generator's prompt table as read (empty for folders without one).

    For the generator's folders, first union its shard files (in memory: the folder is an
    input, never written; the shards may still be running), then keep only prompts with a
    completion marker: a prompt still being sampled would be screened on part of its samples.
    Folders of other tools (no shard files, no markers) are read whole.
    """
    # The generations folder is read-only here: the union of the shard files is made in memory.
    table = load_prompts(generations_dir, write=False)
    # Checks the folder and the table, with clear errors; unsafe prompt ids go to ``rejects``.
    prompts = read_prompts(generations_dir, rejects, table=table)
    if (generations_dir / ".done").is_dir() and {"prompt_id", "n_samples"} <= set(table.columns):
        generator_ids = table["prompt_id"].astype(str)
        counts = pd.to_numeric(table["n_samples"], errors="coerce")
        complete = {
            pid for pid, n in zip(generator_ids, counts)
            if unsafe_name(pid) is None and n == n and prompt_done(generations_dir, pid, int(n))
        }  # fmt: skip
        waiting = prompts["prompt_id"].isin(set(generator_ids) - complete)
        if waiting.any():
            log.warning("%d of %d prompts in %s are not complete yet (still being generated): not screened this time, "
                        "rerun detect when the generator has finished", int(waiting.sum()), len(prompts), generations_dir)
            prompts = prompts[~waiting].reset_index(drop=True)
    return prompts, table


def stopped_under_another_rule(prompts_table: pd.DataFrame, rule: NearCopyRule) -> list[str]:
    """Prompts that adaptive sampling stopped on a verdict it took under another rule than ``rule``.

    A stop "flagged" or "out_of_reach" (:mod:`pipeline.generate.adaptive`) cannot change the detector's
    verdict only when both judge near-copies alike: the rule stored with the stop (the
    generator's ``adaptive`` column) must be this one (:meth:`NearCopyRule.matches`: metric and
    its parameters, threshold, clique size and search budget). A prompt judged otherwise, or
    whose stored rule cannot be read, may deserve the samples it was spared; these are its
    ids (sorted).
    """
    if not {"prompt_id", "stop_reason", "adaptive"} <= set(prompts_table.columns):
        return []
    ids = set()
    for prompt_id, reason, adaptive in zip(prompts_table["prompt_id"], prompts_table["stop_reason"], prompts_table["adaptive"]):
        if reason not in (FLAGGED, OUT_OF_REACH) or not isinstance(adaptive, (str, dict)) or unsafe_name(str(prompt_id)):
            continue
        if not rule.matches(stored_rule(adaptive)):
            ids.add(str(prompt_id))
    return sorted(ids)


class ScreenPrompts:
    """The detector's step for the executor: one unit per prompt (prompt ``i``, in prompt id
    order, belongs to shard ``i % world_size``), decided anew when the rule, the caption or the
    prompt's sample files change: their names and the digests of their bytes (a generator run
    with a larger ``n_samples`` adds files; a regenerated folder replaces them). Its finish
    writes ``memorized.parquet`` and ``summary.json`` once every prompt is screened."""

    name = "detect"

    def __init__(self, generations_dir: Path, out_dir: Path, prompts: pd.DataFrame, generator_table: pd.DataFrame,
                 rule: NearCopyRule, progress: bool):  # fmt: skip
        self.generations_dir = generations_dir
        self.out_dir = out_dir
        self.results_dir = out_dir / "prompts"
        self.captions = dict(zip(prompts["prompt_id"], prompts["caption"]))
        self.rule = rule
        self.progress = progress
        # What the finish carries from the generator's table (dup_count, keys), by prompt id.
        self.carry = carried(generator_table) if {"prompt_id", "caption"} <= set(generator_table.columns) else {}
        self.other_rule = stopped_under_another_rule(generator_table, rule)
        described = rule.describe()
        self.all_units = [
            Unit(pid, {"rule": described, "caption": caption, "files": samples_identity(generations_dir, pid)})
            for pid, caption in self.captions.items()
        ]

    def units(self) -> list[Unit]:
        return self.all_units

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        for unit in tqdm(units, desc=f"detect [{ctx.rank}/{ctx.world_size}]", unit="prompt", disable=not self.progress):
            result = detect_prompt(self.generations_dir, unit.name, self.captions[unit.name], self.rule, ctx.rejects)
            write_json(result, self.results_dir / f"{unit.name}.json")
            ctx.stat("samples", result["n_samples"])
            ctx.done(unit)

    def outputs(self) -> list[Path]:
        return [self.out_dir / "memorized.parquet", self.out_dir / "summary.json"]

    def finish_settings(self) -> dict[str, Any]:
        return {"carry": {pid: self.carry.get(pid) for pid in self.captions}, "generations_dir": str(self.generations_dir.resolve()),
                "other_rule": self.other_rule}  # fmt: skip

    def finish(self, ctx: StepContext) -> None:
        """Every prompt's row, with ``dup_count`` and ``keys`` from the generator's table, as
        ``memorized.parquet`` (a prompt table), and the counts in ``summary.json``."""
        rows = [json.loads((self.results_dir / f"{unit.name}.json").read_text(encoding="utf-8")) for unit in self.all_units]
        memorized = pd.DataFrame(rows, columns=MEMORIZED_COLUMNS).sort_values("prompt_id", kind="stable").reset_index(drop=True)
        memorized["dup_count"] = [self.carry.get(pid, {}).get("dup_count") for pid in memorized["prompt_id"]]
        memorized["keys"] = [self.carry.get(pid, {}).get("keys") for pid in memorized["prompt_id"]]
        memorized = prompt_columns(memorized)
        write_parquet(memorized, self.out_dir / "memorized.parquet")
        summary = {
            "generations_dir": str(self.generations_dir.resolve()), "settings": self.rule.describe(), "prompts": len(memorized),
            "flagged": int(memorized["flagged"].sum()), "samples": int(memorized["n_samples"].sum()),
            "rejected_samples": int(memorized["n_rejected"].sum()), "stopped_under_another_rule": self.other_rule,
        }  # fmt: skip
        write_json(summary, self.out_dir / "summary.json")
        log.info("%d of %d prompts flagged; wrote %s", summary["flagged"], len(memorized), self.out_dir / "memorized.parquet")


def run_detect(
    generations_dir: str | Path,
    out_dir: str | Path,
    rule: NearCopyRule,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> pd.DataFrame | None:
    """Screen this shard's prompts with ``rule``; once every shard is done, ``memorized.parquet``.

    Runs through the stage executor (:mod:`pipeline.executor`): each finished prompt is stored
    as ``<out_dir>/prompts/<prompt_id>.json`` with a completion marker, so a rerun skips it
    (and decides again when the rule or its samples changed). The step's finish, run by the
    shard that completes the last prompt, writes ``memorized.parquet`` (a prompt table:
    ``dup_count`` and ``keys`` come with each prompt from the generator's table, by
    ``prompt_id``) and ``summary.json``; the executor merges ``rejects.jsonl`` and ``stats.json``.

    Returns:
        The ``memorized.parquet`` table when all prompts are done, else ``None``.
    """
    rank, world_size = check_shard(rank, world_size)
    generations_dir, out_dir = Path(generations_dir), Path(out_dir)
    # Every shard reads the whole prompt table; rank 0 alone records the ids it skips (in its
    # reject file, which lists each once across reruns).
    id_rejects = RejectLog(out_dir / "rejects" / "rejects_0.jsonl", once=True) if rank == 0 else None
    prompts, generator_table = screenable_prompts(generations_dir, id_rejects)
    if prompts.empty:
        raise ValueError(
            f"generations_dir: no prompts ready to screen in {generations_dir} (no sub-folders, no {PROMPTS_FILE}, "
            "or every prompt still being generated)"
        )
    step = ScreenPrompts(generations_dir, out_dir, prompts, generator_table, rule, progress)
    if step.other_rule:
        log.warning(
            "%d prompt(s) were stopped by adaptive sampling on a verdict taken with another near-copy rule than this "
            "detector's (%s), e.g. %s: their verdicts here may differ from a full run's; rerun the generator without "
            "adaptive sampling (or with the detector's rule) to complete them",
            len(step.other_rule), json.dumps(rule.describe()), step.other_rule[0],
        )  # fmt: skip
    ctx = run_step(step, step.results_dir, rank=rank, world_size=world_size, progress=progress, logs_dir=out_dir)
    if not ctx.all_done:
        log.info("not every prompt is screened yet (other shards); memorized.parquet is written by the shard "
                 "that finishes last, or by a rerun with world_size=1")
        return None
    return pd.read_parquet(out_dir / "memorized.parquet")


def run(cfg: DictConfig) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The stage from its Hydra config: screen, then verify when ``data`` is given.

    Returns (memorized, extracted); memorized is None while other shards are unfinished,
    extracted is None without a training set.
    """
    from pipeline.detect.verify import run_verify

    # The near-copy rule every stage shares (conf/rule.yaml, conf/metric/); metric=clip builds
    # the embedder here, which the embedding index of verification then shares.
    rule = rule_from_config(cfg)
    embedder_cfg = cfg.get("embedder")
    embedders: list[Embedder] = [rule.metric.embedder] if isinstance(getattr(rule.metric, "embedder", None), Embedder) else []

    def get_embedder() -> Embedder | None:
        """Instantiated on first use only: the tiled L2 path needs no embedder."""
        if not embedders and embedder_cfg is not None:
            embedders.append(hydra.utils.instantiate(embedder_cfg))
        return embedders[0] if embedders else None

    # Read before screening, which may take hours: a wrong value is reported at once.
    n_candidates = config_int(cfg, "verify.n_candidates", minimum=0)
    max_candidates = config_int(cfg, "verify.max_candidates", minimum=1)
    delta = config_number(cfg, "verify.delta", minimum=0, optional=True)
    delta = rule.threshold if delta is None else delta
    out_dir = Path(cfg.out_dir)
    memorized = run_detect(cfg.generations_dir, out_dir, rule, rank=cfg.rank, world_size=cfg.world_size, progress=cfg.progress)
    if memorized is None:
        return None, None
    print(f"{int(memorized['flagged'].sum())} of {len(memorized)} prompts flagged -> {out_dir / 'memorized.parquet'}")
    data = cfg.get("data")
    if data is None:
        print("no training set given (data=...): verification skipped")
        return memorized, None
    memorized, extracted = run_verify(
        memorized, cfg.generations_dir, out_dir, data=OmegaConf.to_container(data, resolve=True),
        dedup_dir=cfg.verify.dedup_dir, embedder_factory=get_embedder, n_candidates=n_candidates,
        max_candidates=max_candidates, delta=delta, exhaustive=cfg.verify.exhaustive, metric=rule.metric,
        progress=cfg.progress,
    )  # fmt: skip
    write_prompt_table(memorized, out_dir / "memorized.parquet")
    # The report reads the verification threshold from here, not from verification's own files.
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    verification = {
        "delta": delta, "metric": rule.metric.describe(), "extracted": int(memorized["extracted"].sum()),
        "samples_matched": int(memorized["samples_matched"].sum()), "pairs": len(extracted),
        "samples_matched_other": int(memorized["samples_matched_other"].sum()),
    }  # fmt: skip
    write_json({**summary, "verification": verification}, summary_path)
    print(f"{int(memorized['extracted'].sum())} of {len(memorized)} prompts extracted: a sample within {delta:g} of one of "
          f"their caption's training images ({int(memorized['samples_matched'].sum())} samples in all) -> {out_dir / 'extracted.parquet'}")
    other = ~memorized["extracted"] & (memorized["samples_matched_other"] > 0)
    if other.any():
        print(f"{int(other.sum())} more prompt(s) not extracted have {int(memorized.loc[other, 'samples_matched_other'].sum())} "
              f"sample(s) within {delta:g} of another caption's training image (samples_matched_other; in_group false "
              "in extracted.parquet)")  # fmt: skip
    return memorized, extracted


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="detect")
@stage_main("detect")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
