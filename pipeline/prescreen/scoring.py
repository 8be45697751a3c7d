"""Scoring prompts with the denoiser: the prescreen's model math.

For each prompt and seed, the denoiser's conditional and unconditional predictions at the
pipeline's initial noise x_T (prepared per family by :mod:`pipeline.prescreen.denoisers`) give
the scores of :mod:`pipeline.prescreen.scores`. Cost, in denoiser evaluations (one image each):
``(prompts + 1) * seeds`` per timestep evaluated (:func:`unet_evaluations`): the unconditional
prediction at x_T is shared by every prompt.

:func:`score_prompts` gives a rank's raw score table (:func:`score_table`'s columns);
:func:`pipeline.prescreen.ranking.rank_scores` ranks the table of every prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.budget import prescreen_evaluations
from pipeline.prescreen.denoisers import Conditioning, denoiser_for
from pipeline.prescreen.own_images import chosen_keys, image_evaluations, own_image_errors, own_image_score
from pipeline.prescreen.scores import (
    SCORES,
    anisotropy_score,
    conditional_difference_norm,
    guidance_alignment,
    level_indexes,
    low_noise_timestep,
)
from pipeline.prescreen.settings import PrescreenSettings
from pipeline.prompts import Prompt

# The per-prompt numbers of a score table, after prompt_id, caption and dup_count, and the
# per-level norms of score=wen_levels (a list per prompt; null under the other scores).
# score_own_images and own_images: the own_images score (log ratio, mean over its levels) and the
# number of the prompt's training images it was taken on (NaN and 0 under the other scores);
# IMAGE_LEVEL_COLUMN: its log ratio at each of image_levels (a list per prompt; null under the
# other scores, NaN entries for a prompt with no image).
SCORE_COLUMNS = ("score", "score_std", "score_wen", "score_anisotropy", "alignment", "score_own_images", "own_images")
LEVEL_COLUMN = "level_norms"
IMAGE_LEVEL_COLUMN = "own_image_levels"


def latent_shape(pipe, height: int | None, width: int | None) -> tuple[int, int, int]:
    """(channels, h, w) of a UNet pipeline's initial latents at the requested image size (for any
    family: :meth:`pipeline.prescreen.denoisers.Denoiser.latent_shape`)."""
    scale = pipe.vae_scale_factor
    default = pipe.unet.config.sample_size * scale
    height, width = height or default, width or default
    return pipe.unet.config.in_channels, height // scale, width // scale


def _repeat(conditioning: Conditioning, n: int) -> Conditioning:
    """One caption's conditioning (batch 1) for ``n`` images."""
    return {name: t.expand(n, *t.shape[1:]) for name, t in conditioning.items()}


def _stack(rows: list[Conditioning]) -> Conditioning:
    """Per-image conditionings (batch 1 each) as one batch."""
    return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}


@torch.no_grad()
def denoiser_scores(pipe, captions: list[str], settings: PrescreenSettings, progress: bool = True) -> dict[str, np.ndarray]:
    """The prescreen's scores for each caption and seed (:mod:`pipeline.prescreen.scores`).

    For seed ``s``, x_T is the pipeline's initial noise drawn from ``torch.Generator().manual_seed(base_seed + s)``
    (the same for every caption, so scores differ only through the text), prepared as the
    pipeline prepares its first step (:func:`pipeline.prescreen.denoisers.denoiser_for`). The
    unconditional prediction at x_T is one evaluation per seed and timestep, shared by all
    captions; each caption is encoded once, alone.

    Returns:
        float64 arrays (len(captions), seeds): ``"wen"``, the L2 norm of the text-conditional
        difference at the first timestep (for ``"wen_levels"`` only when level 0 is among its
        levels); with ``settings.score == "anisotropy"`` also ``"alignment"`` (in [-1, 1], at the
        low-noise timestep) and ``"anisotropy"``; with ``"wen_levels"``, ``"levels"``, float64
        (len(captions), seeds, levels): the norm at each of :meth:`PrescreenSettings.level_values`.
    """
    if settings.score not in SCORES:
        raise ValueError(f"prescreen.score: must be one of {', '.join(SCORES)}; got {settings.score!r}")
    settings = settings.text_settings()  # own_images: its caption-only part here
    denoiser = denoiser_for(pipe, settings.height, settings.width, settings.steps, settings.guidance_scale)
    # What each timestep's pair of predictions gives: Wen's norm at the first (noisiest)
    # timestep; the anisotropy's alignment at its low-noise one, on the same input.
    levels = settings.level_values() if settings.score == "wen_levels" else []
    passes = {} if levels and 0.0 not in levels else {"wen": (denoiser.timesteps[0], conditional_difference_norm)}
    if settings.score == "anisotropy":
        passes["alignment"] = (low_noise_timestep(denoiser.timesteps), guidance_alignment)
    level_names = ["wen" if level == 0.0 else f"level_{j}" for j, level in enumerate(levels)]  # level 0 is Wen's pass
    for name, index in zip(level_names, level_indexes(len(denoiser.timesteps), levels)):
        passes.setdefault(name, (denoiser.timesteps[index], conditional_difference_norm))
    noise = denoiser.initial_noise([settings.base_seed + s for s in range(settings.seeds)])

    # Every caption sees the same x_T for a seed, so f(x_T, "") is one evaluation per seed (and
    # timestep), shared by all captions: (captions + 1) * seeds evaluations a timestep, not twice that.
    uncond_out: dict[str, torch.Tensor] = {}
    if captions:
        empty = denoiser.unconditional()
        for name, (t, _) in passes.items():
            uncond_out[name] = torch.cat(
                [denoiser.predict(chunk, t, _repeat(empty, len(chunk))) for chunk in noise.split(settings.batch_size)]
            )
    pairs = [(c, s) for c in range(len(captions)) for s in range(settings.seeds)]
    per_seed = {name: np.zeros((len(captions), settings.seeds)) for name in passes}
    bar = tqdm(total=len(pairs), desc="prescreen", unit="pair", disable=not progress)
    cache: dict[int, Conditioning] = {}
    for start in range(0, len(pairs), settings.batch_size):
        batch = pairs[start : start + settings.batch_size]
        for c in sorted({c for c, _ in batch} - cache.keys()):  # each caption is encoded once, however many seeds it has
            cache[c] = denoiser.condition(captions[c])
        cond = _stack([cache[c] for c, _ in batch])
        seeds = [s for _, s in batch]
        for name, (t, measure) in passes.items():
            values = measure(denoiser.predict(noise[seeds], t, cond), uncond_out[name][seeds]).cpu().numpy()
            for (c, s), value in zip(batch, values):
                per_seed[name][c, s] = value
        # Seeds of a caption come together: drop conditionings no later pair needs.
        last = batch[-1][0]
        for c in [c for c in cache if c < last]:
            del cache[c]
        bar.update(len(batch))
    bar.close()
    if "alignment" in per_seed:
        per_seed["anisotropy"] = anisotropy_score(per_seed["wen"], per_seed["alignment"], settings.anisotropy_weight)
    if levels:
        per_seed["levels"] = np.stack([per_seed[name] if name == "wen" else per_seed.pop(name) for name in level_names], axis=2)
    return per_seed


def text_conditional_noise_norm(pipe, captions: list[str], settings: PrescreenSettings, progress: bool = True) -> np.ndarray:
    """Wen et al.'s score alone for each caption and seed: float64 (len(captions), seeds), the L2
    norm over the whole latent of ``f(x_T, t_1, caption) - f(x_T, t_1, "")`` (:func:`denoiser_scores`)."""
    return denoiser_scores(pipe, captions, replace(settings, score="wen"), progress)["wen"]


def evaluation_passes(settings: PrescreenSettings) -> int:
    """Timesteps the denoiser is evaluated at for the caption-only score: 1 for Wen's score, 2 for
    the anisotropy score, one per distinct level for ``wen_levels`` (under ``own_images``, those of
    its ``text_score``)."""
    score = settings.caption_score
    if score == "wen_levels":
        return len(settings.level_values())
    return 2 if score == "anisotropy" else 1


def unet_evaluations(n_prompts: int, settings: PrescreenSettings, images_used: int = 0) -> int:
    """Denoiser evaluations (one image each; UNet or transformer) the prescreen spends:
    :func:`pipeline.budget.prescreen_evaluations` per timestep, ``(prompts + 1) * seeds``, times
    :func:`evaluation_passes` (2 for the anisotropy score); under ``score=own_images`` plus
    :func:`pipeline.prescreen.own_images.image_evaluations` of the ``images_used`` (the training
    images scored, over every prompt: the score table's ``own_images`` column summed)."""
    text = prescreen_evaluations(n_prompts, settings.seeds) * evaluation_passes(settings)
    if settings.score != "own_images":
        return text
    return text + image_evaluations([images_used], len(settings.image_levels), settings.image_draws)


def table_evaluations(table: pd.DataFrame, settings: PrescreenSettings) -> int:
    """:func:`unet_evaluations` of a score table (:func:`score_prompts`' or a ranked one)."""
    used = int(table["own_images"].fillna(0).sum()) if "own_images" in table.columns else 0
    return unet_evaluations(len(table), settings, used)


def score_prompts(
    pipe,
    prompts: list[Prompt],
    settings: PrescreenSettings,
    progress: bool = True,
    images: Mapping[str, Image.Image] | None = None,
) -> pd.DataFrame:
    """The raw scores of ``prompts``, in their order: prompt_id, caption, dup_count, score (the
    ``settings.score`` one, mean over seeds), score_std (its standard deviation over seeds),
    score_wen, score_anisotropy and alignment (means over seeds; the last two NaN unless
    ``score=anisotropy``), level_norms (``score=wen_levels``: the norm at each level, means over
    seeds; the score itself is NaN here, since it compares prompts: ranking sets it). What one rank
    computes and :func:`pipeline.prescreen.ranking.rank_scores` ranks.

    ``score=own_images``: the columns of its ``text_score``, with score NaN (the ranking combines),
    plus score_own_images (:func:`pipeline.prescreen.own_images.own_image_score`, NaN for a prompt
    with no image) and own_images (the images it was taken on): each prompt's are the first
    ``settings.images`` of its ``keys`` that ``images`` (training images by key) holds.
    """
    text = settings.text_settings()
    per_seed = denoiser_scores(pipe, [p.caption for p in prompts], text, progress)
    columns = {"score_wen": per_seed["wen"].mean(axis=1)} if "wen" in per_seed else {}
    if text.score in per_seed and settings.score != "own_images":
        chosen = per_seed[text.score]
        columns.update(score=chosen.mean(axis=1), score_std=chosen.std(axis=1))
    if "anisotropy" in per_seed:
        columns.update(score_anisotropy=per_seed["anisotropy"].mean(axis=1), alignment=per_seed["alignment"].mean(axis=1))
    image_levels = None
    if settings.score == "own_images":
        groups = [[images[k] for k in chosen_keys(p.keys, images or {}, settings.images)] for p in prompts]
        image_levels = own_image_levels(pipe, prompts, groups, settings, progress)
        with np.errstate(all="ignore"):  # a prompt with no image: NaN at every level
            columns["score_own_images"] = image_levels.mean(axis=1)
        columns["own_images"] = np.array([len(g) for g in groups], dtype=np.float64)
    levels = per_seed["levels"].mean(axis=1) if "levels" in per_seed else None
    return score_table(prompts, columns, levels, image_levels)


def own_image_levels(
    pipe, prompts: list[Prompt], groups: list[list[Image.Image]], settings: PrescreenSettings, progress: bool = True
) -> np.ndarray:
    """float64 (prompts, len(image_levels)): the own_images log ratio of each prompt scored on
    ``groups`` (its training images, at most ``settings.images``; NaN for none) at each level
    (:mod:`pipeline.prescreen.own_images`)."""
    denoiser = denoiser_for(pipe, settings.height, settings.width, settings.steps, settings.guidance_scale)
    with_images = [i for i, group in enumerate(groups) if group]
    conditions = {}
    for i in tqdm(with_images, desc="prescreen: captions", unit="prompt", disable=not progress):
        conditions[i] = denoiser.condition(prompts[i].caption)
    errors = np.zeros((len(prompts), len(settings.image_levels), 2))
    if with_images:
        errors[with_images] = own_image_errors(
            denoiser,
            [conditions[i] for i in with_images],
            [groups[i] for i in with_images],
            settings.image_levels,
            settings.image_draws,
            settings.base_seed,
            settings.images,
            settings.batch_size,
        )
    return own_image_score(errors)


def score_table(
    prompts: list[Prompt],
    columns: dict[str, np.ndarray] | None = None,
    levels: np.ndarray | None = None,
    image_levels: np.ndarray | None = None,
) -> pd.DataFrame:
    """:func:`score_prompts`' table for ``prompts``: the :data:`SCORE_COLUMNS` from ``columns``
    (one float per prompt each; NaN for a column not given), :data:`LEVEL_COLUMN` from ``levels``
    (prompts, levels) and :data:`IMAGE_LEVEL_COLUMN` from ``image_levels`` (prompts, image
    levels), or null."""
    columns = columns or {}
    table = pd.DataFrame(
        {
            "prompt_id": pd.Series([p.prompt_id for p in prompts], dtype=str),
            "caption": pd.Series([p.caption for p in prompts], dtype=str),
            "dup_count": pd.array([p.dup_count for p in prompts], dtype="Int64"),
        }
    )
    for name in SCORE_COLUMNS:
        table[name] = np.asarray(columns[name], dtype=np.float64) if name in columns else np.full(len(prompts), np.nan)
    for name, values in ((LEVEL_COLUMN, levels), (IMAGE_LEVEL_COLUMN, image_levels)):
        rows = (
            [None] * len(prompts) if values is None else [[float(v) for v in row] for row in np.asarray(values, dtype=np.float64)]
        )
        table[name] = pd.Series(rows, index=table.index, dtype=object)
    return table
