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
* ``rejects.jsonl`` (records skipped, with the reason) and ``summary.json``.

The work runs in four phases, each skipped when a completion marker says it is done with
the same settings (so a rerun resumes, and changing e.g. ``threshold`` redoes only the
search and grouping). ``phase=all`` (the default, ``world_size=1``) runs them in order. On
a cluster, split them over a SLURM array (e.g. ``hydra/launcher=submitit_slurm -m
rank=0,1,2,3 world_size=4``):

1. ``phase=embed``, one task per rank: embeds shard ``rank`` of the data set;
2. ``phase=index``, once: trains the IVF cells over all embeddings (nothing for exact search);
3. ``phase=search``, one task per rank: query rows of shard ``rank`` against all rows;
4. ``phase=group``, once: connected components, selection, summary.

``index`` and ``group`` do nothing on ranks other than 0, so every phase can be launched
as the same array.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cli import ConfigError, config_int, config_number, stage_main
from pipeline.data import Record, RejectLog
from pipeline.data.sharding import check_shard
from pipeline.embedders.base import Embedder
from pipeline.embeddings_store import list_shards, read_embeddings, read_metadata, write_shard
from pipeline.grouping import connected_groups, evaluate_groups, group_table, select_top
from pipeline.index import Cells, IndexSettings, Pairs, find_pairs, train_cells
from pipeline.io import atomic_write, marker_path, mark_done, write_json, write_parquet
from pipeline.text import display_text

log = logging.getLogger(__name__)

PHASES = ("all", "embed", "index", "search", "group")


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
    """``(groups, selected)`` from the metadata (key, caption; row i = embedding i) and pairs."""
    labels = connected_groups(len(metadata), pairs.i, pairs.j)
    groups = group_table(metadata["key"].tolist(), metadata["caption"].tolist(), labels)
    return groups, select_top(groups, top_k, min_group_size)


# ----------------------------------------------------------------------------------------
# The stage: phases over files, with completion markers


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

    Returns the summary (for ``all`` and ``group`` on rank 0), else None.
    """
    if phase not in PHASES:
        raise ValueError(f"phase: must be one of {', '.join(PHASES)}; got {phase!r}")
    rank, world_size = check_shard(rank, world_size)
    if phase == "all" and world_size != 1:
        raise ValueError(
            "phase=all runs every phase in this process and needs world_size=1; with "
            f"world_size={world_size} run phase=embed, phase=index, phase=search, phase=group in turn"
        )
    if ground_truth is not None and not Path(ground_truth).exists():
        raise FileNotFoundError(f"data.ground_truth: {ground_truth} does not exist")
    stage = _Stage(Path(out_dir), settings, data, embedder, embedder_id, embeddings_dir, rank, world_size, progress)
    if phase in ("all", "embed"):
        stage.embed()
    if phase in ("all", "index") and rank == 0:
        stage.index()
    if phase in ("all", "search"):
        stage.search()
    if phase in ("all", "group") and rank == 0:
        return stage.group(ground_truth)
    if phase in ("index", "group") and rank != 0:
        log.info("phase=%s runs on rank 0 only; nothing to do on rank %d", phase, rank)
    return None


class _Stage:
    """The phases of one run; each checks its inputs' markers and writes its own last."""

    def __init__(self, out_dir, settings, data, embedder, embedder_id, embeddings_dir, rank, world_size, progress):
        self.out = out_dir
        self.settings = settings
        self.data = data
        self.embedder = embedder
        self.embedder_id = embedder_id if embedder_id is not None else getattr(embedder, "name", None)
        self.precomputed = Path(embeddings_dir) if embeddings_dir else None
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self._vectors: np.ndarray | None = None

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

    # Markers ------------------------------------------------------------------------------

    def _current(self, name: str, settings: dict) -> bool:
        path = marker_path(self.out, name)
        if not path.exists():
            return False
        recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        if _canonical(recorded) == _canonical(settings):
            return True
        log.info("%s: settings changed since it was done; redoing it", name)
        return False

    def _marker(self, name: str) -> dict:
        return json.loads(marker_path(self.out, name).read_text(encoding="utf-8"))

    def _require(self, names: list[str], settings: list[dict], phase: str) -> None:
        stale = [n for n, s in zip(names, settings) if not self._current(n, s)]
        if stale:
            raise RuntimeError(f"phase={phase} needs {', '.join(stale)} done first (in {self.out}); run the earlier phase(s)")

    def embed_settings(self, rank: int) -> dict:
        data = {k: v for k, v in dict(self.data or {}).items() if k != "ground_truth"}
        return {"data": data, "embedder": self.embedder_id, "rank": rank, "world_size": self.world_size}

    def embeddings_settings(self) -> dict:
        """What identifies the embeddings the later phases read."""
        if self.precomputed is None:
            return {"embed": [_digest(self.embed_settings(r)) for r in range(self.world_size)]}
        files = [self.precomputed / "img_emb" / f"img_emb_{s}.npy" for s in self.shards()]
        return {"embeddings_dir": str(self.precomputed.resolve()), "files": [[f.name, f.stat().st_size, f.stat().st_mtime] for f in files]}

    def index_settings(self) -> dict:
        return {"embeddings": self.embeddings_settings(), "index": self.settings.index.to_dict()}

    def search_settings(self, rank: int) -> dict:
        s = self.settings
        return {"index": _digest(self.index_settings()), "threshold": s.threshold, "k": s.k, "rank": rank, "world_size": self.world_size}

    def group_settings(self) -> dict:
        searches = [_digest(self.search_settings(r)) for r in range(self.world_size)]
        return {"search": searches, "top_k": self.settings.top_k, "min_group_size": self.settings.min_group_size}

    # Phases -------------------------------------------------------------------------------

    def embed(self) -> None:
        if self.precomputed is not None:
            log.info("embed: using the precomputed embeddings in %s", self.precomputed)
            return
        name, settings = f"embed_{self.rank}", self.embed_settings(self.rank)
        if self._current(name, settings):
            log.info("embed: shard %d already done, skipping", self.rank)
            return
        if self.embedder is None:
            raise ValueError("embedder: none configured; pick one (embedder=thumbnail, embedder=open_clip) or pass embeddings_dir=...")
        if self.data is None:
            raise ValueError("data: no data set configured; pick a conf/data/*.yaml (data=files data.path=...)")
        from pipeline.data import open_dataset

        started = time.perf_counter()
        rejects_path = self.out / "rejects" / f"rejects_{self.rank}.jsonl"
        rejects_path.unlink(missing_ok=True)  # this shard starts over; its old rejects go
        rejects = RejectLog(rejects_path)
        records = open_dataset(self.data, rank=self.rank, world_size=self.world_size, rejects=rejects, progress=self.progress)
        embeddings, metadata = embed_records(records, self.embedder, self.settings.batch_size)
        write_shard(self.out / "embeddings", self.rank, embeddings, metadata)
        seconds = time.perf_counter() - started
        mark_done(self.out, name, {
            "settings": settings, "rows": len(metadata), "rejected": len(rejects),
            "rejects_by_reason": dict(rejects.reasons), "embedder": self.embedder.name, "dim": int(self.embedder.dim),
            "seconds": seconds,
        })  # fmt: skip
        log.info("embed: shard %d: %d images embedded in %.1f s; %s", self.rank, len(metadata), seconds, rejects.summary())

    def _load_vectors(self) -> np.ndarray:
        if self.precomputed is None:
            self._require([f"embed_{r}" for r in range(self.world_size)], [self.embed_settings(r) for r in range(self.world_size)], "index/search")
        if self._vectors is None:  # phase=all reads them once for index and search
            self._vectors = read_embeddings(self.embeddings_root, self.shards())
        return self._vectors

    def index(self) -> None:
        settings = self.index_settings()
        if self._current("index", settings):
            log.info("index: already done, skipping")
            return
        started = time.perf_counter()
        vectors = self._load_vectors()
        kind = self.settings.index.resolved_kind(len(vectors))
        info: dict[str, Any] = {"settings": settings, "kind": kind, "rows": len(vectors), "dim": int(vectors.shape[1])}
        if kind == "ivf":
            cells = train_cells(vectors, self.settings.index, self.progress)
            cells.save(self.out / "index")
            info.update(nlist=cells.nlist, nprobe=cells.nprobe)
        info["seconds"] = time.perf_counter() - started
        mark_done(self.out, "index", info)
        log.info("index: %s over %d embeddings (%.1f s)", kind, len(vectors), info["seconds"])

    def search(self) -> None:
        name, settings = f"search_{self.rank}", self.search_settings(self.rank)
        if self._current(name, settings):
            log.info("search: shard %d already done, skipping", self.rank)
            return
        self._require(["index"], [self.index_settings()], "search")
        started = time.perf_counter()
        vectors = self._load_vectors()
        kind = self._marker("index")["kind"]
        cells = Cells.load(self.out / "index") if kind == "ivf" else None
        start, stop = shard_bounds(len(vectors), self.rank, self.world_size)
        index_settings = IndexSettings(**{**self.settings.index.to_dict(), "kind": kind})
        pairs = find_pairs(
            vectors, self.settings.threshold, self.settings.k, index_settings, start, stop, cells=cells, progress=self.progress
        )
        write_parquet(pairs.to_frame(), self.out / "pairs" / f"pairs_{self.rank}.parquet")
        seconds = time.perf_counter() - started
        mark_done(self.out, name, {"settings": settings, "queries": stop - start, "pairs": len(pairs), "seconds": seconds})
        log.info("search: shard %d: %d queries, %d pairs (%.1f s)", self.rank, stop - start, len(pairs), seconds)

    def group(self, ground_truth: str | Path | None) -> dict:
        settings = self.group_settings()
        summary_path = self.out / "summary.json"
        if self._current("group", settings) and summary_path.exists():
            log.info("group: already done, skipping")
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if ground_truth is not None:
                groups = pd.read_parquet(self.out / "groups.parquet")
                selected = pd.read_parquet(self.out / "selected.parquet")
                summary["evaluation"] = {"ground_truth": str(ground_truth), **evaluate_groups(groups, pd.read_parquet(ground_truth), selected)}
            return summary
        self._require([f"search_{r}" for r in range(self.world_size)], [self.search_settings(r) for r in range(self.world_size)], "group")
        started = time.perf_counter()
        metadata = read_metadata(self.embeddings_root, self.shards())
        parts = [pd.read_parquet(self.out / "pairs" / f"pairs_{r}.parquet") for r in range(self.world_size)]
        pairs = Pairs.from_frame(pd.concat(parts, ignore_index=True))
        groups, selected = group_pairs(metadata, pairs, self.settings.top_k, self.settings.min_group_size)
        write_parquet(groups, self.out / "groups.parquet")
        write_parquet(selected, self.out / "selected.parquet")
        rejects = self._merge_rejects()
        group_seconds = time.perf_counter() - started
        summary = self._summary(metadata, groups, selected, pairs, rejects, group_seconds)
        if ground_truth is not None:
            truth = pd.read_parquet(ground_truth)
            summary["evaluation"] = {"ground_truth": str(ground_truth), **evaluate_groups(groups, truth, selected)}
        write_json(summary, summary_path)
        mark_done(self.out, "group", {"settings": settings, "seconds": group_seconds})
        return summary

    def _merge_rejects(self) -> list[dict]:
        entries: list[dict] = []
        for r in range(self.world_size if self.precomputed is None else 0):
            path = self.out / "rejects" / f"rejects_{r}.jsonl"
            if path.exists():
                entries.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        atomic_write(self.out / "rejects.jsonl", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return entries

    def _summary(self, metadata, groups, selected, pairs, rejects, group_seconds) -> dict:
        sizes = groups.drop_duplicates("group_id")["group_size"]
        largest = selected.head(10) if len(selected) else selected
        index_info = self._marker("index")
        timing = {}
        if self.precomputed is None:
            embeds = [self._marker(f"embed_{r}") for r in range(self.world_size)]
            timing["embed"] = sum(m.get("seconds", 0.0) for m in embeds)
            embedder = {"name": embeds[0].get("embedder"), "dim": embeds[0].get("dim")}
        else:
            embedder = {"name": "precomputed", "embeddings_dir": str(self.precomputed)}
        timing["index"] = index_info.get("seconds", 0.0)
        timing["search"] = sum(self._marker(f"search_{r}").get("seconds", 0.0) for r in range(self.world_size))
        timing["group"] = group_seconds
        timing["total"] = sum(timing.values())  # summed over ranks: compute time, not wall time
        reasons: Counter[str] = Counter()
        for entry in rejects:  # an entry may stand for several records (a shard that broke part-way)
            reasons[entry.get("reason", "").split(":", 1)[0]] += int(entry.get("count", 1))
        rejected = sum(reasons.values())
        lo, hi = np.minimum(pairs.i, pairs.j), np.maximum(pairs.i, pairs.j)
        return {
            "records_read": int(len(metadata) + rejected),
            "records_embedded": int(len(metadata)),
            "rejected": int(rejected),
            "rejected_by_reason": dict(reasons),
            "pairs": int(len(np.unique(lo * len(metadata) + hi))) if len(pairs) else 0,
            "groups": int(len(sizes)),
            "duplicate_groups": int((sizes >= 2).sum()),
            "records_in_duplicate_groups": int(sizes[sizes >= 2].sum()),
            "selected": int(len(selected)),
            "largest_groups": [
                {"prompt_id": r.prompt_id, "dup_count": int(r.dup_count), "caption": r.caption, "n_captions": int(r.n_captions)}
                for r in largest.itertuples()
            ],
            "settings": {
                "embedder": embedder,
                "threshold": self.settings.threshold,
                "k": self.settings.k,
                "top_k": self.settings.top_k,
                "min_group_size": self.settings.min_group_size,
                "index": {**self.settings.index.to_dict(), "resolved_kind": index_info.get("kind"),
                          "nlist": index_info.get("nlist"), "nprobe_used": index_info.get("nprobe")},
                "world_size": self.world_size,
            },
            "timing_seconds": timing,
            "outputs": {name: str(self.out / name) for name in ("groups.parquet", "selected.parquet", "rejects.jsonl", "summary.json")},
        }  # fmt: skip


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
    lines.append(f"  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timing_seconds"].items()))
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


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _digest(value: Any) -> str:
    return hashlib.sha1(_canonical(value).encode()).hexdigest()[:16]


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
    """The embedder's config minus what does not change the vectors (device, batching, threshold)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(embedder_cfg, resolve=True)
    return {k: v for k, v in values.items() if k not in ("device", "batch_size", "num_workers", "threshold", "cache_dir")}


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path="../conf", config_name="dedup")
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
            ground_truth=ground_truth, progress=cfg.progress,
        )  # fmt: skip
        if summary is not None:
            print(format_summary(summary))

    _run()


if __name__ == "__main__":
    main()
