"""The HTML report: self-contained, escaped, and saying what the detector found."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.detect import run_detect
from pipeline.detect.verify import run_verify
from pipeline.report import RunResults, load_run, rates_by_duplicates, write_report
from pipeline.rule import NearCopyRule
from tests.test_detect import CAPTIONS, ORIGINAL_KEY, build_run

REPO = Path(__file__).resolve().parents[1]


def audited_run(root: Path, verified: bool = True, min_clique: int = 10) -> Path:
    run = build_run(root)
    run_dir = run["run_dir"]
    memorized = run_detect(run_dir / "generations", run_dir / "detect", NearCopyRule(min_clique=min_clique), progress=False)
    if verified:
        data = {"format": "files", "path": str(run["train"])}
        run_verify(memorized, run_dir / "generations", run_dir / "detect", data, dedup_dir=run_dir / "dedup", progress=False)
    return run_dir


def image_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def test_report_is_self_contained_and_escapes_captions(tmp_path):
    run_dir = audited_run(tmp_path)
    out = write_report(load_run(run_dir / "detect"), run_dir / "report" / "index.html", title="Audit <b>x</b>")
    html = out.read_text(encoding="utf-8")

    # The caption holds a <script> tag: it must come out as text.
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "Audit &lt;b&gt;x&lt;/b&gt;" in html
    # Nothing is fetched: no links, stylesheets, scripts or remote images; every image inlined.
    assert not re.search(r"https?://|<link|@import|url\(", html)
    sources = image_sources(html)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()

    # Summary, the flagged prompt with its clique and its training match, and the plot.
    assert re.search(r"Prompts screened</td><td>3<", html)
    assert re.search(r"Prompts flagged</td><td>1<", html)
    assert "1 of 1 flagged" in html
    assert "clique of 12 of 30 samples" in html
    assert ORIGINAL_KEY["00000"] in html and "extracted" in html
    assert CAPTIONS["00001"] not in html  # not flagged, so not listed
    assert 'alt="flag and extraction rate by duplicate count"' in html
    # 6 thumbnails of the clique + the training image + the plot.
    assert len(sources) == 6 + 1 + 1


def test_rates_by_duplicate_count(tmp_path):
    run_dir = audited_run(tmp_path)
    rates = rates_by_duplicates(load_run(run_dir / "detect"))
    assert rates["bin"].tolist() == ["1", "10", "40"]
    assert rates["prompts"].tolist() == [1, 1, 1]
    assert rates["flag_rate"].tolist() == [0, 0, 1] and rates["extraction_rate"].tolist() == [0, 0, 1]

    # Many distinct counts are grouped by powers of two.
    counts = np.arange(1, 40)
    memorized = pd.DataFrame({"prompt_id": [f"{i:05d}" for i in counts], "flagged": counts >= 16})
    extracted = pd.DataFrame({"prompt_id": [f"{i:05d}" for i in counts if i >= 32], "extracted": True})
    results = RunResults(memorized, extracted, {}, tmp_path, tmp_path, pd.DataFrame({"prompt_id": memorized["prompt_id"], "dup_count": counts}))
    grouped = rates_by_duplicates(results)
    assert grouped["bin"].tolist() == ["1", "2-3", "4-7", "8-15", "16-31", "32-63"]
    assert grouped["prompts"].tolist() == [1, 2, 4, 8, 16, 8]
    assert grouped["flag_rate"].tolist() == [0, 0, 0, 0, 1, 1]
    assert grouped["extraction_rate"].tolist() == [0, 0, 0, 0, 0, 1]


def test_report_without_verification_or_duplicate_counts(tmp_path):
    run_dir = audited_run(tmp_path, verified=False)
    memorized_path = run_dir / "detect" / "memorized.parquet"
    pd.read_parquet(memorized_path).assign(dup_count=None).to_parquet(memorized_path)  # prompts of unknown duplication
    html = write_report(load_run(run_dir / "detect"), tmp_path / "r.html", title="t").read_text()
    assert "not verified" in html and "so no plot" in html
    assert len(image_sources(html)) == 6
    with pytest.raises(FileNotFoundError, match="pipeline.detect"):
        load_run(tmp_path / "nowhere")


def test_report_when_nothing_is_flagged(tmp_path):
    run_dir = audited_run(tmp_path, min_clique=13)
    extracted = pd.read_parquet(run_dir / "detect" / "extracted.parquet")
    assert extracted.empty and list(extracted.columns)[:5] == ["prompt_id", "sample", "sample_file", "train_key", "distance"]
    html = write_report(load_run(run_dir / "detect"), tmp_path / "r.html", title="t").read_text()
    assert "No prompt was flagged." in html and "0 of 0 flagged" in html
    assert len(image_sources(html)) == 1  # the plot only


def test_stale_verification_is_not_shown(tmp_path, caplog):
    run_dir = audited_run(tmp_path)
    # Detection rerun with other settings, without verifying again.
    run_detect(run_dir / "generations", run_dir / "detect", NearCopyRule(threshold=0.005), progress=False)
    results = load_run(run_dir / "detect")
    assert results.extracted is not None and results.extracted.empty
    assert "does not match" in caplog.text


def test_command_line_report(tmp_path):
    run_dir = audited_run(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.report", f"run_dir={run_dir}", "thumbnails=2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    html = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert len(image_sources(html)) == 2 + 1 + 1


def test_report_shows_the_sampling_cost_when_the_generator_wrote_a_budget(tmp_path, caplog):
    from pipeline.budget import BUDGET_FILE, write_generation_budget
    run_dir = audited_run(tmp_path, verified=False)
    generations = run_dir / "generations"
    report = lambda: write_report(load_run(run_dir / "detect"), tmp_path / "r.html", title="t").read_text()  # noqa: E731
    assert "Sampling cost" not in report()  # hand-made samples: no budget.json
    prompts = pd.DataFrame({
        "prompt_id": ["a", "b", "c", "d"], "n_samples": 32, "steps": 25, "guidance_scale": 3.0,
        "n_generated": [32, 8, 8, 16], "stopped_early": [False, True, True, False], "stop_reason": [None, "no_close_pairs", "no_close_pairs", "flagged"],
    })  # fmt: skip
    budget = write_generation_budget(generations, prompts)
    html = report()
    assert "Sampling cost</td><td>3,200 UNet evaluations, 50.0% of brute force" in html  # (32+8+8+16) x 25 x 2 of 4 x 32 x 25 x 2
    assert "2 prompt(s) stopped early with no near-copy pair; 1 stopped once flagged" in html
    assert f"{budget['unet_evaluations']:,} UNet evaluations" in html
    (generations / BUDGET_FILE).write_text("{not json")
    assert "Sampling cost" not in report() and "unreadable" in caplog.text
