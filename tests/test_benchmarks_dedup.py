"""benchmarks/dedup_bench.py runs, at a tiny size, and reports what it promises."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO


def test_dedup_benchmark_runs_small():
    args = [
        sys.executable,
        str(REPO / "benchmarks" / "dedup_bench.py"),
        "--n",
        "6000",
        "--dim",
        "32",
        "--subset",
        "2000",
        "--queries",
        "300",
        "--nlist",
        "30",
    ]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    recall = float(re.search(r"pair recall against exact search .*: ([0-9.]+) grouped together", out).group(1))
    assert recall >= 0.99
    precision, group_recall = map(float, re.search(r"pair precision ([0-9.]+), recall ([0-9.]+)", out).groups())
    assert precision >= 0.99 and group_recall >= 0.99
    assert re.search(r"numpy all-pairs loop on a 2000-row subset: [0-9.]+ s; .* \(([0-9.]+)x faster", out)
    assert "faiss IndexIVFFlat.search" in out and "extrapolated to N" in out
