"""Ranking every prompt's scores together: the robust z, the kept set and the rank.

The ranking compares prompts, so it runs over the score table of every prompt at once (after
every rank has scored its share, :class:`pipeline.prescreen.step.ScorePrompts`), never per shard.
Every robust z is taken against the singleton prompts when the list has at least
``prescreen.reference_singletons`` of them (:func:`pipeline.prescreen.keep.reference_rows`), else
against every prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.prescreen.keep import choose_kept, reference_rows, robust_z
from pipeline.prescreen.scores import strongest_outlier
from pipeline.prescreen.scoring import IMAGE_LEVEL_COLUMN, LEVEL_COLUMN, score_prompts
from pipeline.prescreen.settings import PrescreenSettings
from pipeline.prompts import Prompt


def table_reference(table: pd.DataFrame, settings: PrescreenSettings) -> np.ndarray | None:
    """The rows of ``table`` every robust z is standardised against: its singleton prompts when it
    has at least ``settings.reference_singletons`` of them, else None (every row)
    (:func:`pipeline.prescreen.keep.reference_rows`)."""
    dup_count = table["dup_count"] if "dup_count" in table.columns else [None] * len(table)
    return reference_rows(dup_count, settings.reference_singletons)


def _standardise(reference: np.ndarray | None, minimum: int | None = 1):
    """:func:`robust_z` against ``reference`` (rows of the values standardised), or against every
    row when ``reference`` selects fewer than ``minimum`` of them."""

    def standardise(values: np.ndarray) -> np.ndarray:
        usable = reference is not None and int(reference.sum()) >= max(1, int(minimum or 1))
        return robust_z(values, reference if usable else None)

    return standardise


def text_z(table: pd.DataFrame, settings: PrescreenSettings, reference: np.ndarray | None = None) -> np.ndarray:
    """(rows,) the robust z of the caption-only score (:attr:`PrescreenSettings.caption_score`):
    for ``wen_levels`` the largest of its levels' robust z (:func:`strongest_outlier`), else
    :func:`robust_z` of its column (``score``, or under ``own_images`` ``score_<text_score>``);
    each against the ``reference`` rows (None: every row)."""
    score = settings.caption_score
    if not len(table):
        return np.zeros(0)
    standardise = _standardise(reference)
    if score == "wen_levels":
        norms = np.array([list(row) for row in table[LEVEL_COLUMN]], dtype=np.float64).reshape(len(table), -1)
        return strongest_outlier(norms, standardise)
    return standardise(table["score" if settings.score != "own_images" else f"score_{score}"].to_numpy(dtype=np.float64))


def own_images_z(levels: np.ndarray, reference: np.ndarray | None = None, minimum: int | None = 1) -> np.ndarray:
    """(rows,) the own_images score's robust z: the largest over its levels (columns of ``levels``,
    (rows, levels) log ratios) of :func:`robust_z` over the prompts that have images (rows with no
    NaN), against the ``reference`` rows among them (every one of them when ``reference`` is None
    or selects fewer than ``minimum`` of them); NaN for the others."""
    levels = np.asarray(levels, dtype=np.float64).reshape(len(levels), -1)
    out = np.full(len(levels), np.nan)
    present = ~np.isnan(levels).any(axis=1)
    if present.any():
        within = None if reference is None else np.asarray(reference, dtype=bool)[present]
        out[present] = strongest_outlier(levels[present], _standardise(within, minimum))
    return out


def combined_z(z_text: np.ndarray, z_own: np.ndarray, reference: np.ndarray | None = None, minimum: int | None = 1) -> np.ndarray:
    """(rows,) :func:`robust_z` of ``z_text + z_own`` over the rows that have both (Stouffer's sum:
    a prompt moderately high on both scores stands out; standardised again since the two are
    not independent), against the ``reference`` rows among them (as :func:`own_images_z`); NaN
    where ``z_own`` is."""
    total = np.asarray(z_text, dtype=np.float64) + np.asarray(z_own, dtype=np.float64)
    out = np.full(len(total), np.nan)
    present = ~np.isnan(total)
    if present.any():
        within = None if reference is None else np.asarray(reference, dtype=bool)[present]
        out[present] = _standardise(within, minimum)(total[present])
    return out


def rank_scores(table: pd.DataFrame, settings: PrescreenSettings) -> pd.DataFrame:
    """``table`` (:func:`score_prompts`' columns, in the prompt list's order) with robust_z
    (:func:`robust_z` of the score, against the singleton prompts or every row as
    :func:`table_reference` says; for ``wen_levels``, whose score is already the largest of the
    levels' robust z, the score itself), kept (:func:`choose_kept`, the singleton prompts at
    ``singleton_min_robust_z`` where set) and rank (0 = highest), highest score first (ties in
    the prompt list's order).

    ``own_images``: the score is the largest of the text score's robust z (:func:`text_z`), the
    own_images score's (:func:`own_images_z`) and that of their sum (:func:`combined_z`); the
    text one alone for a prompt with no image. Written also as ``z_text``, ``z_own_images`` and
    ``z_both``; robust_z is the score itself."""
    table = table.copy()
    reference = table_reference(table, settings)
    minimum = settings.reference_singletons
    if settings.score == "wen_levels":
        table["score"] = text_z(table, settings, reference)
    elif settings.score == "own_images":
        table["z_text"] = text_z(table, settings, reference)
        levels = [list(row) if row is not None else [np.nan] for row in table[IMAGE_LEVEL_COLUMN]]
        table["z_own_images"] = (
            own_images_z(np.array(levels, dtype=np.float64), reference, minimum) if len(table) else np.zeros(0)
        )
        table["z_both"] = combined_z(table["z_text"].to_numpy(), table["z_own_images"].to_numpy(), reference, minimum)
        table["score"] = np.fmax(
            np.fmax(table["z_text"].to_numpy(), table["z_own_images"].to_numpy()), table["z_both"].to_numpy()
        )
    # wen_levels' and own_images' scores are already robust z values; standardising again would
    # measure them against the bulk's maxima, not against each score's bulk.
    already_z = settings.score in ("wen_levels", "own_images")
    scores = table["score"].to_numpy(dtype=np.float64)
    table["robust_z"] = scores if already_z else robust_z(scores, reference)
    dup_count = table["dup_count"] if "dup_count" in table.columns else None
    table["kept"] = choose_kept(scores, settings, dup_count, z=table["robust_z"].to_numpy())
    table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(len(table))
    return table


def prescreen(
    pipe,
    prompts: list[Prompt],
    settings: PrescreenSettings,
    progress: bool = True,
    images: Mapping[str, Image.Image] | None = None,
) -> pd.DataFrame:
    """Score and rank ``prompts``; one row per prompt, highest score first.

    Columns: prompt_id, caption, dup_count, score (``settings.score``'s, mean over seeds),
    score_std, score_wen, score_anisotropy, alignment, score_own_images, own_images
    (:func:`score_prompts`; ``images``: training images by key, for ``score=own_images``),
    robust_z (:func:`robust_z` of the score), rank (0 = highest), kept.
    """
    return rank_scores(score_prompts(pipe, prompts, settings, progress, images), settings)
