"""The prescreen's step for the stage executor: each rank scores its share of the prompts, and
the last rank to finish ranks every prompt together and writes the stage's outputs.

Files, under ``RunLayout(run_dir).prescreen``: one raw score table per rank
(:data:`pipeline.layout.PRESCREEN_RANK_SCORES`, :func:`pipeline.prescreen.scoring.score_table`'s
columns) with its marker ``.done/scores_<rank>.json``; then the ranked table of every prompt
(``RunLayout.prescreen_scores``), the kept prompts as a prompt table (``RunLayout.prescreen_selected``)
and the summary (:data:`pipeline.layout.SUMMARY`), the same whichever rank writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.executor import StepContext, Unit, read_marker, settings_digest
from pipeline.identity import model_identity
from pipeline.layout import PRESCREEN_RANK_SCORES, SUMMARY, RunLayout
from pipeline.prescreen.evaluation import score_aucs
from pipeline.prescreen.own_images import chosen_keys, keys_to_fetch
from pipeline.prescreen.ranking import rank_scores
from pipeline.prescreen.scores import SCORES
from pipeline.prescreen.scoring import (
    IMAGE_LEVEL_COLUMN,
    LEVEL_COLUMN,
    SCORE_COLUMNS,
    score_prompts,
    score_table,
    table_evaluations,
)
from pipeline.prescreen.settings import PrescreenSettings, score_settings
from pipeline.prompts import Prompt, shard_prompts
from pipeline.text import display_text


def load_prescreen_model(cfg):
    """The pipeline the prescreen scores with: :func:`pipeline.models.load_model` of ``cfg.model``,
    as generation loads it (same weights, revision, variant, scheduler and scheduler_kwargs: the
    score is taken at the scheduler's first timestep, with its initial noise scale), on
    ``cfg.device`` in ``cfg.dtype``. Fused QKV projections stay off: the prescreen's evaluations
    are few, and it scores with the plain projections."""
    from pipeline.models import load_model, make_runtime, resolve_device

    device = resolve_device(cfg.device)
    return load_model(cfg.model, make_runtime(device, cfg.dtype, fuse_qkv=False), device=device)


def prompts_digest(prompts: list[Prompt], images: int | None = None) -> str:
    """A digest of the prompt ids and captions a unit scores, in order (for its marker); with
    ``images`` (``score=own_images``), also of the training keys each may be scored on (the
    first ``images`` of its ``keys``)."""
    if images is None:
        return settings_digest([[p.prompt_id, p.caption] for p in prompts])
    return settings_digest([[p.prompt_id, p.caption, chosen_keys(p.keys, None, images)] for p in prompts])


def scores_path(out_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its raw scores under the prescreen folder ``out_dir``."""
    return Path(out_dir) / PRESCREEN_RANK_SCORES.format(rank=rank)


class ScorePrompts:
    """The prescreen's scoring step for :func:`pipeline.executor.run_step`: rank ``r`` of
    ``world_size`` owns one unit, ``scores_<r>``, the prompts ``r, r + world_size, ...`` of the
    list (:func:`pipeline.prompts.shard_prompts`), and writes their raw scores to
    :func:`scores_path` (:func:`pipeline.prescreen.scoring.score_prompts`' columns).

    A unit's settings: the model config and the identity of its weights
    (:func:`pipeline.identity.model_identity`: weights replaced in place rescore), the device and
    dtype, the scoring settings (:data:`pipeline.prescreen.settings.SCORE_SETTINGS`) and a digest
    of the prompt ids and captions it scores (a score depends on nothing else of a prompt:
    ``dup_count`` and ``keys`` are read afresh by :meth:`finish`; under ``score=own_images`` the
    keys it is scored on count too, and the identity of the training set ``data``, the files
    under its path: :func:`pipeline.training_images.training_set_identity`). Its marker also records the
    denoiser evaluations (the key ``unet_evaluations``, which the budget reads, whatever the
    denoiser) and the seconds the scoring took (summed into the summary).

    ``table``: the ranked table of every prompt once this process ran :meth:`finish`, else None.
    """

    name = "prescreen"

    def __init__(
        self,
        cfg,
        prompts: list[Prompt],
        settings: PrescreenSettings,
        layout: RunLayout,
        world_size: int = 1,
        progress: bool = True,
        heavy_dup_count: int = 100,
        data: dict | None = None,
    ):
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.prompts = prompts
        self.settings = settings
        self.layout = layout
        self.out_dir = layout.prescreen
        self.world_size = world_size
        self.progress = progress
        self.heavy_dup_count = heavy_dup_count
        self.data = data
        self.table: pd.DataFrame | None = None
        model = OmegaConf.to_container(cfg.model, resolve=True)
        self.base = {
            "model": model,
            # Read before the model is loaded: weights changed while it loads differ next time.
            "model_files": model_identity(model.get("path") or "", model.get("revision")),
            "device": str(cfg.device),
            "dtype": str(cfg.dtype),
            "prescreen": score_settings(settings),
        }
        if settings.score == "own_images":
            from pipeline.training_images import training_set_identity

            # Read before the images are: a set changed while they are read differs next time.
            self.base["training_set"] = {"data": data, "files": training_set_identity(data or {})}
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
        images = self.settings.images if self.settings.score == "own_images" else None
        scored = {"rank": rank, "world_size": world_size, "prompts": len(share), "prompt_ids": prompts_digest(share, images)}
        return Unit(f"scores_{rank}", {**self.base, **scored})

    def run(self, units, ctx: StepContext) -> None:
        from pipeline.io import write_parquet

        share = self.share(ctx.rank, ctx.world_size)
        pipe = load_prescreen_model(self.cfg) if share else None  # a rank with no prompt loads nothing
        images = self.training_images(share) if share and self.settings.score == "own_images" else None
        for unit in units:
            with ctx.track_time("scoring"):
                scores = score_prompts(pipe, share, self.settings, self.progress, images) if share else score_table([])
            write_parquet(scores, scores_path(ctx.out_dir, ctx.rank))
            evaluations = table_evaluations(scores, self.settings)
            ctx.stat("unet_evaluations", evaluations)
            ctx.done(unit, {"prompts": len(share), "unet_evaluations": evaluations, "seconds": round(ctx.seconds["scoring"], 2)})

    def training_images(self, share: list[Prompt]) -> dict:
        """The training images ``share`` is scored on under ``own_images`` (the first
        ``prescreen.images`` keys of each prompt), by key; prints one line when some are missing."""
        from pipeline.data.rejects import RejectLog
        from pipeline.training_images import fetch_training_images, with_location_index

        wanted = keys_to_fetch([p.keys for p in share], self.settings.images)
        rejects = RejectLog()
        # Through the run's location index when the duplicate finder wrote one (read by key, not streamed).
        data = with_location_index(self.data, self.layout.dedup)
        images = fetch_training_images(data, wanted, rejects=rejects, progress=self.progress) if wanted else {}
        without = sum(1 for p in share if not chosen_keys(p.keys, images, self.settings.images))
        if len(images) < len(wanted) or without:
            print(
                f"prescreen: {len(wanted) - len(images)} of {len(wanted)} training images not found in data.path="
                f"{self.data.get('path')}; {without} of {len(share)} prompts have no image and are ranked by "
                f"the {self.settings.text_score} score alone"
            )
        return images

    def outputs(self) -> list[Path]:
        return [self.layout.prescreen_scores, self.layout.prescreen_selected, self.out_dir / SUMMARY]

    def finish_settings(self) -> dict:
        """What the ranking reads beyond the scores: the keep rule and what each prompt carries."""
        from omegaconf import OmegaConf

        return {
            "prescreen": OmegaConf.to_container(self.cfg.prescreen, resolve=True),
            "heavy_dup_count": self.heavy_dup_count,
            "carried": [[p.prompt_id, p.dup_count, None if p.keys is None else list(p.keys)] for p in self.prompts],
        }

    def finish(self, ctx: StepContext) -> None:
        """Rank every rank's scores together and write the outputs (atomically; the same content
        whichever rank writes them, so two ranks finishing together is harmless)."""
        self.table = rank_scores(merged_scores(ctx.out_dir, self.prompts, ctx.world_size), self.settings)
        summary = self.summary(self.table, ctx.world_size)
        write_outputs(self.table, summary, self.prompts, self.layout)
        print_ranking(self.table, summary, self.heavy_dup_count, self.layout)

    def summary(self, table: pd.DataFrame, world_size: int) -> dict:
        """The summary's content: counts, the cost (denoiser evaluations and seconds, from every
        unit's marker), the model, the ``prescreen`` settings and the ROC AUCs
        (:func:`pipeline.prescreen.evaluation.score_aucs`)."""
        from omegaconf import OmegaConf

        markers = [read_marker(self.out_dir, unit.name) or {} for unit in self.units()]
        summary = {
            "prompts": len(table),
            "kept": int(table.kept.sum()),
            "score": self.settings.score,
            "unet_evaluations": int(sum(m.get("unet_evaluations", 0) for m in markers)),
            "seconds": round(sum(m.get("seconds", 0.0) for m in markers), 2),
            "model": self.cfg.model.path,
            "settings": OmegaConf.to_container(self.cfg.prescreen, resolve=True),
        }
        if world_size > 1:
            summary["world_size"] = world_size
        summary.update(score_aucs(table, self.heavy_dup_count, self.settings.score))
        return summary


def merged_scores(out_dir: Path, prompts: list[Prompt], world_size: int) -> pd.DataFrame:
    """Every rank's raw scores as one table in the prompt list's order (as one process scores
    them), checked to hold each prompt exactly once."""
    columns = ["prompt_id", *SCORE_COLUMNS, LEVEL_COLUMN, IMAGE_LEVEL_COLUMN]
    # A column a scorer did not write (own_images' beside another score's table) is NaN.
    frames = [pd.read_parquet(scores_path(out_dir, rank)).reindex(columns=columns) for rank in range(world_size)]
    scores = pd.concat(frames, ignore_index=True)
    scores["prompt_id"] = scores["prompt_id"].astype(str)
    ids = [p.prompt_id for p in prompts]
    if len(scores) != len(ids) or scores["prompt_id"].duplicated().any() or set(scores["prompt_id"]) != set(ids):
        raise ValueError(  # one line, exit 2 (pipeline.cli.stage_main)
            f"the scores under {scores_path(out_dir, 0).parent} do not hold each of the {len(ids)} prompts once "
            f"({len(scores)} rows): another run may be writing there; rerun to rescore"
        )
    by_id = scores.set_index("prompt_id")
    lists = []
    for name in (LEVEL_COLUMN, IMAGE_LEVEL_COLUMN):
        values = by_id.loc[ids, name].tolist()
        present = not any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values)
        lists.append(np.array([list(v) for v in values], dtype=np.float64).reshape(len(ids), -1) if present else None)
    return score_table(prompts, {name: by_id.loc[ids, name].to_numpy() for name in SCORE_COLUMNS}, *lists)


def write_outputs(table: pd.DataFrame, summary: dict, prompts: list[Prompt], layout: RunLayout) -> None:
    """Write the ranked ``table``, the kept prompts (highest score first, as a prompt table with
    each prompt's ``keys`` from ``prompts``, and its score) and ``summary``."""
    from pipeline.io import write_json, write_parquet
    from pipeline.layout import write_prompt_table

    write_parquet(table, layout.prescreen_scores)
    kept = table[table.kept].sort_values("rank")
    selected = kept[["prompt_id", "caption", "dup_count", "score"]].copy()
    keys = {p.prompt_id: p.keys for p in prompts}  # the duplicate group's training records, when listed
    selected["keys"] = pd.Series([keys[pid] for pid in selected["prompt_id"]], index=selected.index, dtype=object)
    write_prompt_table(selected, layout.prescreen_selected)
    write_json(summary, layout.prescreen / SUMMARY)


def print_ranking(table: pd.DataFrame, summary: dict, heavy_dup_count: int, layout: RunLayout) -> None:
    """Print the top 15 prompts, the kept count and the cost, and the ROC AUCs the summary holds."""
    score = summary["score"]
    scores_shown = ["score_wen", "score_anisotropy", "alignment"] if score == "anisotropy" else ["score"]
    shown = table.head(15)[["rank", "prompt_id", "dup_count", *scores_shown, "robust_z", "kept", "caption"]].copy()
    shown["prompt_id"] = shown["prompt_id"].map(lambda v: display_text(v, 20))  # untrusted: bounded, no controls
    shown["caption"] = shown["caption"].map(lambda v: display_text(v, 60))
    print(shown.to_string(index=False))
    print(
        f"prescreen: {summary['kept']} of {summary['prompts']} prompts kept by the {score} score, "
        f"{summary['unet_evaluations']} denoiser evaluations in {summary['seconds']:.1f} s"
    )
    for name in (*SCORES, "text"):
        aucs = {side: summary.get(f"roc_auc_{name}_{side}") for side in ("heavy_vs_singletons", "heavy_vs_rest")}
        if any(value is not None for value in aucs.values()):
            print(
                f"prescreen: ROC AUC of the {name} score for dup_count >= {heavy_dup_count}: "
                + ", ".join(
                    f"{'vs singletons' if side == 'heavy_vs_singletons' else 'vs every other prompt'} {value:.3f}"
                    for side, value in aucs.items()
                    if value is not None
                )
            )
    print(f"written {layout.prescreen_scores}; generate from {layout.prescreen_selected}")
