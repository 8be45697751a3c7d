"""The run directory: where every artifact of an audit lives, and the prompt table they share.

One audit is one run directory (``run_dir``, ``outputs/<run_name>`` by default)::

    dedup/        selected.parquet (prompt table), groups.parquet, embeddings/, locations/, summary.json
    prescreen/    prescreen.parquet (scores), selected.parquet (prompt table), summary.json
    generations/  <prompt_id>/<index>.png, prompts.parquet (prompt table + recipe), budget.json
    detect/       memorized.parquet (prompt table + clique verdict + reproduction rate), extracted.parquet
                  (every sample within the threshold of a training image), matches/, verify/, summary.json
    report/       index.html

Every stage's folder also holds its executor's files (:mod:`pipeline.executor`): ``.done/``
markers, ``rejects/`` per rank (merged into ``rejects.jsonl``) and ``stats/``.

**The prompt table** is the contract between the stages: each stage reads the table the stage
before it wrote and writes its own with the same first columns, so what the duplicate finder
knew about a caption travels with it by ``prompt_id``, never by position:

* ``prompt_id`` (str): a plain file name (:func:`pipeline.io.unsafe_name`), unique;
* ``caption`` (str);
* ``dup_count`` (nullable int): copies of the caption's image in the training set;
* ``keys`` (nullable list of str): the training records of its duplicate group.

Stages add their own columns after these (a score, a recipe, a verdict).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.io import write_parquet

# Stage folders of a run directory, and the artifacts each one holds. Every path of an audit's
# artifacts is made here (RunLayout, or these names joined to a stage's folder), nowhere else.
DEDUP, PRESCREEN, GENERATIONS, DETECT, REPORT = "dedup", "prescreen", "generations", "detect", "report"
SELECTED = "selected.parquet"  # a prompt table: the duplicate finder's ranking, or the prescreen's kept prompts
GROUPS = "groups.parquet"
EMBEDDINGS = "embeddings"
LOCATIONS = "locations"  # dedup/: the training set's location index (pipeline.data.locations)
SCORES_TABLE = "prescreen.parquet"
PROMPTS_TABLE = "prompts.parquet"  # the generator's prompt table (recipes)
BUDGET = "budget.json"
MEMORIZED = "memorized.parquet"
EXTRACTED = "extracted.parquet"
MATCHES = "matches"
DOWNLOAD_LIST = "candidates.parquet"  # detect/: url, caption, key of the training images verification needs
VERIFY = "verify"
REPORT_PAGE = "index.html"
SUMMARY = "summary.json"
REJECTS = "rejects.jsonl"
STATS = "stats.json"
GENERATION_SETTINGS = "settings.json"  # generations/: the pixel-deciding settings of its samples (the first run's)
GENERATION_LOGS = ".logs"  # generations/: its executor's rejects/ and stats/ (its sub-folders are prompts)
PRESCREEN_RANK_SCORES = "scores/scores_{rank}.parquet"  # one rank's raw prescreen scores, under the prescreen folder
SCREENED = "screened.parquet"  # detect/prompts/: the screening verdicts alone, before verification joins them


@dataclass(frozen=True)
class RunLayout:
    """Where every artifact of one audit lives, from its ``run_dir``.

    Configs reach it through the ``layout`` resolver: ``${layout:dedup_selected,${run_dir}}``.
    """

    run_dir: Path

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @property
    def dedup(self) -> Path:
        return self.run_dir / DEDUP

    @property
    def dedup_selected(self) -> Path:
        return self.dedup / SELECTED

    @property
    def dedup_groups(self) -> Path:
        return self.dedup / GROUPS

    @property
    def dedup_embeddings(self) -> Path:
        return self.dedup / EMBEDDINGS

    @property
    def prescreen(self) -> Path:
        return self.run_dir / PRESCREEN

    @property
    def prescreen_scores(self) -> Path:
        return self.prescreen / SCORES_TABLE

    @property
    def prescreen_selected(self) -> Path:
        return self.prescreen / SELECTED

    @property
    def generations(self) -> Path:
        return self.run_dir / GENERATIONS

    @property
    def generations_prompts(self) -> Path:
        return self.generations / PROMPTS_TABLE

    @property
    def detect(self) -> Path:
        return self.run_dir / DETECT

    @property
    def memorized(self) -> Path:
        return self.detect / MEMORIZED

    @property
    def extracted(self) -> Path:
        return self.detect / EXTRACTED

    @property
    def report(self) -> Path:
        return self.run_dir / REPORT

    @property
    def report_page(self) -> Path:
        return self.report / REPORT_PAGE


def layout_path(name: str, run_dir: str) -> str:
    """The ``layout`` config resolver: the path of artifact ``name`` (a :class:`RunLayout`
    property) under ``run_dir``."""
    if name.startswith("_") or not isinstance(getattr(RunLayout, name, None), property):
        known = ", ".join(n for n, v in vars(RunLayout).items() if isinstance(v, property))
        raise ValueError(f"layout: no artifact {name!r} (known: {known})")
    return str(getattr(RunLayout(Path(run_dir)), name))


def register_resolver() -> None:
    """Make ``${layout:<artifact>,${run_dir}}`` available to configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("layout"):
        OmegaConf.register_new_resolver("layout", layout_path)


register_resolver()


PROMPT_COLUMNS = ("prompt_id", "caption", "dup_count", "keys")
# What verification adds to memorized.parquet for every prompt when a training set is given,
# with each column's type: the detector writes them, the report reads them.
VERIFICATION_COLUMNS: dict[str, str] = {
    "extracted": "bool",
    "samples_matched": "int",
    "samples_matched_other": "int",
    "samples_verified": "int",
    "n_candidates": "int",
    "reproduction_rate": "float",
    "reproduction_ci_low": "float",
    "reproduction_ci_high": "float",
    "best_sample": "Int64",
    "best_sample_file": "str",
    "best_train_key": "str",
    "best_distance": "float",
    "best_in_group": "boolean",
}
# Beside them, when verification recorded it: the SHA-1 of the best sample's bytes as verified
# (the report refuses to show that file once it holds other bytes).
EVIDENCE_DIGEST = "best_sample_sha1"
# extracted.parquet: a row per (sample, training image) pair within the verification threshold;
# in_group: whether the image is one of the prompt's duplicate group (null: the prompt has none).
EXTRACTED_COLUMNS = ("prompt_id", "sample", "sample_file", "train_key", "distance", "in_group")


def _missing(value: Any) -> bool:
    """A null scalar (None, NaN, pd.NA); a list or array is never missing."""
    return value is None or (np.ndim(value) == 0 and not isinstance(value, str) and bool(pd.isna(value)))


def normalise_keys(value: Any) -> list[str] | None:
    """A ``keys`` cell as a list of str, or None where the table has none (null, NaN, absent)."""
    if _missing(value):
        return None
    if isinstance(value, str):
        return [value]
    return [str(key) for key in value]


def normalise_dup_count(value: Any) -> int | None:
    """A ``dup_count`` cell as an int, or None where it is unknown."""
    return None if _missing(value) else int(value)


def prompt_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the prompt table's columns first, typed (absent ones filled with nulls),
    then its other columns in their order."""
    out = frame.copy()
    out["prompt_id"] = out["prompt_id"].astype(str)
    out["caption"] = out["caption"].fillna("").astype(str) if "caption" in out else ""
    counts = out["dup_count"] if "dup_count" in out else [None] * len(out)
    out["dup_count"] = pd.array([normalise_dup_count(v) for v in counts], dtype="Int64")
    keys = out["keys"] if "keys" in out else [None] * len(out)
    out["keys"] = pd.Series([normalise_keys(v) for v in keys], index=out.index, dtype=object)
    rest = [c for c in out.columns if c not in PROMPT_COLUMNS]
    return out[list(PROMPT_COLUMNS) + rest]


def write_prompt_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a prompt table (its first columns typed by :func:`prompt_columns`) atomically."""
    return write_parquet(prompt_columns(frame), path)


def read_prompt_table(path: str | Path) -> pd.DataFrame:
    """A prompt table as written by :func:`write_prompt_table` (or by an older run: columns it
    lacks come back null)."""
    return prompt_columns(pd.read_parquet(path))


def carried(frame: pd.DataFrame) -> Mapping[str, dict[str, Any]]:
    """``{prompt_id: {"dup_count": ..., "keys": ...}}``: what a stage carries forward per prompt."""
    table = prompt_columns(frame)
    return {
        pid: {"dup_count": normalise_dup_count(count), "keys": normalise_keys(keys)}
        for pid, count, keys in zip(table["prompt_id"], table["dup_count"], table["keys"])
    }
