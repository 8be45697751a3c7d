"""benchmarks/locate_bench.py --quick: verification through the location index finds exactly what
streaming the training set finds, in both formats, and the benchmark reports both."""

from __future__ import annotations

import json

import pytest

from .conftest import load_benchmark


@pytest.mark.slow
def test_quick_run_finds_what_streaming_finds(capsys):
    bench = load_benchmark("locate_bench")
    result = bench.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert set(result["formats"]) == {"webdataset", "parquet"}
    for summary in result["formats"].values():
        assert summary["identical"]
        for size in summary["sizes"].values():
            # 16 prompts, a quarter with 8 planted copies of a group image: each is found.
            assert size["prompts_extracted"] == 4 and size["pairs"] >= 4 * 8
    assert "index 10N/N" in out
    assert json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]) == result
