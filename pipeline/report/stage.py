"""The audit report: one self-contained HTML file per run directory.

    python -m pipeline.report run_name=demo        (or: make report ARGS="run_name=demo")

Reads ``<run_dir>/detect/`` (``memorized.parquet``, ``summary.json``, and ``extracted.parquet``
with ``matches/`` when verification ran); duplicate counts come with each prompt in
``memorized.parquet``. Writes ``<run_dir>/report/index.html``: images are inlined as base64 PNG
data URIs and the page has no external CSS, scripts or fonts, so it opens offline and can be
mailed as one file. Captions, prompt ids and training keys are untrusted (web text, other tools'
folders): they are shown through :func:`pipeline.text.display_text` (controls and bidi controls as
visible escapes, bounded length, the whole text once under a collapsed "full ..."), isolated in
``<bdi>`` so that right-to-left text reads correctly, and HTML-escaped (jinja2 autoescape).
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from pipeline.cli import CONF_DIR, config_int, stage_main
from pipeline.executor import StepContext, Unit, run_step
from pipeline.io import atomic_write
from pipeline.layout import read_prompt_table
from pipeline.text import display_text

log = logging.getLogger(__name__)

CAPTION_LIMIT = 300  # characters of a caption shown where it is listed
NAME_LIMIT = 100  # characters of a prompt id or training key shown


@dataclass
class RunResults:
    """What the detect stage found, with paths to the images it refers to."""

    memorized: pd.DataFrame  # memorized.parquet, a row per prompt
    extracted: pd.DataFrame | None  # extracted.parquet, a row per flagged prompt; None if not verified
    summary: dict[str, Any]  # summary.json: settings, generations_dir, counts
    detect_dir: Path
    generations_dir: Path
    dup_counts: pd.DataFrame | None  # prompt_id, dup_count (from memorized.parquet), if any

    def sample_path(self, file: str) -> Path:
        """Path of a sample named as in ``member_files`` / ``sample_file``."""
        return self.generations_dir / file

    def match_path(self, prompt_id: str) -> Path:
        """The matched training image saved by verification."""
        return self.detect_dir / "matches" / f"{prompt_id}.png"


def load_run(detect_dir: str | Path) -> RunResults:
    """Load the detect stage's outputs (with the prompts' duplicate counts, where known)."""
    detect_dir = Path(detect_dir)
    memorized_path = detect_dir / "memorized.parquet"
    if not memorized_path.exists():
        raise FileNotFoundError(f"{memorized_path} does not exist: run `python -m pipeline.detect` for this run first")
    memorized = read_prompt_table(memorized_path)
    summary_path = detect_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    extracted_path = detect_dir / "extracted.parquet"
    extracted = pd.read_parquet(extracted_path) if extracted_path.exists() else None
    if extracted is not None:
        # A verification of an earlier detection (other settings) must not be shown as this one's.
        current = set(zip(memorized.loc[memorized["flagged"], "prompt_id"], memorized.loc[memorized["flagged"], "representative"]))
        fresh = [(pid, sample) in current for pid, sample in zip(extracted["prompt_id"], extracted["sample"])]
        if not all(fresh) or len(extracted) != len(current):
            log.warning("%s does not match %s (detection rerun since?): rerun `python -m pipeline.detect data=...` "
                        "to verify again; ignoring the stale rows", extracted_path, memorized_path)
            extracted = extracted[fresh].reset_index(drop=True)
    # Duplicate counts travel with each prompt (the prompt table's dup_count, carried from the
    # duplicate finder by prompt id), never looked up in another stage's files.
    dup_counts = None
    if "dup_count" in memorized.columns and memorized["dup_count"].notna().any():
        dup_counts = memorized.loc[memorized["dup_count"].notna(), ["prompt_id", "dup_count"]].astype({"prompt_id": str})
        memorized = memorized.drop(columns=["dup_count"])
    generations_dir = Path(summary.get("generations_dir", detect_dir.parent / "generations"))
    return RunResults(memorized, extracted, summary, detect_dir, generations_dir, dup_counts)


def flagged_prompts(results: RunResults) -> pd.DataFrame:
    """The flagged prompts with their verification and duplicate count, extractions first.

    Columns: those of memorized.parquet, plus ``train_key``, ``distance``, ``extracted``,
    ``verified`` and ``dup_count`` (NaN/None where unknown).
    """
    table = results.memorized[results.memorized["flagged"]].copy()
    if results.extracted is not None:
        table = table.merge(results.extracted[["prompt_id", "train_key", "distance", "extracted"]], on="prompt_id", how="left")
        table["verified"] = table["train_key"].notna()
    else:
        table["train_key"], table["distance"], table["extracted"], table["verified"] = None, np.nan, False, False
    table["extracted"] = table["extracted"].fillna(False).astype(bool)
    if results.dup_counts is not None:
        table = table.merge(results.dup_counts, on="prompt_id", how="left")
    else:
        table["dup_count"] = np.nan
    return table.sort_values(["extracted", "clique_size", "prompt_id"], ascending=[False, False, True]).reset_index(drop=True)


def rates_by_duplicates(results: RunResults, max_bins: int = 10) -> pd.DataFrame | None:
    """Flag and extraction rates of the screened prompts, grouped by duplicate count.

    Distinct counts are their own group when there are at most ``max_bins`` of them; otherwise
    the groups are powers of two (1, 2-3, 4-7, ...). Returns ``None`` without duplicate counts.
    Columns: ``bin`` (label), ``low`` (smallest count of the bin), ``prompts``, ``flagged``,
    ``extracted``, ``flag_rate``, ``extraction_rate``.
    """
    if results.dup_counts is None:
        return None
    table = results.memorized[["prompt_id", "flagged"]].merge(results.dup_counts, on="prompt_id", how="inner")
    table = table[table["dup_count"].notna()]
    if table.empty:
        return None
    extracted = set()
    if results.extracted is not None:
        extracted = set(results.extracted.loc[results.extracted["extracted"], "prompt_id"])
    table["extracted"] = table["prompt_id"].isin(extracted)
    counts = table["dup_count"].astype(int)
    if counts.nunique() <= max_bins:
        table["low"], table["bin"] = counts, counts.astype(str)
    else:
        power = np.floor(np.log2(np.maximum(counts, 1))).astype(int)
        low, high = 2**power, 2 ** (power + 1) - 1
        table["low"] = low
        table["bin"] = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(low, high)]
    grouped = table.groupby(["low", "bin"], sort=True).agg(
        prompts=("prompt_id", "size"), flagged=("flagged", "sum"), extracted=("extracted", "sum")
    ).reset_index()
    grouped["flag_rate"] = grouped["flagged"] / grouped["prompts"]
    grouped["extraction_rate"] = grouped["extracted"] / grouped["prompts"]
    return grouped


def plot_rates(rates: pd.DataFrame, verified: bool = True) -> bytes:
    """A bar chart of flag (and extraction) rate per duplicate-count group, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    x = np.arange(len(rates))
    width = 0.4 if verified else 0.6
    ax.bar(x - (width / 2 if verified else 0), rates["flag_rate"], width, label="flagged", color="#ef6c00")
    if verified:
        ax.bar(x + width / 2, rates["extraction_rate"], width, label="extracted", color="#c62828")
    for xi, n in zip(x, rates["prompts"]):
        ax.annotate(f"n={n}", (xi, 1.0), ha="center", va="bottom", fontsize=8, color="#555")
    ax.set_xticks(x, rates["bin"])
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("duplicates of the prompt's image in the training set")
    ax.set_ylabel("share of prompts")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def png_data_uri(image: Image.Image | bytes) -> str:
    """A ``data:image/png;base64,...`` URI of a PIL image or of PNG bytes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def load_thumbnail(path: Path, size: int) -> Image.Image | None:
    """The image at ``path`` shrunk to fit ``size`` x ``size`` (small images stay as they are;
    the page scales them up pixelated); ``None`` when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as err:
        # The file name comes from the generations folder, possibly another tool's.
        log.warning("cannot read %s for the report: %s", display_text(path, None), display_text(err, None))
        return None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def _uri(path: Path, size: int) -> str | None:
    thumb = load_thumbnail(path, size)
    return png_data_uri(thumb) if thumb is not None else None


def shown(value: Any, limit: int) -> dict[str, Any]:
    """An untrusted value for the template: ``text``, safe and at most ``limit`` characters, and,
    when that is shortened, ``full`` (the whole value, safe) and its ``length``; else ``full`` is None."""
    text = "" if value is None else str(value)
    shortened = len(text) > limit
    return {"text": display_text(text, limit), "full": display_text(text, None) if shortened else None, "length": len(text)}


def render_report(results: RunResults, title: str, thumbnails: int = 6, thumb_size: int = 128, max_prompts: int = 200) -> str:
    """The report as an HTML string (see the module docstring)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=True,  # captions are untrusted web text (display_text escapes controls, not markup)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    flagged = flagged_prompts(results)
    verified = results.extracted is not None
    prompts = []
    for row in flagged.head(max_prompts).itertuples(index=False):
        # The representative first, then the other members in index order.
        files = [row.representative_file] + [f for f in row.member_files if f != row.representative_file]
        samples = [row.representative] + [m for m in row.members if m != row.representative]
        thumbs = [
            {"uri": _uri(results.sample_path(f), thumb_size), "label": f"#{s}" + (" (central)" if i == 0 else "")}
            for i, (f, s) in enumerate(zip(files[:thumbnails], samples[:thumbnails]))
        ]
        has_match = verified and isinstance(row.train_key, str) and row.train_key != ""
        prompts.append({
            "prompt_id": shown(row.prompt_id, NAME_LIMIT), "caption": shown(row.caption, CAPTION_LIMIT), "clique_size": row.clique_size,
            "n_samples": row.n_samples, "clique_exact": row.clique_exact,
            "max_pair_distance": row.max_pair_distance, "median_pair_distance": row.median_pair_distance,
            "dup_count": None if pd.isna(row.dup_count) else int(row.dup_count),
            "thumbs": thumbs, "verified": verified, "extracted": bool(row.extracted),
            "train_key": shown(row.train_key if has_match else "", NAME_LIMIT), "distance": row.distance if has_match else float("nan"),
            "match_uri": _uri(results.match_path(row.prompt_id), thumb_size) if has_match else None,
        })  # fmt: skip
    rates = rates_by_duplicates(results)
    plot = png_data_uri(plot_rates(rates, verified)) if rates is not None else None
    memorized = results.memorized
    summary = {
        "prompts": len(memorized),
        "samples": int(memorized["n_samples"].sum()),
        "rejected": int(memorized["n_rejected"].sum()) if "n_rejected" in memorized else 0,
        "flagged": int(memorized["flagged"].sum()),
        "verified": verified,
        "extracted": int(results.extracted["extracted"].sum()) if verified else 0,
    }
    settings = results.summary.get("settings", {"min_clique": "?", "threshold": "?", "metric": "?"})
    template = env.get_template("report.html.j2")
    return template.render(
        title=title, summary=summary, settings=settings, delta=_verify_delta(results), budget=_budget(results),
        plot=plot, prompts=prompts, hidden=max(0, len(flagged) - max_prompts), thumb_size=thumb_size,
    )


def _budget(results: RunResults) -> dict[str, Any] | None:
    """The generator's ``budget.json`` (UNet evaluations against brute force), when it wrote one."""
    from pipeline.budget import BUDGET_FILE

    path = results.generations_dir / BUDGET_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("report: %s unreadable (%s); the sampling cost is left out", path, err)
        return None


def _verify_delta(results: RunResults) -> float | None:
    """The verification threshold, as the detect stage recorded it in its summary."""
    return (results.summary.get("verification") or {}).get("delta")


def write_report(results: RunResults, out: str | Path, **options) -> Path:
    """Render and write the report atomically; returns its path."""
    html = render_report(results, **options)
    return atomic_write(out, lambda tmp: tmp.write_text(html, encoding="utf-8"))


class WriteReport:
    """The report as the executor's one unit, on rank 0: rewritten when an input or the page
    itself changed since it was written (a shard of an array has nothing else to do)."""

    name = "report"

    def __init__(self, detect_dir: Path, out: Path, options: dict[str, Any]):
        self.detect_dir, self.out, self.options = detect_dir, out, options

    def unit(self) -> Unit:
        files = [self.detect_dir / name for name in ("memorized.parquet", "extracted.parquet", "summary.json")]
        files += [self.detect_dir.parent / "generations" / "budget.json", self.out]
        state = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}
        return Unit("report", {"files": state, "options": self.options, "out": str(self.out)})

    def units(self, rank: int, world_size: int) -> list[Unit]:
        return [self.unit()] if rank == 0 else []

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        write_report(load_run(self.detect_dir), self.out, **self.options)
        ctx.done(self.unit())  # the state it leaves, the page included


def run_report(detect_dir: str | Path, out: str | Path, rank: int = 0, world_size: int = 1, **options) -> Path | None:
    """Write the report through the executor (on rank 0); returns its path, None on other ranks."""
    step = WriteReport(Path(detect_dir), Path(out), options)
    ctx = run_step(step, Path(out).parent, rank=rank, world_size=world_size)
    return Path(out) if rank == 0 and (ctx.completed or Path(out).is_file()) else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
@stage_main("report")
def main(cfg: DictConfig) -> None:
    options = {
        "title": str(cfg.title),
        "thumbnails": config_int(cfg, "thumbnails", minimum=0),
        "thumb_size": config_int(cfg, "thumb_size", minimum=1),
        "max_prompts": config_int(cfg, "max_prompts", minimum=0),
    }
    out = run_report(cfg.detect_dir, cfg.out, rank=cfg.rank, world_size=cfg.world_size, **options)
    if out is None:
        print(f"report: rank {cfg.rank} has nothing to do; rank 0 writes the report")
    else:
        print(f"report written to {out}")


if __name__ == "__main__":
    main()
