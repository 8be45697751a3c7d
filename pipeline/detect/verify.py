"""Verification: does a flagged prompt's representative sample copy a training image?

A flagged prompt says "the model keeps producing one image"; it is an *extraction* when that
image is (close to) a training image. Each flagged prompt's clique representative is compared,
with the near-copy rule's metric (the detector's: tiled L2 by default, see :mod:`pipeline.rule`),
against candidate training images:

- the duplicate finder's group behind the prompt (``keys``, carried with it in the prompt tables),
- plus the ``n_candidates`` nearest training images by embedding, from a faiss index over the
  duplicate finder's embeddings (``<run_dir>/dedup/embeddings/``), when there are some;
- or, with no duplicate-finder outputs at all (``exhaustive: auto``), every training image,
  streamed once: exact, and fine for small data sets.

Training images are center-cropped to the sample's aspect ratio and resized to its size first,
the way Stable Diffusion's training data was prepared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from pipeline.data import open_dataset
from pipeline.data.files import IMAGE_SUFFIXES
from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog
from pipeline.distance import embed_images
from pipeline.embedders.base import Embedder
from pipeline.executor import StepContext, Unit, merge_rejects, run_step
from pipeline.io import atomic_write, write_parquet
from pipeline.layout import normalise_keys
from pipeline.metrics import Metric, TiledL2

log = logging.getLogger(__name__)

EXTRACTED_COLUMNS = ["prompt_id", "sample", "sample_file", "train_key", "distance", "extracted", "n_candidates"]
# Longest side of the matched training image kept in <out_dir>/matches/ for the report.
MATCH_IMAGE_SIDE = 512
# The executor's rejects and stats of verification, beside the detector's.
VERIFY_LOGS = "verify"


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center-crop ``image`` to the aspect ratio of ``size`` = (height, width) and resize to it."""
    height, width = size
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.BICUBIC)


def _crop_for_display(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The crop :func:`fit_to` makes, at the training image's resolution (longest side capped)."""
    height, width = size
    scale = min(image.width / width, image.height / height, MATCH_IMAGE_SIDE / max(height, width))
    return fit_to(image, (max(1, round(height * scale)), max(1, round(width * scale))))


def group_candidates(prompts: pd.DataFrame) -> dict[str, list[str]]:
    """Training keys of the duplicate group behind each prompt: the ``keys`` column of a prompt
    table (:mod:`pipeline.layout`), carried with the prompt from the duplicate finder; empty
    for prompts that came without (a prompt list of captions, another tool's folder)."""
    keys = prompts["keys"] if "keys" in prompts.columns else [None] * len(prompts)
    return {str(pid): normalise_keys(group) or [] for pid, group in zip(prompts["prompt_id"], keys)}


class EmbeddingIndex:
    """A faiss inner-product index over the duplicate finder's (unit-length) embeddings."""

    def __init__(self, vectors: np.ndarray, keys: list[str]):
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) != len(keys):
            raise ValueError(f"{len(vectors)} embeddings but {len(keys)} keys")
        self.keys = keys
        self.dim = vectors.shape[1]
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(vectors)

    @classmethod
    def load(cls, embeddings_dir: str | Path) -> EmbeddingIndex | None:
        """Read ``img_emb/img_emb_<rank>.npy`` + ``metadata/metadata_<rank>.parquet`` (column ``key``).

        Returns ``None`` when the folder has no embeddings.
        """
        root = Path(embeddings_dir)
        parts = sorted((root / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if not parts:
            return None
        vectors, keys = [], []
        for part in parts:
            rank = part.stem.rsplit("_", 1)[1]
            meta_path = root / "metadata" / f"metadata_{rank}.parquet"
            if not meta_path.exists():
                raise FileNotFoundError(f"{part} has no metadata file {meta_path}")
            meta = pd.read_parquet(meta_path)
            if "key" not in meta.columns:
                raise ValueError(f"{meta_path}: no 'key' column (columns: {list(meta.columns)})")
            emb = np.load(part)
            if len(emb) != len(meta):
                raise ValueError(f"{part} has {len(emb)} rows but {meta_path} has {len(meta)}")
            vectors.append(emb.astype(np.float32))
            keys.extend(meta["key"].astype(str))
        return cls(np.concatenate(vectors), keys)

    def search(self, queries: np.ndarray, k: int) -> list[list[str]]:
        """The keys of the ``k`` nearest embeddings of each query row, nearest first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"embedder: gives {queries.shape[1]}-dimensional embeddings but the duplicate finder's "
                f"index has {self.dim}; use the embedder the dedup stage used"
            )
        _, ids = self.index.search(queries, min(k, len(self.keys)))
        return [[self.keys[i] for i in row if i >= 0] for row in ids]


def fetch_training_images(
    data: Mapping[str, Any], keys: Iterable[str], rejects: RejectLog | None = None, progress: bool = False
) -> dict[str, Image.Image]:
    """Decode the training images with the given keys from the data set ``data`` (a ``data`` config).

    The ``files`` layout is opened by key directly (``<path>/<key>.jpg``); other formats, and
    keys not found that way, are collected while streaming the data set once. Keys not found at
    all, or that do not decode, go to ``rejects``.
    """
    rejects = rejects if rejects is not None else RejectLog()
    wanted = set(keys)
    found: dict[str, Image.Image] = {}
    if data.get("format") == "files" and data.get("path"):
        root = Path(data["path"])
        for key in sorted(wanted):
            for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
                path = root / f"{key}{suffix}"
                if path.is_file():
                    try:
                        found[key] = decode_image(path.read_bytes())
                    except (BadImage, OSError) as err:
                        rejects.add(key, str(path), str(err))
                    break
    remaining = wanted - found.keys() - {entry["key"] for entry in rejects.entries}
    if remaining:
        # Records that do not decode are not ours to report unless we wanted them.
        stream_rejects = RejectLog()
        for record in open_dataset(data, rejects=stream_rejects, progress=progress, require_nonempty=False):
            if record.key in remaining:
                found[record.key] = record.image
                remaining.discard(record.key)
                if not remaining:
                    break
        for entry in stream_rejects.entries:
            if entry["key"] in remaining:
                rejects.add(entry["key"], entry["source"], entry["reason"])
                remaining.discard(entry["key"])
    for key in sorted(remaining):
        rejects.add(key, str(data.get("path")), "missing training image: no record with this key in the data set")
    return found


class _BestMatch:
    """The closest training image seen so far for each prompt."""

    def __init__(self, prompt_ids: list[str]):
        self.best: dict[str, tuple[float, str, Image.Image]] = {}
        self.counts = dict.fromkeys(prompt_ids, 0)

    def update(self, prompt_id: str, distances: np.ndarray, keys: list[str], images: list[Image.Image]) -> None:
        self.counts[prompt_id] += len(keys)
        if not len(keys):
            return
        i = int(np.argmin(distances))
        if prompt_id not in self.best or distances[i] < self.best[prompt_id][0]:
            self.best[prompt_id] = (float(distances[i]), keys[i], images[i])


def compare(representative: np.ndarray, images: list[Image.Image], metric: Metric) -> np.ndarray:
    """``metric`` from one (H, W, 3) sample to each training image fitted to its size: (len(images),)."""
    size = representative.shape[:2]
    fitted = np.stack([np.asarray(fit_to(image, size)) for image in images])
    return np.asarray(metric.distances(representative[None], fitted), dtype=np.float64)[0]


def run_verify(
    memorized: pd.DataFrame,
    generations_dir: str | Path,
    out_dir: str | Path,
    data: Mapping[str, Any],
    dedup_dir: str | Path | None = None,
    embedder_factory: Callable[[], Embedder | None] | None = None,
    n_candidates: int = 20,
    delta: float = 0.15,
    exhaustive: str | bool = "auto",
    metric: Metric | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Compare each flagged prompt's representative with its candidate training images.

    Writes ``<out_dir>/extracted.parquet`` (a row per flagged prompt: the closest candidate,
    ``train_key`` empty and ``distance`` NaN when it had none) and the matched training images
    as ``<out_dir>/matches/<prompt_id>.png``. Runs as one unit of the stage executor: its marker
    (``<out_dir>/.done/verify.json``) holds the digest of the inputs and settings, so a rerun
    with the same ones reuses the stored result; unreadable inputs are listed in
    ``<out_dir>/rejects_verify.jsonl`` and its stats are in ``<out_dir>/verify/stats/``.

    Args:
        data: the training set, as a ``data`` config (``format``, ``path``, reader options).
        memorized: the detector's prompt table; a prompt's ``keys`` (its duplicate group,
            carried from the duplicate finder) are its first candidates.
        dedup_dir: the duplicate finder's output folder, whose ``embeddings/`` give each
            prompt its nearest training images.
        embedder_factory: called (once, if needed) for the embedder of the dedup embeddings.
        n_candidates: nearest training images by embedding added to each prompt's candidates.
        delta: a representative at most this far from a training image is an extraction.
        metric: the distance (:mod:`pipeline.metrics`): the detector's near-copy rule's
            metric; default tiled L2 on a 4 x 4 grid.
        exhaustive: ``True`` compares against every training image; ``"auto"`` does so only
            when nothing offers candidates (no prompt has ``keys``, no embeddings).
    """
    out_dir, generations_dir = Path(out_dir), Path(generations_dir)
    if exhaustive not in (True, False, "auto"):
        raise ValueError(f"verify.exhaustive: expected true, false or auto, got {exhaustive!r}")
    metric = metric if metric is not None else TiledL2()
    flagged = memorized[memorized["flagged"]].reset_index(drop=True)
    settings = {
        "data": {k: str(v) for k, v in data.items()}, "dedup_dir": str(dedup_dir),
        "n_candidates": n_candidates, "delta": delta, "exhaustive": exhaustive, "metric": metric.describe(),
        "representatives": dict(zip(flagged["prompt_id"], flagged["representative_file"])),
        "groups": group_candidates(flagged),
    }  # fmt: skip
    step = _VerifyStep(
        flagged, generations_dir, out_dir, settings, data=data, dedup_dir=dedup_dir, embedder_factory=embedder_factory,
        n_candidates=n_candidates, delta=delta, exhaustive=exhaustive, metric=metric, progress=progress, batch_size=batch_size,
    )  # fmt: skip
    # One unit, run by the process that finished the detection; its marker holds the settings'
    # digest, so a rerun with the same inputs reuses extracted.parquet.
    run_step(step, out_dir, progress=progress, logs_dir=out_dir / VERIFY_LOGS)
    merge_rejects(out_dir / VERIFY_LOGS / "rejects", out_dir / "rejects_verify.jsonl", world_size=1)
    return pd.read_parquet(out_dir / "extracted.parquet")


class _VerifyStep:
    """Verification as a step of the stage executor: a single unit, ``verify``."""

    name = "verify"

    def __init__(self, flagged: pd.DataFrame, generations_dir: Path, out_dir: Path, settings: dict[str, Any], **options: Any):
        self.flagged, self.generations_dir, self.out_dir, self.settings, self.options = flagged, generations_dir, out_dir, settings, options

    def units(self, rank: int, world_size: int) -> list[Unit]:
        return [Unit("verify", self.settings)]

    def is_complete(self, unit: Unit, marker: dict[str, Any]) -> bool:
        return marker.get("digest") == unit.digest and (self.out_dir / "extracted.parquet").exists()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        extracted = _verify(self.flagged, self.generations_dir, self.out_dir, ctx.rejects, **self.options)
        write_parquet(extracted, self.out_dir / "extracted.parquet")
        ctx.done(units[0], {"extracted": int(extracted["extracted"].sum()), "flagged": len(extracted)})


def _verify(
    flagged: pd.DataFrame, generations_dir: Path, out_dir: Path, rejects: RejectLog, *, data: Mapping[str, Any],
    dedup_dir: str | Path | None, embedder_factory: Callable[[], Embedder | None] | None, n_candidates: int,
    delta: float, exhaustive: str | bool, metric: Metric, progress: bool, batch_size: int,
) -> pd.DataFrame:  # fmt: skip
    """The comparison itself (see :func:`run_verify`); returns the extracted table and writes the matched images."""
    prompt_ids = list(flagged["prompt_id"])
    representatives: dict[str, np.ndarray] = {}
    for row in flagged.itertuples(index=False):
        path = generations_dir / row.representative_file
        try:
            representatives[row.prompt_id] = np.asarray(decode_image(path.read_bytes()))
        except (BadImage, OSError) as err:
            rejects.add(row.prompt_id, str(path), f"unreadable representative sample: {err}")

    dedup_dir = Path(dedup_dir) if dedup_dir is not None else None
    candidates = group_candidates(flagged)
    has_groups = any(candidates.values())
    index = EmbeddingIndex.load(dedup_dir / "embeddings") if dedup_dir is not None else None
    if index is not None and representatives and n_candidates > 0:
        embedder = embedder_factory() if embedder_factory is not None else None
        if embedder is None:
            log.warning("dedup embeddings found but no embedder configured (embedder=...): nearest-neighbour candidates skipped")
        else:
            ids = list(representatives)
            nearest = index.search(embed_images([representatives[p] for p in ids], embedder), n_candidates)
            for pid, keys in zip(ids, nearest):
                candidates[pid] = list(dict.fromkeys(candidates[pid] + keys))
    scan_all = exhaustive is True or (exhaustive == "auto" and not has_groups and index is None)

    best = _BestMatch(prompt_ids)
    if scan_all:
        log.info("comparing %d representative(s) with every training image in %s", len(representatives), data.get("path"))
        records = open_dataset(data, rejects=rejects, progress=False) if representatives else []
        _scan(best, representatives, records, metric, progress, batch_size)
    else:
        images = fetch_training_images(data, {k for keys in candidates.values() for k in keys}, rejects, progress)
        for pid in tqdm(list(representatives), desc="verify", unit="prompt", disable=not progress):
            keys = [k for k in candidates[pid] if k in images]
            if keys:
                best.update(pid, compare(representatives[pid], [images[k] for k in keys], metric), keys, [images[k] for k in keys])
    if len(rejects):
        log.warning("%s", rejects.summary())

    rows = []
    for row in flagged.itertuples(index=False):
        distance, key, image = best.best.get(row.prompt_id, (float("nan"), "", None))
        if image is not None:
            display = _crop_for_display(image, representatives[row.prompt_id].shape[:2])
            atomic_write(out_dir / "matches" / f"{row.prompt_id}.png", lambda tmp, im=display: im.save(tmp, format="PNG"))
        rows.append({
            "prompt_id": row.prompt_id, "sample": int(row.representative), "sample_file": row.representative_file,
            "train_key": key, "distance": distance, "extracted": bool(distance <= delta),
            "n_candidates": best.counts[row.prompt_id],
        })  # fmt: skip
    return pd.DataFrame(rows, columns=EXTRACTED_COLUMNS)




def _scan(
    best: _BestMatch,
    representatives: dict[str, np.ndarray],
    records: Iterable[Any],
    metric: Metric,
    progress: bool,
    batch_size: int,
) -> None:
    """Stream the whole training set once, comparing every image with every representative."""
    if not representatives:
        return
    ids = list(representatives)
    # Representatives of one size are compared together, in one matrix product per batch.
    by_size: dict[tuple[int, int], list[str]] = {}
    for pid in ids:
        by_size.setdefault(representatives[pid].shape[:2], []).append(pid)

    def flush(keys: list[str], images: list[Image.Image]) -> None:
        for size, pids in by_size.items():
            fitted = np.stack([np.asarray(fit_to(image, size)) for image in images])
            distances = np.asarray(metric.distances(np.stack([representatives[p] for p in pids]), fitted), dtype=np.float64)
            for pid, row in zip(pids, distances):
                best.update(pid, row, keys, images)

    keys: list[str] = []
    images: list[Image.Image] = []
    for record in tqdm(records, desc="verify (all training images)", unit="image", disable=not progress):
        keys.append(record.key)
        images.append(record.image)
        if len(keys) == batch_size:
            flush(keys, images)
            keys, images = [], []
    if keys:
        flush(keys, images)
