"""The keep rule: which scored prompts the generator samples.

Scores are one float per prompt (higher: more likely memorized). The rule keeps the top
``keep_top`` (or ``keep_fraction``) of them, and, when set, only those reaching
``score_threshold`` or a robust z-score of ``min_robust_z`` (``singleton_min_robust_z`` for a
singleton prompt, ``dup_count`` 1) (:class:`PrescreenSettings`).

The robust z's scale is that of the unmemorized bulk. Which prompts form it depends on the audit:
a prompt list from the duplicate finder holds its duplicated groups first, and in a short list
they can be a quarter of the prompts, which would move the median and widen the MAD, so that
the same cut would keep fewer outliers in a short list than in a long one. The singleton prompts
(``dup_count`` 1) are the bulk in every list: when the list has at least
``reference_singletons`` of them, every robust z is taken against their median and MAD
(:func:`reference_rows`), so a cut means the same share of unmemorized prompts whatever the share
of duplicated ones; with fewer, against every prompt.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.prescreen.settings import PrescreenSettings


def robust_z(scores: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """How far each score lies above the median, in units of 1.4826 x the median absolute deviation.

    Memorized prompts are rare outliers in a large audit; the median and the MAD describe the
    unmemorized bulk and barely move with the outliers, unlike the mean and the standard
    deviation. ``reference``: a boolean mask (the shape of ``scores``) of the rows whose median
    and MAD set the scale (:func:`reference_rows`); None, or a mask selecting no row: every row.
    Every row is standardised on that scale. Falls back to the mean absolute deviation (x
    1.2533) when more than half of the reference scores are equal; all zeros when every one is.
    Returns float64, the shape of ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    basis = scores
    if reference is not None:
        reference = np.asarray(reference, dtype=bool)
        if reference.shape != scores.shape:
            raise ValueError(f"reference: expected a mask of shape {scores.shape}, got {reference.shape}")
        if reference.any():
            basis = scores[reference]
    centre = np.median(basis)
    deviation = np.abs(basis - centre)
    scale = 1.4826 * np.median(deviation)
    if scale == 0:
        scale = 1.2533 * deviation.mean()
    if scale == 0:
        return np.zeros_like(scores)
    return (scores - centre) / scale


def singleton_rows(dup_count) -> np.ndarray:
    """Boolean (prompts,): the prompts whose duplicate group is a singleton (``dup_count`` 1;
    unknown counts, None or NA, are not)."""
    counts = pd.array(dup_count if dup_count is not None else [], dtype="Float64")
    return np.asarray((counts == 1).fillna(False), dtype=bool)


def reference_rows(dup_count, minimum: int | None) -> np.ndarray | None:
    """The rows a robust z is standardised against (:func:`robust_z`'s ``reference``): the
    singleton prompts (:func:`singleton_rows`) when there are at least ``minimum`` of them
    (``minimum`` at least 1), else None (every row); None also when ``minimum`` is None."""
    if minimum is None:
        return None
    singles = singleton_rows(dup_count)
    return singles if singles.sum() >= max(1, int(minimum)) else None


def choose_kept(scores: np.ndarray, settings: PrescreenSettings, dup_count=None, z: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask (len(scores),) of prompts to keep: the top ``keep_top`` (or ``keep_fraction``)
    by score, and, when ``score_threshold`` / ``min_robust_z`` are set, only those reaching them.

    ``z``: each prompt's robust z (as :func:`pipeline.prescreen.ranking.rank_scores` takes it);
    None: ``score="wen_levels"`` and ``"own_images"`` scores are robust z values already, and the
    others' is :func:`robust_z` over every prompt. A singleton prompt (``dup_count`` 1, see
    :func:`singleton_rows`; ``dup_count`` None: no prompt is one) must reach
    ``singleton_min_robust_z`` when that is set, instead of ``min_robust_z``. A rule that keeps
    nothing by construction (none set, ``keep_fraction`` outside (0, 1], ``keep_top`` below 0)
    raises a ValueError naming the key, for any ``scores``.
    """
    top = settings.keep_top
    if settings.keep_fraction is not None:
        if not 0 < settings.keep_fraction <= 1:
            raise ValueError(f"prescreen.keep_fraction: must be in (0, 1], got {settings.keep_fraction}")
        by_fraction = int(np.ceil(settings.keep_fraction * len(scores)))
        top = by_fraction if top is None else max(top, by_fraction)
    cut, singleton_cut = settings.min_robust_z, settings.singleton_min_robust_z
    if top is None and settings.score_threshold is None and cut is None:
        raise ValueError("prescreen: set keep_top (a count), keep_fraction, score_threshold or min_robust_z")
    if top is not None and top < 0:
        raise ValueError(f"prescreen.keep_top: must be >= 0, got {top}")
    keep = np.ones(len(scores), dtype=bool)
    if top is not None:
        keep[:] = False
        keep[np.argsort(-scores, kind="stable")[:top]] = True
    if settings.score_threshold is not None:
        keep &= scores >= settings.score_threshold
    if cut is not None or singleton_cut is not None:
        if z is None:
            z = scores if settings.score in ("wen_levels", "own_images") else robust_z(scores)
        z = np.asarray(z, dtype=np.float64)
        singles = singleton_rows(dup_count) if dup_count is not None else np.zeros(len(scores), dtype=bool)
        if cut is not None:
            keep[~singles] &= z[~singles] >= cut
        single_cut = singleton_cut if singleton_cut is not None else cut
        if single_cut is not None:
            keep[singles] &= z[singles] >= single_cut
    return keep
