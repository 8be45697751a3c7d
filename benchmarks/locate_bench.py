"""Benchmark: verification's training-image reads, streaming the training set against the location index.

    .venv/bin/python benchmarks/locate_bench.py --quick               # seconds: N = 2,000
    .venv/bin/python benchmarks/locate_bench.py                       # N = 100,000 and 10N, both formats

Verification reads each screened prompt's candidate training images (its duplicate group and
its samples' nearest neighbours) by key. Without an index the data set is streamed once per
pass of prompts, decoding every record until the last wanted key is seen: the time grows with
the training set. With the duplicate finder's location index (:mod:`pipeline.data.locations`)
only the wanted records are read.

For each format (``--formats``: webdataset tar shards, parquet files) and each size (``--n``
and ``10 x --n`` records of ``--size`` px JPEGs, in shards of ``--shard-size``), in one run:

1. the training set is written (deterministic pictures, one per record) and indexed as the
   embed phase indexes it (the readers' locations, one rank file; timed apart, not counted;
   with ``--work``, sets and indexes already there are reused);
2. ``--prompts`` prompts of ``--samples`` samples each are verified: each prompt's candidates
   are ``--group`` keys (its group) and ``--neighbours`` other keys, spread over the whole set;
   a quarter of the prompts have samples planted as noisy copies of one of their group's
   images, so that verification has extractions to find. Verification is the detector's: one
   :func:`~pipeline.training_images.fetch_training_images` call for the pass, then
   :func:`~pipeline.training_images.sample_distances` per prompt with the near-copy rule's
   metric, a pair extracted at distance <= ``--delta``;
3. the same verification reads through the index, and the two extracted-pair tables must be
   identical (the same bytes are decoded either way).

Streaming runs once per size; the index's verification runs ``--repeats`` times, the sizes
interleaved, and its fastest time is kept (a load on the machine weighs on both sizes alike).
Printed per format and size: seconds and bytes read (the process's ``rchar``: page cache
included) of each method; then, per format, the index's time at 10N over N (the target:
<= 1.3) and streaming's, and streaming over index at 10N. The last line, ``RESULT {...}``, is
the same as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data import iter_records
from pipeline.data.locations import location_table, write_manifest, write_rank_file
from pipeline.data.rejects import RejectLog
from pipeline.metrics import TiledL2
from pipeline.training_images import fetch_training_images, sample_distances

FORMATS = ("webdataset", "parquet")


def picture(index: int, size: int) -> np.ndarray:
    """Record ``index``'s picture: uint8 (size, size, 3), a smooth pattern of its own."""
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def record_key(fmt: str, index: int, shard_size: int) -> str:
    """The key the data layer gives record ``index`` (webdataset: ``<shard>/<key in tar>``)."""
    name = f"{index:09d}"
    return f"{index // shard_size:05d}/{name}" if fmt == "webdataset" else name


def write_set(fmt: str, root: Path, n: int, size: int, shard_size: int) -> None:
    """``n`` records of ``fmt`` under ``root`` in shards of ``shard_size``."""
    root.mkdir(parents=True)
    for shard, start in enumerate(range(0, n, shard_size)):
        indices = range(start, min(n, start + shard_size))
        if fmt == "webdataset":
            with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
                for i in indices:
                    for ext, blob in (("jpg", jpeg(picture(i, size))), ("txt", f"caption {i}".encode())):
                        info = tarfile.TarInfo(f"{i:09d}.{ext}")
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
        else:
            table = pa.table(
                {
                    "key": [f"{i:09d}" for i in indices],
                    "jpg": pa.array([jpeg(picture(i, size)) for i in indices], pa.binary()),
                    "caption": [f"caption {i}" for i in indices],
                }
            )
            # Row groups of 100 rows, as img2dataset writes its parquet shards.
            pq.write_table(table, root / f"{shard:05d}.parquet", row_group_size=100)


def build_index(data: dict, folder: Path) -> float:
    """Index the set as the embed phase does (one rank); returns the seconds it took."""
    start = time.perf_counter()
    records = iter_records(data["format"], data["path"], decode=True)
    write_rank_file(folder, 0, location_table((r.key, r.location) for r in records))
    write_manifest(folder, data, 1)
    return time.perf_counter() - start


def workload(fmt: str, n: int, args) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, list[str]]]:
    """Samples (uint8 (S, size, size, 3)), groups and candidate keys of each prompt."""
    rng = np.random.default_rng(args.seed)
    samples, groups, candidates = {}, {}, {}
    for p in range(args.prompts):
        pid = f"p{p:03d}"
        chosen = rng.choice(n, args.group + args.neighbours, replace=False)
        groups[pid] = [record_key(fmt, int(i), args.shard_size) for i in chosen[: args.group]]
        candidates[pid] = [record_key(fmt, int(i), args.shard_size) for i in chosen]
        made = rng.integers(0, 256, (args.samples, args.size, args.size, 3)).astype(np.uint8)
        if p % 4 == 0:  # planted copies of the group's first picture, JPEG-decoded as the reader would
            original = np.asarray(Image.open(io.BytesIO(jpeg(picture(int(chosen[0]), args.size)))).convert("RGB"))
            for s in range(0, args.samples, 3):
                noise = rng.normal(0, 4, original.shape)
                made[s] = np.clip(original.astype(float) + noise, 0, 255).astype(np.uint8)
        samples[pid] = made
    return samples, groups, candidates


def verify(data: dict, samples, groups, candidates, delta: float) -> tuple[pd.DataFrame, RejectLog]:
    """The detector's verification of one pass: fetch every candidate, compare per prompt."""
    rejects = RejectLog()
    images = fetch_training_images(data, {k for keys in candidates.values() for k in keys}, rejects)
    metric, rows = TiledL2(), []
    for pid, made in samples.items():
        keys = [k for k in candidates[pid] if k in images]
        distances = sample_distances(made, [images[k] for k in keys], metric)
        for s, c in zip(*np.nonzero(distances <= delta)):
            rows.append((pid, int(s), keys[c], float(distances[s, c]), keys[c] in groups[pid]))
    table = pd.DataFrame(rows, columns=["prompt_id", "sample", "train_key", "distance", "in_group"])
    return table.sort_values(["prompt_id", "sample", "train_key"]).reset_index(drop=True), rejects


def bytes_read() -> int:
    """Bytes this process has read (``rchar`` of /proc/self/io; 0 where there is none)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(call, *args):
    before, start = bytes_read(), time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - start, bytes_read() - before


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="records of the smaller set (the larger has 10x)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--group", type=int, default=6, help="keys of each prompt's duplicate group")
    parser.add_argument("--neighbours", type=int, default=20, help="other candidate keys per prompt")
    parser.add_argument("--size", type=int, default=16, help="pixels of a training image and a sample")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--delta", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each size through the index (the fastest is kept)")
    parser.add_argument(
        "--work", default=None, help="folder for the sets and indexes, reused when there (default: a temporary one, removed)"
    )
    parser.add_argument("--quick", action="store_true", help="N = 2,000, 16 prompts: a check in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.prompts, args.shard_size = 2_000, 16, 500
    formats = [f for f in args.formats.split(",") if f]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="locate_bench_"))
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}", flush=True)
    results: dict = {"n": args.n, "prompts": args.prompts, "samples": args.samples, "formats": {}}
    try:
        for fmt in formats:
            sizes = (args.n, 10 * args.n)
            per_size, work_of = {}, {}
            for n in sizes:  # the sets, their indexes and the workloads, made once
                root = work / f"{fmt}_{n}"
                if not root.exists():
                    write_set(fmt, root, n, args.size, args.shard_size)
                data = {"format": fmt, "path": str(root)}
                folder = work / f"{fmt}_{n}_locations"
                indexing_s = None if (folder / "index.json").exists() else build_index(data, folder)
                work_of[n] = (data, {**data, "locations": str(folder)}, *workload(fmt, n, args))
                per_size[n] = {"indexing_s": indexing_s, "index_runs_s": []}
            for n in sizes:  # streaming: once per size (minutes at 10N)
                data, _, samples, groups, candidates = work_of[n]
                (streamed, rejects), seconds, read = timed(verify, data, samples, groups, candidates, args.delta)
                per_size[n].update(stream_s=seconds, stream_mb=read / 1e6, streamed=streamed, clean=not rejects.entries)
            # The index: sizes interleaved, --repeats times, the fastest kept, so that a load on the
            # machine that comes and goes weighs on both sizes alike.
            for _ in range(args.repeats):
                for n in sizes:
                    _, indexed_data, samples, groups, candidates = work_of[n]
                    (indexed, rejects), seconds, read = timed(verify, indexed_data, samples, groups, candidates, args.delta)
                    row = per_size[n]
                    row["index_runs_s"].append(seconds)
                    row.update(index_mb=read / 1e6, pairs=len(indexed), clean=row["clean"] and not rejects.entries)
                    row["identical"] = bool(row["streamed"].equals(indexed) and row["clean"])
                    extracted = indexed.loc[indexed["in_group"], "prompt_id"] if len(indexed) else pd.Series([], dtype=str)
                    row["prompts_extracted"] = int(extracted.nunique())
            for n in sizes:
                row = per_size[n]
                row.pop("streamed")
                row["index_s"] = min(row["index_runs_s"])
                indexing = "reused" if row["indexing_s"] is None else f"{row['indexing_s']:.1f} s"
                print(
                    f"{fmt:10s} N={n:>9,d}  stream {row['stream_s']:8.2f} s {row['stream_mb']:9.1f} MB   "
                    f"index {row['index_s']:6.2f} s {row['index_mb']:7.1f} MB   (indexing {indexing})   "
                    f"pairs {row['pairs']}, extracted prompts {row['prompts_extracted']}, identical {row['identical']}",
                    flush=True,
                )
            small, large = per_size[sizes[0]], per_size[sizes[1]]
            summary = {
                "sizes": {str(k): v for k, v in per_size.items()},
                "index_growth": large["index_s"] / small["index_s"],
                "stream_growth": large["stream_s"] / small["stream_s"],
                "speedup_at_10n": large["stream_s"] / large["index_s"],
                "identical": small["identical"] and large["identical"],
            }
            results["formats"][fmt] = summary
            print(
                f"{fmt}: index 10N/N = {summary['index_growth']:.2f}x (target <= 1.3), streaming 10N/N = "
                f"{summary['stream_growth']:.2f}x; at 10N the index is {summary['speedup_at_10n']:.0f}x faster; "
                f"identical extracted pairs: {summary['identical']}",
                flush=True,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if all(f["identical"] for f in main()["formats"].values()) else 1)
