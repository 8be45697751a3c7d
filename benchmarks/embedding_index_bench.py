"""Benchmark: the detector's nearest-neighbour search over precomputed embeddings, one flat
faiss index in memory against :class:`~pipeline.detect.candidates.EmbeddingIndex`, which reads
the shards a block at a time.

    .venv/bin/python benchmarks/embedding_index_bench.py --quick    # seconds: 100,000 x 512
    .venv/bin/python benchmarks/embedding_index_bench.py            # 1,000,000 x 512, 4 shards

``--rows`` unit-length float16 embeddings of ``--dim`` dimensions are written as LAION's
``img_emb/img_emb_<rank>.npy`` + ``metadata/metadata_<rank>.parquet`` (``--shards`` of them; with
``--work``, ones already there are reused). Each method then runs in a process of its own,
searching the ``--k`` nearest of ``--queries`` queries (sample embeddings: noisy copies of
stored ones):

* ``flat``: every shard read into one float32 array, a ``faiss.IndexFlatIP`` over it (what the
  detector held before the shards were searched in blocks);
* ``blocks``: ``EmbeddingIndex.load(...).search(...)`` with its default block of rows.

Printed per method: seconds (load and search) and the process's peak resident memory above
what it held once its modules were imported (the search's own); then
flat over blocks for each, and whether the two found the same keys for every query (ties
aside, they must). The last line, ``RESULT {...}``, is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_shards(root: Path, rows: int, dim: int, shards: int, seed: int = 0) -> None:
    """``rows`` unit-length float16 embeddings in ``shards`` LAION-style shard files under ``root``."""
    done = root / ".complete"
    if done.exists() and json.loads(done.read_text()) == [rows, dim, shards, seed]:
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for rank, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = np.empty((hi - lo, dim), np.float16)
        for start in range(0, hi - lo, 100_000):
            chunk = rng.standard_normal((min(100_000, hi - lo - start), dim), dtype=np.float32)
            part[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{rank}.npy", part)
        pd.DataFrame({"key": [f"{row:09d}" for row in range(lo, hi)]}).to_parquet(root / "metadata" / f"metadata_{rank}.parquet")
    done.write_text(json.dumps([rows, dim, shards, seed]))


def queries_for(root: Path, n: int, seed: int = 1) -> np.ndarray:
    """``n`` queries: stored embeddings with noise, renormalised (a sample near a training image)."""
    rng = np.random.default_rng(seed)
    first = np.load(root / "img_emb" / "img_emb_0.npy", mmap_mode="r")
    picked = np.asarray(first[np.sort(rng.choice(len(first), size=min(n, len(first)), replace=False))], dtype=np.float32)
    noisy = picked + 0.5 * rng.standard_normal(picked.shape).astype(np.float32) / np.sqrt(picked.shape[1])
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def run_method(method: str, root: Path, queries: np.ndarray, k: int) -> dict:
    """Load and search with ``method`` in this process: seconds, peak memory above the imports
    (MiB), and the keys found."""
    import faiss

    from pipeline.data.embeddings_store import embedding_path, list_shards, metadata_path
    from pipeline.detect.candidates import EmbeddingIndex

    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the imports'
    start = time.perf_counter()
    if method == "flat":
        shards = list_shards(root)
        vectors = np.concatenate([np.load(embedding_path(root, s)).astype(np.float32) for s in shards])
        keys = [key for s in shards for key in pd.read_parquet(metadata_path(root, s), columns=["key"])["key"]]
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        loaded = time.perf_counter()
        _, ids = index.search(queries, k)
        found = [[keys[i] for i in row] for row in ids]
    else:
        index = EmbeddingIndex.load(root)
        loaded = time.perf_counter()
        found = index.search(queries, k)
    end = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_s": loaded - start, "search_s": end - loaded, "peak_mib": peak_mib - base_mib, "found": found}


def measure(method: str, root: Path, queries: np.ndarray, k: int) -> dict:
    """One method in a fresh process (its peak memory its own): this file run with ``--child``."""
    query_file = root.parent / f"queries_{len(queries)}.npy"
    np.save(query_file, queries)
    command = [sys.executable, __file__, "--child", method, "--root", str(root), "--query-file", str(query_file), "--k", str(k)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="folder for the shards, kept (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 500 queries")
    parser.add_argument("--child", choices=("flat", "blocks"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--query-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement, in the process measure() started
        print(json.dumps(run_method(args.child, args.root, np.load(args.query_file), args.k)))
        return {}
    if args.quick:
        args.rows, args.queries = 100_000, 500
    work = args.work or Path(tempfile.mkdtemp(prefix="embedding_index_bench_"))
    try:
        root = work / f"emb_{args.rows}_{args.dim}_{args.shards}"
        start = time.perf_counter()
        write_shards(root, args.rows, args.dim, args.shards)
        print(
            f"{args.rows:,} x {args.dim} float16 embeddings in {args.shards} shards ({time.perf_counter() - start:.0f} s to write)"
        )
        queries = queries_for(root, args.queries)
        results = {method: measure(method, root, queries, args.k) for method in ("flat", "blocks")}
        for method, r in results.items():
            print(f"{method:>6}: load {r['load_s']:7.2f} s  search {r['search_s']:7.2f} s  peak {r['peak_mib']:8.0f} MiB")
        flat, blocks = results["flat"], results["blocks"]
        same = sum(a == b for a, b in zip(flat["found"], blocks["found"])) / len(queries)
        summary = {
            "rows": args.rows,
            "dim": args.dim,
            "queries": len(queries),
            "k": args.k,
            "flat_seconds": round(flat["load_s"] + flat["search_s"], 2),
            "blocks_seconds": round(blocks["load_s"] + blocks["search_s"], 2),
            "flat_peak_mib": round(flat["peak_mib"]),
            "blocks_peak_mib": round(blocks["peak_mib"]),
            "peak_ratio": round(max(flat["peak_mib"], 1.0) / max(blocks["peak_mib"], 1.0), 2),  # 1 MiB: below it, noise
            "time_ratio": round((flat["load_s"] + flat["search_s"]) / (blocks["load_s"] + blocks["search_s"]), 2),
            "same_keys": same,
        }
        print(
            f"flat / blocks: peak memory {summary['peak_ratio']}x, time {summary['time_ratio']}x; same keys for {same:.1%} of queries"
        )
        print("RESULT " + json.dumps(summary))
        return summary
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
