"""Where verification's candidate training images come from: a prompt's duplicate group
(:func:`group_candidates`) and its samples' nearest training images by embedding
(:class:`EmbeddingIndex`, over the duplicate finder's embeddings, queried with the embedder
:class:`EmbedderOnFirstUse` builds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd

from pipeline.embedders.base import Embedder
from pipeline.identity import digest_of
from pipeline.layout import normalise_keys


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
        # What a verdict found through this index depends on: its keys and vectors.
        self.identity = digest_of(
            [len(keys), hashlib.sha1(vectors.tobytes()).hexdigest(), hashlib.sha1(json.dumps(keys).encode()).hexdigest()]
        )
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
