"""The tables the report shows, computed from a run's :class:`~pipeline.report.results.RunResults`:
every prompt screened (:func:`prompt_table`), the extracted and flagged prompts in the order of
their cards, and the flag, extraction and reproduction rates by duplicate count with 95% Wilson
intervals (:func:`rates_by_duplicates`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.report.results import RunResults
from pipeline.stats import wilson_interval


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
        columns += [
            "extracted",
            "samples_matched",
            "samples_verified",
            "reproduction_rate",
            "reproduction_ci_low",
            "reproduction_ci_high",
            "best_distance",
        ]
    table = results.memorized[columns].copy()
    if results.prescreen is not None:
        table = table.merge(results.prescreen, on="prompt_id", how="left")
        rest = [c for c in results.prescreen.columns if c != "prompt_id"]
        table = table[columns[:3] + rest + columns[3:]]
    order = [("extracted", False), ("reproduction_rate", False), ("flagged", False), ("clique_size", False), ("prompt_id", True)]
    return _sort(table, order)


def extracted_prompts(results: RunResults, other: bool = False) -> pd.DataFrame:
    """The extracted prompts (none without verification), highest reproduction rate first,
    then closest match: the memorized table's columns plus ``seed`` (nullable int: the best
    sample's seed) and ``command`` (str, or None: the command that regenerates the best sample).

    ``other``: instead, the prompts not extracted that have samples within the threshold of
    another caption's training image (``samples_matched_other`` > 0), most such samples first."""
    if not results.verified:
        return results.memorized.iloc[0:0].assign(seed=pd.Series(dtype="Int64"), command=pd.Series(dtype=object))
    memorized = results.memorized
    if other:
        table = _sort(
            memorized[~memorized["extracted"] & (memorized["samples_matched_other"] > 0)],
            [("samples_matched_other", False), ("best_distance", True), ("prompt_id", True)],
        )
    else:
        table = _sort(
            memorized[memorized["extracted"]], [("reproduction_rate", False), ("best_distance", True), ("prompt_id", True)]
        )
    table["seed"] = pd.array([results.seed(p, s) for p, s in zip(table["prompt_id"], table["best_sample"])], dtype="Int64")
    table["command"] = pd.Series(
        [results.regenerate_command(p, s) for p, s in zip(table["prompt_id"], table["best_sample"])],
        index=table.index,
        dtype=object,
    )
    return table


def flagged_prompts(results: RunResults) -> pd.DataFrame:
    """The flagged prompts (the memorized table's rows and columns): extracted ones first when
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
        aggregations.update(
            extracted=("extracted", "sum"), samples=("n_samples", "sum"), samples_matched=("samples_matched", "sum")
        )
    grouped = table.groupby(["low", "bin"], sort=True).agg(**aggregations).reset_index()
    _with_interval(grouped, "flag_rate", "flagged", "prompts")
    if results.verified:
        _with_interval(grouped, "extraction_rate", "extracted", "prompts")
        # Pooled: every sample of the bin counts once, so a prompt with more samples weighs more.
        _with_interval(grouped, "reproduction_rate", "samples_matched", "samples")
    return grouped
