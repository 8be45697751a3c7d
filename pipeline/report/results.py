"""A run's detection results as the report reads them: :func:`load_run` and :class:`RunResults`.

From the detect stage's folder (``<run_dir>/detect/``, names in :mod:`pipeline.layout`):

* the memorized table (``memorized.parquet``): a row per screened prompt, with its duplicate
  count, its clique verdict and, when verification ran, how many of its samples are within the
  threshold of a training image;
* the pairs table (``extracted.parquet``): a row per matching sample and training image;
* ``matches/<prompt_id>.png``: the best-matching training image, cropped as compared;
* the detect summary (``summary.json``): the rule's settings, the verification threshold.

Beside it, where they exist: the prescreen's scores (``<run_dir>/prescreen/``) and, from the
generator's folder, the seed of every sample (its prompt table), from which
:meth:`RunResults.regenerate_command` writes the command that remakes a sample.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.generations import load_prompts
from pipeline.identity import file_digest
from pipeline.layout import (
    BUDGET,
    EXTRACTED,
    EXTRACTED_COLUMNS,
    GENERATIONS,
    MATCHES,
    MEMORIZED,
    PRESCREEN,
    PROMPTS_TABLE,
    SCORES_TABLE,
    SUMMARY,
    VERIFICATION_COLUMNS,
    read_prompt_table,
)
from pipeline.text import display_text

log = logging.getLogger(__name__)

REGENERATE = "python -m pipeline.generate.regenerate"  # remakes one sample from its recorded recipe


@dataclass
class RunResults:
    """What the detect stage found, with what the report shows beside it and the paths of the
    images it refers to."""

    memorized: pd.DataFrame  # the memorized table: a row per screened prompt (VERIFICATION_COLUMNS when verified)
    extracted: pd.DataFrame | None  # the pairs table: a row per matching pair (EXTRACTED_COLUMNS); None if not verified
    summary: dict[str, Any]  # the detect summary: settings, generations_dir, counts, verification
    detect_dir: Path
    generations_dir: Path
    prescreen: pd.DataFrame | None = None  # prompt_id, score (and robust_z): the prescreen's, if it ran
    seeds: dict[str, list[int]] = field(default_factory=dict)  # prompt_id -> seed per sample index (generator's table)

    @property
    def verified(self) -> bool:
        """Whether verification ran: the memorized table has its columns."""
        return "extracted" in self.memorized.columns

    @property
    def dup_counts(self) -> pd.DataFrame | None:
        """``prompt_id``, ``dup_count`` of the prompts whose duplicate count is known (it travels
        with each prompt in the memorized table); None when no prompt's is."""
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

    def evidence_path(self, prompt_id: str, file: str, sha1: Any) -> Path:
        """The path of the sample verification found closest to a training image, checked to
        hold the bytes it verified (``sha1``; unchecked when unrecorded). Raises a ValueError
        (one line) when the file changed or is gone since: the card would show another image."""
        path = self.sample_path(file)
        if isinstance(sha1, str) and sha1:
            try:
                current = file_digest(path)
            except OSError:
                current = None
            if current != sha1:
                raise ValueError(
                    f"generations_dir: sample {display_text(file, 200)} of prompt {display_text(prompt_id, 80)} is not the one "
                    f"the detector verified (changed or deleted since): rerun the detector before the report"
                )
        return path

    def match_path(self, prompt_id: str) -> Path:
        """The best-matching training image saved by verification."""
        return self.detect_dir / MATCHES / f"{prompt_id}.png"

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


def read_summary(detect_dir: Path) -> dict[str, Any]:
    """The detect stage's summary (its settings, ``generations_dir``, counts, ``verification``); {} without one."""
    path = detect_dir / SUMMARY
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def generations_dir(detect_dir: Path, summary: dict[str, Any]) -> Path:
    """The samples' folder: as the detect stage's ``summary`` records it, else the run's generations folder."""
    return Path(summary.get("generations_dir", detect_dir.parent / GENERATIONS))


def prescreen_scores_path(detect_dir: Path) -> Path:
    """The prescreen's score table of the run whose detect folder is ``detect_dir``."""
    return detect_dir.parent / PRESCREEN / SCORES_TABLE


def input_paths(detect_dir: Path) -> list[Path]:
    """Every file and folder :func:`load_run` (and the page's sampling cost) reads, whether or not it exists."""
    generations = generations_dir(detect_dir, read_summary(detect_dir))
    detect = [detect_dir / name for name in (MEMORIZED, EXTRACTED, SUMMARY, MATCHES)]
    return detect + [prescreen_scores_path(detect_dir), generations / BUDGET, generations / PROMPTS_TABLE]


def read_budget(generations: Path) -> dict[str, Any] | None:
    """The generator's budget (UNet evaluations against brute force), when it wrote one; None
    without it or when it cannot be read (logged)."""
    path = generations / BUDGET
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("report: %s unreadable (%s); the sampling cost is left out", path, err)
        return None


def load_run(detect_dir: str | Path) -> RunResults:
    """Load the detect stage's outputs, with the prescreen's scores and the generator's seeds
    where they exist.

    Verification ran when the memorized table has its columns (``VERIFICATION_COLUMNS``); then
    the pairs table's rows are kept only for prompts the memorized table marks extracted (others
    come from an earlier verification and are dropped with a warning). Without those columns
    a pairs table is ignored, with a warning, and ``extracted`` is None.
    """
    detect_dir = Path(detect_dir)
    memorized_path = detect_dir / MEMORIZED
    if not memorized_path.exists():
        raise FileNotFoundError(f"{memorized_path} does not exist: run `python -m pipeline.detect` for this run first")
    memorized = read_prompt_table(memorized_path)
    summary = read_summary(detect_dir)
    extracted_path = detect_dir / EXTRACTED
    extracted = None
    if "extracted" in memorized.columns:
        memorized = _typed_verification(memorized, memorized_path)
        extracted = _matching_pairs(extracted_path, memorized)
    elif extracted_path.exists():
        log.warning(
            "%s exists but %s has no verification columns (an older verification, or detection rerun "
            "without a training set since): ignoring it; rerun `python -m pipeline.detect data=...` to verify",
            extracted_path,
            memorized_path,
        )
    generations = generations_dir(detect_dir, summary)
    prescreen = _prescreen_scores(prescreen_scores_path(detect_dir))
    return RunResults(memorized, extracted, summary, detect_dir, generations, prescreen, _recorded_seeds(generations))


def _typed_verification(memorized: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The verification columns typed as ``VERIFICATION_COLUMNS`` says (nulls filled: False, 0,
    "", NaN; ``best_sample`` and ``best_in_group`` stay nullable). All or none of them must be there."""
    missing = [c for c in VERIFICATION_COLUMNS if c not in memorized.columns]
    if missing:
        raise ValueError(
            f"{path}: has verification column 'extracted' but not {missing}: written by another "
            "version of the detector? rerun `python -m pipeline.detect data=...`"
        )
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
    """The pairs table's rows of prompts the memorized table marks extracted or with samples
    reproducing another caption's training image (``samples_matched_other``), by prompt then
    distance; an empty table (with a warning) when the file is missing."""
    if not path.exists():
        log.warning(
            "%s is missing although %s holds verification results: the cards list no matching samples beyond the best one",
            path,
            MEMORIZED,
        )
        return pd.DataFrame(
            {
                "prompt_id": pd.Series(dtype=str),
                "sample": pd.Series(dtype=int),
                "sample_file": pd.Series(dtype=str),
                "train_key": pd.Series(dtype=str),
                "distance": pd.Series(dtype=float),
                "in_group": pd.Series(dtype="boolean"),
            }
        )
    pairs = pd.read_parquet(path)
    missing = [c for c in EXTRACTED_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(EXTRACTED_COLUMNS)}")
    pairs = pairs.assign(prompt_id=pairs["prompt_id"].astype(str), train_key=pairs["train_key"].fillna("").astype(str))
    listed = pairs["prompt_id"].isin(set(memorized["prompt_id"]))
    with_matches = memorized["extracted"] | (memorized["samples_matched_other"] > 0)
    keep = pairs["prompt_id"].isin(set(memorized.loc[with_matches, "prompt_id"]))
    if not keep.all():
        # The memorized table is the verdict; rows it does not back come from an earlier
        # verification (detection or verification rerun since) and must not pass for this one's.
        log.warning(
            "%s: ignoring %d row(s): %d of prompts not in %s, %d of prompts it does not mark "
            "extracted (an earlier verification?); rerun `python -m pipeline.detect data=...` to verify again",
            path,
            int((~keep).sum()),
            int((~listed).sum()),
            MEMORIZED,
            int((listed & ~keep).sum()),
        )
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


def _recorded_seeds(generations: Path) -> dict[str, list[int]]:
    """prompt_id -> the seed of each sample index, from the generator's table; {} for a folder
    without one (another tool's samples) or whose table records no seeds."""
    if not generations.is_dir():
        return {}
    try:
        # The report reads the generator's folder and writes nothing into it.
        table = load_prompts(generations, write=False)
    except Exception as err:  # another tool's folder: a table we cannot read means no recipe, not no report
        log.warning(
            "report: cannot read %s's %s (%s); no seeds or regeneration commands shown",
            display_text(generations, None),
            PROMPTS_TABLE,
            display_text(err, None),
        )
        return {}
    if not {"prompt_id", "seeds"} <= set(table.columns):
        return {}
    seeds = {}
    for prompt_id, values in zip(table["prompt_id"], table["seeds"]):
        if values is not None and np.ndim(values) == 1:
            seeds[str(prompt_id)] = [int(v) for v in values]
    return seeds
