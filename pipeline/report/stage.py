"""The audit report: one self-contained HTML file per run directory.

    python -m pipeline.report run_name=demo        (or: make report ARGS="run_name=demo")

Reads the detect stage's folder (``detect_dir``: its verdicts, matching pairs and best-matching
training images; :mod:`pipeline.report.results`), with the prescreen's scores and the
generator's seeds and budget where they exist, and writes the page ``out`` (the run's
``RunLayout.report_page`` by default; :mod:`pipeline.report.render`): the evidence of every
extraction, the rates by duplicate count (:mod:`pipeline.report.tables`,
:mod:`pipeline.report.figures`) and a table of every prompt screened.

The page is the executor's one unit (on rank 0): it is written again when an input, a setting
or the page itself changed since it was written; another rank of an array has nothing to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.cli import CONF_DIR, setting, settings_from, stage_main
from pipeline.executor import StepContext, Unit, read_marker, run_step
from pipeline.report.render import write_report
from pipeline.report.results import RunResults, input_paths, load_run


@dataclass(frozen=True)
class ReportSettings:
    """What the page shows, from the report's config (``conf/report.yaml``)."""

    title: Any  # the page's title (any scalar, shown as text)
    thumbnails: int = setting(minimum=0)  # clique members shown per flagged prompt
    thumb_size: int = setting(minimum=1)  # their width in pixels; a card's images are twice that
    max_prompts: int = setting(minimum=0)  # cards, and flagged prompts, shown at most

    def __post_init__(self):
        object.__setattr__(self, "title", str(self.title))


@dataclass
class ReportSummary:
    """What a run of the report did: the page's path (None on a rank other than 0), whether it
    was written (False: found up to date), and the counts it shows (None on other ranks)."""

    out: Path | None
    written: bool
    prompts: int | None = None  # prompts screened
    flagged: int | None = None  # prompts whose samples hold a clique
    extracted: int | None = None  # prompts with a sample within the threshold of a training image; None unverified


class WriteReport:
    """The report as the executor's one unit, on rank 0. The unit's settings are the state (size,
    modification time) of every input and the page's settings; its marker records the page's state
    as written, so that a page changed or removed since is written again."""

    name = "report"

    def __init__(self, detect_dir: Path, out: Path, options: dict[str, Any]):
        self.detect_dir, self.out, self.options = detect_dir, out, options

    def units(self) -> list[Unit]:
        state = {str(path): file_state(path) for path in input_paths(self.detect_dir) if path.exists()}
        return [Unit("report", {"files": state, "options": self.options, "out": str(self.out)})]

    def is_complete(self, unit: Unit, marker: dict[str, Any]) -> bool:
        """Written from the same inputs and settings, and the page is as it was written."""
        return marker.get("digest") == unit.digest and marker.get("page") == file_state(self.out)

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        for unit in units:
            with ctx.track_time("load"):
                results = load_run(self.detect_dir)
            with ctx.track_time("render"):
                write_report(results, self.out, **self.options)
            counts = shown_counts(results)
            for name, value in counts.items():
                if value is not None:
                    ctx.stat(name, value)
            ctx.done(unit, {"page": file_state(self.out), "counts": counts})


def file_state(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of ``path``; None when it does not exist."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def shown_counts(results: RunResults) -> dict[str, int | None]:
    """The prompts screened, flagged and (None unverified) extracted of a run."""
    memorized = results.memorized
    extracted = int(memorized["extracted"].sum()) if results.verified else None
    return {"prompts": len(memorized), "flagged": int(memorized["flagged"].sum()), "extracted": extracted}


def run_report(detect_dir: str | Path, out: str | Path, rank: int = 0, world_size: int = 1, **options) -> Path | None:
    """Write the report through the executor (on rank 0); returns its path, None on other ranks."""
    step = WriteReport(Path(detect_dir), Path(out), options)
    ctx = run_step(step, Path(out).parent, rank=rank, world_size=world_size)
    return Path(out) if rank == 0 and (ctx.completed or Path(out).is_file()) else None


def run(cfg: DictConfig) -> ReportSummary:
    """The report stage: the page of ``cfg.detect_dir``'s results at ``cfg.out``, written on rank 0."""
    # 1. Read the settings (checked once: a wrong value names its key).
    settings = settings_from(ReportSettings, cfg)
    detect_dir, out = Path(str(cfg.detect_dir)), Path(str(cfg.out))

    # 2. Write the page through the executor, unless it is up to date.
    step = WriteReport(detect_dir, out, asdict(settings))
    ctx = run_step(step, out.parent, rank=cfg.rank, world_size=cfg.world_size)
    if ctx.rank != 0:
        print(f"report: rank {cfg.rank} has nothing to do; rank 0 writes the report")
        return ReportSummary(out=None, written=False)

    # 3. Say what it holds.
    marker = read_marker(out.parent, step.name) or {}
    summary = ReportSummary(out=out, written=ctx.completed > 0, **(marker.get("counts") or {}))
    print(f"report written to {out}" if summary.written else f"report up to date (its inputs are unchanged): {out}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
@stage_main("report")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
