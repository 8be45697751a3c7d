"""First-step prescreen: rank prompts by how strongly the text steers the denoiser at pure noise.

Wen et al. (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models") observe that a memorized prompt gives an unusually large text-conditional
prediction, ``|| f(x_T, c) - f(x_T, "") ||``, already at the first sampling step
(``prescreen.score=wen``, the default). Asthana & Belagiannis (ICLR 2026) add the alignment of
that guidance direction with the unconditional prediction at a low-noise timestep, on the same
pure-noise input (``prescreen.score=anisotropy``); :mod:`pipeline.prescreen.scores` has both
formulas. ``prescreen.score=own_images`` (with ``data=``, the training set) also scores each
caption against its own training images, its duplicate group's ``keys``: how much the caption
lowers the denoising error on them against the empty caption (:mod:`pipeline.prescreen.own_images`),
and ranks by the larger robust z of that and of a caption-only score. Every model family is scored (SD 1.x/2.x, SDXL, SD3, FLUX dev/schnell, PixArt-Sigma):
:mod:`pipeline.prescreen.denoisers` prepares each one's first step as its pipeline does.

Cost, in denoiser evaluations (one image each): Wen's score is one conditional evaluation per
prompt and seed, plus one unconditional evaluation per seed shared by all prompts,
``(prompts + 1) * seeds``; the anisotropy score needs the same again at its low-noise timestep,
``2 * (prompts + 1) * seeds``, and writes both scores. Brute-force sampling costs
``n_samples * steps * 2`` per prompt, so either decides cheaply which prompts are worth sampling.

    python -m pipeline.prescreen experiment=demo          # or: make prescreen

Writes, under ``<run_dir>/prescreen/`` (:class:`pipeline.layout.RunLayout`): the scores table
(``prescreen_scores``: every prompt, its score (the chosen one), ``score_wen``,
``score_anisotropy`` and ``alignment`` (NaN unless ``prescreen.score=anisotropy``), and whether
it is kept), the kept prompts (``prescreen_selected``: a prompt table of :mod:`pipeline.layout`
with their ``keys`` when the prompt list has them, for ``python -m pipeline.generate
prompts=<that file>``) and the summary.

Runs through the stage executor (:mod:`pipeline.executor`): with ``world_size=N`` (a SLURM array
or a local multirun) rank ``r`` scores its share of the prompts (:mod:`pipeline.prescreen.step`),
and whichever rank finds every rank's scores done ranks all prompts together (the robust z and
the kept set over every prompt), so the outputs are those of one process. A rerun with the same
settings, the same captions and the same weights (their files' names, sizes and modification
times) skips the scoring and redoes only that last ranking. Its inputs are read-only: a prompts
file inside the output folder, or an output folder inside the model's, is refused.

The domain code lives beside this file: :mod:`~pipeline.prescreen.settings` (the config group),
:mod:`~pipeline.prescreen.scoring` (the denoiser's scores), :mod:`~pipeline.prescreen.keep` (the
keep rule), :mod:`~pipeline.prescreen.ranking`, :mod:`~pipeline.prescreen.evaluation` (ROC AUCs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import CONF_DIR, ConfigError, config_int, stage_main
from pipeline.executor import read_marker, run_step
from pipeline.layout import SUMMARY, RunLayout
from pipeline.prescreen.keep import choose_kept
from pipeline.prescreen.settings import prescreen_settings
from pipeline.prescreen.step import ScorePrompts


@dataclass
class PrescreenSummary:
    """What one run of the prescreen did on its rank.

    ``prompts``: prompts in the list (every rank's); ``ranked``: every prompt is scored and
    ranked (by this run or an earlier one), so ``table`` (the ranked scores table, highest score
    first) and ``kept`` are set; on a rank that leaves the ranking to the last rank to finish
    they are None. ``scores``, ``selected``, ``summary``: the output files' paths.
    """

    prompts: int
    ranked: bool
    kept: int | None
    table: pd.DataFrame | None
    scores: Path
    selected: Path
    summary: Path
    rank: int = 0
    world_size: int = 1


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
            return (
                f"model.path: {model_path} holds the prescreen's output folder {out_dir}; inputs are read-only: "
                "choose a run_dir outside it"
            )
    return None


def run(cfg) -> PrescreenSummary:
    """Everything ``python -m pipeline.prescreen`` does, from a composed config.

    Rank ``rank`` of ``world_size`` scores its share of the prompts through the stage executor
    (:class:`pipeline.prescreen.step.ScorePrompts`; skipped when its marker holds the same
    settings); the rank that finds every rank's scores done (any rank with ``world_size=1``)
    ranks all prompts together and writes the stage's outputs, so a SLURM array or a local
    multirun gives what one process gives.
    """
    from pipeline.data.sharding import check_shard
    from pipeline.prompts import read_prompts

    # 1. Read the settings: a wrong value (a ConfigError naming its key), or a keep rule that
    #    cannot work, ends the run before any file is read or the model loaded.
    settings = prescreen_settings(cfg)
    choose_kept(np.zeros(0), settings)
    heavy_dup_count = config_int(cfg, "heavy_dup_count")
    rank, world_size = check_shard(cfg.rank, cfg.world_size)

    data = cfg.get("data")
    if settings.score == "own_images" and data is None:
        raise ConfigError(
            "prescreen.score: own_images scores each caption against its own training images: set data= "
            "(data=demo, data=files data.path=...), or choose a caption-only score (wen, wen_levels, anisotropy)"
        )

    # 2. Place the outputs under <run_dir>/prescreen, never over an input.
    layout = RunLayout(cfg.run_dir)
    prompts_path = cfg.prompts or str(layout.dedup_selected)
    problem = writes_into_inputs(layout.prescreen, prompts_path, cfg.model.path)
    if problem:
        raise ConfigError(problem)

    # 3. Read the prompts (every rank reads the whole list; the step takes this rank's share).
    prompts = read_prompts(prompts_path)

    # 4. Score this rank's share; the rank that completes the last share ranks every prompt and
    #    writes the outputs (the step's finish).
    step = ScorePrompts(
        cfg,
        prompts,
        settings,
        layout,
        world_size=world_size,
        progress=bool(cfg.progress),
        heavy_dup_count=heavy_dup_count,
        data=None if data is None else OmegaConf.to_container(data, resolve=True),
    )
    ctx = run_step(step, layout.prescreen, rank=rank, world_size=world_size)

    # 5. Say what this rank did, and return the ranked table when every prompt is ranked.
    table = step.table
    if not ctx.all_done:
        markers = {unit.name: read_marker(layout.prescreen, unit.name) or {} for unit in step.units()}
        waiting = [unit.name for unit in step.units() if markers[unit.name].get("digest") != unit.digest]
        print(
            f"prescreen [rank {rank}/{world_size}]: scores written; the rank that finishes last ranks every prompt "
            f"(waiting for {', '.join(waiting[:10])}{', ...' if len(waiting) > 10 else ''})"
        )
    elif table is None:  # ranked by an earlier run (or another rank) from the same scores
        print(f"prescreen: every prompt already scored and ranked with these settings -> {layout.prescreen_scores}")
        table = pd.read_parquet(layout.prescreen_scores)
    return PrescreenSummary(
        prompts=len(prompts),
        ranked=table is not None,
        kept=None if table is None else int(table.kept.sum()),
        table=table,
        scores=layout.prescreen_scores,
        selected=layout.prescreen_selected,
        summary=layout.prescreen / SUMMARY,
        rank=rank,
        world_size=world_size,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prescreen")
@stage_main("prescreen")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
