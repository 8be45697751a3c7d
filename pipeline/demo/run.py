"""`make demo`: every stage of an audit, on the shipped demo model and the demo data set.

Runs each stage as a user would (``python -m pipeline.<stage> experiment=demo``), so the demo
exercises exactly the command lines the README shows. Stages skip work already done, so a
second ``make demo`` is quick. Ends by scoring the audit against the demo set's ground truth.

    python -m pipeline.demo.run                  # extra Hydra overrides go to every stage:
    python -m pipeline.demo.run n_samples=48
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline.demo.score import format_summary, score_run
from pipeline.layout import RunLayout

DATA_DIR = Path("data/demo")
RUN_DIR = Path("outputs/demo")
# What `make demo-eval` measured of the shipped model (samples within the threshold of a copy, per band).
MEASURED = Path("models/demo/memorization.csv")

# (stage module, overrides that stage needs beyond experiment=demo)
# The demo set's duplicates are re-encodings, resizes, small crops and recolourings, for which
# the thumbnail embedder was calibrated (pair precision 0.9999, recall 0.9993 there); the robust
# default (pipeline/embedders/robust.py, made for LAION's edits) loses some of them. The
# detector queries the duplicate finder's index, so it must embed with the same one.
STAGES = [
    ("pipeline.dedup", ["embedder=thumbnail"]),
    ("pipeline.prescreen", []),
    ("pipeline.generate", []),
    ("pipeline.detect", ["data=demo", "embedder=thumbnail"]),
    ("pipeline.report", []),
]


def run_stage(module: str, overrides: list[str]) -> None:
    """Run ``python -m <module> <overrides>``; stop the demo when it fails."""
    command = [sys.executable, "-m", module, *overrides]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage {module} failed (exit code {result.returncode}); its messages are above")
    print(f"=== {module} done in {time.perf_counter() - started:.0f} s", flush=True)


def demo_commands(extra: list[str], build_data: bool) -> list[tuple[str, list[str]]]:
    """``(module, overrides)`` of each stage ``make demo`` runs, in order.

    ``extra`` (the user's overrides) goes to every audit stage; the data-set builder, which
    is not a stage of the audit, runs with its own defaults when ``build_data``.
    """
    commands = [("pipeline.demo.dataset", [])] if build_data else []
    return commands + [(module, ["experiment=demo", *overrides, *extra]) for module, overrides in STAGES]


def main(argv: list[str] | None = None) -> None:
    extra = list(sys.argv[1:] if argv is None else argv)
    build_data = not (DATA_DIR / "ground_truth.parquet").exists()
    if not build_data:
        print(f"demo data set already at {DATA_DIR} (delete it or run `make demo-data` to rebuild)")
    for module, overrides in demo_commands(extra, build_data):
        run_stage(module, overrides)

    ground_truth = pd.read_parquet(DATA_DIR / "ground_truth.parquet")
    measured = pd.read_csv(MEASURED) if MEASURED.is_file() else None
    summary, per_band = score_run(RUN_DIR, ground_truth, measured=measured)
    (RUN_DIR / "demo_score.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\nAgainst the demo set's ground truth (planted = the heavily duplicated originals):")
    print(per_band.to_string(index=False))
    print("other: prompts not extracted with a sample within the threshold of another caption's training image;")
    print(
        "reproduction: the band's samples within the threshold of one of their caption's training images, with a 95% Wilson interval;"
        f"\ndemo_eval: the share `make demo-eval` measured with other seeds ({MEASURED})"
        if measured is not None
        else ""
    )
    print(format_summary(summary))
    print(f"\nReport: {RunLayout(RUN_DIR).report_page.resolve()}")


if __name__ == "__main__":
    main()
