"""First-step prescreen: rank prompts by how strongly the text steers the denoiser at pure noise.

Wen et al. (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models") observe that a memorized prompt gives an unusually large text-conditional
prediction, ``|| f(x_T, c) - f(x_T, "") ||``, already at the first sampling step
(``prescreen.score=wen``, the default). Asthana & Belagiannis (ICLR 2026) add the alignment of
that guidance direction with the unconditional prediction at a low-noise timestep, on the same
pure-noise input (``prescreen.score=anisotropy``); :mod:`pipeline.prescreen.scores` has both
formulas. Every model family is scored (SD 1.x/2.x, SDXL, SD3, FLUX dev/schnell, PixArt-Sigma):
:mod:`pipeline.prescreen.denoisers` prepares each one's first step as its pipeline does.

Cost, in denoiser evaluations (one image each): Wen's score is one conditional evaluation per
prompt and seed, plus one unconditional evaluation per seed shared by all prompts,
``(prompts + 1) * seeds``; the anisotropy score needs the same again at its low-noise timestep,
``2 * (prompts + 1) * seeds``, and writes both scores. Brute-force sampling costs
``n_samples * steps * 2`` per prompt, so either decides cheaply which prompts are worth sampling.

    python -m pipeline.prescreen experiment=demo          # or: make prescreen

Writes ``<run_dir>/prescreen/prescreen.parquet`` (every prompt, its score (the chosen one),
``score_wen``, ``score_anisotropy`` and ``alignment`` (NaN unless ``prescreen.score=anisotropy``),
and whether it is kept), ``<run_dir>/prescreen/selected.parquet`` (the kept prompts, a prompt table of
:mod:`pipeline.layout` with their ``keys`` when the prompt list has them, for
``python -m pipeline.generate prompts=<that file>``) and ``summary.json``.

Runs through the stage executor (:mod:`pipeline.executor`): with ``world_size=N`` (a SLURM array
or a local multirun) rank ``r`` scores its share of the prompts into
``prescreen/scores/scores_<r>.parquet`` (marker ``.done/scores_<r>.json``), and whichever rank
finds every rank's scores done ranks all prompts together (the robust z and the kept set over
every prompt), so the outputs are those of one process. A rerun with the same settings, the
same captions and the same weights (their files' names, sizes and modification times) skips the
scoring and redoes only that last ranking. Its inputs are read-only: a prompts file inside the
output folder, or an output folder inside the model's, is refused.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.budget import prescreen_evaluations
from pipeline.cli import CONF_DIR, ConfigError, config_int, config_number, stage_main
from pipeline.executor import StepContext, Unit, read_marker, run_step, settings_digest
from pipeline.identity import model_identity
from pipeline.prescreen.denoisers import Conditioning, denoiser_for
from pipeline.prescreen.scores import (
    SCORES,
    anisotropy_score,
    conditional_difference_norm,
    guidance_alignment,
    level_indexes,
    low_noise_timestep,
    strongest_outlier,
)
from pipeline.prompts import Prompt, shard_prompts
from pipeline.text import display_text

log = logging.getLogger(__name__)


@dataclass
class PrescreenSettings:
    """``seeds`` noise draws per prompt; ``steps`` sets the scheduler's timesteps (as sampling would).

    ``score``: what ranks and keeps prompts, ``"wen"`` or ``"anisotropy"`` (which also computes
    Wen's, at twice the cost); ``anisotropy_weight``: the alignment's weight in the anisotropy
    score; ``guidance_scale``: FLUX-dev's guidance embedding (None: FluxPipeline's default 3.5;
    the other families' first step does not depend on it); ``levels``: where ``"wen_levels"``
    takes Wen's norm, as fractions of the schedule (0: its first timestep; see
    :mod:`pipeline.prescreen.scores`).
    """

    seeds: int = 4
    steps: int = 50
    batch_size: int = 64
    base_seed: int = 0
    # Keep the `keep_top` highest-scoring prompts (or the top `keep_fraction` of them), and/or
    # those scoring at least `score_threshold`, and/or those whose robust z-score (distance
    # from the median score in scaled median absolute deviations) is at least `min_robust_z`.
    keep_top: int | None = None
    keep_fraction: float | None = None
    score_threshold: float | None = None
    min_robust_z: float | None = None
    height: int | None = None
    width: int | None = None
    score: str = "wen"
    anisotropy_weight: float = 2.0
    guidance_scale: float | None = None
    levels: tuple[float, ...] = (0.125,)

    def level_values(self) -> list[float]:
        """The noise levels ``score="wen_levels"`` evaluates: ``levels``, distinct, in increasing order."""
        return sorted({float(v) for v in self.levels})


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
    """Timesteps the denoiser is evaluated at: 1 for Wen's score, 2 for the anisotropy score,
    one per distinct level for ``wen_levels``."""
    if settings.score == "wen_levels":
        return len(settings.level_values())
    return 2 if settings.score == "anisotropy" else 1


def unet_evaluations(n_prompts: int, settings: PrescreenSettings) -> int:
    """Denoiser evaluations (one image each; UNet or transformer) the prescreen spends:
    :func:`pipeline.budget.prescreen_evaluations` per timestep, ``(prompts + 1) * seeds``, times
    :func:`evaluation_passes` (2 for the anisotropy score)."""
    return prescreen_evaluations(n_prompts, settings.seeds) * evaluation_passes(settings)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """How far each score lies above the median, in units of 1.4826 x the median absolute deviation.

    Memorized prompts are rare outliers in a large audit; the median and the MAD describe the
    unmemorized bulk and barely move with the outliers, unlike the mean and the standard
    deviation. Falls back to the mean absolute deviation (x 1.2533) when more than half of the
    scores are equal; all zeros when every score is.
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
    """Boolean mask of prompts to keep: the top ``keep_top`` (or ``keep_fraction``) by score,
    and, when ``score_threshold`` / ``min_robust_z`` are set, only those reaching them."""
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
        keep &= (scores if settings.score == "wen_levels" else robust_z(scores)) >= settings.min_robust_z
    return keep


def score_prompts(pipe, prompts: list[Prompt], settings: PrescreenSettings, progress: bool = True) -> pd.DataFrame:
    """The raw scores of ``prompts``, in their order: prompt_id, caption, dup_count, score (the
    ``settings.score`` one, mean over seeds), score_std (its standard deviation over seeds),
    score_wen, score_anisotropy and alignment (means over seeds; the last two NaN unless
    ``score=anisotropy``), level_norms (``score=wen_levels``: the norm at each level, means over
    seeds; the score itself is NaN here, since it compares prompts: :func:`rank_scores` sets it).
    What one rank computes and :func:`rank_scores` ranks."""
    per_seed = denoiser_scores(pipe, [p.caption for p in prompts], settings, progress)
    columns = {"score_wen": per_seed["wen"].mean(axis=1)} if "wen" in per_seed else {}
    if settings.score in per_seed:
        chosen = per_seed[settings.score]
        columns.update(score=chosen.mean(axis=1), score_std=chosen.std(axis=1))
    if "anisotropy" in per_seed:
        columns.update(score_anisotropy=per_seed["anisotropy"].mean(axis=1), alignment=per_seed["alignment"].mean(axis=1))
    levels = per_seed["levels"].mean(axis=1) if "levels" in per_seed else None
    return score_table(prompts, columns, levels)


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
    (the chosen one), ``roc_auc_<wen|anisotropy>_<side>`` for ``score_wen`` / ``score_anisotropy``,
    and ``roc_auc_<chosen>_<side>`` for a ``chosen`` score held only in ``score`` (``wen_levels``);
    only the finite ones (none where ``dup_count`` is unknown or a score was not computed).
    """
    dup_counts = table.dup_count.to_numpy(dtype=float, na_value=np.nan)
    columns = {"": "score", **{f"{name}_": f"score_{name}" for name in SCORES if f"score_{name}" in table.columns}}
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


def settings_from_config(cfg) -> PrescreenSettings:
    """:class:`PrescreenSettings` from the ``prescreen`` section; a wrong value raises a ConfigError naming its key."""
    fields = PrescreenSettings.__dataclass_fields__
    unknown = sorted(set(cfg.prescreen) - set(fields))
    if unknown:
        raise ConfigError(f"prescreen.{unknown[0]}: unknown key; the prescreen section takes {', '.join(fields)}")
    return PrescreenSettings(
        seeds=config_int(cfg, "prescreen.seeds", minimum=1),
        steps=config_int(cfg, "prescreen.steps", minimum=1),
        batch_size=config_int(cfg, "prescreen.batch_size", minimum=1),
        base_seed=config_int(cfg, "prescreen.base_seed"),
        keep_top=config_int(cfg, "prescreen.keep_top", minimum=0, optional=True),
        keep_fraction=config_number(cfg, "prescreen.keep_fraction", optional=True),  # choose_kept checks its range
        score_threshold=config_number(cfg, "prescreen.score_threshold", optional=True),
        min_robust_z=config_number(cfg, "prescreen.min_robust_z", optional=True),
        height=config_int(cfg, "prescreen.height", minimum=1, optional=True),
        width=config_int(cfg, "prescreen.width", minimum=1, optional=True),
        score=config_score(cfg),
        anisotropy_weight=config_number(cfg, "prescreen.anisotropy_weight"),
        guidance_scale=config_number(cfg, "prescreen.guidance_scale", optional=True),
        levels=config_levels(cfg),
    )


def config_levels(cfg) -> tuple[float, ...]:
    """``prescreen.levels``: a list of fractions of the schedule in [0, 1] (absent: the default)."""
    value = cfg.prescreen.get("levels", None)
    if value is None:
        return PrescreenSettings.levels
    if isinstance(value, (int, float)):
        values = [value]
    elif isinstance(value, str) or not hasattr(value, "__iter__"):
        values = None
    else:
        values = list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
        raise ConfigError(f"prescreen.levels: a list of fractions of the schedule in [0, 1] (0: the first timestep), got {value!r}")
    return tuple(float(v) for v in values)


def config_score(cfg) -> str:
    """``prescreen.score``, one of :data:`pipeline.prescreen.scores.SCORES`."""
    value = cfg.prescreen.score
    if value not in SCORES:
        raise ConfigError(f"prescreen.score: must be one of {', '.join(SCORES)}; got {value!r}")
    return str(value)


def load_prescreen_model(cfg):
    """The pipeline the prescreen scores with: :func:`pipeline.models.load_model` of ``cfg.model``,
    as generation loads it (same weights, revision, variant, scheduler and scheduler_kwargs: the
    score is taken at the scheduler's first timestep, with its initial noise scale), on
    ``cfg.device`` in ``cfg.dtype``. Fused QKV projections stay off: the prescreen's evaluations
    are few, and it has always scored with the plain projections."""
    from pipeline.models import load_model, make_runtime, resolve_device

    device = resolve_device(cfg.device)
    return load_model(cfg.model, make_runtime(device, cfg.dtype, fuse_qkv=False), device=device)


# The settings that decide a prompt's score (not which prompts are kept: changing those redoes
# only the finish).
SCORE_SETTINGS = ("seeds", "steps", "batch_size", "base_seed", "height", "width", "score", "anisotropy_weight", "guidance_scale", "levels")


def prompts_digest(prompts: list[Prompt]) -> str:
    """A digest of the prompt ids and captions a unit scores, in order (for its marker)."""
    return settings_digest([[p.prompt_id, p.caption] for p in prompts])


class ScorePrompts:
    """The prescreen's scoring step for :func:`pipeline.executor.run_step`: rank ``r`` of
    ``world_size`` owns one unit, ``scores_<r>``, the prompts ``r, r + world_size, ...`` of the
    list (:func:`pipeline.prompts.shard_prompts`), and writes their raw scores to
    ``<out_dir>/scores/scores_<r>.parquet`` (:func:`score_prompts`' columns). Its settings:
    the model config and the identity of its weights (:func:`pipeline.identity.model_identity`:
    weights replaced in place rescore), the device and dtype, the scoring settings and a digest
    of the prompt ids and captions it scores (a score depends on nothing else of a prompt:
    ``dup_count`` and ``keys`` are read afresh by :func:`finish`); its marker also records how many denoiser evaluations (the key
    ``unet_evaluations``, which the budget reads, whatever the denoiser) and seconds the scoring
    took (summed into ``summary.json``)."""

    name = "prescreen"

    def __init__(self, cfg, prompts: list[Prompt], settings: PrescreenSettings, progress: bool = True, world_size: int = 1,
                 out_dir: Path | None = None, heavy_dup_count: int = 100):  # fmt: skip
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.prompts = prompts
        self.settings = settings
        self.progress = progress
        self.world_size = world_size
        self.out_dir = Path(out_dir) if out_dir is not None else Path(cfg.run_dir) / "prescreen"
        self.heavy_dup_count = heavy_dup_count
        self.table: pd.DataFrame | None = None  # the finish's ranking, when this process ran it
        model = OmegaConf.to_container(cfg.model, resolve=True)
        self.base = {
            "model": model,
            # Read before the model is loaded: weights changed while it loads differ next time.
            "model_files": model_identity(model.get("path") or "", model.get("revision")),
            "device": str(cfg.device),
            "dtype": str(cfg.dtype),
            "prescreen": {name: list(v) if isinstance(v := getattr(settings, name), tuple) else v for name in SCORE_SETTINGS},
        }
        self._shares: dict[tuple[int, int], list[Prompt]] = {}

    def share(self, rank: int, world_size: int) -> list[Prompt]:
        key = (rank, world_size)
        if key not in self._shares:
            self._shares[key] = shard_prompts(self.prompts, rank, world_size)
        return self._shares[key]

    def units(self) -> list[Unit]:
        return [self.unit(rank, self.world_size) for rank in range(self.world_size)]

    def unit(self, rank: int, world_size: int) -> Unit:
        share = self.share(rank, world_size)
        settings = {**self.base, "rank": rank, "world_size": world_size, "prompts": len(share), "prompt_ids": prompts_digest(share)}
        return Unit(f"scores_{rank}", settings)

    def run(self, units, ctx: StepContext) -> None:
        from pipeline.io import write_parquet

        share = self.share(ctx.rank, ctx.world_size)
        pipe = load_prescreen_model(self.cfg) if share else None  # a rank with no prompt loads nothing
        for unit in units:
            with ctx.track_time("scoring"):
                scores = score_prompts(pipe, share, self.settings, self.progress) if share else score_table([])
            write_parquet(scores, scores_path(ctx.out_dir, ctx.rank))
            evaluations = unet_evaluations(len(share), self.settings)
            ctx.stat("unet_evaluations", evaluations)
            ctx.done(unit, {"prompts": len(share), "unet_evaluations": evaluations, "seconds": round(ctx.seconds["scoring"], 2)})

    def outputs(self) -> list[Path]:
        return [self.out_dir / name for name in ("prescreen.parquet", "selected.parquet", "summary.json")]

    def finish_settings(self) -> dict:
        """What the ranking reads beyond the scores: the keep rule and what each prompt carries."""
        from omegaconf import OmegaConf

        return {"prescreen": OmegaConf.to_container(self.cfg.prescreen, resolve=True), "heavy_dup_count": self.heavy_dup_count,
                "carried": [[p.prompt_id, p.dup_count, None if p.keys is None else list(p.keys)] for p in self.prompts]}  # fmt: skip

    def finish(self, ctx: StepContext) -> None:
        self.table = finish(self.cfg, self, ctx.out_dir, ctx.world_size, self.heavy_dup_count)


# The per-prompt numbers of a score table, after prompt_id, caption and dup_count, and the
# per-level norms of score=wen_levels (a list per prompt; null under the other scores).
SCORE_COLUMNS = ("score", "score_std", "score_wen", "score_anisotropy", "alignment")
LEVEL_COLUMN = "level_norms"


def score_table(prompts: list[Prompt], columns: dict[str, np.ndarray] | None = None, levels: np.ndarray | None = None) -> pd.DataFrame:
    """:func:`score_prompts`' table for ``prompts``: the :data:`SCORE_COLUMNS` from ``columns``
    (one float per prompt each; NaN for a column not given) and :data:`LEVEL_COLUMN` from
    ``levels`` (prompts, levels), or null."""
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
    rows = [None] * len(prompts) if levels is None else [[float(v) for v in row] for row in np.asarray(levels, dtype=np.float64)]
    table[LEVEL_COLUMN] = pd.Series(rows, index=table.index, dtype=object)
    return table


def scores_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / "scores" / f"scores_{rank}.parquet"


def merged_scores(out_dir: Path, prompts: list[Prompt], world_size: int) -> pd.DataFrame:
    """Every rank's raw scores as one table in the prompt list's order (as one process scores
    them), checked to hold each prompt exactly once."""
    frames = [pd.read_parquet(scores_path(out_dir, rank), columns=["prompt_id", *SCORE_COLUMNS, LEVEL_COLUMN]) for rank in range(world_size)]
    scores = pd.concat(frames, ignore_index=True)
    scores["prompt_id"] = scores["prompt_id"].astype(str)
    ids = [p.prompt_id for p in prompts]
    if len(scores) != len(ids) or scores["prompt_id"].duplicated().any() or set(scores["prompt_id"]) != set(ids):
        raise ValueError(  # one line, exit 2 (pipeline.cli.stage_main)
            f"the scores under {out_dir / 'scores'} do not hold each of the {len(ids)} prompts once "
            f"({len(scores)} rows): another run may be writing there; rerun to rescore"
        )
    by_id = scores.set_index("prompt_id")
    levels = by_id.loc[ids, LEVEL_COLUMN].tolist()
    level_norms = None if any(v is None for v in levels) else np.array([list(v) for v in levels], dtype=np.float64).reshape(len(ids), -1)
    return score_table(prompts, {name: by_id.loc[ids, name].to_numpy() for name in SCORE_COLUMNS}, level_norms)


def finish(cfg, step: ScorePrompts, out_dir: Path, world_size: int, heavy_dup_count: int) -> pd.DataFrame:
    """Rank every rank's scores together and write ``prescreen.parquet``, ``selected.parquet``
    and ``summary.json`` (atomically; the same content whichever rank writes them, so two ranks
    finishing together is harmless). Returns the prescreen table."""
    from omegaconf import OmegaConf

    from pipeline.io import write_json, write_parquet
    from pipeline.layout import write_prompt_table

    settings = step.settings
    table = rank_scores(merged_scores(out_dir, step.prompts, world_size), settings)
    write_parquet(table, out_dir / "prescreen.parquet")
    kept = table[table.kept].sort_values("rank")
    selected = kept[["prompt_id", "caption", "dup_count", "score"]].copy()
    keys = {p.prompt_id: p.keys for p in step.prompts}  # the duplicate group's training records, when listed
    selected["keys"] = pd.Series([keys[pid] for pid in selected["prompt_id"]], index=selected.index, dtype=object)
    write_prompt_table(selected, out_dir / "selected.parquet")
    markers = [read_marker(out_dir, unit.name) or {} for unit in step.units()]
    summary = {
        "prompts": len(table),
        "kept": int(table.kept.sum()),
        "score": settings.score,
        "unet_evaluations": int(sum(m.get("unet_evaluations", 0) for m in markers)),
        "seconds": round(sum(m.get("seconds", 0.0) for m in markers), 2),
        "model": cfg.model.path,
        "settings": OmegaConf.to_container(cfg.prescreen, resolve=True),
    }
    if world_size > 1:
        summary["world_size"] = world_size
    summary.update(score_aucs(table, heavy_dup_count, settings.score))
    write_json(summary, out_dir / "summary.json")
    scores_shown = ["score_wen", "score_anisotropy", "alignment"] if settings.score == "anisotropy" else ["score"]
    shown = table.head(15)[["rank", "prompt_id", "dup_count", *scores_shown, "robust_z", "kept", "caption"]].copy()
    shown["prompt_id"] = shown["prompt_id"].map(lambda v: display_text(v, 20))  # untrusted: bounded, no controls
    shown["caption"] = shown["caption"].map(lambda v: display_text(v, 60))
    print(shown.to_string(index=False))
    print(f"prescreen: {summary['kept']} of {summary['prompts']} prompts kept by the {settings.score} score, "
          f"{summary['unet_evaluations']} denoiser evaluations in {summary['seconds']:.1f} s")  # fmt: skip
    for name in SCORES:
        aucs = {side: summary.get(f"roc_auc_{name}_{side}") for side in ("heavy_vs_singletons", "heavy_vs_rest")}
        if any(value is not None for value in aucs.values()):
            print(f"prescreen: ROC AUC of the {name} score for dup_count >= {heavy_dup_count}: "
                  + ", ".join(f"{'vs singletons' if side == 'heavy_vs_singletons' else 'vs every other prompt'} {value:.3f}"
                              for side, value in aucs.items() if value is not None))  # fmt: skip
    print(f"written {out_dir / 'prescreen.parquet'}; generate from {out_dir / 'selected.parquet'}")
    return table


def writes_into_inputs(out_dir: str | Path, prompts: str | Path, model_path: str | Path | None) -> str | None:
    """One line saying how writing ``out_dir`` would write over an input, or None: the prompts
    file lies inside ``out_dir`` (its outputs would replace the list they score), or ``out_dir``
    is, or lies inside, the model's folder. Paths are compared resolved (links followed)."""
    out = Path(os.path.realpath(out_dir))
    prompts_file = Path(os.path.realpath(Path(str(prompts)).expanduser()))
    if out in prompts_file.parents:
        return f"prompts: {prompts} lies inside the prescreen's output folder {out_dir}, which it writes: copy it elsewhere first"
    if model_path:
        model = Path(os.path.realpath(Path(str(model_path)).expanduser()))
        if model.is_dir() and (out == model or model in out.parents):
            return (f"model.path: {model_path} holds the prescreen's output folder {out_dir}; inputs are read-only: "
                    "choose a run_dir outside it")
    return None


def run(cfg) -> pd.DataFrame | None:
    """Everything ``python -m pipeline.prescreen`` does, from a composed config.

    Rank ``rank`` of ``world_size`` scores its share of the prompts through the stage executor
    (:class:`ScorePrompts`; skipped when its marker holds the same settings); the rank that
    finds every rank's scores done (any rank with ``world_size=1``) ranks all prompts together
    and writes the stage's outputs (:func:`finish`), so a SLURM array or a local multirun gives
    what one process gives. Returns the prescreen table, or None where this rank did not finish.

    The config is read first, so that a wrong value is reported (a ConfigError naming its key)
    before any file is read or the model loaded.
    """
    from pipeline.data.sharding import check_shard
    from pipeline.prompts import read_prompts

    settings = settings_from_config(cfg)
    choose_kept(np.zeros(0), settings)  # a keep rule that cannot work ends the run before any scoring
    heavy_dup_count = config_int(cfg, "heavy_dup_count")
    rank, world_size = check_shard(cfg.rank, cfg.world_size)
    out_dir = Path(cfg.run_dir) / "prescreen"
    prompts_path = cfg.prompts or str(Path(cfg.run_dir) / "dedup" / "selected.parquet")
    problem = writes_into_inputs(out_dir, prompts_path, cfg.model.path)
    if problem:
        raise ConfigError(problem)
    step = ScorePrompts(cfg, read_prompts(prompts_path), settings, progress=bool(cfg.progress), world_size=world_size,
                        out_dir=out_dir, heavy_dup_count=heavy_dup_count)  # fmt: skip
    ctx = run_step(step, out_dir, rank=rank, world_size=world_size)
    if not ctx.all_done:
        waiting = [unit.name for unit in step.units() if (read_marker(out_dir, unit.name) or {}).get("digest") != unit.digest]
        print(f"prescreen [rank {rank}/{world_size}]: scores written; the rank that finishes last ranks every prompt "
              f"(waiting for {', '.join(waiting[:10])}{', ...' if len(waiting) > 10 else ''})")  # fmt: skip
        return None
    if step.table is None:  # ranked by an earlier run (or another rank) from the same scores
        print(f"prescreen: every prompt already scored and ranked with these settings -> {out_dir / 'prescreen.parquet'}")
        return pd.read_parquet(out_dir / "prescreen.parquet")
    return step.table


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prescreen")
    @stage_main("prescreen")
    def _run(cfg: DictConfig) -> None:
        run(cfg)

    _run()


if __name__ == "__main__":
    main()
