"""How well the prescreen's scores tell heavily duplicated prompts apart: ROC AUCs.

A prompt list from the duplicate finder carries ``dup_count`` (training copies of each
caption's image); prompts with at least ``heavy_dup_count`` copies are the ones expected to be
memorized. Every AUC is in [0, 1] (0.5: no better than chance).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.prescreen.scores import SCORES


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("ROC AUC needs both positive and negative prompts")
    return float(roc_auc_score(positive, scores))


def heavy_prompt_aucs(scores: np.ndarray, dup_counts: np.ndarray, heavy_dup_count: int) -> dict[str, float]:
    """How well ``scores`` tell heavily duplicated prompts (``dup_count >= heavy_dup_count``) apart.

    ``heavy_vs_singletons``: against prompts with one training copy, the prompts in between
    left out (memorization is expected of the first, not of the second);
    ``heavy_vs_rest``: against every other prompt, moderately duplicated ones included (they may
    be memorized too, which lowers it). NaN where a side is empty or ``dup_counts`` has NaN.
    """
    scores, dup_counts = np.asarray(scores, dtype=float), np.asarray(dup_counts, dtype=float)
    out = {"heavy_vs_singletons": float("nan"), "heavy_vs_rest": float("nan")}
    if np.isnan(dup_counts).any():
        return out
    heavy, single = dup_counts >= heavy_dup_count, dup_counts <= 1
    if heavy.any() and single.any():
        both = heavy | single
        out["heavy_vs_singletons"] = roc_auc(scores[both], heavy[both])
    if heavy.any() and not heavy.all():
        out["heavy_vs_rest"] = roc_auc(scores, heavy)
    return out


def score_aucs(table: pd.DataFrame, heavy_dup_count: int, chosen: str | None = None) -> dict[str, float]:
    """ROC AUCs (:func:`heavy_prompt_aucs`) of the ranked score and of each score the table holds.

    Keys ``roc_auc_heavy_vs_singletons`` / ``roc_auc_heavy_vs_rest`` for the ``score`` column
    (the chosen one), ``roc_auc_<wen|anisotropy|own_images>_<side>`` for ``score_wen`` /
    ``score_anisotropy`` / ``score_own_images`` (the last only where every prompt has one),
    ``roc_auc_text_<side>`` for the caption-only part of a ranked ``own_images`` table (``z_text``),
    and ``roc_auc_<chosen>_<side>`` for a ``chosen`` score held only in ``score`` (``wen_levels``);
    only the finite ones (none where ``dup_count`` is unknown or a score was not computed).
    """
    dup_counts = table.dup_count.to_numpy(dtype=float, na_value=np.nan)
    columns = {"": "score", **{f"{name}_": f"score_{name}" for name in SCORES if f"score_{name}" in table.columns}}
    if "z_text" in table.columns:
        columns["text_"] = "z_text"
    if chosen is not None and f"score_{chosen}" not in table.columns:  # a score with no column of its own (wen_levels)
        columns[f"{chosen}_"] = "score"
    out = {}
    for prefix, column in columns.items():
        scores = table[column].to_numpy(dtype=float)
        if np.isnan(scores).any():
            continue
        aucs = heavy_prompt_aucs(scores, dup_counts, heavy_dup_count)
        out.update({f"roc_auc_{prefix}{side}": value for side, value in aucs.items() if not np.isnan(value)})
    return out
