"""benchmarks/verify_bench.py --quick: batched verification and the per-pair loop agree."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("verify_bench")


def test_quick_run_agrees_with_the_loop_and_reports_the_ratio(bench, capsys):
    result = bench.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    # --quick times every pair in the loop, so the check covers the whole matrix.
    assert result["loop_pairs"] == result["pairs"] == 12 * 10 and not result["loop_extrapolated"]
    # The tolerance is argued in the module (float32 rounding at 512 px); it must not drift looser.
    assert bench.TOLERANCE <= 2e-6 and result["max_abs_diff"] <= bench.TOLERANCE
    assert result["matches_identical"] and result["matches_batched"] == result["matches_loop"]
    # The planted near-copies make the match set non-trivial: some pairs match, most do not.
    assert 0 < len(result["matches_batched"]) < result["pairs"]
    assert re.search(r"speed-up : [0-9.]+x, batched over the per-pair loop", out)
    assert "identical: yes" in out and "tolerance 2e-06: OK" in out
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT "))["speedup"] == pytest.approx(result["speedup"])
