"""The detector's embedding index: exact search over embedding shards in bounded memory."""

from __future__ import annotations

import os
import tracemalloc

import faiss
import numpy as np
import pandas as pd
import pytest

from pipeline.detect.candidates import EmbeddingIndex


def _write_shards(root, sizes, dim, rng, dtype=np.float16):
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    vectors, keys = [], []
    for rank, size in enumerate(sizes):
        part = rng.normal(size=(size, dim)).astype(np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        part = part.astype(dtype)
        part_keys = [f"k{rank}-{row}" for row in range(size)]
        np.save(root / "img_emb" / f"img_emb_{rank}.npy", part)
        pd.DataFrame({"key": part_keys}).to_parquet(root / "metadata" / f"metadata_{rank}.parquet")
        vectors.append(part.astype(np.float32))
        keys += part_keys
    return np.concatenate(vectors), keys


def test_search_equals_one_flat_index_over_every_shard(tmp_path):
    """Shards searched a few rows at a time give each query the similarities a flat index over
    all the vectors gives (exact search: equal up to float32 rounding, 1e-5), with the right keys."""
    rng = np.random.default_rng(0)
    vectors, keys = _write_shards(tmp_path, [7, 1, 13, 5], dim=8, rng=rng)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    flat = faiss.IndexFlatIP(8)
    flat.add(vectors)
    expected_sims, _ = flat.search(queries, 9)
    for block_rows in (1, 3, 100):
        index = EmbeddingIndex.load(tmp_path, block_rows=block_rows)
        assert len(index) == len(keys) == 26
        found = index.search(queries, 9)
        assert [len(row) for row in found] == [9] * 6
        by_key = dict(zip(keys, vectors))
        sims = np.array([[by_key[key] @ query for key in row] for row, query in zip(found, queries)])
        np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
    assert [len(row) for row in index.search(queries, 100)] == [26] * 6  # k capped at the index's size
    assert index.search(queries[:0], 3) == []


def test_search_holds_one_block_not_every_vector(tmp_path):
    """Memory: the vectors are read a block at a time, so the search's peak (numpy and Python
    allocations, traced) stays well under the float32 copy of every vector that one flat index
    would hold: one block is 1/50 of it here, the queries and their running best are smaller
    still, and one shard's keys (read for its rows found) are under 1/10 of it."""
    rng = np.random.default_rng(1)
    sizes, dim = [40_000, 60_000], 256
    _write_shards(tmp_path, sizes, dim=dim, rng=rng)
    every_vector = sum(sizes) * dim * 4
    index = EmbeddingIndex.load(tmp_path, block_rows=2_000)
    queries = rng.normal(size=(32, dim)).astype(np.float32)
    tracemalloc.start()
    try:
        index.search(queries, 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < every_vector / 4, (peak, every_vector)


def test_load_checks_the_shards(tmp_path):
    rng = np.random.default_rng(2)
    assert EmbeddingIndex.load(tmp_path) is None  # no embeddings
    _write_shards(tmp_path / "a", [4, 3], dim=5, rng=rng)
    np.save(tmp_path / "a" / "img_emb" / "img_emb_1.npy", np.ones((3, 6), np.float16))
    with pytest.raises(ValueError, match=r"img_emb_1.npy has dimension 6, other shards 5$"):
        EmbeddingIndex.load(tmp_path / "a")
    _write_shards(tmp_path / "b", [4], dim=5, rng=rng)
    pd.DataFrame({"key": ["x"]}).to_parquet(tmp_path / "b" / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="has 4 rows but .* has 1"):
        EmbeddingIndex.load(tmp_path / "b")
    _write_shards(tmp_path / "c", [4], dim=5, rng=rng)
    pd.DataFrame({"name": list("abcd")}).to_parquet(tmp_path / "c" / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match="no 'key' column"):
        EmbeddingIndex.load(tmp_path / "c")


def test_identity_follows_the_shard_files(tmp_path):
    """A changed shard (vectors or keys) changes the identity verdicts are stored under."""
    rng = np.random.default_rng(3)
    _write_shards(tmp_path, [4, 3], dim=5, rng=rng)
    before = EmbeddingIndex.load(tmp_path).identity
    assert EmbeddingIndex.load(tmp_path).identity == before
    meta = tmp_path / "metadata" / "metadata_1.parquet"
    pd.DataFrame({"key": ["p", "q", "r"]}).to_parquet(meta)
    stat = meta.stat()
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert EmbeddingIndex.load(tmp_path).identity != before


def test_a_truncated_shard_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(4)
    _write_shards(tmp_path, [6], dim=4, rng=rng)
    part = tmp_path / "img_emb" / "img_emb_0.npy"
    index = EmbeddingIndex.load(tmp_path, block_rows=4)
    part.write_bytes(part.read_bytes()[:-8])  # 8 bytes: the last row (4 float16 values) is gone
    with pytest.raises(ValueError, match=r"img_emb_0.npy is unreadable: mmap length is greater than file size$"):
        index.search(np.ones((1, 4), np.float32), 2)
