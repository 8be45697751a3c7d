"""What screening saves and what it misses: UNet evaluations against brute-force sampling.

Brute force (Carlini et al. 2023) gives every prompt ``n_samples`` samples of ``steps``
denoising steps; a step is one UNet evaluation per image, two with classifier-free guidance
(``guidance_scale > 1``: a conditional and an unconditional one). The shortcuts:

* the prescreen (:mod:`pipeline.prescreen`) scores every prompt with one conditional UNet
  evaluation per seed (plus one unconditional evaluation per seed, shared by all prompts) and
  keeps only the top ones for sampling;
* adaptive sampling (:mod:`pipeline.generate.adaptive`) stops a prompt after its first round(s) unless
  its samples so far look like a forming clique, and (optionally) as soon as the detector's
  verdict on it is decided, as soon as a sample reproduces one of its training images
  ("extracted"), or once a clique is unlikely to complete ("unlikely", a heuristic). The last
  two take verdicts on fewer samples than the budget: the report lists those prompts.

The functions here are pure (numbers and DataFrames in, a JSON-ready dict out);
:func:`write_generation_budget` is the file-reading edge the generator calls at the end of a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.generations import EXTRACTED, FLAGGED, OUT_OF_REACH, UNLIKELY
from pipeline.io import write_json
from pipeline.layout import BUDGET

BUDGET_FILE = BUDGET


def evaluations_per_sample(steps: int, guidance_scale: float) -> int:
    """UNet evaluations one sample costs: ``steps``, twice that with classifier-free guidance."""
    return int(steps) * (2 if float(guidance_scale) > 1.0 else 1)


def brute_force_evaluations(n_prompts: int, n_samples: int, steps: int, guidance_scale: float) -> int:
    """``n_prompts * n_samples * steps * (2 if guidance_scale > 1 else 1)``."""
    return int(n_prompts) * int(n_samples) * evaluations_per_sample(steps, guidance_scale)


def prescreen_evaluations(n_prompts: int, seeds: int) -> int:
    """The prescreen's cost: a conditional evaluation per prompt and seed, and one unconditional
    evaluation per seed (the same for every prompt, since every prompt sees the same noise)."""
    return (int(n_prompts) + 1) * int(seeds) if int(n_prompts) > 0 else 0


def generation_budget(prompts: pd.DataFrame, prescreen: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """UNet evaluations a generations folder cost, against brute force on the same prompts.

    Args:
        prompts: the generator's prompt table (``prompts.parquet``): per prompt ``n_samples``
            (the budget), ``steps``, ``guidance_scale`` (or, where recorded, the family's
            ``evaluations_per_step``: 2 under classifier-free guidance, 1 for FLUX) and, from adaptive-aware runs,
            ``n_generated`` and ``stopped_early`` (without them every prompt counts as fully
            sampled).
        prescreen: when these prompts were kept by a prescreen, its ``prompts`` (how many it
            scored: brute force would have sampled all of them) and ``unet_evaluations``.

    Returns:
        A dict: ``prompts`` (brute force's prompt count), ``prompts_sampled``,
        ``prompts_stopped_early`` (no sign of memorization), ``prompts_stopped_flagged`` (stopped
        once a clique was found), ``prompts_stopped_out_of_reach`` (stopped once the budget left
        could no longer complete a clique), ``prompts_stopped_extracted`` (stopped once a sample
        reproduced one of the prompt's training images), ``prompts_stopped_unlikely`` (stopped
        once a clique was unlikely to complete), ``fewer_samples`` (the ids of the prompts of
        those two stops, sorted: their verdicts were taken on fewer samples than the budget, so
        their clique size and reproduction rate are those of the samples made), ``samples``, ``samples_brute_force``,
        ``generation_evaluations``, ``prescreen_evaluations``, ``unet_evaluations`` (their
        sum), ``brute_force_evaluations`` and ``fraction`` (spent / brute force; NaN when
        brute force costs nothing).
    """
    if len(prompts) and not {"n_samples", "steps", "guidance_scale"} <= set(prompts.columns):
        raise ValueError("prompts table: needs n_samples, steps and guidance_scale columns (the generator's prompts.parquet)")
    n_sampled = len(prompts)
    if n_sampled:
        budget = prompts["n_samples"].astype(int)
        made = prompts["n_generated"].fillna(budget).astype(int) if "n_generated" in prompts.columns else budget
        # The generator records its family's evaluations per step (FLUX: one, whatever the
        # guidance scale); tables from before that column follow the guidance scale.
        recorded = prompts["evaluations_per_step"] if "evaluations_per_step" in prompts.columns else [None] * n_sampled
        per_sample = [
            evaluations_per_sample(s, g) if e is None or pd.isna(e) else int(s) * int(e)
            for s, g, e in zip(prompts["steps"], prompts["guidance_scale"], recorded)
        ]
        per_sample = pd.Series(per_sample, index=prompts.index)
        stopped = int(prompts["stopped_early"].fillna(False).astype(bool).sum()) if "stopped_early" in prompts.columns else 0
        reasons = prompts["stop_reason"] if "stop_reason" in prompts.columns else pd.Series(dtype=object)
        flagged_early, out_of_reach = int((reasons == FLAGGED).sum()), int((reasons == OUT_OF_REACH).sum())
        extracted, unlikely = int((reasons == EXTRACTED).sum()), int((reasons == UNLIKELY).sum())
        ids = prompts["prompt_id"] if "prompt_id" in prompts.columns else pd.Series(prompts.index, index=prompts.index)
        fewer = sorted(str(p) for p in ids[reasons.isin([EXTRACTED, UNLIKELY]).to_numpy()]) if len(reasons) else []
    else:
        budget = made = per_sample = pd.Series(dtype=int)
        stopped = flagged_early = out_of_reach = extracted = unlikely = 0
        fewer = []
    spent = int((made * per_sample).sum())
    brute = int((budget * per_sample).sum())
    samples_brute = int(budget.sum())
    n_prompts = n_sampled
    screened = 0
    if prescreen is not None:
        n_prompts = int(prescreen["prompts"])
        if n_prompts < n_sampled:
            raise ValueError(f"prescreen: it scored {n_prompts} prompts, fewer than the {n_sampled} sampled")
        screened = int(prescreen["unet_evaluations"])
        dropped = n_prompts - n_sampled
        if dropped and n_sampled:
            # The dropped prompts would have been sampled like the kept ones (one recipe per run).
            samples_brute += dropped * int(budget.max())
            brute += dropped * int((budget * per_sample).max())
    total = spent + screened
    return {
        "prompts": n_prompts,
        "prompts_sampled": n_sampled,
        "prompts_stopped_early": stopped,
        "prompts_stopped_flagged": flagged_early,
        "prompts_stopped_out_of_reach": out_of_reach,
        "prompts_stopped_extracted": extracted,
        "prompts_stopped_unlikely": unlikely,
        "fewer_samples": fewer,
        "samples": int(made.sum()),
        "samples_brute_force": samples_brute,
        "generation_evaluations": spent,
        "prescreen_evaluations": screened,
        "unet_evaluations": total,
        "brute_force_evaluations": brute,
        "fraction": total / brute if brute else float("nan"),
    }


def _ids(frame: pd.DataFrame, column: str, on: str) -> tuple[set[str], set[str]]:
    """(ids listed, ids where ``column`` is true) of a prompt table."""
    listed = set(frame[on].astype(str))
    true = set(frame.loc[frame[column].fillna(False).astype(bool), on].astype(str))
    return listed, true


def missed_by_shortcuts(
    memorized: pd.DataFrame,
    prescreen: pd.DataFrame | None = None,
    adaptive: pd.DataFrame | None = None,
    on: str = "prompt_id",
) -> dict[str, Any]:
    """Of the prompts a brute-force run found, those each shortcut would have missed.

    A prompt is found when flagged or, where the brute-force run was verified (an ``extracted``
    column), extracted.

    Args:
        memorized: the brute-force run's ``memorized.parquet`` (``prompt_id``, ``flagged`` and,
            when verified, ``extracted``).
        prescreen: a prescreen table over those prompts (``prompt_id``, ``kept``): a flagged
            prompt it did not keep is missed.
        adaptive: adaptive sampling's outcome per prompt (``prompt_id``, ``stopped_early`` and,
            when known, ``stop_reason``), e.g. an adaptive run's ``prompts.parquet``: a found
            prompt stopped for any reason but "flagged" or "extracted" (a sample reproduced one
            of its training images: it is found) is missed (an "out_of_reach" stop can only miss
            a flagged one when the detector ran with another threshold or clique size, or an
            extracted one whose match comes later; an "unlikely" stop is a heuristic).
        on: the column that names a prompt in all three tables.

    Returns:
        ``{"flagged": n, "flagged_ids": [...], "extracted_ids": [...], "found": n, "prescreen":
        {...}, "adaptive": {...}, "both": {...}}`` (``found``: flagged or extracted) where each
        shortcut's entry has ``missed`` and ``unknown`` (found prompts the table does not list)
        as sorted id lists, their counts ``n_missed``/``n_unknown`` and ``recall`` (the share of
        found prompts known to be kept; NaN when nothing was found). A shortcut whose table is
        not given is left out; ``both`` needs both tables.
    """
    if not {on, "flagged"} <= set(memorized.columns):
        raise ValueError(f"memorized table: needs {on} and flagged columns (detect's memorized.parquet)")
    flagged_only = set(memorized.loc[memorized["flagged"].astype(bool), on].astype(str))
    extracted = (
        set(memorized.loc[memorized["extracted"].fillna(False).astype(bool), on].astype(str))
        if "extracted" in memorized.columns
        else set()
    )
    flagged = flagged_only | extracted  # what brute force found
    outcome: dict[str, Any] = {
        "flagged": len(flagged_only),
        "flagged_ids": sorted(flagged_only),
        "extracted_ids": sorted(extracted),
        "found": len(flagged),
    }
    verdicts: dict[str, tuple[set[str], set[str]]] = {}  # shortcut -> (missed, unknown)
    if prescreen is not None:
        listed, kept = _ids(prescreen, "kept", on)
        verdicts["prescreen"] = ((flagged & listed) - kept, flagged - listed)
    if adaptive is not None:
        listed, stopped = _ids(adaptive, "stopped_early", on)
        if "stop_reason" in adaptive.columns:
            short = adaptive["stop_reason"].notna() & ~adaptive["stop_reason"].isin([FLAGGED, EXTRACTED])
            stopped |= set(adaptive.loc[short, on].astype(str))
        verdicts["adaptive"] = (flagged & stopped, flagged - listed)
    if prescreen is not None and adaptive is not None:
        missed = verdicts["prescreen"][0] | verdicts["adaptive"][0]
        verdicts["both"] = (missed, (verdicts["prescreen"][1] | verdicts["adaptive"][1]) - missed)
    for name, (missed, unknown) in verdicts.items():
        outcome[name] = {
            "missed": sorted(missed),
            "unknown": sorted(unknown),
            "n_missed": len(missed),
            "n_unknown": len(unknown),
            "recall": (len(flagged) - len(missed) - len(unknown)) / len(flagged) if flagged else float("nan"),
        }
    return outcome


def format_budget(report: Mapping[str, Any]) -> str:
    """One line for the console, e.g. ``budget: 12,800 UNet evaluations of 64,000 brute force (20.0%) ...``."""
    line = (
        f"budget: {report['unet_evaluations']:,} UNet evaluations of {report['brute_force_evaluations']:,} "
        f"brute force ({100 * report['fraction']:.1f}%); {report['samples']:,} of {report['samples_brute_force']:,} "
        f"samples, {report['prompts_sampled']} of {report['prompts']} prompts sampled, "
        f"{report['prompts_stopped_early']} stopped early"
    )
    if report.get("prompts_stopped_flagged"):
        line += f", {report['prompts_stopped_flagged']} stopped once flagged"
    if report.get("prompts_stopped_out_of_reach"):
        line += f", {report['prompts_stopped_out_of_reach']} once a clique was out of reach"
    if report.get("prompts_stopped_extracted"):
        line += f", {report['prompts_stopped_extracted']} once extracted"
    if report.get("prompts_stopped_unlikely"):
        line += f", {report['prompts_stopped_unlikely']} once a clique was unlikely"
    fewer = report.get("fewer_samples")
    if fewer:
        shown = ", ".join(fewer[:10]) + (f" and {len(fewer) - 10} more" if len(fewer) > 10 else "")
        line += f" (verdicts on fewer samples than the budget: {shown})"
    if report.get("prescreen_evaluations"):
        line += f"; prescreen {report['prescreen_evaluations']:,}"
    missed = report.get("missed")
    if missed:
        parts = [
            f"{name} missed {missed[name]['n_missed']}"
            + (f" (+{missed[name]['n_unknown']} unknown)" if missed[name]["n_unknown"] else "")
            for name in ("prescreen", "adaptive", "both")
            if name in missed
        ]
        found = missed.get("found", missed["flagged"])
        what = "flagged or extracted" if missed.get("extracted_ids") else "flagged"
        line += f"\nof the {found} prompts brute force {what}: " + ", ".join(parts)
    return line


def prescreen_files_for(prompts_path: str | Path) -> tuple[dict | None, pd.DataFrame | None]:
    """The prescreen summary and table beside a prescreen's ``selected[_NNNNN].parquet``, if that
    is what the generator read its prompts from; (None, None) otherwise."""
    path = Path(prompts_path)
    if not path.name.startswith("selected") or path.suffix != ".parquet":
        return None, None
    suffix = path.stem.removeprefix("selected")
    summary_path = path.with_name(f"summary{suffix}.json")
    table_path = path.with_name(f"prescreen{suffix}.parquet")
    if not summary_path.is_file():
        return None, None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if "unet_evaluations" not in summary or "prompts" not in summary:
        return None, None  # a duplicate finder's summary, not a prescreen's
    return summary, pd.read_parquet(table_path) if table_path.is_file() else None


def write_generation_budget(
    out_dir: str | Path,
    prompts: pd.DataFrame,
    prompts_path: str | Path | None = None,
    brute_force_memorized: str | Path | None = None,
) -> dict[str, Any]:
    """Compute the budget of a generations folder and write ``<out_dir>/budget.json``; returns it.

    ``prompts_path`` is what the generator read (a prescreen's ``selected.parquet`` brings its
    cost and table in); ``brute_force_memorized`` a brute-force run's ``memorized.parquet`` to
    count the flagged prompts the shortcuts would have missed.
    """
    summary, table = prescreen_files_for(prompts_path) if prompts_path is not None else (None, None)
    report = generation_budget(prompts, summary)
    if brute_force_memorized:
        path = Path(brute_force_memorized)
        if not path.is_file():
            raise ValueError(f"budget.brute_force_memorized: no such file {str(path)!r} (a detect run's memorized.parquet)")
        # Adaptive sampling's verdicts only where it ran (its settings are recorded per prompt).
        ran = "stopped_early" in prompts.columns and "adaptive" in prompts.columns and prompts["adaptive"].notna().any()
        adaptive = prompts[prompts["adaptive"].notna()] if ran else None
        report["missed"] = missed_by_shortcuts(pd.read_parquet(path), table, adaptive)
    write_json(report, Path(out_dir) / BUDGET_FILE)
    return report
