"""Images to embeddings, a batch at a time (the embed phase's core, without files)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.data import Record
from pipeline.embedders.base import Embedder


def embed_records(records: Iterable[Record], embedder: Embedder, batch_size: int = 256) -> tuple[np.ndarray, pd.DataFrame]:
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
