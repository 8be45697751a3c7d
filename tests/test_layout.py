"""The prompt table carries what the duplicate finder knew about a caption by prompt id, from
stage to stage; no stage looks it up in another stage's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.detect import run_detect
from pipeline.detect.verify import run_verify
from pipeline.layout import PROMPT_COLUMNS, read_prompt_table, write_prompt_table
from pipeline.report import load_run
from pipeline.rule import NearCopyRule
from tests.test_detect import build_run


def test_prompt_table_round_trip(tmp_path):
    frame = pd.DataFrame(
        {
            "score": [0.5, 0.1],
            "prompt_id": ["b", "a"],
            "caption": ["two", None],
            "dup_count": [3.0, np.nan],
            "keys": [np.array(["k1", "k2"]), None],
        }
    )
    table = read_prompt_table(write_prompt_table(frame, tmp_path / "t.parquet"))
    assert tuple(table.columns[:4]) == PROMPT_COLUMNS and "score" in table.columns
    assert table["dup_count"].tolist()[0] == 3 and pd.isna(table["dup_count"].tolist()[1])
    assert table["keys"].tolist() == [["k1", "k2"], None] and table["caption"].tolist() == ["two", ""]


def test_prompts_without_a_group_get_none_from_another_stages_files(tmp_path):
    """Samples made from a plain list of captions (ids 00000, ...) in a run directory that also
    holds the duplicate finder's selection for other captions under the same ids: the detector,
    verification and the report must not give them that selection's counts and training keys."""
    run = build_run(tmp_path)
    run_dir = run["run_dir"]
    table = run_dir / "generations" / "prompts.parquet"
    pd.read_parquet(table).drop(columns=["dup_count", "keys"]).to_parquet(table)  # as from a .txt list
    memorized = run_detect(run_dir / "generations", run_dir / "detect", NearCopyRule(min_clique=9), progress=False)
    assert memorized["dup_count"].isna().all() and memorized["keys"].isna().all()
    data = {"format": "files", "path": str(run["train"])}
    verified, _ = run_verify(
        memorized,
        run_dir / "generations",
        run_dir / "detect",
        data,
        dedup_dir=run_dir / "dedup",
        exhaustive=False,
        progress=False,
    )
    assert (verified["n_candidates"] == 0).all()  # dedup's keys for "00000" belong to another caption
    assert load_run(run_dir / "detect").dup_counts is None


def test_the_layout_resolver_gives_every_stage_its_folder_from_run_dir():
    from hydra import compose, initialize_config_dir

    from pipeline.layout import RunLayout

    layout = RunLayout(Path("outputs/x"))
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        generate = compose(config_name="generate", overrides=["run_name=x"])
        detect = compose(config_name="detect", overrides=["run_name=x"])
        report = compose(config_name="report", overrides=["run_name=x"])
        dedup = compose(config_name="dedup", overrides=["run_name=x"])
    assert Path(generate.prompts) == layout.dedup_selected and Path(generate.out_dir) == layout.generations
    assert Path(detect.generations_dir) == layout.generations and Path(detect.out_dir) == layout.detect
    assert Path(detect.verify.dedup_dir) == layout.dedup and Path(dedup.out_dir) == layout.dedup
    assert Path(report.detect_dir) == layout.detect and Path(report.out) == layout.report_page


def test_the_layout_resolver_names_an_unknown_artifact():
    from pipeline.layout import layout_path

    with pytest.raises(ValueError, match="layout: no artifact 'nope'"):
        layout_path("nope", "outputs/x")


def test_no_artifact_file_name_is_written_outside_the_layout_module():
    """Every artifact path is made from pipeline/layout.py's names: no other module of the
    package spells an artifact's file name as a string literal."""
    import re

    from pipeline import layout

    names = [
        getattr(layout, n)
        for n in (
            "SELECTED",
            "GROUPS",
            "SCORES_TABLE",
            "PROMPTS_TABLE",
            "BUDGET",
            "MEMORIZED",
            "EXTRACTED",
            "REPORT_PAGE",
            "SUMMARY",
            "REJECTS",
            "STATS",
            "GENERATION_SETTINGS",
        )
    ]
    literal = re.compile("[\"'](" + "|".join(re.escape(n) for n in names) + ")[\"']")
    package = Path(layout.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path != Path(layout.__file__)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if literal.search(line)
    ]
    assert not found, "artifact file names spelled outside pipeline/layout.py:\n" + "\n".join(found)
