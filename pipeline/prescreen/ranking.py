"""Ranking every prompt's scores together: the robust z, the kept set and the rank.

The ranking compares prompts, so it runs over the score table of every prompt at once (after
every rank has scored its share, :class:`pipeline.prescreen.step.ScorePrompts`), never per shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.prescreen.keep import choose_kept, robust_z
from pipeline.prescreen.scores import strongest_outlier
from pipeline.prescreen.scoring import LEVEL_COLUMN, score_prompts
from pipeline.prescreen.settings import PrescreenSettings
from pipeline.prompts import Prompt


def rank_scores(table: pd.DataFrame, settings: PrescreenSettings) -> pd.DataFrame:
    """``table`` (:func:`score_prompts`' columns, in the prompt list's order) with robust_z
    (:func:`robust_z` of the score over every row; for ``wen_levels``, whose score is already
    the largest of the levels' robust z, the score itself), kept (:func:`choose_kept`) and rank
    (0 = highest), highest score first (ties in the prompt list's order)."""
    table = table.copy()
    if settings.score == "wen_levels":
        norms = np.array([list(row) for row in table[LEVEL_COLUMN]], dtype=np.float64).reshape(len(table), -1)
        table["score"] = strongest_outlier(norms, robust_z) if len(table) else np.zeros(0)
    # wen_levels' score is already a robust z (the largest of the levels'); standardising it again
    # would measure it against the bulk's maxima, not against each level's bulk.
    table["robust_z"] = table["score"].to_numpy() if settings.score == "wen_levels" else robust_z(table.score.to_numpy())
    table["kept"] = choose_kept(table.score.to_numpy(), settings)
    table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(len(table))
    return table


def prescreen(pipe, prompts: list[Prompt], settings: PrescreenSettings, progress: bool = True) -> pd.DataFrame:
    """Score and rank ``prompts``; one row per prompt, highest score first.

    Columns: prompt_id, caption, dup_count, score (``settings.score``'s, mean over seeds),
    score_std, score_wen, score_anisotropy, alignment (:func:`score_prompts`), robust_z
    (:func:`robust_z` of the score), rank (0 = highest), kept.
    """
    return rank_scores(score_prompts(pipe, prompts, settings, progress), settings)
