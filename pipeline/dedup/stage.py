"""Stage 1, the duplicate finder: group a training set's near-duplicate images, rank the groups.

    python -m pipeline.dedup                                  # the demo set, offline embedder
    python -m pipeline.dedup data=files data.path=/data/laion embedder=open_clip \\
        embedder.pretrained=/weights/ViT-L-14.pt embedder.model_name=ViT-L-14
    python -m pipeline.dedup embedder=precomputed embeddings_dir=/data/laion_emb   # LAION's own

Reads the data set through the data layer and writes ``<run_dir>/dedup/``:

* ``embeddings/img_emb/img_emb_<rank>.npy`` + ``embeddings/metadata/metadata_<rank>.parquet``
  (clip-retrieval layout; not written when ``embeddings_dir`` supplies them);
* ``groups.parquet``: one row per record: ``key``, ``group_id`` (0 = the largest group),
  ``caption``, ``group_size``;
* ``selected.parquet``: the ``top_k`` largest groups: ``prompt_id`` ("00000"...),
  ``caption`` (the group's most common), ``dup_count``, ``keys``; the generator's input;
* ``rejects.jsonl`` (records skipped, with the reason) and ``summary.json``;
* ``memory/<phase>_<rank>.json``: the peak resident memory of the process that ran that phase
  for that rank (``peak_rss_mib``), to size array tasks;
* ``index/`` (``centroids.npy``, the IVF cells phase=train wrote, and the bucket files,
  :mod:`pipeline.dedup.buckets`) and ``pairs/pairs_<rank>.npy`` (each search task's pairs), the
  intermediate files; ``group_tmp.<host>.<pid>.*/``, the group phase's scratch, removed when it ends.

Nothing is written into ``data.path`` or ``embeddings_dir``: an output folder inside either is refused.

The work runs in five phases, each a step of the stage executor (:mod:`pipeline.executor`)
whose units (``embed_<rank>``, ``train``, ``index_<rank>``, ``search_<rank>``, ``group``) are
skipped when their completion marker (``.done/<unit>.json``) says they are done with the same
settings (so a rerun resumes; changing e.g. ``threshold`` redoes only the search and grouping,
changing an ``index.*`` setting redoes train, index, search and grouping; a file of the data
set replaced, added or removed redoes everything, since the embed units record the data set's
files by name, size and modification time, :mod:`pipeline.dedup.inputs`); each rank's rejects
go to ``rejects/rejects_<rank>.jsonl`` and its stats to ``stats/``. ``phase=all`` (the default,
``world_size=1``) runs them in order in one process. On a cluster, run each phase as a SLURM
array after the previous one (``python -m pipeline.dedup -m hydra/launcher=slurm_cpu
phase=index world_size=4``, one task per rank), or locally as processes (``-m
hydra/launcher=local``)::

    for p in train index search group; do   # with images: embed first
      python -m pipeline.dedup -m hydra/launcher=slurm_cpu phase=$p world_size=256 \\
          embedder=precomputed embeddings_dir=/data/laion_emb
    done

1. ``phase=embed``, one task per rank: embeds shard ``rank`` of the data set;
2. ``phase=train``, once (rank 0): for IVF, trains the cells by spherical k-means on a sample
   of the rows (``index.train_size``, default 32 x nlist) and writes ``index/centroids.npy``
   (atomically; its digest goes into the ``train`` marker, written after it); for exact search
   it only records that there are no cells;
3. ``phase=index``, one task per rank: for IVF, loads the cells (refusing, with one line naming
   phase=train, when they are missing or were trained with other settings), assigns rows
   ``shard_bounds(N, rank, world_size)`` to their cells and writes them to bucket files by cell
   (:mod:`pipeline.dedup.buckets`); nothing for exact search;
4. ``phase=search``, one task per rank: IVF: joins the cells it owns (``1/world_size`` of
   them) from the buckets; exact: query rows of shard ``rank`` against all rows, a block of
   rows at a time; writes ``pairs/pairs_<rank>.npy``;
5. ``phase=group``, once (rank 0): connected components by union-find over the pair files,
   streamed by query range (one integer per row); the records sorted by key and caption out of
   core, a bucket of ``group_chunk_rows`` records at a time (:mod:`pipeline.dedup.records`);
   ``groups.parquet`` streamed a row group at a time; then selection and summary.

No task holds the whole set of embeddings nor every record's strings: the train task holds
the k-means sample, an index task its own rows (float16) and the cells, a search task its
own buckets (memory-mapped) and the cells it is joining, the group task one integer per row
(plus a few per row of a duplicate group), a step of pairs, a bucket of records and a row
group of output. ``train`` and ``group`` do nothing on ranks other than 0, so every phase can
be launched as the same array (``python -m pipeline.dedup -m hydra/launcher=local
phase=search world_size=4`` runs one process per rank). The pairs, groups, their ids and the
selection do not depend on ``world_size`` nor on ``group_chunk_rows``: the same cells are
joined with the same rows in the same order, each query keeps its ``k`` best over all tasks,
records are ordered by key (then caption) before grouping, and groups of equal size by their
smallest key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cli import CONF_DIR, ConfigError, config_int, config_number, stage_main
from pipeline.data import Record, RejectLog
from pipeline.data.sharding import check_shard
from pipeline.dedup.buckets import centroids_digest, join_buckets, read_pairs, train_centroids, write_buckets, write_pairs
from pipeline.dedup.embeddings_store import EmbeddingRows, list_shards, unit_rows, write_shard
from pipeline.dedup.grouping import UnionFind, connected_groups, evaluate_groups, group_table, record_order, select_top
from pipeline.dedup.index import DATABASE_BLOCK, IndexSettings, Pairs, assign_cells, exact_pairs_blocked, training_sample
from pipeline.dedup.inputs import data_identity, embedding_files_identity, metadata_identity, writes_into
from pipeline.dedup.records import GroupCounts, write_groups
from pipeline.embedders.base import Embedder
from pipeline.executor import StepContext, Unit, all_done, merge_rejects, read_marker, run_step
from pipeline.identity import digest_of, tree_identity
from pipeline.io import atomic_write, marker_path, write_json, write_parquet
from pipeline.text import display_text

log = logging.getLogger(__name__)

PHASES = ("all", "embed", "train", "index", "search", "group")
# Phases that run on rank 0 only (one task); the other ranks of an array do nothing.
SINGLE_TASK_PHASES = ("train", "group")
# Queries per step of the group phase's stream over the pair files, and records per bucket of
# its out-of-core sort of the keys and captions (pipeline.dedup.records).
GROUP_CHUNK_ROWS = 1 << 18


@dataclass
class DedupSettings:
    """What decides the groups (the top level of ``conf/dedup.yaml``).

    Attributes:
        threshold: cosine similarity at or above which two images are near-duplicates.
        k: neighbours kept per image (its k most similar above the threshold); None: all.
        top_k: groups selected for the generator.
        min_group_size: a group needs this many members to be selected.
        batch_size: images per embedding call.
        index: how pairs are searched.
    """

    threshold: float
    k: int | None = 32
    top_k: int = 20
    min_group_size: int = 2
    batch_size: int = 256
    index: IndexSettings = field(default_factory=IndexSettings)

    def __post_init__(self):
        if self.threshold is None or not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(
                f"threshold: must be a cosine similarity in [-1, 1], got {self.threshold!r} "
                "(the embedder has no default threshold; pass threshold=...)"
            )
        if self.k is not None and self.k < 1:
            raise ValueError(f"k: must be >= 1 or null (keep every neighbour above the threshold), got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size: must be >= 1, got {self.min_group_size}")


# ----------------------------------------------------------------------------------------
# The core, without files


def embed_records(
    records: Iterable[Record], embedder: Embedder, batch_size: int = 256
) -> tuple[np.ndarray, pd.DataFrame]:
    """Embed a stream of records in batches.

    Returns ``(embeddings, metadata)``: float16 ``(N, dim)`` unit rows (float16 halves the
    memory of a large shard and is what is stored), and a DataFrame with ``key`` and
    ``caption`` in the same order.
    """
    chunks: list[np.ndarray] = []
    keys: list[str] = []
    captions: list[str] = []
    batch: list[Record] = []

    def flush() -> None:
        vectors = embedder.embed([r.image for r in batch])
        if vectors.shape != (len(batch), embedder.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(
                f"embedder {embedder.name}: returned {vectors.shape} (finite: {np.isfinite(vectors).all()}) "
                f"for {len(batch)} images; expected ({len(batch)}, {embedder.dim})"
            )
        chunks.append(vectors.astype(np.float16))
        keys.extend(r.key for r in batch)
        captions.extend(r.caption for r in batch)
        batch.clear()

    for record in records:
        if record.image is None:
            raise ValueError(f"record {record.key}: no image (the reader was asked not to decode)")
        batch.append(record)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float16)
    return embeddings, pd.DataFrame({"key": keys, "caption": captions})


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Query rows ``[start, stop)`` of rank ``rank``: contiguous, sizes differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def group_pairs(metadata: pd.DataFrame, pairs: Pairs, top_k: int, min_group_size: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(groups, selected)`` from the metadata (key, caption; row i = embedding i) and pairs.

    ``groups`` lists the records by key (then caption), so that it, the group ids and the
    selection are the same however the records were split over ranks and read back.
    """
    return group_labels(metadata, connected_groups(len(metadata), pairs.i, pairs.j), top_k, min_group_size)


def group_labels(metadata: pd.DataFrame, labels: np.ndarray, top_k: int, min_group_size: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`group_pairs` from each row's component label (int, any values below ``len(metadata)``)."""
    order = record_order(metadata["key"], metadata["caption"])
    keys, captions = metadata["key"].to_numpy()[order], metadata["caption"].to_numpy()[order]
    groups = group_table(keys, captions, np.asarray(labels)[order], presorted=True)
    return groups, select_top(groups, top_k, min_group_size)


# ----------------------------------------------------------------------------------------
# The stage: four steps of the stage executor (pipeline.executor), sharing one _Stage


def run_dedup(
    out_dir: str | Path,
    settings: DedupSettings,
    *,
    data: Mapping[str, Any] | None = None,
    embedder: Embedder | None = None,
    embedder_id: Any = None,
    embeddings_dir: str | Path | None = None,
    phase: str = "all",
    rank: int = 0,
    world_size: int = 1,
    ground_truth: str | Path | None = None,
    progress: bool = True,
    group_chunk_rows: int = GROUP_CHUNK_ROWS,
) -> dict | None:
    """Run ``phase`` of the duplicate finder for ``rank`` of ``world_size``; see the module doc.

    Args:
        out_dir: the stage's folder, ``<run_dir>/dedup``.
        data: a ``data`` config (format, path, reader options), for the embed phase.
        embedder: embeds the images (not needed with ``embeddings_dir``).
        embedder_id: what identifies the embedding (its config); a changed id redoes the
            embedding. Default: ``embedder.name``.
        embeddings_dir: a clip-retrieval folder of precomputed embeddings to use instead.
        ground_truth: a parquet with ``key`` and ``original_id``: evaluate the groups.
        group_chunk_rows: the group phase's chunk: queries per step of its stream over the pair
            files and records per bucket of its sort of keys and captions (its memory, not its result).

    Returns the summary (for ``all`` and ``group`` on rank 0), else None.
    """
    if phase not in PHASES:
        raise ValueError(f"phase: must be one of {', '.join(PHASES)}; got {phase!r}")
    rank, world_size = check_shard(rank, world_size)
    if phase == "all" and world_size != 1:
        raise ValueError(
            "phase=all runs every phase in this process and needs world_size=1; with "
            f"world_size={world_size} run phase=embed, phase=train, phase=index, phase=search, phase=group in turn"
        )
    if int(group_chunk_rows) < 1:
        raise ValueError(f"group_chunk_rows: must be >= 1, got {group_chunk_rows}")
    if ground_truth is not None and not Path(ground_truth).exists():
        raise FileNotFoundError(f"data.ground_truth: {ground_truth} does not exist")
    out = Path(out_dir)
    data_path = None if embeddings_dir else (data or {}).get("path")  # precomputed: the data set is not read
    problem = writes_into(out, {"data.path": data_path, "embeddings_dir": embeddings_dir})
    if problem:
        raise ValueError(problem)
    stage = _Stage(out, settings, data, embedder, embedder_id, embeddings_dir, rank, world_size, progress, int(group_chunk_rows))
    steps = {"embed": _Embed(stage), "train": _Train(stage), "index": _Index(stage), "search": _Search(stage),
             "group": _Group(stage, ground_truth)}  # fmt: skip
    for name in PHASES[1:] if phase == "all" else (phase,):
        if name in SINGLE_TASK_PHASES and rank != 0:
            log.info("phase=%s runs on rank 0 only; nothing to do on rank %d", name, rank)
        if name == "group" and rank == 0 and not (out / "summary.json").exists():
            marker_path(out, "group").unlink(missing_ok=True)  # its summary is gone: group again
        run_step(steps[name], out, rank=rank, world_size=world_size, progress=progress)
    write_json({"phase": phase, "rank": rank, "world_size": world_size, "pid": os.getpid(), "peak_rss_mib": peak_rss_mib()},
               out / "memory" / f"{phase}_{rank}.json")  # fmt: skip
    if phase not in ("all", "group") or rank != 0:
        return None
    group = steps["group"]
    if group.summary is not None:
        return group.summary
    log.info("group: already done, skipping")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    stored = summary.get("evaluation")
    summary.pop("evaluation", None)
    if ground_truth is not None:
        groups = pd.read_parquet(out / "groups.parquet", columns=["key", "group_id"])
        selected = pd.read_parquet(out / "selected.parquet")
        summary["evaluation"] = {"ground_truth": str(ground_truth), **evaluate_groups(groups, pd.read_parquet(ground_truth), selected)}
    if summary.get("evaluation") != stored:  # summary.json evaluates against this run's ground truth, or none
        write_json(summary, out / "summary.json")
    return summary


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: anonymous memory plus the pages of
    mapped files it touched. On Linux ``VmHWM`` of ``/proc/self/status``, which starts afresh
    at exec (``ru_maxrss`` would carry over the launching process's peak); elsewhere ``ru_maxrss``."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class _Stage:
    """What the phases of one run share: where things are, the settings that decide each
    phase's units (stored in their markers), the embeddings once read, and the order checks."""

    def __init__(self, out_dir, settings, data, embedder, embedder_id, embeddings_dir, rank, world_size, progress, group_chunk_rows=GROUP_CHUNK_ROWS):
        self.out = out_dir
        self.settings = settings
        self.data = data
        self.embedder = embedder
        self.embedder_id = embedder_id if embedder_id is not None else getattr(embedder, "name", None)
        self.precomputed = Path(embeddings_dir) if embeddings_dir else None
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self.group_chunk_rows = group_chunk_rows
        self._rows: EmbeddingRows | None = None
        self._data_identity: dict | None = None
        self._embeddings_settings: dict | None = None

    # Where things are ---------------------------------------------------------------------

    @property
    def embeddings_root(self) -> Path:
        return self.precomputed if self.precomputed is not None else self.out / "embeddings"

    def shards(self) -> list[int]:
        if self.precomputed is None:
            return list(range(self.world_size))
        if not self.precomputed.is_dir():
            raise FileNotFoundError(f"embeddings_dir: {self.precomputed} is not a folder")
        shards = list_shards(self.precomputed)
        if not shards:
            raise FileNotFoundError(f"embeddings_dir: no img_emb/img_emb_<n>.npy files in {self.precomputed}")
        return shards

    # Units: each phase's, with the settings that decide its result -----------------------

    def data_identity(self) -> dict:
        """The data set's files (:func:`pipeline.dedup.inputs.data_identity`), walked once per
        process, on first use: before the embed step reads a record."""
        if self._data_identity is None:
            self._data_identity = data_identity(dict(self.data or {}))
        return self._data_identity

    def embed_unit(self, rank: int) -> Unit:
        data = {k: v for k, v in dict(self.data or {}).items() if k != "ground_truth"}
        return Unit(f"embed_{rank}", {"data": data, "data_files": self.data_identity(), "embedder": self.embedder_id,
                                      "rank": rank, "world_size": self.world_size})  # fmt: skip

    def embeddings_settings(self) -> dict:
        """What identifies the embeddings the later phases read: the embed units' digests, or
        the precomputed vectors' files (names, sizes, modification times). Computed once per
        process: every later unit's settings hold it, some for every rank."""
        if self._embeddings_settings is None:
            if self.precomputed is None:
                self._embeddings_settings = {"embed": [self.embed_unit(r).digest for r in range(self.world_size)]}
            else:
                self._embeddings_settings = {"embeddings_dir": str(self.precomputed.resolve()),
                                             "files": embedding_files_identity(self.precomputed, self.shards())}  # fmt: skip
        return self._embeddings_settings

    def train_unit(self) -> Unit:
        """The cells, trained once for every rank: they depend on the embeddings and the index
        settings, not on ``world_size`` (the same sample of the same rows)."""
        return Unit("train", {"embeddings": self.embeddings_settings(), "index": self.settings.index.to_dict()})

    def cells_digest(self) -> str | None:
        """The digest of the centroids phase=train wrote (None before it ran, or for exact search)."""
        return (read_marker(self.out, "train") or {}).get("centroids")

    def index_unit(self, rank: int) -> Unit:
        # The train unit's digest and the centroids' own: retraining (new settings, or cells
        # trained again on another kind of CPU) redoes every index task.
        settings = {"train": self.train_unit().digest, "cells": self.cells_digest(), "embeddings": self.embeddings_settings(),
                    "index": self.settings.index.to_dict(), "rank": rank, "world_size": self.world_size}  # fmt: skip
        return Unit(f"index_{rank}", settings)

    def index_units(self) -> list[Unit]:
        return [self.index_unit(r) for r in range(self.world_size)]

    def search_unit(self, rank: int) -> Unit:
        s = self.settings
        index = [u.digest for u in self.index_units()]
        return Unit(f"search_{rank}", {"index": index, "threshold": s.threshold, "k": s.k, "rank": rank, "world_size": self.world_size})

    def group_unit(self) -> Unit:
        searches = [self.search_unit(r).digest for r in range(self.world_size)]
        settings = {"search": searches, "top_k": self.settings.top_k, "min_group_size": self.settings.min_group_size}
        if self.precomputed is not None:  # the keys and captions listed; the embed units cover the stage's own
            settings["metadata"] = metadata_identity(self.precomputed, self.shards())
        return Unit("group", settings)

    def require_cells(self, phase: str) -> dict:
        """The train marker, or one line saying to run phase=train first."""
        unit = self.train_unit()
        if not all_done(self.out, [unit]):
            state = "is missing" if read_marker(self.out, "train") is None else "was written with other embeddings or index settings"
            raise RuntimeError(
                f"phase={phase} needs the IVF cells trained once: run phase=train first (one task, rank 0; "
                f"{marker_path(self.out, 'train')} {state})"
            )
        return self.marker("train")

    # Phase order --------------------------------------------------------------------------

    def require(self, units: list[Unit], phase: str) -> None:
        """Raise unless every one of ``units`` (an earlier phase's) is done with the current settings."""
        stale = [u.name for u in units if not all_done(self.out, [u])]
        if stale:
            # A marker of other settings: for embed units, the data set's files may have changed since.
            other = [name for name in stale if read_marker(self.out, name) is not None]
            why = f"; {', '.join(other)} done with other settings or input files" if other else ""
            names = ", ".join(stale)
            raise RuntimeError(f"phase={phase} needs {names} done first (in {self.out}{why}); run the earlier phase(s)")

    def marker(self, name: str) -> dict:
        info = read_marker(self.out, name)
        if info is None:
            raise RuntimeError(f"{marker_path(self.out, name)}: missing or unreadable; run the phase that writes it again")
        return info

    def rows(self, phase: str) -> EmbeddingRows:
        """The embeddings, read a slice at a time (after every embed unit is done)."""
        if self.precomputed is None:
            self.require([self.embed_unit(r) for r in range(self.world_size)], phase)
        if self._rows is None:
            self._rows = EmbeddingRows(self.embeddings_root, self.shards())
        return self._rows


class _Embed:
    """Phase 1, one unit per rank (none with precomputed embeddings): embed shard ``rank``."""

    name = "embed"

    def __init__(self, stage: _Stage):
        self.stage = stage

    def units(self) -> list[Unit]:
        if self.stage.precomputed is not None:
            log.info("embed: using the precomputed embeddings in %s", self.stage.precomputed)
            return []
        return [self.stage.embed_unit(r) for r in range(self.stage.world_size)]

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        stage = self.stage
        if stage.embedder is None:
            raise ValueError("embedder: none configured; pick one (embedder=thumbnail, embedder=open_clip) or pass embeddings_dir=...")
        if stage.data is None:
            raise ValueError("data: no data set configured; pick a conf/data/*.yaml (data=files data.path=...)")
        from pipeline.data import open_dataset

        for unit in units:
            started = time.perf_counter()
            # This shard starts over: its old rejects go, and the log lists this run's.
            path = ctx.rejects.path
            path.unlink(missing_ok=True)
            ctx.rejects = rejects = RejectLog(path, once=True)
            records = open_dataset(stage.data, rank=ctx.rank, world_size=ctx.world_size, rejects=rejects, progress=ctx.progress)
            embeddings, metadata = embed_records(records, stage.embedder, stage.settings.batch_size)
            write_shard(stage.out / "embeddings", ctx.rank, embeddings, metadata)
            seconds = time.perf_counter() - started
            ctx.done(unit, {
                "rows": len(metadata), "rejected": len(rejects), "rejects_by_reason": dict(rejects.reasons),
                "embedder": stage.embedder.name, "dim": int(stage.embedder.dim), "seconds": seconds,
            })  # fmt: skip
            log.info("embed: shard %d: %d images embedded in %.1f s; %s", ctx.rank, len(metadata), seconds, rejects.summary())


class _Train:
    """Phase 2, one unit on rank 0: the IVF cells, trained once by spherical k-means on a sample
    of the rows, written to ``index/centroids.npy`` (exact search: only the marker, saying so)."""

    name = "train"

    def __init__(self, stage: _Stage):
        self.stage = stage

    def units(self) -> list[Unit]:
        return [self.stage.train_unit()]

    def is_complete(self, unit: Unit, marker: dict) -> bool:
        """The same settings, and the centroids it wrote are still there, unchanged."""
        if marker.get("digest") != unit.digest:
            return False
        if marker.get("kind") != "ivf":
            return True
        try:
            return centroids_digest(load_centroids(self.stage.out)) == marker.get("centroids")
        except (OSError, ValueError):
            return False

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        stage = self.stage
        (unit,) = units
        started = time.perf_counter()
        rows = stage.rows("train")
        kind = stage.settings.index.resolved_kind(rows.n)
        info: dict[str, Any] = {"kind": kind, "rows": rows.n, "dim": rows.dim}
        if kind == "ivf":
            # Only the sample is held: train_size (default 32 x nlist) rows of float32.
            centroids = train_centroids(rows, stage.settings.index)
            path = stage.out / "index" / "centroids.npy"
            atomic_write(path, lambda tmp: _save_npy(tmp, centroids))
            info.update(nlist=len(centroids), nprobe=min(stage.settings.index.nprobe, len(centroids)),
                        centroids=centroids_digest(centroids), sample_rows=len(training_sample(rows.n, stage.settings.index)),
                        path=str(path))  # fmt: skip
        info["seconds"] = info["train_seconds"] = time.perf_counter() - started
        ctx.done(unit, info)  # after the centroids: the marker holds their digest
        log.info("train: %s on %d rows (%.1f s)", f"{info['nlist']} cells" if kind == "ivf" else "exact search, no cells", rows.n, info["seconds"])


def load_centroids(out_dir: Path) -> np.ndarray:
    """``<dedup>/index/centroids.npy``, as phase=train wrote it."""
    return np.load(Path(out_dir) / "index" / "centroids.npy")


class _Index:
    """Phase 3, one unit per rank: rank ``rank``'s rows assigned to the cells phase=train wrote and
    bucketed by cell (exact: nothing to build)."""

    name = "index"

    def __init__(self, stage: _Stage):
        self.stage = stage

    def units(self) -> list[Unit]:
        return self.stage.index_units()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        stage = self.stage
        (unit,) = units
        started = time.perf_counter()
        rows = stage.rows("index")
        train = stage.require_cells("index")
        kind = train["kind"]
        start, stop = shard_bounds(rows.n, ctx.rank, ctx.world_size)
        info: dict[str, Any] = {"kind": kind, "rows": rows.n, "dim": rows.dim, "first_row": start, "stop_row": stop}
        if kind == "ivf":
            index_dir = stage.out / "index"
            try:
                centroids = load_centroids(stage.out)
            except (OSError, ValueError) as err:
                raise RuntimeError(f"phase=index: {index_dir / 'centroids.npy'} is unreadable ({err}); run phase=train again") from err
            if centroids_digest(centroids) != train["centroids"] or centroids.shape[1] != rows.dim:
                raise RuntimeError(f"phase=index: {index_dir / 'centroids.npy'} is not what phase=train recorded; run phase=train again")
            nlist, nprobe = len(centroids), min(stage.settings.index.nprobe, len(centroids))
            stored = rows.read(start, stop)  # this rank's rows, float16: N / world_size x dim x 2 bytes
            assign = assign_cells(centroids, _UnitView(stored), nprobe, progress=ctx.progress)
            atomic_write(index_dir / f"assign_{ctx.rank}.npy", lambda tmp: _save_npy(tmp, assign))
            entries = write_buckets(index_dir, ctx.rank, ctx.world_size, stored, start, assign, nlist)
            info.update(nlist=nlist, nprobe=nprobe, centroids=centroids_digest(centroids), bucket_entries=entries)
        info["seconds"] = time.perf_counter() - started
        ctx.done(unit, info)
        log.info("index: %s, rank %d: rows %d-%d of %d (%.1f s)", kind, ctx.rank, start, stop, rows.n, info["seconds"])


class _UnitView:
    """Stored rows seen as float32 unit rows, a slice at a time (for :func:`assign_cells`)."""

    def __init__(self, stored: np.ndarray):
        self.stored = stored

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, part: slice) -> np.ndarray:
        return unit_rows(self.stored[part])


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
        np.save(f, array)


class _Search:
    """Phase 3, one unit per rank: IVF, the pairs of the cells rank ``rank`` owns; exact, the
    pairs of query rows of shard ``rank`` against all rows."""

    name = "search"

    def __init__(self, stage: _Stage):
        self.stage = stage

    def units(self) -> list[Unit]:
        return [self.stage.search_unit(r) for r in range(self.stage.world_size)]

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        stage = self.stage
        settings = stage.settings
        (unit,) = units
        stage.require(stage.index_units(), "search")
        started = time.perf_counter()
        index = [stage.marker(f"index_{r}") for r in range(ctx.world_size)]
        kind = index[0]["kind"]
        if kind == "ivf":
            digests = sorted({m.get("centroids") for m in index})
            if digests != [stage.cells_digest()]:
                raise RuntimeError(
                    f"phase=index: its {ctx.world_size} tasks bucketed rows by cells {digests}, phase=train's are "
                    f"{stage.cells_digest()}; run phase=index again"
                )
            nlist = index[0]["nlist"]
            pairs = join_buckets(stage.out / "index", ctx.rank, ctx.world_size, nlist, settings.threshold, settings.k,
                                 settings.index.threads, ctx.progress)  # fmt: skip
            queries = sum(m["bucket_entries"][ctx.rank] for m in index)
        else:
            rows = stage.rows("search")
            start, stop = shard_bounds(rows.n, ctx.rank, ctx.world_size)
            pairs = exact_pairs_blocked(lambda lo, hi: unit_rows(rows.read(lo, hi)), rows.n, settings.threshold, settings.k,
                                        start, stop, settings.index.query_batch, DATABASE_BLOCK, ctx.progress)  # fmt: skip
            queries = stop - start
        write_pairs(stage.out / "pairs" / f"pairs_{ctx.rank}.npy", pairs)
        seconds = time.perf_counter() - started
        ctx.done(unit, {"queries": int(queries), "pairs": len(pairs), "seconds": seconds})
        log.info("search: rank %d: %d queries, %d pairs (%.1f s)", ctx.rank, queries, len(pairs), seconds)


class _Group:
    """Phase 5, one unit on rank 0: connected components, selection, merged rejects, summary.

    Bounded: one int64 per row (the union-find), a chunk of pairs, a bucket of records of the
    out-of-core sort by key and caption (:mod:`pipeline.dedup.records`), the groups with
    duplicates (a few ints each) and the selected groups' members."""

    name = "group"

    def __init__(self, stage: _Stage, ground_truth: str | Path | None):
        self.stage = stage
        self.ground_truth = ground_truth
        self.summary: dict | None = None  # set when this process grouped

    def units(self) -> list[Unit]:
        return [self.stage.group_unit()]

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        stage = self.stage
        (unit,) = units
        out, world_size = stage.out, stage.world_size
        stage.require([stage.search_unit(r) for r in range(world_size)], "group")
        started = time.perf_counter()
        rows = stage.rows("group")  # the row count (and the shards' shapes checked), no rows read
        chunk = stage.group_chunk_rows
        with scratch_folder(out) as scratch:
            labels, n_pairs = stream_components(rows.n, [out / "pairs" / f"pairs_{r}.npy" for r in range(world_size)],
                                                stage.settings.k, scratch / "pairs", chunk)  # fmt: skip
            selected, counts, sort = write_groups(stage.embeddings_root, stage.shards(), labels, stage.settings.top_k,
                                                  stage.settings.min_group_size, out / "groups.parquet", scratch / "records",
                                                  chunk)  # fmt: skip
        del labels
        if sort.duplicate_keys:
            log.warning("embeddings_dir: %d keys occur more than once (e.g. %r); groups.parquet will repeat them", sort.duplicate_keys, sort.example)
        write_parquet(selected, out / "selected.parquet")
        rejects = merge_rejects(out / "rejects", out / "rejects.jsonl", world_size if stage.precomputed is None else 0)
        group_seconds = time.perf_counter() - started
        summary = self._summary(counts, selected, n_pairs, rejects, group_seconds)
        if self.ground_truth is not None:  # a labelled sample: reads the groups' keys and ids back
            truth = pd.read_parquet(self.ground_truth)
            groups = pd.read_parquet(out / "groups.parquet", columns=["key", "group_id"])
            summary["evaluation"] = {"ground_truth": str(self.ground_truth), **evaluate_groups(groups, truth, selected)}
        write_json(summary, out / "summary.json")
        ctx.done(unit, {"seconds": group_seconds, "chunk_rows": chunk, "record_buckets": sort.buckets,
                        "records_held_max": sort.max_bucket, "duplicate_keys": sort.duplicate_keys})  # fmt: skip
        self.summary = summary

    def _summary(self, counts: GroupCounts, selected, n_pairs, rejects, group_seconds) -> dict:
        stage = self.stage
        largest = selected.head(10) if len(selected) else selected
        index_info = stage.marker("index_0")
        timing = {}
        if stage.precomputed is None:
            embeds = [stage.marker(f"embed_{r}") for r in range(stage.world_size)]
            timing["embed"] = sum(m.get("seconds", 0.0) for m in embeds)
            embedder = {"name": embeds[0].get("embedder"), "dim": embeds[0].get("dim")}
        else:
            embedder = {"name": "precomputed", "embeddings_dir": str(stage.precomputed)}
        timing["train"] = stage.marker("train").get("seconds", 0.0)
        timing["index"] = sum(stage.marker(f"index_{r}").get("seconds", 0.0) for r in range(stage.world_size))
        timing["search"] = sum(stage.marker(f"search_{r}").get("seconds", 0.0) for r in range(stage.world_size))
        timing["group"] = group_seconds
        timing["total"] = sum(timing.values())  # summed over ranks: compute time, not wall time
        reasons: Counter[str] = Counter()
        for entry in rejects:  # an entry may stand for several records (a shard that broke part-way)
            reasons[entry.get("reason", "").split(":", 1)[0]] += int(entry.get("count", 1))
        rejected = sum(reasons.values())
        settings = stage.settings
        return {
            "records_read": int(counts.records + rejected),
            "records_embedded": int(counts.records),
            "rejected": int(rejected),
            "rejected_by_reason": dict(reasons),
            "pairs": int(n_pairs),
            "groups": int(counts.groups),
            "duplicate_groups": int(counts.duplicate_groups),
            "records_in_duplicate_groups": int(counts.records_in_duplicate_groups),
            "selected": int(len(selected)),
            "largest_groups": [
                {"prompt_id": r.prompt_id, "dup_count": int(r.dup_count), "caption": r.caption, "n_captions": int(r.n_captions)}
                for r in largest.itertuples()
            ],
            "settings": {
                "embedder": embedder,
                "threshold": settings.threshold,
                "k": settings.k,
                "top_k": settings.top_k,
                "min_group_size": settings.min_group_size,
                "index": {**settings.index.to_dict(), "resolved_kind": index_info.get("kind"),
                          "nlist": index_info.get("nlist"), "nprobe_used": index_info.get("nprobe")},
                "world_size": stage.world_size,
            },
            "timing_seconds": timing,
            "outputs": {name: str(stage.out / name) for name in ("groups.parquet", "selected.parquet", "rejects.jsonl", "summary.json")},
        }  # fmt: skip


# Scratch folders of the group phase: <out>/group_tmp.<host>.<pid>.<random>, one per process.
SCRATCH_PREFIX = "group_tmp."


@contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """A new folder under ``out`` for this process's temporary files, removed afterwards.

    Its name holds the host and process id, so that two processes never share one and the
    folders a killed process left on this host (whose process has ended) are removed here
    first; those of another host are left alone (their process may still be running).
    """
    host = socket.gethostname().replace(".", "_")
    out.mkdir(parents=True, exist_ok=True)
    for folder in out.glob(f"{SCRATCH_PREFIX}{host}.*"):
        parts = folder.name.split(".")
        if len(parts) == 4 and parts[2].isdigit() and not _running(int(parts[2])):
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{host}.{os.getpid()}.", dir=out))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this host (one of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def stream_components(n: int, pair_files: list[Path], k: int | None, scratch: Path, chunk_rows: int = GROUP_CHUNK_ROWS) -> tuple[np.ndarray, int]:
    """Connected components over the pair files, out of core: ``(labels, pairs)``.

    The files (structured, sorted by query; :func:`~pipeline.dedup.buckets.write_pairs`) are
    read ``chunk_rows`` queries at a time, each query keeping its ``k`` best over all files,
    and fed to a union-find holding one int64 per row. ``labels``: int64 (n,), each row's
    component (its smallest row). ``pairs``: the distinct undirected pairs, counted from
    ``lo * n + hi`` keys spilled to ``scratch`` by ``lo`` range (one range held at a time;
    ``scratch`` is removed afterwards).
    """
    finder = UnionFind(n)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    spills = [scratch / f"keys_{p}.bin" for p in range(-(-n // chunk_rows))]
    for lo in range(0, n, chunk_rows):
        pairs = read_pairs(pair_files, lo, min(lo + chunk_rows, n), k)
        finder.union(pairs.i, pairs.j)
        low, high = np.minimum(pairs.i, pairs.j), np.maximum(pairs.i, pairs.j)
        keys, part = low * n + high, low // chunk_rows
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(spills) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(spills[p], "ab") as f:
                f.write(keys[order[bounds[p] : bounds[p + 1]]].tobytes())
    n_pairs = sum(len(np.unique(np.fromfile(path, dtype=np.int64))) for path in spills if path.exists())
    shutil.rmtree(scratch, ignore_errors=True)
    return finder.labels(), n_pairs


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [
        f"dedup: {summary['records_read']} records read, {summary['rejected']} rejected"
        + (f" ({', '.join(f'{n} {r}' for r, n in summary['rejected_by_reason'].items())})" if summary["rejected"] else ""),
        f"  {summary['groups']} groups; {summary['duplicate_groups']} with duplicates, holding "
        f"{summary['records_in_duplicate_groups']} records ({summary['pairs']} near-duplicate pairs, "
        f"threshold {summary['settings']['threshold']}, {summary['settings']['index']['resolved_kind']} search)",
    ]
    for group in summary["largest_groups"][:5]:
        lines.append(f"  {display_text(group['prompt_id'], 20)}  x{group['dup_count']:<5d} {display_text(group['caption'], 70)}")
    lines.append(f"  {summary['selected']} groups selected -> {summary['outputs']['selected.parquet']}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timing_seconds"].items()))
    if "evaluation" in summary:
        ev = summary["evaluation"]
        line = (
            f"  ground truth: pair precision {ev['precision']:.4f}, recall {ev['recall']:.4f} "
            f"({ev['correct_pairs']} of {ev['predicted_pairs']} predicted / {ev['true_pairs']} true pairs)"
        )
        if "top_k_match" in ev:
            line += f"; selected groups among the {summary['selected']} most duplicated: {ev['top_k_match']:.0%}"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Hydra entry point


def settings_from_config(cfg) -> DedupSettings:
    """:class:`DedupSettings` from the stage's config; a value of the wrong type raises a ConfigError naming its key."""
    from omegaconf import OmegaConf

    index = OmegaConf.to_container(cfg.index, resolve=True)
    index.setdefault("seed", cfg.get("seed", 0))
    fields = IndexSettings.__dataclass_fields__
    unknown = set(index) - set(fields)
    if unknown:
        raise ConfigError(f"index: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    # Every index setting but kind is a count; those defaulting to None may be null.
    counts = {name: config_int(cfg, f"index.{name}", optional=fields[name].default is None) for name in cfg.index if name != "kind"}
    # The ranges are DedupSettings' to check; a null threshold gets its hint there.
    return DedupSettings(
        threshold=config_number(cfg, "threshold", optional=True), k=config_int(cfg, "k", optional=True),
        top_k=config_int(cfg, "top_k"), min_group_size=config_int(cfg, "min_group_size"),
        batch_size=config_int(cfg, "batch_size"), index=IndexSettings(**{**index, **counts}),
    )  # fmt: skip


def embedder_identity(embedder_cfg) -> dict:
    """The embedder's config minus what does not change the vectors (device, batching, threshold),
    plus, under ``local_files``, the identity of each value naming a local file or folder (e.g.
    ``pretrained=/weights/ViT-L-14.pt``): its files' names, sizes and modification times, so
    weights replaced in place redo the embedding."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(embedder_cfg, resolve=True)
    identity = {k: v for k, v in values.items() if k not in ("device", "batch_size", "num_workers", "threshold", "cache_dir")}
    local = {k: digest_of(tree_identity(Path(v).expanduser())) for k, v in identity.items()
             if isinstance(v, str) and v and Path(v).expanduser().exists()}  # fmt: skip
    if local:
        identity["local_files"] = local
    return identity


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="dedup")
    @stage_main("dedup")
    def _run(cfg: DictConfig) -> None:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build: noise here
        settings = settings_from_config(cfg)
        embedder = None
        needs_embedder = not cfg.embeddings_dir and cfg.phase in ("all", "embed")
        if needs_embedder:
            if "_target_" not in cfg.embedder:
                raise ConfigError(f"embedder={cfg.embedder.get('name', '?')} reads precomputed embeddings: pass embeddings_dir=<folder>")
            embedder = hydra.utils.instantiate(cfg.embedder)
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False) if cfg.get("data") else None
        ground_truth = (data or {}).get("ground_truth") if cfg.evaluate else None
        if ground_truth and cfg.embeddings_dir and not Path(ground_truth).exists():
            # Precomputed embeddings need no data set, so the data group (data=demo by default) may not exist here.
            log.info("groups not evaluated: data.ground_truth %s does not exist", ground_truth)
            ground_truth = None
        summary = run_dedup(
            cfg.out_dir, settings, data=data, embedder=embedder, embedder_id=embedder_identity(cfg.embedder),
            embeddings_dir=cfg.embeddings_dir, phase=cfg.phase, rank=cfg.rank, world_size=cfg.world_size,
            ground_truth=ground_truth, progress=cfg.progress, group_chunk_rows=config_int(cfg, "group_chunk_rows", minimum=1),
        )  # fmt: skip
        if summary is not None:
            print(format_summary(summary))

    _run()


if __name__ == "__main__":
    main()
