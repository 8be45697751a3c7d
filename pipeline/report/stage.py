"""The audit report: one self-contained HTML file per run directory.

    python -m pipeline.report run_name=demo        (or: make report ARGS="run_name=demo")

Reads ``<run_dir>/detect/``: ``memorized.parquet`` (a row per screened prompt: its duplicate
count, its clique verdict and, when verification ran, how many of its samples are within the
threshold of a training image), ``extracted.parquet`` (a row per matching sample and training
image), ``matches/<prompt_id>.png`` (the best-matching training image, cropped as compared) and
``summary.json`` (the rule's settings, the verification threshold); also the prescreen's scores
(``<run_dir>/prescreen/prescreen.parquet``) and the generator's seeds (its ``prompts.parquet``)
where they exist. Writes ``<run_dir>/report/index.html``, which shows, as evidence a reader can
check:

* a card per extracted prompt: the generated sample beside the training image it reproduces,
  their distance against the threshold, the sample's seed, the training key and the command that
  regenerates the sample;
* the reproduction rate (share of samples within the threshold) and the flag rate against the
  duplicate count, pooled per duplicate-count bin, with 95% Wilson intervals;
* a table of every prompt screened; the clique thumbnails of every flagged prompt.

Images are inlined as base64 PNG data URIs and the page has no external CSS, scripts or fonts,
so it opens offline and can be mailed as one file. Captions, prompt ids and training keys are
untrusted (web text, other tools' folders): they are shown through
:func:`pipeline.text.display_text` (controls and bidi controls as visible escapes, bounded
length, the whole text once under a collapsed "full ..."), isolated in ``<bdi>`` so that
right-to-left text reads correctly, and HTML-escaped (jinja2 autoescape).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from pipeline.cli import CONF_DIR, config_int, stage_main
from pipeline.executor import StepContext, Unit, run_step
from pipeline.generations import PROMPTS_FILE, load_prompts
from pipeline.io import atomic_write
from pipeline.layout import EXTRACTED_COLUMNS, VERIFICATION_COLUMNS, read_prompt_table
from pipeline.stats import wilson_interval
from pipeline.text import display_text

log = logging.getLogger(__name__)

CAPTION_LIMIT = 300  # characters of a caption shown on a card or a flagged prompt
TABLE_CAPTION_LIMIT = 80  # characters of a caption in the table of every prompt
NAME_LIMIT = 100  # characters of a prompt id or training key shown
PAIRS_SHOWN = 20  # matching (sample, training image) pairs listed on a card

REGENERATE = "python -m pipeline.generate.regenerate"


@dataclass
class RunResults:
    """What the detect stage found, with what the report shows beside it and the paths of the
    images it refers to."""

    memorized: pd.DataFrame  # memorized.parquet: a row per screened prompt (VERIFICATION_COLUMNS when verified)
    extracted: pd.DataFrame | None  # extracted.parquet: a row per matching pair (EXTRACTED_COLUMNS); None if not verified
    summary: dict[str, Any]  # summary.json: settings, generations_dir, counts, verification
    detect_dir: Path
    generations_dir: Path
    prescreen: pd.DataFrame | None = None  # prompt_id, score (and robust_z): the prescreen's, if it ran
    seeds: dict[str, list[int]] = field(default_factory=dict)  # prompt_id -> seed per sample index (generator's table)

    @property
    def verified(self) -> bool:
        """Whether verification ran: memorized.parquet has its columns."""
        return "extracted" in self.memorized.columns

    @property
    def dup_counts(self) -> pd.DataFrame | None:
        """``prompt_id``, ``dup_count`` of the prompts whose duplicate count is known (it travels
        with each prompt in memorized.parquet); None when no prompt's is."""
        known = self.memorized[self.memorized["dup_count"].notna()]
        return known[["prompt_id", "dup_count"]].reset_index(drop=True) if len(known) else None

    @property
    def delta(self) -> float | None:
        """The verification threshold, as the detect stage recorded it in its summary."""
        return (self.summary.get("verification") or {}).get("delta")

    @property
    def metric_name(self) -> str:
        """The name of the distance verification used (e.g. ``tiled_l2``), "?" when unrecorded."""
        metric = (self.summary.get("verification") or {}).get("metric") or {}
        name = metric.get("name") if isinstance(metric, dict) else metric
        return str(name or (self.summary.get("settings") or {}).get("metric") or "?")

    def sample_path(self, file: str) -> Path:
        """Path of a sample named as in ``member_files`` / ``best_sample_file`` / ``sample_file``."""
        return self.generations_dir / file

    def match_path(self, prompt_id: str) -> Path:
        """The best-matching training image saved by verification."""
        return self.detect_dir / "matches" / f"{prompt_id}.png"

    def seed(self, prompt_id: str, index: Any) -> int | None:
        """The seed sample ``index`` of the prompt was made from; None when the generator's
        table does not record it (samples made by another tool)."""
        seeds = self.seeds.get(str(prompt_id))
        if seeds is None or index is None or pd.isna(index) or not 0 <= int(index) < len(seeds):
            return None
        return seeds[int(index)]

    def regenerate_command(self, prompt_id: str, index: Any) -> str | None:
        """The shell command that remakes sample ``index`` of the prompt from its recorded recipe
        (into ``regenerated_<prompt_id>_<index>.png`` in the current folder), every argument
        quoted by :func:`shell_word`; None when the generator's table has no seed for it."""
        if self.seed(prompt_id, index) is None:
            return None
        prompt_id, index = str(prompt_id), int(index)
        positional = [str(self.generations_dir), prompt_id, str(index)]
        out = ["--out", f"regenerated_{prompt_id}_{index:05d}.png"]
        # A prompt id may start with "-", which argparse would read as an option: then the
        # positional arguments go after "--".
        words = out + ["--"] + positional if prompt_id.startswith("-") else positional + out
        return " ".join([REGENERATE] + [shell_word(word) for word in words])


def shell_word(value: str) -> str:
    """``value`` as one bash word that reads back exactly.

    Printable text goes through :func:`shlex.quote`. Text with characters that
    :func:`pipeline.text.display_text` escapes (controls, bidi controls) uses bash's ``$'...'``
    quoting with those characters written as ``\\xHH`` / ``\\uHHHH``, so that the command can be
    shown in a page or a terminal without them acting and still be pasted as it is. (A NUL
    cannot be in an argument, so none is expected.)
    """
    if all(display_text(char, None) == char for char in value):
        return shlex.quote(value)
    out = []
    for char in value:
        code = ord(char)
        if char in "\\'":
            out.append("\\" + char)
        elif display_text(char, None) != char:
            # \xHH is a byte in bash; above ASCII, \uHHHH is the character (UTF-8 encoded).
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "$'" + "".join(out) + "'"


def _read_summary(detect_dir: Path) -> dict[str, Any]:
    path = detect_dir / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _generations_dir(detect_dir: Path, summary: dict[str, Any]) -> Path:
    return Path(summary.get("generations_dir", detect_dir.parent / "generations"))


def load_run(detect_dir: str | Path) -> RunResults:
    """Load the detect stage's outputs, with the prescreen's scores and the generator's seeds
    where they exist.

    Verification ran when memorized.parquet has its columns (``VERIFICATION_COLUMNS``); then
    extracted.parquet's rows are kept only for prompts memorized.parquet marks extracted (others
    come from an earlier verification and are dropped with a warning). Without those columns
    an extracted.parquet is ignored, with a warning, and ``extracted`` is None.
    """
    detect_dir = Path(detect_dir)
    memorized_path = detect_dir / "memorized.parquet"
    if not memorized_path.exists():
        raise FileNotFoundError(f"{memorized_path} does not exist: run `python -m pipeline.detect` for this run first")
    memorized = read_prompt_table(memorized_path)
    summary = _read_summary(detect_dir)
    extracted_path = detect_dir / "extracted.parquet"
    extracted = None
    if "extracted" in memorized.columns:
        memorized = _typed_verification(memorized, memorized_path)
        extracted = _matching_pairs(extracted_path, memorized)
    elif extracted_path.exists():
        log.warning("%s exists but %s has no verification columns (an older verification, or detection rerun "
                    "without a training set since): ignoring it; rerun `python -m pipeline.detect data=...` to verify",
                    extracted_path, memorized_path)  # fmt: skip
    generations_dir = _generations_dir(detect_dir, summary)
    prescreen = _prescreen_scores(detect_dir.parent / "prescreen" / "prescreen.parquet")
    return RunResults(memorized, extracted, summary, detect_dir, generations_dir, prescreen, _recorded_seeds(generations_dir))


def _typed_verification(memorized: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The verification columns typed as ``VERIFICATION_COLUMNS`` says (nulls filled: False, 0,
    "", NaN; ``best_sample`` and ``best_in_group`` stay nullable). All or none of them must be there."""
    missing = [c for c in VERIFICATION_COLUMNS if c not in memorized.columns]
    if missing:
        raise ValueError(f"{path}: has verification column 'extracted' but not {missing}: written by another "
                         "version of the detector? rerun `python -m pipeline.detect data=...`")  # fmt: skip
    out = memorized.copy()
    for column, kind in VERIFICATION_COLUMNS.items():
        values = out[column]
        if kind == "bool":
            out[column] = values.astype("boolean").fillna(False).astype(bool)
        elif kind == "int":
            out[column] = pd.to_numeric(values, errors="coerce").fillna(0).astype(int)
        elif kind == "float":
            out[column] = pd.to_numeric(values, errors="coerce").astype(float)
        elif kind == "Int64":
            out[column] = pd.to_numeric(values, errors="coerce").astype("Int64")
        elif kind == "boolean":
            out[column] = values.astype("boolean")
        else:
            out[column] = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values]
    return out


def _matching_pairs(path: Path, memorized: pd.DataFrame) -> pd.DataFrame:
    """extracted.parquet's rows of prompts memorized.parquet marks extracted or with samples
    reproducing another caption's training image (``samples_matched_other``), by prompt then
    distance; an empty table (with a warning) when the file is missing."""
    if not path.exists():
        log.warning("%s is missing although memorized.parquet holds verification results: the cards list no "
                    "matching samples beyond the best one", path)  # fmt: skip
        return pd.DataFrame({"prompt_id": pd.Series(dtype=str), "sample": pd.Series(dtype=int), "sample_file": pd.Series(dtype=str),
                             "train_key": pd.Series(dtype=str), "distance": pd.Series(dtype=float),
                             "in_group": pd.Series(dtype="boolean")})  # fmt: skip
    pairs = pd.read_parquet(path)
    missing = [c for c in EXTRACTED_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(EXTRACTED_COLUMNS)}")
    pairs = pairs.assign(prompt_id=pairs["prompt_id"].astype(str), train_key=pairs["train_key"].fillna("").astype(str))
    listed = pairs["prompt_id"].isin(set(memorized["prompt_id"]))
    with_matches = memorized["extracted"] | (memorized["samples_matched_other"] > 0)
    keep = pairs["prompt_id"].isin(set(memorized.loc[with_matches, "prompt_id"]))
    if not keep.all():
        # memorized.parquet is the verdict; rows it does not back come from an earlier
        # verification (detection or verification rerun since) and must not pass for this one's.
        log.warning("%s: ignoring %d row(s): %d of prompts not in memorized.parquet, %d of prompts it does not mark "
                    "extracted (an earlier verification?); rerun `python -m pipeline.detect data=...` to verify again",
                    path, int((~keep).sum()), int((~listed).sum()), int((listed & ~keep).sum()))  # fmt: skip
    return pairs[keep].sort_values(["prompt_id", "distance", "sample"], kind="stable").reset_index(drop=True)


def _prescreen_scores(path: Path) -> pd.DataFrame | None:
    """prompt_id, score (and robust_z, when there) of the prescreen's table; None without one."""
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        log.warning("report: %s unreadable (%s); prescreen scores left out", path, display_text(err, None))
        return None
    if not {"prompt_id", "score"} <= set(table.columns):
        log.warning("report: %s has no prompt_id/score columns; prescreen scores left out", path)
        return None
    columns = ["prompt_id", "score"] + (["robust_z"] if "robust_z" in table.columns else [])
    table = table[columns].astype({"prompt_id": str}).drop_duplicates("prompt_id")
    return table.reset_index(drop=True)


def _recorded_seeds(generations_dir: Path) -> dict[str, list[int]]:
    """prompt_id -> the seed of each sample index, from the generator's table; {} for a folder
    without one (another tool's samples) or whose table records no seeds."""
    if not generations_dir.is_dir():
        return {}
    try:
        # The report reads the generator's folder and writes nothing into it.
        table = load_prompts(generations_dir, write=False)
    except Exception as err:  # another tool's folder: a table we cannot read means no recipe, not no report
        log.warning("report: cannot read %s's %s (%s); no seeds or regeneration commands shown",
                    display_text(generations_dir, None), PROMPTS_FILE, display_text(err, None))  # fmt: skip
        return {}
    if not {"prompt_id", "seeds"} <= set(table.columns):
        return {}
    seeds = {}
    for prompt_id, values in zip(table["prompt_id"], table["seeds"]):
        if values is not None and np.ndim(values) == 1:
            seeds[str(prompt_id)] = [int(v) for v in values]
    return seeds


def _sort(table: pd.DataFrame, by: list[tuple[str, bool]]) -> pd.DataFrame:
    """``table`` sorted by the columns of ``by`` that it has ((column, ascending) pairs), stable."""
    by = [(c, a) for c, a in by if c in table.columns]
    if not by:
        return table.reset_index(drop=True)
    columns, ascending = zip(*by)
    return table.sort_values(list(columns), ascending=list(ascending), kind="stable", na_position="last").reset_index(drop=True)


def prompt_table(results: RunResults) -> pd.DataFrame:
    """Every screened prompt, a row each: extracted first (highest reproduction rate first),
    then flagged, then by clique size and prompt id.

    Columns: ``prompt_id``, ``caption``, ``dup_count`` (nullable int), ``score`` and
    ``robust_z`` (when the prescreen ran; NaN for prompts it did not score), ``n_samples``,
    ``clique_size``, ``flagged``; when verified also ``extracted``, ``samples_matched``,
    ``samples_verified``, ``reproduction_rate``, ``reproduction_ci_low``/``_high`` (in [0, 1])
    and ``best_distance`` (NaN without a candidate).
    """
    columns = ["prompt_id", "caption", "dup_count", "n_samples", "clique_size", "flagged"]
    if results.verified:
        columns += ["extracted", "samples_matched", "samples_verified", "reproduction_rate", "reproduction_ci_low",
                    "reproduction_ci_high", "best_distance"]  # fmt: skip
    table = results.memorized[columns].copy()
    if results.prescreen is not None:
        table = table.merge(results.prescreen, on="prompt_id", how="left")
        rest = [c for c in results.prescreen.columns if c != "prompt_id"]
        table = table[columns[:3] + rest + columns[3:]]
    return _sort(table, [("extracted", False), ("reproduction_rate", False), ("flagged", False), ("clique_size", False), ("prompt_id", True)])


def extracted_prompts(results: RunResults, other: bool = False) -> pd.DataFrame:
    """The extracted prompts (none without verification), highest reproduction rate first,
    then closest match: memorized.parquet's columns plus ``seed`` (nullable int: the best
    sample's seed) and ``command`` (str, or None: the command that regenerates the best sample).

    ``other``: instead, the prompts not extracted that have samples within the threshold of
    another caption's training image (``samples_matched_other`` > 0), most such samples first."""
    if not results.verified:
        return results.memorized.iloc[0:0].assign(seed=pd.Series(dtype="Int64"), command=pd.Series(dtype=object))
    memorized = results.memorized
    if other:
        table = _sort(memorized[~memorized["extracted"] & (memorized["samples_matched_other"] > 0)],
                      [("samples_matched_other", False), ("best_distance", True), ("prompt_id", True)])  # fmt: skip
    else:
        table = _sort(memorized[memorized["extracted"]], [("reproduction_rate", False), ("best_distance", True), ("prompt_id", True)])
    table["seed"] = pd.array([results.seed(p, s) for p, s in zip(table["prompt_id"], table["best_sample"])], dtype="Int64")
    table["command"] = pd.Series([results.regenerate_command(p, s) for p, s in zip(table["prompt_id"], table["best_sample"])],
                                 index=table.index, dtype=object)  # fmt: skip
    return table


def flagged_prompts(results: RunResults) -> pd.DataFrame:
    """The flagged prompts (memorized.parquet's rows and columns): extracted ones first when
    verified, then by clique size and prompt id."""
    table = results.memorized[results.memorized["flagged"]]
    return _sort(table, [("extracted", False), ("clique_size", False), ("prompt_id", True)])


def _with_interval(table: pd.DataFrame, name: str, successes: str, trials: str) -> None:
    """Add ``<name>``, ``<name>_ci_low`` and ``<name>_ci_high`` (Wilson, 95%) to ``table``."""
    bounds = [wilson_interval(k, n) for k, n in zip(table[successes], table[trials])]
    table[name] = [k / n if n else math.nan for k, n in zip(table[successes], table[trials])]
    table[f"{name}_ci_low"] = [low for low, _ in bounds]
    table[f"{name}_ci_high"] = [high for _, high in bounds]


def rates_by_duplicates(results: RunResults, max_bins: int = 10) -> pd.DataFrame | None:
    """Flag, extraction and reproduction rates of the screened prompts, by duplicate count.

    Distinct counts are their own bin when there are at most ``max_bins`` of them; otherwise the
    bins are powers of two (1, 2-3, 4-7, ...). Prompts of unknown count are left out; returns
    ``None`` when no prompt has one. A row per bin, by count: ``bin`` (label), ``low`` (smallest
    count of the bin), ``prompts``, ``flagged``, ``flag_rate`` (flagged / prompts); when
    verified also ``extracted`` and ``extraction_rate`` (share of prompts with a sample within
    the threshold), ``samples`` and ``samples_matched`` (pooled over the bin's prompts) and
    ``reproduction_rate`` (samples_matched / samples). Each rate comes with ``<rate>_ci_low``
    and ``<rate>_ci_high``, its 95% Wilson interval (all in [0, 1]; (0, 1) for 0 trials).
    """
    columns = ["prompt_id", "dup_count", "flagged"] + (["extracted", "n_samples", "samples_matched"] if results.verified else [])
    table = results.memorized[columns]
    table = table[table["dup_count"].notna()].copy()
    if table.empty:
        return None
    counts = table["dup_count"].astype(int)
    if counts.nunique() <= max_bins:
        table["low"], table["bin"] = counts, counts.astype(str)
    else:
        power = np.floor(np.log2(np.maximum(counts, 1))).astype(int)
        low, high = 2**power, 2 ** (power + 1) - 1
        table["low"] = low
        table["bin"] = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(low, high)]
    aggregations = {"prompts": ("prompt_id", "size"), "flagged": ("flagged", "sum")}
    if results.verified:
        aggregations.update(extracted=("extracted", "sum"), samples=("n_samples", "sum"), samples_matched=("samples_matched", "sum"))
    grouped = table.groupby(["low", "bin"], sort=True).agg(**aggregations).reset_index()
    _with_interval(grouped, "flag_rate", "flagged", "prompts")
    if results.verified:
        _with_interval(grouped, "extraction_rate", "extracted", "prompts")
        # Pooled: every sample of the bin counts once, so a prompt with more samples weighs more.
        _with_interval(grouped, "reproduction_rate", "samples_matched", "samples")
    return grouped


def plot_rates(rates: pd.DataFrame, verified: bool = True) -> bytes:
    """Rates by duplicate-count bin with 95% Wilson intervals as error bars, as PNG bytes: the
    share of prompts flagged (and extracted) on the left, and, when verified, the pooled
    reproduction rate of samples on the right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 2 if verified else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), dpi=100, squeeze=False)
    x = np.arange(len(rates))

    def bars(ax, name: str, offset: float, label: str, color: str) -> None:
        rate = rates[name].to_numpy(dtype=float)
        errors = [rate - rates[f"{name}_ci_low"].to_numpy(float), rates[f"{name}_ci_high"].to_numpy(float) - rate]
        ax.errorbar(x + offset, rate, yerr=np.clip(errors, 0, None), fmt="o", capsize=4, color=color, label=label)

    prompts = axes[0][0]
    bars(prompts, "flag_rate", -0.1 if verified else 0.0, "flagged (clique)", "#ef6c00")
    if verified:
        bars(prompts, "extraction_rate", 0.1, "extracted (a sample within the threshold)", "#c62828")
    for xi, n in zip(x, rates["prompts"]):
        prompts.annotate(f"n={n}", (xi, 1.04), ha="center", va="bottom", fontsize=8, color="#555")
    prompts.set_ylabel("share of prompts")
    prompts.set_title("prompts", fontsize=10)
    if verified:
        samples = axes[0][1]
        bars(samples, "reproduction_rate", 0.0, "samples within the threshold", "#6a1b9a")
        for xi, k, n in zip(x, rates["samples_matched"], rates["samples"]):
            samples.annotate(f"{k}/{n}", (xi, 1.04), ha="center", va="bottom", fontsize=8, color="#555")
        samples.set_ylabel("reproduction rate (samples)")
        samples.set_title("samples, pooled per bin", fontsize=10)
    for ax in axes[0]:
        ax.set_xticks(x, rates["bin"])
        ax.set_xlim(-0.6, len(rates) - 0.4)
        ax.set_ylim(-0.03, 1.15)
        ax.set_xlabel("duplicates of the prompt's image in the training set")
        # Below the axes: inside, it would hide points at a rate of 1 and the counts above them.
        ax.legend(loc="upper center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
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


def shown(value: Any, limit: int, full: bool = True) -> dict[str, Any]:
    """An untrusted value for the template: ``text``, safe and at most ``limit`` characters, and,
    when that is shortened and ``full`` is asked for, ``full`` (the whole value, safe) and its
    ``length``; else ``full`` is None (the page shows each whole value once)."""
    text = "" if value is None else str(value)
    shortened = len(text) > limit and full
    return {"text": display_text(text, limit), "full": display_text(text, None) if shortened else None, "length": len(text)}


def _number(value: Any, spec: str = ".4f") -> str:
    """A number as the page shows it; "—" when it is missing (None, NaN, NA)."""
    if value is None or pd.isna(value):
        return "—"
    return format(value, spec)


def _rate(matched: int, samples: int, low: float, high: float) -> str:
    """``"40% (95% CI 25-58%), 12/30"``: a reproduction rate for the page."""
    if not samples:
        return "— (0 samples)"
    return f"{100 * matched / samples:.0f}% (95% CI {100 * low:.0f}–{100 * high:.0f}%), {matched}/{samples}"


def _count(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def render_report(results: RunResults, title: str, thumbnails: int = 6, thumb_size: int = 128, max_prompts: int = 200) -> str:
    """The report as an HTML string (see the module docstring).

    ``thumbnails``: clique members shown per flagged prompt, ``thumb_size`` pixels wide (the
    sample and training image of a card are twice that); ``max_prompts``: cards, and flagged
    prompts, shown at most (the table lists every prompt).
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=True,  # captions are untrusted web text (display_text escapes controls, not markup)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    verified = results.verified
    card_size = 2 * thumb_size
    extracted, others = extracted_prompts(results), extracted_prompts(results, other=True)
    pairs_of = dict(tuple(results.extracted.groupby("prompt_id", sort=False))) if results.extracted is not None else {}

    def card(anchor: str, row: dict) -> dict:
        pairs = pairs_of.get(row["prompt_id"], pd.DataFrame(columns=list(EXTRACTED_COLUMNS)))
        return {
            "anchor": anchor, "prompt_id": shown(row["prompt_id"], NAME_LIMIT), "caption": shown(row["caption"], CAPTION_LIMIT),
            "sample_uri": _uri(results.sample_path(row["best_sample_file"]), card_size) if row["best_sample_file"] else None,
            "match_uri": _uri(results.match_path(row["prompt_id"]), card_size),
            "best_sample": _count(row["best_sample"]), "sample_file": shown(row["best_sample_file"], NAME_LIMIT, full=False),
            "seed": _count(row["seed"]), "command": row["command"],
            "distance": _number(row["best_distance"]), "train_key": shown(row["best_train_key"], NAME_LIMIT),
            "in_group": None if pd.isna(row.get("best_in_group", pd.NA)) else bool(row["best_in_group"]),
            "dup_count": _count(row["dup_count"]), "clique_size": int(row["clique_size"]), "n_samples": int(row["n_samples"]),
            "flagged": bool(row["flagged"]), "samples_verified": int(row["samples_verified"]), "n_candidates": int(row["n_candidates"]),
            "extracted": bool(row["extracted"]),
            "rate": _rate(int(row["samples_matched"]), int(row["n_samples"]), row["reproduction_ci_low"], row["reproduction_ci_high"]),
            "matched_other": int(row["samples_matched_other"]),
            "pairs": [{"sample": int(p["sample"]), "train_key": shown(p["train_key"], NAME_LIMIT, full=False), "distance": _number(p["distance"]),
                       "in_group": None if pd.isna(p.get("in_group", pd.NA)) else bool(p["in_group"])}
                      for p in pairs.head(PAIRS_SHOWN).to_dict("records")],
            "more_pairs": max(0, len(pairs) - PAIRS_SHOWN),
        }  # fmt: skip

    cards = [card(f"card-{i}", row) for i, row in enumerate(extracted.head(max_prompts).to_dict("records"))]
    other_cards = [card(f"other-{i}", row) for i, row in enumerate(others.head(max_prompts).to_dict("records"))]
    card_of = {c_row["prompt_id"]: c["anchor"] for table_, cards_ in ((extracted, cards), (others, other_cards))
               for c_row, c in zip(table_.head(max_prompts).to_dict("records"), cards_)}  # fmt: skip

    flagged = flagged_prompts(results)
    flagged_shown = []
    for j, row in enumerate(flagged.head(max_prompts).to_dict("records")):
        # The representative first, then the other members in index order.
        files = [row["representative_file"]] + [f for f in row["member_files"] if f != row["representative_file"]]
        samples = [row["representative"]] + [m for m in row["members"] if m != row["representative"]]
        thumbs = [
            {"uri": _uri(results.sample_path(f), thumb_size), "label": f"#{s}" + (" (central)" if i == 0 else "")}
            for i, (f, s) in enumerate(zip(files[:thumbnails], samples[:thumbnails]))
        ]
        card = card_of.get(row["prompt_id"])
        flagged_shown.append({
            "anchor": f"flagged-{j}", "card": card,
            # A prompt with a card shows its whole caption and id there, once.
            "prompt_id": shown(row["prompt_id"], NAME_LIMIT, full=card is None), "caption": shown(row["caption"], CAPTION_LIMIT, full=card is None),
            "clique_size": int(row["clique_size"]), "n_samples": int(row["n_samples"]), "clique_exact": bool(row["clique_exact"]),
            "max_pair_distance": _number(row["max_pair_distance"]), "median_pair_distance": _number(row["median_pair_distance"]),
            "dup_count": _count(row["dup_count"]), "thumbs": thumbs, "extracted": bool(row.get("extracted", False)),
            "best_distance": _number(row.get("best_distance")), "train_key": shown(row.get("best_train_key", ""), NAME_LIMIT, full=False),
        })  # fmt: skip
    flagged_of = {row["prompt_id"]: entry["anchor"] for row, entry in zip(flagged.head(max_prompts).to_dict("records"), flagged_shown)}

    table = prompt_table(results)
    has_score, has_z = "score" in table.columns, "robust_z" in table.columns
    rows = []
    for row in table.to_dict("records"):
        rows.append({
            "link": card_of.get(row["prompt_id"]) or flagged_of.get(row["prompt_id"]),
            "prompt_id": display_text(row["prompt_id"], NAME_LIMIT), "caption": display_text(row["caption"], TABLE_CAPTION_LIMIT),
            "dup_count": _number(row["dup_count"], "d"), "score": _number(row.get("score"), ".3g"), "robust_z": _number(row.get("robust_z"), ".2f"),
            "clique": f"{int(row['clique_size'])}/{int(row['n_samples'])}", "flagged": bool(row["flagged"]),
            "extracted": bool(row.get("extracted", False)), "matched_other": int(row.get("samples_matched_other", 0) or 0),
            "rate": _rate(int(row["samples_matched"]), int(row["n_samples"]), row["reproduction_ci_low"], row["reproduction_ci_high"]) if verified else "",
            "best_distance": _number(row.get("best_distance")),
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
    }
    if verified:
        matched, samples = int(memorized["samples_matched"].sum()), int(memorized["n_samples"].sum())
        low, high = wilson_interval(matched, samples)
        summary.update(
            extracted=int(memorized["extracted"].sum()), extracted_flagged=int((memorized["extracted"] & memorized["flagged"]).sum()),
            samples_verified=int(memorized["samples_verified"].sum()), rate=_rate(matched, samples, low, high),
            other_prompts=int((~memorized["extracted"] & (memorized["samples_matched_other"] > 0)).sum()),
            other_samples=int(memorized["samples_matched_other"].sum()),
        )  # fmt: skip
    rule = results.summary.get("settings") or {}
    settings = {key: rule.get(key, "?") for key in ("min_clique", "threshold", "metric")}
    template = env.get_template("report.html.j2")
    return template.render(
        title=title, summary=summary, settings=settings, delta=_number(results.delta, "g"), metric=results.metric_name,
        budget=_budget(results), plot=plot, verified=verified, cards=cards, hidden_cards=max(0, len(extracted) - len(cards)),
        other_cards=other_cards, hidden_other_cards=max(0, len(others) - len(other_cards)),
        table=rows, has_score=has_score, has_z=has_z, flagged=flagged_shown, hidden_flagged=max(0, len(flagged) - len(flagged_shown)),
        thumb_size=thumb_size, card_size=card_size,
    )  # fmt: skip


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
        from pipeline.budget import BUDGET_FILE

        summary = _read_summary(self.detect_dir) if (self.detect_dir / "summary.json").is_file() else {}
        generations = _generations_dir(self.detect_dir, summary)
        files = [self.detect_dir / name for name in ("memorized.parquet", "extracted.parquet", "summary.json", "matches")]
        files += [self.detect_dir.parent / "prescreen" / "prescreen.parquet", generations / BUDGET_FILE, generations / PROMPTS_FILE, self.out]
        state = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}
        return Unit("report", {"files": state, "options": self.options, "out": str(self.out)})

    def units(self) -> list[Unit]:
        return [self.unit()]

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
