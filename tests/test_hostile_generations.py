"""The detector reads generations folders made by other tools: nothing in them may make it write
outside its run directory, crash, or drop samples or prompts without a record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.detect import run_detect
from pipeline.generations import list_samples, read_prompts
from pipeline.io import unsafe_name
from pipeline.metrics import TiledL2
from pipeline.rule import NearCopyRule

SETTINGS = NearCopyRule(TiledL2(device="cpu"), min_clique=2)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def write_samples(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(image).save(folder / f"{i:05d}.png")


@pytest.fixture
def hostile_run(tmp_path):
    """<tmp>/run/generations holds one good prompt, and a prompts.parquet from "another tool"
    listing ids that are paths, null, hidden, absolute or carry control characters."""
    generations = tmp_path / "run" / "generations"
    write_samples(generations / "good", 3, seed=0)
    outside = tmp_path / "elsewhere"
    write_samples(outside, 3, seed=1)  # what "../../elsewhere" points at
    ids = ["good", "../../elsewhere", str(outside), None, ".done", "a\nb", "x/../good", ""]
    pd.DataFrame({"prompt_id": ids, "caption": [f"caption {i}" for i in range(len(ids))]}).to_parquet(
        generations / "prompts.parquet"
    )
    return tmp_path, generations


def test_prompt_ids_that_are_paths_are_skipped_and_recorded(hostile_run):
    tmp_path, generations = hostile_run
    out_dir = tmp_path / "run" / "detect"
    before = files_under(tmp_path)
    memorized = run_detect(generations, out_dir, SETTINGS, progress=False)
    assert memorized["prompt_id"].tolist() == ["good"]
    assert bool(memorized["flagged"].iloc[0])  # three identical samples: a clique of 3
    written = files_under(tmp_path) - before
    assert written and all(p == out_dir or out_dir in p.parents for p in written), sorted(map(str, written))
    rejects = [json.loads(line) for line in (out_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejects) == 7 and all(r["reason"].startswith("unsafe prompt id") for r in rejects)
    # A rerun reuses the stored verdict and still writes nothing outside.
    again = run_detect(generations, out_dir, SETTINGS, progress=False)
    assert again["prompt_id"].tolist() == ["good"]


def test_folder_and_file_names_that_cannot_be_stored_are_recorded(tmp_path):
    generations = tmp_path / "generations"
    write_samples(generations / "p", 2, seed=0)
    # A sample named with a byte that is not UTF-8 and one with a newline, as other tools may leave them.
    raw = bytes(generations / "p") + b"/\xff.png"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (generations / "p" / "00000.png").read_bytes())
    os.close(fd)
    (generations / "p" / "new\nline.png").write_bytes((generations / "p" / "00000.png").read_bytes())
    os.mkdir(bytes(generations) + b"/bad\xfe")  # a prompt folder with such a name
    write_samples(generations / "ok", 1, seed=2)
    out_dir = tmp_path / "detect"
    memorized = run_detect(generations, out_dir, SETTINGS, progress=False).set_index("prompt_id")
    assert sorted(memorized.index) == ["ok", "p"]
    assert memorized.loc["p", "n_samples"] == 2 and memorized.loc["p", "n_rejected"] == 2
    reasons = [json.loads(line)["reason"] for line in (out_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(r.startswith("unsafe file name") for r in reasons) == 2
    assert sum(r.startswith("unsafe prompt id") for r in reasons) == 1
    # Stored results stay valid: a rerun does not screen (or reject) anything again.
    run_detect(generations, out_dir, SETTINGS, progress=False)
    assert len((out_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == len(reasons)


def test_a_damaged_generator_table_does_not_crash(tmp_path):
    """Stop reasons and rules nobody can parse count as another rule; a sample count that is
    not a number leaves the prompt unfinished, said in one clear error."""
    generations = tmp_path / "generations"
    write_samples(generations / "p", 2, seed=0)
    pd.DataFrame(
        {
            "prompt_id": ["p", "../q"],
            "caption": ["c", "d"],
            "n_samples": [float("nan"), 2.0],
            "stop_reason": ["flagged", "flagged"],
            "adaptive": ["{not json", '{"threshold": "abc"}'],
        }
    ).to_parquet(generations / "prompts.parquet")
    memorized = run_detect(generations, tmp_path / "detect", SETTINGS, progress=False)
    assert memorized["prompt_id"].tolist() == ["p"]
    summary = json.loads((tmp_path / "detect" / "summary.json").read_text())
    assert summary["stopped_under_another_rule"] == ["p"]
    (generations / ".done").mkdir()  # now a generator's folder, whose prompt p has no usable count
    with pytest.raises(ValueError, match="generations_dir: no prompts ready to screen"):
        run_detect(generations, tmp_path / "detect2", SETTINGS, progress=False)


@pytest.mark.parametrize(
    "name, safe",
    [
        ("00001", True),
        ("a cat.png", True),
        ("日本", True),
        ("..", False),
        (".", False),
        (".done", False),
        ("a/b", False),
        ("/etc", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("\udcff", False),
        ("x" * 201, False),
        ("", False),
        (None, False),
    ],
)
def test_unsafe_name(name, safe):
    assert (unsafe_name(name) is None) is safe


def test_reading_a_folder_without_table_checks_folder_names(tmp_path):
    (tmp_path / "fine").mkdir()
    os.mkdir(bytes(tmp_path) + b"/\xff")
    assert read_prompts(tmp_path)["prompt_id"].tolist() == ["fine"]
    assert list_samples(tmp_path, "fine") == []
