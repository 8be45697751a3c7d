"""The keep rule: which scored prompts the generator samples.

Scores are one float per prompt (higher: more likely memorized). The rule keeps the top
``keep_top`` (or ``keep_fraction``) of them, and, when set, only those reaching
``score_threshold`` or a robust z-score of ``min_robust_z`` (:class:`PrescreenSettings`).
"""

from __future__ import annotations

import numpy as np

from pipeline.prescreen.settings import PrescreenSettings


def robust_z(scores: np.ndarray) -> np.ndarray:
    """How far each score lies above the median, in units of 1.4826 x the median absolute deviation.

    Memorized prompts are rare outliers in a large audit; the median and the MAD describe the
    unmemorized bulk and barely move with the outliers, unlike the mean and the standard
    deviation. Falls back to the mean absolute deviation (x 1.2533) when more than half of the
    scores are equal; all zeros when every score is. Returns float64, the shape of ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    centred = scores - np.median(scores)
    deviation = np.abs(centred)
    scale = 1.4826 * np.median(deviation)
    if scale == 0:
        scale = 1.2533 * deviation.mean()
    if scale == 0:
        return np.zeros_like(scores)
    return centred / scale


def choose_kept(scores: np.ndarray, settings: PrescreenSettings) -> np.ndarray:
    """Boolean mask (len(scores),) of prompts to keep: the top ``keep_top`` (or ``keep_fraction``)
    by score, and, when ``score_threshold`` / ``min_robust_z`` are set, only those reaching them.

    ``score="wen_levels"`` and ``"own_images"`` scores are robust z values already, compared to
    ``min_robust_z`` as they are. A rule that keeps nothing by construction (none set, ``keep_fraction`` outside
    (0, 1], ``keep_top`` below 0) raises a ValueError naming the key, for any ``scores``.
    """
    top = settings.keep_top
    if settings.keep_fraction is not None:
        if not 0 < settings.keep_fraction <= 1:
            raise ValueError(f"prescreen.keep_fraction: must be in (0, 1], got {settings.keep_fraction}")
        by_fraction = int(np.ceil(settings.keep_fraction * len(scores)))
        top = by_fraction if top is None else max(top, by_fraction)
    if top is None and settings.score_threshold is None and settings.min_robust_z is None:
        raise ValueError("prescreen: set keep_top (a count), keep_fraction, score_threshold or min_robust_z")
    if top is not None and top < 0:
        raise ValueError(f"prescreen.keep_top: must be >= 0, got {top}")
    keep = np.ones(len(scores), dtype=bool)
    if top is not None:
        keep[:] = False
        keep[np.argsort(-scores, kind="stable")[:top]] = True
    if settings.score_threshold is not None:
        keep &= scores >= settings.score_threshold
    if settings.min_robust_z is not None:
        already_z = settings.score in ("wen_levels", "own_images")
        keep &= (scores if already_z else robust_z(scores)) >= settings.min_robust_z
    return keep
