"""Stage 3: flag the prompts whose samples are copies of one image, then verify them.

For each prompt, the samples form a graph with an edge between two samples closer than
``threshold`` (the paper's tiled L2, or a CLIP cosine distance); a prompt is flagged when the
largest clique of that graph has at least ``min_clique`` members (Carlini et al. 2023: many
seeds converging on the same image is the signature of a memorized training image). Flagged
prompts are then compared with the training set (:mod:`pipeline.verify`).

    python -m pipeline.detect run_name=demo                 # reads <run_dir>/generations
    python -m pipeline.detect generations_dir=/elsewhere data=files data.path=/laion

Outputs in ``<run_dir>/detect/``: ``memorized.parquet`` (a row per prompt), ``extracted.parquet``
and ``matches/`` (when a training set is given), ``summary.json``, ``rejects.jsonl`` (unreadable
samples; ``rejects_<rank>.jsonl`` per shard), and per-prompt results under ``prompts/`` so that
a rerun skips finished prompts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.adaptive import FLAGGED, OUT_OF_REACH
from pipeline.cli import ConfigError, config_int, config_number, stage_main
from pipeline.clique import MAX_STEPS, max_clique
from pipeline.data.rejects import RejectLog
from pipeline.data.sharding import check_shard
from pipeline.distance import clip_distance, tiled_l2
from pipeline.embedders.base import Embedder
from pipeline.generations import PROMPTS_FILE, list_samples, load_samples, read_prompts, sample_files
from pipeline.io import is_done, mark_done, marker_path, unsafe_name, write_json, write_parquet

log = logging.getLogger(__name__)

METRICS = ("tiled_l2", "clip")
DEFAULT_THRESHOLDS = {"tiled_l2": 0.15, "clip": 0.05}

MEMORIZED_COLUMNS = [
    "prompt_id", "caption", "n_samples", "n_rejected", "clique_size", "flagged", "members",
    "member_files", "representative", "representative_file", "max_pair_distance",
    "median_pair_distance", "clique_exact",
]  # fmt: skip


@dataclass(frozen=True)
class DetectSettings:
    """What decides a verdict; a stored result is reused only when these are unchanged."""

    metric: str = "tiled_l2"
    threshold: float = DEFAULT_THRESHOLDS["tiled_l2"]
    min_clique: int = 10
    grid: int = 4
    size: int | None = None
    max_clique_steps: int = MAX_STEPS
    embedder: str | None = None  # the embedder's name, for the clip metric

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric: unknown metric {self.metric!r}; expected one of {list(METRICS)}")
        if not self.threshold > 0:
            raise ValueError(f"threshold: must be positive, got {self.threshold}")
        if self.min_clique < 2:
            raise ValueError(f"min_clique: must be at least 2, got {self.min_clique}")
        if self.grid < 1:
            raise ValueError(f"grid: must be at least 1, got {self.grid}")


def find_memorized(distances: np.ndarray, threshold: float, min_clique: int, max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """The verdict on one prompt from the distances between its samples.

    Args:
        distances: (n, n) symmetric matrix of sample distances.
        threshold: two samples are near-copies (an edge) when their distance is below it.
        min_clique: clique size from which the prompt is flagged.

    Returns:
        ``clique_size``, ``flagged``, ``members`` (positions in the matrix, increasing),
        ``representative`` (the member with the smallest mean distance to the other members;
        -1 when n == 0), ``max_pair_distance`` (largest distance within the clique, 0 for one
        member), ``median_pair_distance`` (over all pairs of samples; NaN when n < 2) and
        ``clique_exact`` (False when the clique search ran out of budget: size is a lower bound).
    """
    distances = np.asarray(distances, dtype=np.float64)
    n = distances.shape[0]
    clique = max_clique(distances < threshold, max_steps=max_steps)
    members = clique.members
    if members:
        within = distances[np.ix_(members, members)]
        mean_to_others = within.sum(axis=1) / max(1, len(members) - 1)
        representative = members[int(np.argmin(mean_to_others))]
        max_pair = float(within.max())
    else:
        representative, max_pair = -1, float("nan")
    upper = distances[np.triu_indices(n, k=1)]
    return {
        "clique_size": len(members),
        "flagged": len(members) >= min_clique,
        "members": members,
        "representative": representative,
        "max_pair_distance": max_pair,
        "median_pair_distance": float(np.median(upper)) if upper.size else float("nan"),
        "clique_exact": clique.exact,
    }


def sample_distances(images: list[np.ndarray], settings: DetectSettings, embedder: Embedder | None = None, device: str = "auto") -> np.ndarray:
    """All-pairs distances of one prompt's samples under ``settings.metric``: (n, n)."""
    if settings.metric == "clip":
        if embedder is None:
            raise ValueError("metric=clip needs an embedder: pass embedder=<name> (see conf/embedder/)")
        return clip_distance(images, embedder=embedder)
    return tiled_l2(images, grid=settings.grid, size=settings.size, device=device)


def detect_prompt(
    generations_dir: str | Path,
    prompt_id: str,
    caption: str,
    settings: DetectSettings,
    embedder: Embedder | None = None,
    rejects: RejectLog | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Read one prompt's samples and decide; returns its row of ``memorized.parquet``."""
    rejects = rejects if rejects is not None else RejectLog()
    before = len(rejects)
    listed = list_samples(generations_dir, prompt_id, rejects)
    samples, images = load_samples(generations_dir, listed, rejects)
    if images:
        distances = sample_distances(images, settings, embedder, device)
    else:
        distances = np.zeros((0, 0))
    verdict = find_memorized(distances, settings.threshold, settings.min_clique, settings.max_clique_steps)
    if not verdict["clique_exact"]:
        log.warning("prompt %s: the clique search stopped after max_clique_steps=%d; clique_size %d is a lower bound",
                    prompt_id, settings.max_clique_steps, verdict["clique_size"])
    positions = verdict.pop("members")
    position = verdict.pop("representative")
    return {
        "prompt_id": prompt_id,
        "caption": caption,
        "n_samples": len(samples),
        "n_rejected": len(rejects) - before,
        **verdict,
        "members": [samples[i].index for i in positions],
        "member_files": [samples[i].file for i in positions],
        "representative": samples[position].index if position >= 0 else -1,
        "representative_file": samples[position].file if position >= 0 else "",
    }


def _stored_result(results_dir: Path, prompt_id: str, settings: dict) -> dict | None:
    """A finished prompt's row, when it was computed with the same settings."""
    if not is_done(results_dir, prompt_id):
        return None
    marker = json.loads(marker_path(results_dir, prompt_id).read_text(encoding="utf-8"))
    if marker.get("settings") != settings:
        return None
    return json.loads((results_dir / f"{prompt_id}.json").read_text(encoding="utf-8"))


def _still_valid(result: dict | None, generations_dir: Path) -> bool:
    """A stored result still describes the prompt's samples (none were added since, e.g. by a
    generator run with a larger n_samples)."""
    if result is None:
        return False
    listed = len(sample_files(generations_dir, result["prompt_id"]))
    return listed == int(result["n_samples"]) + int(result["n_rejected"])


def screenable_prompts(generations_dir: Path, rejects: RejectLog | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prompts of a generations folder that are ready to screen: (prompt_id, caption), and
    the generator's prompt table as read (empty for folders without one).

    For the generator's folders, first union its shard files into ``prompts.parquet`` (the
    shards may still be running), then keep only prompts with a completion marker: a prompt
    still being sampled would be screened on part of its samples. Folders of other tools
    (no shard files, no markers) are read whole.
    """
    from pipeline.generate import consolidate_prompts, prompt_done

    if any(generations_dir.glob("prompts_*-of-*.parquet")):
        consolidate_prompts(generations_dir)
    # Checks the folder and the table, with clear errors; unsafe prompt ids go to ``rejects``.
    prompts = read_prompts(generations_dir, rejects)
    table = pd.read_parquet(generations_dir / PROMPTS_FILE) if (generations_dir / PROMPTS_FILE).is_file() else pd.DataFrame()
    if (generations_dir / ".done").is_dir() and {"prompt_id", "n_samples"} <= set(table.columns):
        generator_ids = table["prompt_id"].astype(str)
        counts = pd.to_numeric(table["n_samples"], errors="coerce")
        complete = {
            pid for pid, n in zip(generator_ids, counts)
            if unsafe_name(pid) is None and n == n and prompt_done(generations_dir, pid, int(n))
        }  # fmt: skip
        waiting = prompts["prompt_id"].isin(set(generator_ids) - complete)
        if waiting.any():
            log.warning("%d of %d prompts in %s are not complete yet (still being generated): not screened this time, "
                        "rerun detect when the generator has finished", int(waiting.sum()), len(prompts), generations_dir)
            prompts = prompts[~waiting].reset_index(drop=True)
    return prompts, table


def stopped_under_another_rule(prompts_table: pd.DataFrame, settings: DetectSettings) -> list[str]:
    """Prompts that adaptive sampling stopped on a verdict it took with another rule than these settings.

    A stop "flagged" or "out_of_reach" (:mod:`pipeline.adaptive`) cannot change the detector's
    verdict only when both judge near-copies alike: tiled L2 on the same ``grid``, the same
    ``threshold`` and ``min_clique``. Such a prompt judged otherwise may deserve the samples it
    was spared; these are its ids (sorted).
    """
    if not {"prompt_id", "stop_reason", "adaptive"} <= set(prompts_table.columns):
        return []
    ids = set()
    for prompt_id, reason, rule in zip(prompts_table["prompt_id"], prompts_table["stop_reason"], prompts_table["adaptive"]):
        if reason not in (FLAGGED, OUT_OF_REACH) or not isinstance(rule, (str, dict)) or unsafe_name(str(prompt_id)):
            continue
        try:
            rule = json.loads(rule) if isinstance(rule, str) else rule
            same = (
                settings.metric == "tiled_l2"
                and np.isclose(float(rule.get("threshold", np.nan)), settings.threshold)
                and int(rule.get("min_clique", -1)) == settings.min_clique
                and int(rule.get("grid", -1)) == settings.grid
            )
        except (ValueError, TypeError, AttributeError):  # a rule nobody can read is not this one
            same = False
        if not same:
            ids.add(str(prompt_id))
    return sorted(ids)


def run_detect(
    generations_dir: str | Path,
    out_dir: str | Path,
    settings: DetectSettings,
    embedder: Embedder | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str = "auto",
    progress: bool = True,
) -> pd.DataFrame | None:
    """Screen this shard's prompts, then write ``memorized.parquet`` once every shard is done.

    Prompt ``i`` (in prompt id order) belongs to shard ``i % world_size``. Each finished prompt
    is stored under ``<out_dir>/prompts/`` with a completion marker, so a rerun skips it (and
    recomputes it if the settings changed).

    Returns:
        The ``memorized.parquet`` table when all prompts are done, else ``None``.
    """
    rank, world_size = check_shard(rank, world_size)
    generations_dir, out_dir = Path(generations_dir), Path(out_dir)
    # One file per shard: processes of an array job must not append to the same file. A rerun
    # meets the same unsafe prompt ids again: the file lists each once.
    rejects = RejectLog(out_dir / ("rejects.jsonl" if world_size == 1 else f"rejects_{rank}.jsonl"), once=True)
    # Every shard reads the whole prompt table; rank 0 alone records the ids it skips.
    prompts, generator_table = screenable_prompts(generations_dir, rejects if rank == 0 else None)
    if prompts.empty:
        raise ValueError(
            f"generations_dir: no prompts ready to screen in {generations_dir} (no sub-folders, no {PROMPTS_FILE}, "
            "or every prompt still being generated)"
        )
    settings_dict = asdict(settings)
    results_dir = out_dir / "prompts"

    other_rule = stopped_under_another_rule(generator_table, settings)
    if other_rule:
        log.warning(
            "%d prompt(s) were stopped by adaptive sampling on a verdict taken with another near-copy rule than this "
            "detector's (metric %s, threshold %g, min_clique %d, grid %d), e.g. %s: their verdicts here may differ from "
            "a full run's; rerun the generator without adaptive sampling (or with the detector's rule) to complete them",
            len(other_rule), settings.metric, settings.threshold, settings.min_clique, settings.grid, other_rule[0],
        )  # fmt: skip

    mine = prompts.iloc[rank::world_size]
    todo = [row for row in mine.itertuples(index=False) if not _still_valid(_stored_result(results_dir, row.prompt_id, settings_dict), generations_dir)]
    log.info("shard %d/%d: %d prompts, %d already done", rank, world_size, len(mine), len(mine) - len(todo))
    for row in tqdm(todo, desc=f"detect [{rank}/{world_size}]", unit="prompt", disable=not progress):
        result = detect_prompt(generations_dir, row.prompt_id, row.caption, settings, embedder, rejects, device)
        write_json(result, results_dir / f"{row.prompt_id}.json")
        mark_done(results_dir, row.prompt_id, {"settings": settings_dict})
    if len(rejects):
        log.warning("%s", rejects.summary())

    rows = [_stored_result(results_dir, pid, settings_dict) for pid in prompts["prompt_id"]]
    rows = [row if _still_valid(row, generations_dir) else None for row in rows]
    missing = sum(row is None for row in rows)
    if missing:
        log.info("%d of %d prompts are not screened yet (other shards); memorized.parquet is written "
                 "by the last shard to finish, or by a rerun with world_size=1", missing, len(rows))
        return None
    memorized = pd.DataFrame(rows, columns=MEMORIZED_COLUMNS)
    write_parquet(memorized, out_dir / "memorized.parquet")
    write_json(
        {
            "generations_dir": str(generations_dir.resolve()),
            "settings": settings_dict,
            "prompts": len(memorized),
            "flagged": int(memorized["flagged"].sum()),
            "samples": int(memorized["n_samples"].sum()),
            "rejected_samples": int(memorized["n_rejected"].sum()),
            "stopped_under_another_rule": other_rule,
        },
        out_dir / "summary.json",
    )
    log.info("%d of %d prompts flagged; wrote %s", int(memorized["flagged"].sum()), len(memorized), out_dir / "memorized.parquet")
    return memorized


def settings_from_config(cfg: DictConfig, embedder_name: str | None = None) -> DetectSettings:
    """Build :class:`DetectSettings` from the Hydra config, naming the config key on errors."""
    metric = str(cfg.metric)
    if metric not in METRICS:
        raise ConfigError(f"metric: unknown metric {metric!r}; expected one of {list(METRICS)}")
    threshold = config_number(cfg, "threshold", optional=True)
    return DetectSettings(
        metric=metric,
        threshold=config_number(cfg, f"thresholds.{metric}") if threshold is None else threshold,
        min_clique=config_int(cfg, "min_clique"),
        grid=config_int(cfg, "grid"),
        size=config_int(cfg, "size", minimum=1, optional=True),
        max_clique_steps=config_int(cfg, "max_clique_steps", minimum=1),
        embedder=embedder_name if metric == "clip" else None,
    )


def run(cfg: DictConfig) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The stage from its Hydra config: screen, then verify when ``data`` is given.

    Returns (memorized, extracted); memorized is None while other shards are unfinished,
    extracted is None without a training set.
    """
    from pipeline.verify import run_verify

    embedder_cfg = cfg.get("embedder")
    embedders: list[Embedder] = []

    def get_embedder() -> Embedder | None:
        """Instantiated on first use only: the tiled L2 path needs no embedder."""
        if embedder_cfg is None:
            return None
        if not embedders:
            embedders.append(hydra.utils.instantiate(embedder_cfg))
        return embedders[0]

    if cfg.metric == "clip" and embedder_cfg is None:
        raise ConfigError("embedder: metric=clip needs an embedder; pass embedder=<name> (see conf/embedder/)")
    metric_embedder = get_embedder() if cfg.metric == "clip" else None
    settings = settings_from_config(cfg, getattr(metric_embedder, "name", None))
    # Read before screening, which may take hours: a wrong value is reported at once.
    n_candidates, delta = config_int(cfg, "verify.n_candidates", minimum=0), config_number(cfg, "verify.delta")
    out_dir = Path(cfg.out_dir)
    memorized = run_detect(
        cfg.generations_dir, out_dir, settings, embedder=metric_embedder, rank=cfg.rank,
        world_size=cfg.world_size, device=cfg.device, progress=cfg.progress,
    )  # fmt: skip
    if memorized is None:
        return None, None
    print(f"{int(memorized['flagged'].sum())} of {len(memorized)} prompts flagged -> {out_dir / 'memorized.parquet'}")
    data = cfg.get("data")
    if data is None:
        print("no training set given (data=...): verification skipped")
        return memorized, None
    extracted = run_verify(
        memorized, cfg.generations_dir, out_dir, data=OmegaConf.to_container(data, resolve=True),
        dedup_dir=cfg.verify.dedup_dir, embedder_factory=get_embedder, n_candidates=n_candidates,
        delta=delta, exhaustive=cfg.verify.exhaustive, grid=settings.grid, device=cfg.device,
        progress=cfg.progress,
    )  # fmt: skip
    print(f"{int(extracted['extracted'].sum())} of {len(extracted)} flagged prompts match a training image "
          f"-> {out_dir / 'extracted.parquet'}")
    return memorized, extracted


@hydra.main(version_base="1.3", config_path="../conf", config_name="detect")
@stage_main("detect")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
