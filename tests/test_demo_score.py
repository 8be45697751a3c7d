"""Scoring a demo audit against the planted ground truth."""

import pandas as pd

from pipeline.demo.score import score_run


def test_flags_and_extractions_are_scored_against_planted_originals(tmp_path):
    truth = pd.DataFrame(
        {
            "key": ["a1", "a2", "b1", "b2", "c1"],
            "original_id": ["A", "A", "B", "B", "C"],
            "band": ["heavy", "heavy", "heavy", "heavy", "single"],
            "dup_count": [150, 150, 150, 150, 1],
        }
    )
    (tmp_path / "dedup").mkdir()
    (tmp_path / "detect").mkdir()
    pd.DataFrame({"prompt_id": ["0", "1", "2"], "keys": [["a1", "a2"], ["b1", "b2"], ["c1"]]}).to_parquet(tmp_path / "dedup" / "selected.parquet")
    pd.DataFrame({"prompt_id": ["0", "1", "2"], "flagged": [True, False, True], "clique_size": [12, 2, 10]}).to_parquet(
        tmp_path / "detect" / "memorized.parquet"
    )
    # Prompt 0 matches a copy of its own original; prompt 2 matches another original's copy.
    pd.DataFrame({"prompt_id": ["0", "2"], "train_key": ["a2", "b1"], "extracted": [True, True]}).to_parquet(
        tmp_path / "detect" / "extracted.parquet"
    )
    summary, per_band = score_run(tmp_path, truth)
    assert summary["planted_prompts"] == 2 and summary["flagged"] == 2 and summary["extracted"] == 1
    assert summary["flagged_precision"] == 0.5 and summary["flagged_recall"] == 0.5
    assert summary["extracted_precision"] == 1.0 and summary["extracted_recall"] == 0.5
    assert per_band.set_index("band").loc["heavy", "flagged"] == 1
