"""Where verification's candidate training images come from: a prompt's duplicate group
(:func:`group_candidates`) and its samples' nearest training images by embedding
(:class:`EmbeddingIndex`, over the duplicate finder's embeddings, queried with the embedder
:class:`EmbedderOnFirstUse` builds)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.embedders.base import Embedder
from pipeline.identity import digest_of, file_identity
from pipeline.layout import normalise_keys


def group_candidates(prompts: pd.DataFrame) -> dict[str, list[str]]:
    """Training keys of the duplicate group behind each prompt: the ``keys`` column of a prompt
    table (:mod:`pipeline.layout`), carried with the prompt from the duplicate finder; empty
    for prompts that came without (a prompt list of captions, another tool's folder)."""
    keys = prompts["keys"] if "keys" in prompts.columns else [None] * len(prompts)
    return {str(pid): normalise_keys(group) or [] for pid, group in zip(prompts["prompt_id"], keys)}


@dataclass(frozen=True)
class EmbeddingShard:
    """One shard of precomputed embeddings: ``vectors`` (``.npy``, ``(rows, dim)``, any float
    dtype) and ``metadata`` (``.parquet`` with a ``key`` column, one row per vector)."""

    vectors: Path
    metadata: Path
    rows: int


def _blocks(path: Path, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, float32 block)`` of at most ``rows`` rows of the 2-D ``.npy`` at ``path``,
    read with plain file reads (a memory map would keep every page it touched resident)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise ValueError(f"{path}: embeddings must be a C-ordered 2-D numeric array, got shape {shape}")
        total, dim = shape
        for start in range(0, total, rows):
            count = min(rows, total - start)
            block = np.fromfile(f, dtype=dtype, count=count * dim)
            if block.size != count * dim:
                raise ValueError(f"{path}: ends after {start * dim + block.size} of {total * dim} values")
            yield start, block.reshape(count, dim).astype(np.float32, copy=False)


class EmbeddingIndex:
    """Exact inner-product search over the duplicate finder's (unit-length) embeddings, read
    shard by shard and, within a shard, ``block_rows`` rows at a time (default: 256 MiB of
    float32 vectors) straight from the file.

    Memory holds one block of float32 vectors (``block_rows x dim``), the queries and their
    running best ``k``, whatever the number of embeddings; a shard's keys are read only when
    a search returns one of its rows. The search is exact: each query's ``k`` best
    similarities are those one flat index over every embedding finds (shards in rank order;
    among equal similarities, earlier blocks first).
    """

    def __init__(self, shards: list[EmbeddingShard], dim: int, block_rows: int | None = None):
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows: must be >= 1, got {block_rows}")
        self.shards, self.dim = shards, int(dim)
        self.block_rows = int(block_rows) if block_rows is not None else max(1, (256 << 20) // (4 * self.dim))
        self.size = sum(shard.rows for shard in shards)
        # What a verdict found through this index depends on: its files (names, sizes, times).
        self.identity = digest_of([[file_identity(s.vectors), file_identity(s.metadata)] for s in shards])

    def __len__(self) -> int:
        return self.size

    @classmethod
    def load(cls, embeddings_dir: str | Path, block_rows: int | None = None) -> EmbeddingIndex | None:
        """The shards ``img_emb/img_emb_<rank>.npy`` + ``metadata/metadata_<rank>.parquet``
        (column ``key``) under ``embeddings_dir``, checked (shapes, row counts, one dimension)
        without reading their vectors. Returns ``None`` when the folder has no embeddings."""
        root = Path(embeddings_dir)
        parts = sorted((root / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if not parts:
            return None
        shards, dims = [], set()
        for part in parts:
            rank = part.stem.rsplit("_", 1)[1]
            meta_path = root / "metadata" / f"metadata_{rank}.parquet"
            if not meta_path.exists():
                raise FileNotFoundError(f"{part} has no metadata file {meta_path}")
            meta = pq.ParquetFile(meta_path)
            if "key" not in meta.schema_arrow.names:
                raise ValueError(f"{meta_path}: no 'key' column (columns: {meta.schema_arrow.names})")
            vectors = np.load(part, mmap_mode="r")
            if vectors.ndim != 2:
                raise ValueError(f"{part}: embeddings must be a 2-D array (rows, dim), got shape {vectors.shape}")
            if len(vectors) != meta.metadata.num_rows:
                raise ValueError(f"{part} has {len(vectors)} rows but {meta_path} has {meta.metadata.num_rows}")
            dims.add(int(vectors.shape[1]))
            shards.append(EmbeddingShard(part, meta_path, len(vectors)))
        if len(dims) > 1:
            raise ValueError(f"{root}: shards of different dimensions {sorted(dims)}")
        return cls(shards, dims.pop(), block_rows=block_rows)

    def search(self, queries: np.ndarray, k: int) -> list[list[str]]:
        """The keys of the ``k`` nearest embeddings of each query row (float ``(n, dim)``), nearest first."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"embedder: gives {queries.shape[-1]}-dimensional embeddings but the duplicate finder's "
                f"index has {self.dim}; use the embedder the dedup stage used"
            )
        k = min(int(k), self.size)
        if k <= 0 or not len(queries):
            return [[] for _ in range(len(queries))]
        best_sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        best_ids = np.full((len(queries), k), -1, dtype=np.int64)
        offset = 0
        for shard in self.shards:
            for start, block in _blocks(shard.vectors, self.block_rows):
                sims, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
                ids = np.where(ids >= 0, ids + offset + start, -1)
                # Earlier rows first, so a stable sort keeps the lower row among equal similarities.
                sims, ids = np.concatenate([best_sims, sims], axis=1), np.concatenate([best_ids, ids], axis=1)
                order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
                best_sims, best_ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
            offset += shard.rows
        return self._keys(best_ids)

    def _keys(self, ids: np.ndarray) -> list[list[str]]:
        """The keys of global row ids (``-1``: none), read from the shards that hold them."""
        keys = np.full(ids.shape, None, dtype=object)
        offset = 0
        for shard in self.shards:
            inside = (ids >= offset) & (ids < offset + shard.rows)
            if inside.any():
                column = pq.read_table(shard.metadata, columns=["key"]).column("key").to_pandas().astype(str).to_numpy()
                keys[inside] = column[ids[inside] - offset]
            offset += shard.rows
        return [[key for key in row if key is not None] for row in keys]


class EmbedderOnFirstUse:
    """The image embedder verification queries the embedding index with, built on the first
    call only (the tiled L2 path needs none): the rule's metric's own embedder when it has one
    (metric=clip), else the ``embedder`` config group instantiated; None when neither is given."""

    def __init__(self, metric: Any, embedder_cfg: Any):
        own = getattr(metric, "embedder", None)
        self.embedder: Embedder | None = own if isinstance(own, Embedder) else None
        self.embedder_cfg = embedder_cfg

    def __call__(self) -> Embedder | None:
        if self.embedder is None and self.embedder_cfg is not None:
            self.embedder = hydra.utils.instantiate(self.embedder_cfg)
        return self.embedder
