"""benchmarks/embedding_index_bench.py on a small set: the flat index and the blocks find the same keys."""

from __future__ import annotations

import json

from .conftest import load_benchmark


def test_small_run_finds_the_flat_index_keys_and_reports_the_ratios(tmp_path, capsys):
    bench = load_benchmark("embedding_index_bench")
    result = bench.main(["--rows", "3000", "--dim", "32", "--shards", "3", "--queries", "40", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    # Exact search both ways over random unit vectors (ties have probability 0): the same keys.
    assert result["same_keys"] == 1.0
    assert result["flat_peak_mib"] >= 0 and result["blocks_peak_mib"] >= 0 and result["peak_ratio"] > 0
    assert "flat / blocks: peak memory" in out
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == result
