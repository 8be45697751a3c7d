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

DATA_DIR = Path("data/demo")
RUN_DIR = Path("outputs/demo")

# (stage module, overrides that stage needs beyond experiment=demo)
STAGES = [
    ("pipeline.dedup", []),
    ("pipeline.prescreen", []),
    ("pipeline.generate", []),
    ("pipeline.detect", ["data=demo"]),
    ("pipeline.report", []),
]


def run_stage(module: str, overrides: list[str]) -> None:
    command = [sys.executable, "-m", module, "experiment=demo", *overrides]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage {module} failed (exit code {result.returncode}); its messages are above")
    print(f"=== {module} done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    extra = list(sys.argv[1:] if argv is None else argv)
    if not (DATA_DIR / "ground_truth.parquet").exists():
        run_stage("pipeline.demo.dataset", [])
    else:
        print(f"demo data set already at {DATA_DIR} (delete it or run `make demo-data` to rebuild)")
    for module, overrides in STAGES:
        run_stage(module, overrides + extra)

    ground_truth = pd.read_parquet(DATA_DIR / "ground_truth.parquet")
    summary, per_band = score_run(RUN_DIR, ground_truth)
    (RUN_DIR / "demo_score.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\nAgainst the demo set's ground truth (planted = the heavily duplicated originals):")
    print(per_band.to_string(index=False))
    print(format_summary(summary))
    print(f"\nReport: {(RUN_DIR / 'report' / 'index.html').resolve()}")


if __name__ == "__main__":
    main()
