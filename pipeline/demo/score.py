"""Scoring an audit of the demo model against the demo set's ground truth.

The demo set plants its duplicates, so for every screened prompt we know which original it
captions and how many copies of it the training set holds. A prompt is *planted* when its
original has at least ``planted_min_copies`` copies (the heavy band); the audit should flag
and extract those and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.layout import RunLayout
from pipeline.stats import wilson_interval


def prompt_originals(selected: pd.DataFrame, ground_truth: pd.DataFrame) -> pd.DataFrame:
    """For each selected prompt: the original most of its group's keys copy, and its band.

    Returns columns prompt_id, original_id, band, true_dup_count.
    """
    truth = ground_truth.set_index("key")
    rows = []
    for prompt in selected.itertuples():
        originals = truth.loc[[k for k in prompt.keys if k in truth.index], "original_id"]
        original = originals.mode().iloc[0] if len(originals) else None
        info = truth[truth.original_id == original].iloc[0] if original is not None else None
        rows.append(
            {
                "prompt_id": prompt.prompt_id,
                "original_id": original,
                "band": None if info is None else info.band,
                "true_dup_count": None if info is None else int(info.dup_count),
            }
        )
    return pd.DataFrame(rows)


def _precision_recall(predicted: pd.Series, actual: pd.Series) -> tuple[float | None, float | None]:
    hits = int((predicted & actual).sum())
    precision = hits / int(predicted.sum()) if predicted.any() else None
    recall = hits / int(actual.sum()) if actual.any() else None
    return precision, recall


def score_run(
    run_dir: str | Path, ground_truth: pd.DataFrame, planted_min_copies: int = 100, measured: pd.DataFrame | None = None
) -> tuple[dict, pd.DataFrame]:
    """Precision and recall of flagged and of extracted prompts; and a per-band table.

    A prompt counts as correctly extracted only when its closest training image
    (``best_train_key`` of the detector's verification) is a copy of the prompt's own original.
    ``other`` counts the band's prompts not extracted whose samples reproduce another caption's
    training image (the detector's ``samples_matched_other``).
    The per-band table pools the verified samples of the band's prompts into a reproduction
    rate (samples within the threshold of a training image, with its 95% Wilson interval) and,
    given ``measured`` (``make demo-eval``'s memorization.csv: ``band``, ``reproduced``), puts
    the rate that evaluation measured beside it.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    selected = pd.read_parquet(layout.dedup_selected)
    memorized = pd.read_parquet(layout.memorized)
    verified = "best_train_key" in memorized.columns
    columns = ["prompt_id", "flagged", "clique_size"] + (
        ["best_train_key", "samples_matched", "n_samples", "extracted"] if verified else []
    )
    columns += [c for c in ["samples_matched_other"] if verified and c in memorized.columns]
    table = prompt_originals(selected, ground_truth).merge(memorized[columns], on="prompt_id", how="inner")
    truth = ground_truth.set_index("key")
    if verified:
        own = [
            key in truth.index and truth.loc[key, "original_id"] == original
            for key, original in zip(table["best_train_key"].fillna(""), table["original_id"])
        ]
        table["extracted"] = table["extracted"].fillna(False).astype(bool) & pd.Series(own, index=table.index, dtype=bool)
    else:
        table["extracted"], table["samples_matched"], table["n_samples"] = False, 0, 0
    # Prompts not extracted whose samples reproduce another caption's training image.
    other = (
        table["samples_matched_other"].fillna(0) if "samples_matched_other" in table.columns else pd.Series(0, index=table.index)
    )
    table["other"] = ~table["extracted"] & (other > 0)
    table["planted"] = table.true_dup_count.fillna(0) >= planted_min_copies
    flag_p, flag_r = _precision_recall(table.flagged.astype(bool), table.planted)
    ext_p, ext_r = _precision_recall(table.extracted, table.planted)
    summary = {
        "prompts_screened": len(table),
        "planted_prompts": int(table.planted.sum()),
        "flagged": int(table.flagged.sum()),
        "extracted": int(table.extracted.sum()),
        "flagged_precision": flag_p,
        "flagged_recall": flag_r,
        "extracted_precision": ext_p,
        "extracted_recall": ext_r,
        "planted_min_copies": planted_min_copies,
        "verified": verified,
    }
    per_band = (
        table.groupby(["band", "true_dup_count"], dropna=False)
        .agg(
            prompts=("prompt_id", "size"),
            flagged=("flagged", "sum"),
            extracted=("extracted", "sum"),
            other=("other", "sum"),
            median_clique=("clique_size", "median"),
            matched=("samples_matched", "sum"),
            samples=("n_samples", "sum"),
        )
        .reset_index()
        .sort_values("true_dup_count", ascending=False)
    )
    if verified:
        intervals = [wilson_interval(int(k), int(n)) for k, n in zip(per_band["matched"], per_band["samples"])]
        per_band["reproduction"] = [
            "n/a" if n == 0 else f"{k / n:.2f} [{low:.2f}, {high:.2f}]"
            for k, n, (low, high) in zip(per_band["matched"], per_band["samples"], intervals)
        ]
    if measured is not None and {"band", "reproduced"} <= set(measured.columns):
        rates = measured.groupby("band")["reproduced"].agg(["sum", "size"])
        per_band["demo_eval"] = [
            f"{rates.loc[band, 'sum'] / rates.loc[band, 'size']:.2f} (of {int(rates.loc[band, 'size'])})"
            if band in rates.index
            else "n/a"
            for band in per_band["band"]
        ]
    return summary, per_band.drop(columns=["matched", "samples"])


def format_summary(summary: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{value:.2f}"

    return (
        f"{summary['prompts_screened']} prompts screened, {summary['planted_prompts']} planted "
        f"(>= {summary['planted_min_copies']} copies); flagged {summary['flagged']} "
        f"(precision {pct(summary['flagged_precision'])}, recall {pct(summary['flagged_recall'])}); "
        f"extracted {summary['extracted']} (precision {pct(summary['extracted_precision'])}, "
        f"recall {pct(summary['extracted_recall'])})"
    )
