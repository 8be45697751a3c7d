"""Verification: which samples reproduce a training image?

A flagged prompt says "the model keeps producing one image"; a sample is direct evidence when
it is (close to) a training image. When a training set is given, every sample of every
screened prompt, flagged or not, is compared with the near-copy rule's metric (the
detector's: tiled L2 by default, see :mod:`pipeline.rule`) against candidate training images:

- the duplicate finder's group behind the prompt (``keys``, carried with it in the prompt tables),
- plus each sample's ``n_candidates`` nearest training images by embedding, from a faiss index
  over the duplicate finder's embeddings (``<run_dir>/dedup/embeddings/``), when there are
  some; at most ``max_candidates`` per prompt;
- or, with no duplicate-finder outputs at all (``exhaustive: auto``), every training image,
  streamed once: exact, and fine for small data sets.

A prompt is *extracted* when at least one of its samples is within ``delta`` of one of its
own training images: its duplicate group when the prompt carries one, else (a caption list,
another tool's folder: nothing says which images are its own) any training image. Its
*reproduction rate* is the share of its samples that are, with a 95% Wilson score interval
(:func:`pipeline.stats.wilson_interval`). This finds what the clique misses: samples spread
over several variants of a duplicated image, or a few copies among many samples.

A sample within ``delta`` of a training image outside the prompt's group reproduces training
data too, under a caption that is not that image's (a weakly steered model drifting to a
heavily duplicated image): it is counted apart, in ``samples_matched_other``, and listed in
``extracted.parquet`` with ``in_group`` false, never dropped; it does not make the prompt
extracted, whose verdict says "this caption's training data comes back".

Training images are center-cropped to the sample's aspect ratio and resized to its size first,
the way Stable Diffusion's training data was prepared; distances are batched, every sample of
a prompt against a chunk of candidates in one call (:func:`sample_distances`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data import open_dataset
from pipeline.data.rejects import RejectLog
from pipeline.detect.candidates import EmbeddingIndex, group_candidates
from pipeline.distance import embed_images
from pipeline.embedders.base import Embedder
from pipeline.executor import StepContext, Unit, run_step
from pipeline.generations import Sample, list_samples, load_samples, samples_identity
from pipeline.io import atomic_write, write_json, write_parquet
from pipeline.layout import EMBEDDINGS, EVIDENCE_DIGEST, EXTRACTED, EXTRACTED_COLUMNS, MATCHES, VERIFICATION_COLUMNS, VERIFY
from pipeline.metrics import Metric, TiledL2
from pipeline.stats import wilson_interval
from pipeline.training_images import (  # noqa: F401
    fetch_training_images,
    fit_batch,
    fit_to,
    sample_distances,
    training_set_identity,
    with_location_index,
)

log = logging.getLogger(__name__)

# Longest side of the matched training image kept in <out_dir>/matches/ for the report.
MATCH_IMAGE_SIDE = 512
# Verification's own folder under the detector's: executor markers, per-prompt results, rejects, stats.
VERIFY_DIR = VERIFY
# Under it: each verified prompt's row (<prompt_id>.json) and matching pairs (<prompt_id>.parquet).
PROMPT_RESULTS = "prompts"


def _crop_for_display(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The crop :func:`fit_to` makes, at the training image's resolution (longest side capped)."""
    height, width = size
    scale = min(image.width / width, image.height / height, MATCH_IMAGE_SIDE / max(height, width))
    return fit_to(image, (max(1, round(height * scale)), max(1, round(width * scale))))


@dataclass
class PromptSamples:
    """One prompt's readable samples: their :class:`pipeline.generations.Sample` records and
    uint8 (H, W, 3) images, in the same order."""

    prompt_id: str
    samples: list[Sample]
    images: list[np.ndarray]


def embeddings_folder(dedup_dir: str | Path | None, embeddings_dir: str | Path | None = None) -> Path | None:
    """Where the training set's embeddings are: ``embeddings_dir`` (the precomputed ones the
    duplicate finder read) or ``<dedup_dir>/embeddings``; None without either."""
    if embeddings_dir:
        return Path(embeddings_dir)
    return Path(dedup_dir) / EMBEDDINGS if dedup_dir is not None else None


def embedding_index(dedup_dir: str | Path | None, embeddings_dir: str | Path | None = None) -> EmbeddingIndex | None:
    """A nearest-neighbour index over :func:`embeddings_folder`'s embeddings; None without any."""
    folder = embeddings_folder(dedup_dir, embeddings_dir)
    return EmbeddingIndex.load(folder) if folder is not None else None


def nearest_by_prompt(
    prompt_ids: Sequence[str],
    load: Callable[[str], PromptSamples],
    index: EmbeddingIndex | None,
    embedder_factory: Callable[[], Embedder | None] | None,
    n_candidates: int,
    progress: bool = False,
) -> dict[str, list[str]]:
    """Each prompt's samples' ``n_candidates`` nearest training keys in ``index``, rank by rank
    (:func:`nearest_keys`), from one search for every prompt: a search reads every shard of the
    index, so it is made once however the prompts are split later.

    The prompts are read one at a time (``load(prompt_id)``) and only their samples' embeddings
    kept (float32 ``(n_samples, dim)`` each). The embedder is built (``embedder_factory()``)
    at the first prompt with samples. Empty without an index, candidates or an embedder (which
    a warning names)."""
    if index is None or n_candidates <= 0:
        return {}
    embedder: Embedder | None = None
    vectors: dict[str, np.ndarray] = {}
    for prompt_id in tqdm(prompt_ids, desc="embedding samples", unit="prompt", disable=not progress):
        prompt = load(prompt_id)
        if not prompt.images:
            continue
        if embedder is None:
            embedder = embedder_factory() if embedder_factory is not None else None
            if embedder is None:
                log.warning(
                    "dedup embeddings found but no embedder configured (embedder=...): nearest-neighbour candidates skipped"
                )
                return {}
        vectors[prompt_id] = embed_images(prompt.images, embedder)
    return nearest_keys(vectors, index, n_candidates)


def nearest_keys(vectors: Mapping[str, np.ndarray], index: EmbeddingIndex, n_candidates: int) -> dict[str, list[str]]:
    """Each prompt's samples' ``n_candidates`` nearest training keys in ``index``, rank by rank
    (every sample's nearest, then every sample's second ...), from one search for all of them."""
    names = [name for name, v in vectors.items() if len(v)]
    if not names or n_candidates <= 0:
        return {}
    found = index.search(np.concatenate([vectors[name] for name in names]), n_candidates)
    bounds = np.cumsum([0] + [len(vectors[name]) for name in names])
    out = {}
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        nearest = found[lo:hi]
        out[name] = [keys[rank] for rank in range(max(map(len, nearest), default=0)) for keys in nearest if rank < len(keys)]
    return out


def candidate_lists(
    prompt_ids: Sequence[str], groups: Mapping[str, list[str]], nearest: Mapping[str, list[str]], max_candidates: int
) -> dict[str, list[str]]:
    """Each prompt's duplicate group, then its ``nearest`` keys, without repeats, at most ``max_candidates``."""
    return {pid: list(dict.fromkeys([*groups.get(pid, []), *nearest.get(pid, [])]))[:max_candidates] for pid in prompt_ids}


class _Matches:
    """What one prompt's comparisons found so far: per sample its closest training image among
    the prompt's own (its duplicate group ``own``; every training image when ``own`` is None,
    a prompt that came without one) and among the others, and every (sample, training image)
    pair within ``delta``."""

    def __init__(self, prompt: PromptSamples, delta: float, own: frozenset[str] | None = None):
        self.prompt, self.delta, self.own = prompt, delta, own
        n = len(prompt.samples)
        # Index 0: the prompt's own training images; 1: other captions' (always inf when own is None).
        self.best_distance = np.full((2, n), np.inf)
        self.best_key: list[list[str]] = [[""] * n, [""] * n]
        self.best_image: list[list[Image.Image | None]] = [[None] * n, [None] * n]
        self.pairs: list[tuple[int, str, str, float, bool | None]] = []  # sample index, file, training key, distance, in group
        self.n_candidates = 0

    def in_group(self, key: str) -> bool | None:
        return None if self.own is None else key in self.own

    def add(self, keys: Sequence[str], images: Sequence[Image.Image], metric: Metric) -> None:
        """Compare every sample with ``images`` (training images named ``keys``), batched by sample size."""
        self.n_candidates += len(keys)
        if not keys or not self.prompt.images:
            return
        other = np.array([self.in_group(key) is False for key in keys])
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(self.prompt.images):
            by_size.setdefault(image.shape, []).append(i)
        for positions in by_size.values():
            distances = sample_distances(np.stack([self.prompt.images[i] for i in positions]), images, metric)
            for side, mask in ((0, ~other), (1, other)):
                if not mask.any():
                    continue
                masked = np.where(mask[None, :], distances, np.inf)
                nearest = masked.argmin(axis=1)
                for row, i in enumerate(positions):
                    j = int(nearest[row])
                    if masked[row, j] < self.best_distance[side, i]:
                        self.best_distance[side, i] = float(masked[row, j])
                        self.best_key[side][i], self.best_image[side][i] = keys[j], images[j]
            for row, j in zip(*np.nonzero(distances <= self.delta)):
                sample = self.prompt.samples[positions[row]]
                self.pairs.append((sample.index, sample.file, keys[j], float(distances[row, j]), self.in_group(keys[j])))

    def best(self) -> tuple[int, int] | None:
        """(side, position in ``prompt.samples``) of the best match: the sample closest to one of
        the prompt's own training images when one is within ``delta`` (the evidence of its
        extraction), else the sample closest to any training image; None when nothing was compared."""
        if not self.best_distance.size or not np.isfinite(self.best_distance).any():
            return None
        if (self.best_distance[0] <= self.delta).any():
            return 0, int(self.best_distance[0].argmin())
        side, position = np.unravel_index(int(self.best_distance.argmin()), self.best_distance.shape)
        return int(side), int(position)

    def result(self) -> dict[str, Any]:
        """The prompt's verification row (see :data:`VERIFICATION_COLUMNS`, less the rate, its interval and ``best_in_group``)."""
        matched = int((self.best_distance[0] <= self.delta).sum())
        matched_other = int(((self.best_distance[1] <= self.delta) & (self.best_distance[0] > self.delta)).sum())
        best = self.best()
        if best is not None:
            side, i = best
            row = {
                "best_sample": self.prompt.samples[i].index,
                "best_sample_file": self.prompt.samples[i].file,
                "best_train_key": self.best_key[side][i],
                "best_distance": float(self.best_distance[side, i]),
            }
        else:
            row = {"best_sample": None, "best_sample_file": "", "best_train_key": "", "best_distance": float("nan")}
        return {
            "prompt_id": self.prompt.prompt_id,
            "extracted": matched > 0,
            "samples_matched": matched,
            "samples_matched_other": matched_other,
            "samples_verified": len(self.prompt.samples),
            "n_candidates": self.n_candidates,
            **row,
        }


def run_verify(
    memorized: pd.DataFrame,
    generations_dir: str | Path,
    out_dir: str | Path,
    data: Mapping[str, Any],
    dedup_dir: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
    embedder_factory: Callable[[], Embedder | None] | None = None,
    n_candidates: int = 20,
    max_candidates: int = 256,
    delta: float = 0.15,
    exhaustive: str | bool = "auto",
    metric: Metric | None = None,
    progress: bool = True,
    batch_size: int = 256,
    prompts_per_pass: int = 64,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare every sample of every screened prompt with its candidate training images.

    Candidates per prompt: its duplicate group (``keys``, carried from the duplicate finder),
    then the ``n_candidates`` nearest training images of each sample by embedding (a faiss
    index over ``<dedup_dir>/embeddings/``, or ``embeddings_dir``: the precomputed embeddings
    the duplicate finder read), at most ``max_candidates`` in all; or, with
    ``exhaustive`` true (``"auto"``: when neither offers any), every training image, streamed
    once. A sample within ``delta`` of a training image (the rule's ``metric``) reproduces it;
    the prompt is extracted when that image is one of its own (its group, or any image for a
    prompt without one), and the sample counts in ``samples_matched_other`` when it reproduces
    only images of other captions.

    Runs through the stage executor with a unit per prompt (``<out_dir>/verify/``: markers
    with the digest of the prompt's sample files, candidates and settings; per-prompt results;
    rejects and stats), so an interrupted run resumes and a rerun redoes only what changed.
    Writes ``<out_dir>/extracted.parquet`` (a row per matching pair: ``prompt_id``, ``sample``,
    ``sample_file``, ``train_key``, ``distance``, ``in_group``: null for a prompt without a
    group), ``<out_dir>/matches/<prompt_id>.png`` (the best match's training image, cropped as
    compared, of each prompt with a sample within ``delta`` of a training image) and
    its unreadable samples and training images in ``<out_dir>/rejects.jsonl`` (with the detector's).

    Returns:
        ``memorized`` with :data:`VERIFICATION_COLUMNS` (``reproduction_rate`` = samples_matched /
        ``n_samples``, with its 95% Wilson interval), and the extracted pairs.
    """
    out_dir, generations_dir = Path(out_dir), Path(generations_dir)
    if exhaustive not in (True, False, "auto"):
        raise ValueError(f"verify.exhaustive: expected true, false or auto, got {exhaustive!r}")
    metric = metric if metric is not None else TiledL2()
    dedup_dir = Path(dedup_dir) if dedup_dir is not None else None
    groups = group_candidates(memorized)
    index = embedding_index(dedup_dir, embeddings_dir)
    data = with_location_index(data, dedup_dir)
    scan_all = exhaustive is True or (exhaustive == "auto" and not any(groups.values()) and index is None)
    common = {
        # Where images are read from does not decide a verdict: the location index is left out.
        "data": {k: str(v) for k, v in data.items() if k != "locations"},
        "training_set": training_set_identity(data),
        "dedup_dir": str(dedup_dir),
        "index": None if index is None else index.identity,
        "n_candidates": int(n_candidates),
        "max_candidates": int(max_candidates),
        "delta": float(delta),
        "scan_all": scan_all,
        "metric": metric.describe(),
        # What a prompt's result holds: 2 = extracted by its own training images, the others'
        # counted apart (results of the earlier version are redone, not reused).
        "results_version": 3,
    }
    step = _VerifyStep(
        memorized,
        generations_dir,
        out_dir,
        common,
        groups,
        index,
        data=data,
        embedder_factory=embedder_factory,
        n_candidates=int(n_candidates),
        max_candidates=int(max_candidates),
        delta=float(delta),
        scan_all=scan_all,
        metric=metric,
        progress=progress,
        batch_size=int(batch_size),
        prompts_per_pass=int(prompts_per_pass),
    )
    work_dir = out_dir / VERIFY_DIR
    # Its rejects and stats go with the detector's (one rejects.jsonl and stats.json per stage).
    run_step(step, work_dir, progress=progress, logs_dir=out_dir)

    rows, pairs = [], []
    for pid in memorized["prompt_id"].astype(str):
        rows.append(json.loads((work_dir / PROMPT_RESULTS / f"{pid}.json").read_text(encoding="utf-8")))
        pairs.append(pd.read_parquet(work_dir / PROMPT_RESULTS / f"{pid}.parquet"))
    derived = ("reproduction_rate", "reproduction_ci_low", "reproduction_ci_high", "best_in_group")
    verified = pd.DataFrame(rows, columns=["prompt_id", *[c for c in VERIFICATION_COLUMNS if c not in derived], EVIDENCE_DIGEST])
    # An earlier verification's columns are replaced, not merged beside this one's.
    base = memorized.drop(columns=[c for c in [*VERIFICATION_COLUMNS, EVIDENCE_DIGEST] if c in memorized.columns])
    table = base.merge(verified, on="prompt_id", how="left")
    n = table["n_samples"].astype(int)
    table["reproduction_rate"] = np.where(n > 0, table["samples_matched"] / n.where(n > 0, 1), np.nan)
    intervals = [wilson_interval(k, m) for k, m in zip(table["samples_matched"].astype(int), n)]
    table["reproduction_ci_low"] = [low for low, _ in intervals]
    table["reproduction_ci_high"] = [high for _, high in intervals]
    table["best_sample"] = pd.array(table["best_sample"], dtype="Int64")
    # Whether the closest training image is one of the prompt's own duplicate group (null where
    # the prompt has none): a sample can reproduce another caption's training image too.
    table["best_in_group"] = pd.array(
        [
            None if not groups.get(pid) or not key else key in groups[pid]
            for pid, key in zip(table["prompt_id"], table["best_train_key"])
        ],
        dtype="boolean",
    )
    extracted = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=list(EXTRACTED_COLUMNS))
    extracted = extracted.astype({"sample": int, "distance": float, "in_group": "boolean"}).sort_values(
        ["prompt_id", "sample", "distance"], kind="stable"
    )
    write_parquet(extracted.reset_index(drop=True), out_dir / EXTRACTED)
    return table[[*base.columns, *VERIFICATION_COLUMNS, EVIDENCE_DIGEST]], extracted


class _VerifyStep:
    """Verification as a step of the stage executor: a unit per prompt, run by one process
    (the detector's last shard), prompts in passes so that their candidates are read together."""

    name = "verify"

    def __init__(
        self,
        memorized: pd.DataFrame,
        generations_dir: Path,
        out_dir: Path,
        common: dict[str, Any],
        groups: dict[str, list[str]],
        index: EmbeddingIndex | None,
        **options: Any,
    ):
        self.generations_dir, self.out_dir, self.groups, self.index, self.options = (
            generations_dir,
            out_dir,
            groups,
            index,
            options,
        )
        self.work_dir = out_dir / VERIFY_DIR
        # A prompt is decided by its samples' bytes, its duplicate group and the shared settings
        # (the training set's and the embedding index's identities among them).
        self._units = [
            Unit(pid, {**common, "files": samples_identity(generations_dir, pid), "keys": groups.get(pid, [])})
            for pid in memorized["prompt_id"].astype(str)
        ]

    def units(self) -> list[Unit]:
        return self._units

    def is_complete(self, unit: Unit, marker: dict[str, Any]) -> bool:
        outputs = (self.work_dir / PROMPT_RESULTS / f"{unit.name}.json", self.work_dir / PROMPT_RESULTS / f"{unit.name}.parquet")
        return marker.get("digest") == unit.digest and all(path.exists() for path in outputs)

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        o = self.options
        passes = (
            [units]
            if o["scan_all"]
            else [units[i : i + o["prompts_per_pass"]] for i in range(0, len(units), o["prompts_per_pass"])]
        )
        # Every prompt's nearest training images from one search: each pass reading the index
        # again would read every embedding shard once per pass. Samples unreadable here are
        # logged when their pass reads them.
        nearest = (
            {}
            if o["scan_all"]
            else nearest_by_prompt(
                [unit.name for unit in units],
                lambda prompt_id: self._load(prompt_id, RejectLog()),
                self.index,
                o["embedder_factory"],
                o["n_candidates"],
                progress=o["progress"],
            )
        )
        bar = tqdm(total=len(units), desc="verify", unit="prompt", disable=not o["progress"])
        for chunk in passes:
            prompts = [self._load(unit.name, ctx.rejects) for unit in chunk]
            matches = {p.prompt_id: _Matches(p, o["delta"], self._own(p.prompt_id)) for p in prompts}
            if o["scan_all"]:
                self._scan(matches, ctx.rejects)
            else:
                candidates = candidate_lists([p.prompt_id for p in prompts], self.groups, nearest, o["max_candidates"])
                images = fetch_training_images(
                    o["data"], {k for keys in candidates.values() for k in keys}, ctx.rejects, o["progress"]
                )
                for p in prompts:
                    keys = [k for k in candidates[p.prompt_id] if k in images]
                    matches[p.prompt_id].add(keys, [images[k] for k in keys], o["metric"])
            for unit in chunk:
                self._finish(unit, matches[unit.name], ctx)
                bar.update(1)
        bar.close()

    def _own(self, prompt_id: str) -> frozenset[str] | None:
        """The prompt's own training images (its duplicate group); None when it has none listed."""
        group = self.groups.get(prompt_id)
        return frozenset(group) if group else None

    def _load(self, prompt_id: str, rejects: RejectLog) -> PromptSamples:
        samples, images = load_samples(self.generations_dir, list_samples(self.generations_dir, prompt_id, rejects), rejects)
        return PromptSamples(prompt_id, samples, images)

    def _scan(self, matches: dict[str, _Matches], rejects: RejectLog) -> None:
        """Stream the whole training set once, comparing every batch with every prompt's samples."""
        o = self.options
        if not any(m.prompt.images for m in matches.values()):
            return
        log.info("comparing the samples of %d prompt(s) with every training image in %s", len(matches), o["data"].get("path"))
        keys: list[str] = []
        images: list[Image.Image] = []

        def flush() -> None:
            for m in matches.values():
                m.add(keys, images, o["metric"])

        for record in tqdm(
            open_dataset(o["data"], rejects=rejects, progress=False),
            desc="verify (all training images)",
            unit="image",
            disable=not o["progress"],
        ):
            keys.append(record.key)
            images.append(record.image)
            if len(keys) == o["batch_size"]:
                flush()
                keys, images = [], []
        if keys:
            flush()

    def _finish(self, unit: Unit, found: _Matches, ctx: StepContext) -> None:
        """Write the prompt's result, its pairs, and its match image; then its marker."""
        result = found.result()
        best = found.best()
        match_path = self.out_dir / MATCHES / f"{unit.name}.png"
        if best is not None and result["best_distance"] <= found.delta:  # extracted, or reproducing another caption's image
            display = _crop_for_display(found.best_image[best[0]][best[1]], found.prompt.images[best[1]].shape[:2])
            atomic_write(match_path, lambda tmp, im=display: im.save(tmp, format="PNG"))
        else:
            match_path.unlink(missing_ok=True)  # an earlier run's, under other settings
        pairs = pd.DataFrame([(unit.name, *pair) for pair in found.pairs], columns=list(EXTRACTED_COLUMNS))
        pairs = pairs.astype({"sample": int, "distance": float, "in_group": "boolean"})
        write_parquet(pairs, self.work_dir / PROMPT_RESULTS / f"{unit.name}.parquet")
        # The digest of the best sample's bytes as verified: the report shows that file as
        # evidence, and refuses when it no longer holds these bytes.
        digests = {name: sha1 for name, sha1 in unit.settings["files"]}
        result[EVIDENCE_DIGEST] = digests.get(Path(result["best_sample_file"]).name) if result["best_sample_file"] else None
        write_json(result, self.work_dir / PROMPT_RESULTS / f"{unit.name}.json")
        ctx.done(unit, {"samples_matched": result["samples_matched"]})
