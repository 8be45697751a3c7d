"""Where verification's candidate training images come from: a prompt's duplicate group
(:func:`group_candidates`) and its samples' nearest training images by embedding
(:class:`EmbeddingIndex`, over the duplicate finder's embeddings, queried with the embedder
:class:`EmbedderOnFirstUse` builds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.data.embeddings_store import EmbeddingRows, embedding_path, list_shards, metadata_path
from pipeline.embedders.base import Embedder
from pipeline.identity import digest_of, file_identity
from pipeline.layout import normalise_keys


def group_candidates(prompts: pd.DataFrame) -> dict[str, list[str]]:
    """Training keys of the duplicate group behind each prompt: the ``keys`` column of a prompt
    table (:mod:`pipeline.layout`), carried with the prompt from the duplicate finder; empty
    for prompts that came without (a prompt list of captions, another tool's folder)."""
    keys = prompts["keys"] if "keys" in prompts.columns else [None] * len(prompts)
    return {str(pid): normalise_keys(group) or [] for pid, group in zip(prompts["prompt_id"], keys)}


class EmbeddingIndex:
    """Exact inner-product search over the duplicate finder's (unit-length) embeddings, read
    ``block_rows`` rows at a time (default: 256 MiB of float32 vectors) through
    :class:`~pipeline.data.embeddings_store.EmbeddingRows`, whose reads leave no page of the
    shards resident.

    Memory holds one block of vectors (``block_rows x dim``, as stored and as float32), the
    queries and their running best ``k``, whatever the number of embeddings; a shard's keys
    are read only when a search returns one of its rows. The search is exact: each query's
    ``k`` best similarities are those one flat index over every embedding finds (shards in
    order; among equal similarities, earlier blocks first).
    """

    def __init__(self, rows: EmbeddingRows, block_rows: int | None = None):
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows: must be >= 1, got {block_rows}")
        self.rows, self.dim = rows, rows.dim
        self.block_rows = int(block_rows) if block_rows is not None else max(1, (256 << 20) // (4 * self.dim))
        # What a verdict found through this index depends on: its files (names, sizes, times).
        self.identity = digest_of(
            [[file_identity(embedding_path(rows.root, s)), file_identity(metadata_path(rows.root, s))] for s in rows.shards]
        )

    def __len__(self) -> int:
        return self.rows.n

    @classmethod
    def load(cls, embeddings_dir: str | Path, block_rows: int | None = None) -> EmbeddingIndex | None:
        """The shards ``img_emb/img_emb_<n>.npy`` + ``metadata/metadata_<n>.parquet`` (column
        ``key``) under ``embeddings_dir``, checked (shapes, row counts, one dimension) without
        reading their vectors. Returns ``None`` when the folder has no embeddings."""
        root = Path(embeddings_dir)
        shards = list_shards(root)
        if not shards:
            return None
        for shard in shards:
            meta = metadata_path(root, shard)
            if not meta.exists():
                raise FileNotFoundError(f"{embedding_path(root, shard)} has no metadata file {meta}")
            columns = pq.read_schema(meta).names
            if "key" not in columns:
                raise ValueError(f"{meta}: no 'key' column (columns: {columns})")
        return cls(EmbeddingRows(root, shards), block_rows=block_rows)

    def search(self, queries: np.ndarray, k: int) -> list[list[str]]:
        """The keys of the ``k`` nearest embeddings of each query row (float ``(n, dim)``), nearest first."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"embedder: gives {queries.shape[-1]}-dimensional embeddings but the duplicate finder's "
                f"index has {self.dim}; use the embedder the dedup stage used"
            )
        k = min(int(k), self.rows.n)
        if k <= 0 or not len(queries):
            return [[] for _ in range(len(queries))]
        best_sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        best_ids = np.full((len(queries), k), -1, dtype=np.int64)
        for start in range(0, self.rows.n, self.block_rows):
            block = self.rows.read(start, start + self.block_rows).astype(np.float32)
            sims, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            ids = np.where(ids >= 0, ids + start, -1)
            # Earlier rows first, so a stable sort keeps the lower row among equal similarities.
            sims, ids = np.concatenate([best_sims, sims], axis=1), np.concatenate([best_ids, ids], axis=1)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            best_sims, best_ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
        return self._keys(best_ids)

    def _keys(self, ids: np.ndarray) -> list[list[str]]:
        """The keys of global row ids (``-1``: none), read from the shards that hold them."""
        keys = np.full(ids.shape, None, dtype=object)
        offsets = self.rows.offsets
        for s, shard in enumerate(self.rows.shards):
            inside = (ids >= offsets[s]) & (ids < offsets[s + 1])
            if inside.any():
                meta = metadata_path(self.rows.root, shard)
                column = pq.read_table(meta, columns=["key"]).column("key").to_pandas().astype(str).to_numpy()
                keys[inside] = column[ids[inside] - offsets[s]]
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
