"""The duplicate finder's summary: ``summary.json`` (what the group phase counted, the settings
that decided it, each phase's compute time), its evaluation against a labelled sample, the
:class:`DedupSummary` that :func:`pipeline.dedup.stage.run` returns, and the terminal lines.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.dedup.grouping import evaluate_groups
from pipeline.dedup.records import GroupCounts
from pipeline.dedup.settings import PHASES, DedupSettings
from pipeline.io import write_json
from pipeline.layout import GROUPS, REJECTS, SELECTED, STATS, SUMMARY
from pipeline.text import display_text

# Artifacts listed under "outputs" in summary.json, in this order.
OUTPUTS = (GROUPS, SELECTED, REJECTS, SUMMARY)


@dataclass
class DedupSummary:
    """What one command of the stage did.

    ``report`` is ``summary.json``'s content when this process grouped (phase ``all`` or
    ``group`` on rank 0), else None; ``jobs``: with ``submit=slurm``, each phase's array job id.
    """

    phase: str
    rank: int
    world_size: int
    out_dir: Path
    groups_path: Path
    selected_path: Path
    report: dict | None = None
    jobs: dict[str, str] = field(default_factory=dict)

    @property
    def selected(self) -> int | None:
        """Groups selected for the generator (None: not grouped by this command)."""
        return None if self.report is None else int(self.report["selected"])

    @property
    def duplicate_groups(self) -> int | None:
        return None if self.report is None else int(self.report["duplicate_groups"])


def phase_seconds(out: Path, precomputed: bool, group_seconds: float) -> dict[str, float]:
    """Each phase's compute time summed over ranks (not wall time), from the merged ``stats.json``
    (the embed phase left out for precomputed embeddings, the locate phase otherwise), then ``total``."""
    try:
        stats = json.loads((out / STATS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stats = {}
    stats = stats if isinstance(stats, dict) else {}
    timing = {}
    # Precomputed embeddings: no embed phase, maybe a locate phase; else the embed phase locates.
    for phase in [p for p in PHASES[:-1] if p != ("embed" if precomputed else "locate")]:
        entry = stats.get(phase)
        timing[phase] = float(((entry or {}).get("timers") or {}).get(phase, 0.0)) if isinstance(entry, dict) else 0.0
    timing["group"] = group_seconds
    timing["total"] = sum(timing.values())
    return timing


def build_summary(
    out: Path,
    settings: DedupSettings,
    counts: GroupCounts,
    selected: pd.DataFrame,
    n_pairs: int,
    rejects: Iterable[Mapping[str, Any]],
    embedder: dict,
    index_info: Mapping[str, Any],
    world_size: int,
    timing: dict[str, float],
) -> dict:
    """``summary.json``'s content. ``rejects``: the merged rejects' entries (one may stand for
    several records, ``count``); ``index_info``: the index_0 marker (resolved kind, nlist, nprobe)."""
    largest = selected.head(10) if len(selected) else selected
    reasons: Counter[str] = Counter()
    for entry in rejects:
        reasons[entry.get("reason", "").split(":", 1)[0]] += int(entry.get("count", 1))
    rejected = sum(reasons.values())
    return {
        "records_read": int(counts.records + rejected),
        "records_embedded": int(counts.records),
        "rejected": int(rejected),
        "rejected_by_reason": dict(reasons),
        "pairs": int(n_pairs),
        "groups": int(counts.groups),
        "duplicate_groups": int(counts.duplicate_groups),
        "records_in_duplicate_groups": int(counts.records_in_duplicate_groups),
        "selected": int(len(selected)),
        "largest_groups": [
            {"prompt_id": r.prompt_id, "dup_count": int(r.dup_count), "caption": r.caption, "n_captions": int(r.n_captions)}
            for r in largest.itertuples()
        ],
        "settings": {
            "embedder": embedder,
            "threshold": settings.threshold,
            "k": settings.k,
            "top_k": settings.top_k,
            "min_group_size": settings.min_group_size,
            "index": {
                **settings.index.to_dict(),
                "resolved_kind": index_info.get("kind"),
                "nlist": index_info.get("nlist"),
                "nprobe_used": index_info.get("nprobe"),
            },
            "world_size": world_size,
            "verify": {
                "enabled": settings.verify.enabled,
                "candidate_threshold": settings.verify.candidate_threshold,
                "candidate_neighbours": settings.verify.neighbours,
                "candidate_floor": settings.verify.candidate_floor,
                "pair": settings.verify.pair.to_dict(),
            },
        },
        "timing_seconds": timing,
        "outputs": {name: str(out / name) for name in OUTPUTS},
    }


def evaluation(out: Path, ground_truth: str | Path, selected: pd.DataFrame) -> dict:
    """The groups scored against a labelled sample (``key``, ``original_id``): pair precision and
    recall, and how many selected groups are among the most duplicated originals."""
    groups = pd.read_parquet(out / GROUPS, columns=["key", "group_id"])
    return {"ground_truth": str(ground_truth), **evaluate_groups(groups, pd.read_parquet(ground_truth), selected)}


def stored_summary(out: Path, ground_truth: str | Path | None) -> dict:
    """``summary.json`` of a group phase already done, evaluated against this run's ground truth
    (or none); rewritten when that changes its evaluation."""
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    stored = summary.pop("evaluation", None)
    if ground_truth is not None:
        summary["evaluation"] = evaluation(out, ground_truth, pd.read_parquet(out / SELECTED))
    if summary.get("evaluation") != stored:
        write_json(summary, out / SUMMARY)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [
        f"dedup: {summary['records_read']} records read, {summary['rejected']} rejected"
        + (f" ({', '.join(f'{n} {r}' for r, n in summary['rejected_by_reason'].items())})" if summary["rejected"] else ""),
        f"  {summary['groups']} groups; {summary['duplicate_groups']} with duplicates, holding "
        f"{summary['records_in_duplicate_groups']} records ({summary['pairs']} near-duplicate pairs, "
        f"threshold {summary['settings']['threshold']}, {summary['settings']['index']['resolved_kind']} search)",
    ]
    for group in summary["largest_groups"][:5]:
        lines.append(f"  {display_text(group['prompt_id'], 20)}  x{group['dup_count']:<5d} {display_text(group['caption'], 70)}")
    lines.append(f"  {summary['selected']} groups selected -> {summary['outputs'][SELECTED]}")
    verification = summary.get("verification") or {}
    if verification.get("enabled"):
        lines.append(
            f"  verified: {verification['verified']} of {verification['candidates']} candidate pairs at similarity >= "
            f"{verification['candidate_threshold']:.3f}"
            + (
                f" or among an image's {verification['candidate_neighbours']} nearest at >= {verification['candidate_floor']:.3f}"
                if verification.get("candidate_neighbours")
                else ""
            )
            + f" ({verification['candidates_per_record']:.2f} per record; "
            f"{verification['compared']} compared, {1000 * verification['seconds_per_pair']:.1f} ms per pair)"
        )
    elif verification:
        lines.append(f"  pairs not verified (no images): embedder pairs at similarity >= {verification['threshold']:.3f}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timing_seconds"].items()))
    if "evaluation" in summary:
        ev = summary["evaluation"]
        line = (
            f"  ground truth: pair precision {ev['precision']:.4f}, recall {ev['recall']:.4f} "
            f"({ev['correct_pairs']} of {ev['predicted_pairs']} predicted / {ev['true_pairs']} true pairs)"
        )
        if "top_k_match" in ev:
            line += f"; selected groups among the {summary['selected']} most duplicated: {ev['top_k_match']:.0%}"
        lines.append(line)
    return "\n".join(lines)
