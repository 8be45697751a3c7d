"""Screening: each prompt's samples judged by the near-copy rule, as the detector's executor step.

For each prompt, the samples form a graph with an edge between two samples closer than
``rule.threshold`` under the rule's metric; the prompt is flagged when the largest clique of
that graph has at least ``rule.min_clique`` members (:meth:`pipeline.rule.NearCopyRule.verdict`).
:class:`ScreenPrompts` decides every ready prompt of a generations folder
(:func:`screenable_prompts`), one unit per prompt, and writes ``memorized.parquet`` and
``summary.json`` once all are decided.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.data.rejects import RejectLog
from pipeline.executor import StepContext, Unit
from pipeline.generations import (
    FLAGGED,
    OUT_OF_REACH,
    list_samples,
    load_prompts,
    load_samples,
    prompt_done,
    read_prompts,
    samples_identity,
    stored_rule,
)
from pipeline.io import unsafe_name, write_json, write_parquet
from pipeline.layout import SCREENED, SUMMARY, carried, prompt_columns
from pipeline.rule import NearCopyRule

log = logging.getLogger(__name__)

# Under the detector's folder: each screened prompt's row (<prompt_id>.json) and the step's markers.
PROMPT_RESULTS = "prompts"

MEMORIZED_COLUMNS = [
    "prompt_id",
    "caption",
    "n_samples",
    "n_rejected",
    "clique_size",
    "flagged",
    "members",
    "member_files",
    "representative",
    "representative_file",
    "max_pair_distance",
    "median_pair_distance",
    "clique_exact",
]


def find_memorized(distances: np.ndarray, threshold: float, min_clique: int, max_steps: int | None = None) -> dict[str, Any]:
    """The verdict on one prompt's (n, n) tiled-L2 distances: :meth:`NearCopyRule.verdict`
    under ``threshold`` and ``min_clique``, for callers that hold those two numbers rather than a rule."""
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
        log.warning(
            "prompt %s: the clique search stopped after rule.max_clique_steps=%d; clique_size %d is a lower bound",
            prompt_id,
            rule.max_clique_steps,
            verdict["clique_size"],
        )
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
            pid
            for pid, n in zip(generator_ids, counts)
            if unsafe_name(pid) is None and n == n and prompt_done(generations_dir, pid, int(n))
        }
        waiting = prompts["prompt_id"].isin(set(generator_ids) - complete)
        if waiting.any():
            log.warning(
                "%d of %d prompts in %s are not complete yet (still being generated): not screened this time, "
                "rerun detect when the generator has finished",
                int(waiting.sum()),
                len(prompts),
                generations_dir,
            )
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

    def __init__(
        self,
        generations_dir: Path,
        out_dir: Path,
        prompts: pd.DataFrame,
        generator_table: pd.DataFrame,
        rule: NearCopyRule,
        progress: bool,
    ):
        self.generations_dir = generations_dir
        self.out_dir = out_dir
        self.results_dir = out_dir / PROMPT_RESULTS
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
        return [self.results_dir / SCREENED, self.results_dir / SUMMARY]

    def finish_settings(self) -> dict[str, Any]:
        return {
            "carry": {pid: self.carry.get(pid) for pid in self.captions},
            "generations_dir": str(self.generations_dir.resolve()),
            "other_rule": self.other_rule,
        }

    def finish(self, ctx: StepContext) -> None:
        """Every prompt's row, with ``dup_count`` and ``keys`` from the generator's table (a
        prompt table), and its counts, in the step's own folder: the stage joins verification to
        them and writes ``memorized.parquet`` and ``summary.json`` (:func:`run_detect`)."""
        rows = [json.loads((self.results_dir / f"{unit.name}.json").read_text(encoding="utf-8")) for unit in self.all_units]
        memorized = pd.DataFrame(rows, columns=MEMORIZED_COLUMNS).sort_values("prompt_id", kind="stable").reset_index(drop=True)
        memorized["dup_count"] = [self.carry.get(pid, {}).get("dup_count") for pid in memorized["prompt_id"]]
        memorized["keys"] = [self.carry.get(pid, {}).get("keys") for pid in memorized["prompt_id"]]
        memorized = prompt_columns(memorized)
        write_parquet(memorized, self.results_dir / SCREENED)
        summary = {
            "generations_dir": str(self.generations_dir.resolve()),
            "settings": self.rule.describe(),
            "prompts": len(memorized),
            "flagged": int(memorized["flagged"].sum()),
            "samples": int(memorized["n_samples"].sum()),
            "rejected_samples": int(memorized["n_rejected"].sum()),
            "stopped_under_another_rule": self.other_rule,
        }
        write_json(summary, self.results_dir / SUMMARY)
        log.info("%d of %d prompts flagged", summary["flagged"], len(memorized))
