"""The training images verification needs, as a URL list to download: audits without the images.

Users often hold LAION's metadata (url, caption, key) and its precomputed CLIP embeddings but
not the images. The duplicate finder runs on the embeddings alone; the detector then lists,
for every screened prompt, the candidates verification would compare its samples with (its
duplicate group, then its samples' nearest training images by embedding:
:func:`pipeline.detect.verify.nearest_by_prompt`), with their URL and caption from the
embeddings' metadata, as ``candidates.parquet`` (``url``, ``caption``, ``key``): the input of
img2dataset. The download, read with ``data.key_table=<that list>`` (each record keyed by its
URL, :mod:`pipeline.data.key_table`), is then the training set the detector verifies against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.rejects import RejectLog
from pipeline.detect.candidates import EmbeddingIndex, group_candidates
from pipeline.detect.verify import PromptSamples, candidate_lists, nearest_by_prompt
from pipeline.embedders.base import Embedder
from pipeline.generations import list_samples, load_samples
from pipeline.io import write_parquet

LIST_COLUMNS = ("url", "caption", "key")


def metadata_files(embeddings_dir: str | Path) -> list[Path]:
    """The clip-retrieval metadata files (``metadata/metadata_<n>.parquet``) of ``embeddings_dir``."""
    return sorted((Path(embeddings_dir) / "metadata").glob("metadata_*.parquet"))


def has_urls(embeddings_dir: str | Path | None) -> bool:
    """Whether the embeddings' metadata has a ``url`` column (LAION's does)."""
    files = metadata_files(embeddings_dir) if embeddings_dir is not None else []
    return bool(files) and "url" in pq.read_schema(files[0]).names


def candidate_keys(
    memorized: pd.DataFrame,
    generations_dir: str | Path,
    index: EmbeddingIndex | None,
    embedder_factory: Callable[[], Embedder | None] | None,
    n_candidates: int,
    max_candidates: int,
    rejects: RejectLog,
) -> dict[str, list[str]]:
    """Every screened prompt's candidate keys, as verification would choose them."""
    groups = group_candidates(memorized)
    prompt_ids = list(memorized["prompt_id"].astype(str))

    def load(prompt_id: str) -> PromptSamples:
        samples, images = load_samples(generations_dir, list_samples(generations_dir, prompt_id, rejects), rejects)
        return PromptSamples(prompt_id, samples, images)

    nearest = nearest_by_prompt(prompt_ids, load, index, embedder_factory, n_candidates)
    return candidate_lists(prompt_ids, groups, nearest, max_candidates)


def url_list(keys: set[str], embeddings_dir: str | Path) -> pd.DataFrame:
    """``url``, ``caption``, ``key`` of ``keys`` from the embeddings' metadata, in key order;
    keys without a URL are left out."""
    wanted = pa.array(sorted(keys), pa.string())
    parts = []
    for path in metadata_files(embeddings_dir):
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in LIST_COLUMNS if c in names])
        table = table.filter(pc.is_in(table.column("key").cast(pa.string()), value_set=wanted))
        parts.append(table.to_pandas())
    listed = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(LIST_COLUMNS))
    if "caption" not in listed.columns:
        listed["caption"] = ""
    listed = listed.dropna(subset=["url"]).astype({"key": str, "url": str})
    return listed[list(LIST_COLUMNS)].drop_duplicates("key").sort_values("key", kind="stable").reset_index(drop=True)


def write_download_list(
    memorized: pd.DataFrame,
    generations_dir: str | Path,
    embeddings_dir: str | Path,
    out_path: str | Path,
    embedder_factory: Callable[[], Embedder | None] | None,
    n_candidates: int,
    max_candidates: int,
) -> pd.DataFrame:
    """Write the candidates of every screened prompt as ``out_path`` (``url``, ``caption``, ``key``); returns it."""
    index = EmbeddingIndex.load(embeddings_dir)
    rejects = RejectLog()
    keys = candidate_keys(memorized, generations_dir, index, embedder_factory, n_candidates, max_candidates, rejects)
    listed = url_list({k for group in keys.values() for k in group}, embeddings_dir)
    write_parquet(listed, Path(out_path))
    return listed
