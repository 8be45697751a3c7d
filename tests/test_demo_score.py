"""Scoring a demo audit against the planted ground truth."""

import pandas as pd

from pipeline.demo.score import score_run
from pipeline.stats import wilson_interval


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
    pd.DataFrame({"prompt_id": ["0", "1", "2"], "keys": [["a1", "a2"], ["b1", "b2"], ["c1"]]}).to_parquet(
        tmp_path / "dedup" / "selected.parquet"
    )
    # Prompt 0's closest training image is a copy of its own original; prompt 2's is another
    # original's copy: extracted by the detector, but not a correct extraction.
    pd.DataFrame(
        {
            "prompt_id": ["0", "1", "2"],
            "flagged": [True, False, True],
            "clique_size": [12, 2, 10],
            "extracted": [True, False, True],
            "best_train_key": ["a2", "", "b1"],
            "samples_matched": [6, 0, 2],
            "n_samples": [24, 24, 24],
            "samples_matched_other": [0, 1, 0],
        }
    ).to_parquet(tmp_path / "detect" / "memorized.parquet")
    measured = pd.DataFrame({"band": ["heavy"] * 4 + ["single"] * 2, "reproduced": [True, True, True, False, False, False]})
    summary, per_band = score_run(tmp_path, truth, measured=measured)
    assert summary["planted_prompts"] == 2 and summary["flagged"] == 2 and summary["extracted"] == 1
    assert summary["flagged_precision"] == 0.5 and summary["flagged_recall"] == 0.5
    assert summary["extracted_precision"] == 1.0 and summary["extracted_recall"] == 0.5
    bands = per_band.set_index("band")
    assert bands.loc["heavy", "flagged"] == 1
    # Prompt 1 (heavy) is not extracted but a sample reproduces another caption's image.
    assert bands.loc["heavy", "other"] == 1 and bands.loc["single", "other"] == 0
    # Pooled over the band's prompts: 6 of 48 samples, with the Wilson interval of 6/48.
    low, high = wilson_interval(6, 48)
    assert bands.loc["heavy", "reproduction"] == f"{6 / 48:.2f} [{low:.2f}, {high:.2f}]"
    assert bands.loc["heavy", "demo_eval"] == "0.75 (of 4)" and bands.loc["single", "demo_eval"] == "0.00 (of 2)"
