"""The report page: the template's context built from a run's results, rendered through
``templates/report.html.j2`` into one self-contained HTML file.

The page shows, as evidence a reader can check:

* a card per extracted prompt: the generated sample beside the training image it reproduces,
  their distance against the threshold, the sample's seed, the training key and the command that
  regenerates the sample (and a card per prompt whose samples reproduce another caption's image);
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

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.io import atomic_write
from pipeline.layout import EVIDENCE_DIGEST, EXTRACTED_COLUMNS
from pipeline.report.figures import plot_rates, png_data_uri, thumbnail_uri
from pipeline.report.results import RunResults, read_budget
from pipeline.report.tables import extracted_prompts, flagged_prompts, prompt_table, rates_by_duplicates
from pipeline.stats import wilson_interval
from pipeline.text import display_text

CAPTION_LIMIT = 300  # characters of a caption shown on a card or a flagged prompt
TABLE_CAPTION_LIMIT = 80  # characters of a caption in the table of every prompt
NAME_LIMIT = 100  # characters of a prompt id or training key shown
PAIRS_SHOWN = 20  # matching (sample, training image) pairs listed on a card
TEMPLATE = "report.html.j2"  # in the package's templates/ folder


def write_report(results: RunResults, out: str | Path, **options) -> Path:
    """Render the report (``options``: those of :func:`render_report`) and write it atomically; returns its path."""
    html = render_report(results, **options)
    return atomic_write(out, lambda tmp: tmp.write_text(html, encoding="utf-8"))


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
    return env.get_template(TEMPLATE).render(**report_context(results, title, thumbnails, thumb_size, max_prompts))


def report_context(results: RunResults, title: str, thumbnails: int, thumb_size: int, max_prompts: int) -> dict[str, Any]:
    """The template's variables (see :func:`render_report` for the arguments): the run's summary
    and settings, the cards, the flagged prompts, the table of every prompt and the rates' plot."""
    verified, card_size = results.verified, 2 * thumb_size
    # 1. A card per extracted prompt, and per prompt reproducing another caption's image.
    extracted, others = extracted_prompts(results), extracted_prompts(results, other=True)
    pairs_of = dict(tuple(results.extracted.groupby("prompt_id", sort=False))) if results.extracted is not None else {}
    cards = _cards(results, extracted.head(max_prompts), "card", pairs_of, card_size)
    other_cards = _cards(results, others.head(max_prompts), "other", pairs_of, card_size)
    card_of = {**_anchors(extracted.head(max_prompts), cards), **_anchors(others.head(max_prompts), other_cards)}
    # 2. The flagged prompts with their clique's thumbnails, linked to their card.
    flagged = flagged_prompts(results)
    flagged_shown = [
        _flagged_entry(results, f"flagged-{j}", row, card_of.get(row["prompt_id"]), thumbnails, thumb_size)
        for j, row in enumerate(flagged.head(max_prompts).to_dict("records"))
    ]
    flagged_of = _anchors(flagged.head(max_prompts), flagged_shown)
    # 3. Every prompt, linked to its card or else its flagged entry.
    table = prompt_table(results)
    rows = [
        _table_row(row, card_of.get(row["prompt_id"]) or flagged_of.get(row["prompt_id"]), verified)
        for row in table.to_dict("records")
    ]
    # 4. The rates by duplicate count, and the run's summary.
    rates = rates_by_duplicates(results)
    rule = results.summary.get("settings") or {}
    return dict(
        title=title,
        summary=_run_summary(results.memorized, verified),
        settings={key: rule.get(key, "?") for key in ("min_clique", "threshold", "metric")},
        delta=_number(results.delta, "g"),
        metric=results.metric_name,
        budget=read_budget(results.generations_dir),
        plot=png_data_uri(plot_rates(rates, verified)) if rates is not None else None,
        verified=verified,
        cards=cards,
        hidden_cards=max(0, len(extracted) - len(cards)),
        other_cards=other_cards,
        hidden_other_cards=max(0, len(others) - len(other_cards)),
        table=rows,
        has_score="score" in table.columns,
        has_z="robust_z" in table.columns,
        flagged=flagged_shown,
        hidden_flagged=max(0, len(flagged) - len(flagged_shown)),
        thumb_size=thumb_size,
        card_size=card_size,
    )


def _anchors(table: pd.DataFrame, entries: list[dict[str, Any]]) -> dict[str, str]:
    """prompt_id -> the page anchor of its entry, for the rows of ``table`` shown as ``entries`` (in order)."""
    return {row["prompt_id"]: entry["anchor"] for row, entry in zip(table.to_dict("records"), entries)}


def _cards(
    results: RunResults, table: pd.DataFrame, prefix: str, pairs_of: dict[str, pd.DataFrame], size: int
) -> list[dict[str, Any]]:
    """A card per row of ``table`` (rows of :func:`extracted_prompts`), anchored ``<prefix>-<i>``;
    ``pairs_of``: each prompt's matching pairs; ``size``: pixels of the sample and training image."""
    empty = pd.DataFrame(columns=list(EXTRACTED_COLUMNS))
    return [
        _card(results, f"{prefix}-{i}", row, pairs_of.get(row["prompt_id"], empty), size)
        for i, row in enumerate(table.to_dict("records"))
    ]


def _card(results: RunResults, anchor: str, row: dict[str, Any], pairs: pd.DataFrame, size: int) -> dict[str, Any]:
    """One card: the best sample beside the training image it reproduces, the evidence around
    them, and the first ``PAIRS_SHOWN`` of the prompt's matching ``pairs`` (by distance)."""
    return {
        "anchor": anchor,
        "prompt_id": shown(row["prompt_id"], NAME_LIMIT),
        "caption": shown(row["caption"], CAPTION_LIMIT),
        "sample_uri": thumbnail_uri(
            results.evidence_path(row["prompt_id"], row["best_sample_file"], row.get(EVIDENCE_DIGEST)), size
        )
        if row["best_sample_file"]
        else None,
        "match_uri": thumbnail_uri(results.match_path(row["prompt_id"]), size),
        "best_sample": _count(row["best_sample"]),
        "sample_file": shown(row["best_sample_file"], NAME_LIMIT, full=False),
        "seed": _count(row["seed"]),
        "command": row["command"],
        "distance": _number(row["best_distance"]),
        "train_key": shown(row["best_train_key"], NAME_LIMIT),
        "in_group": _maybe(row.get("best_in_group", pd.NA)),
        "dup_count": _count(row["dup_count"]),
        "clique_size": int(row["clique_size"]),
        "n_samples": int(row["n_samples"]),
        "flagged": bool(row["flagged"]),
        "samples_verified": int(row["samples_verified"]),
        "n_candidates": int(row["n_candidates"]),
        "extracted": bool(row["extracted"]),
        "rate": _reproduction(row),
        "matched_other": int(row["samples_matched_other"]),
        "pairs": [
            {
                "sample": int(p["sample"]),
                "train_key": shown(p["train_key"], NAME_LIMIT, full=False),
                "distance": _number(p["distance"]),
                "in_group": _maybe(p.get("in_group", pd.NA)),
            }
            for p in pairs.head(PAIRS_SHOWN).to_dict("records")
        ],
        "more_pairs": max(0, len(pairs) - PAIRS_SHOWN),
    }


def _flagged_entry(
    results: RunResults, anchor: str, row: dict[str, Any], card: str | None, thumbnails: int, size: int
) -> dict[str, Any]:
    """A flagged prompt (a row of :func:`flagged_prompts`): its clique's first ``thumbnails``
    members, ``size`` pixels wide, the representative first; ``card``: the anchor of its card, if any."""
    # The representative first, then the other members in index order.
    files = [row["representative_file"]] + [f for f in row["member_files"] if f != row["representative_file"]]
    samples = [row["representative"]] + [m for m in row["members"] if m != row["representative"]]
    thumbs = [
        {"uri": thumbnail_uri(results.sample_path(f), size), "label": f"#{s}" + (" (central)" if i == 0 else "")}
        for i, (f, s) in enumerate(zip(files[:thumbnails], samples[:thumbnails]))
    ]
    return {
        "anchor": anchor,
        "card": card,
        # A prompt with a card shows its whole caption and id there, once.
        "prompt_id": shown(row["prompt_id"], NAME_LIMIT, full=card is None),
        "caption": shown(row["caption"], CAPTION_LIMIT, full=card is None),
        "clique_size": int(row["clique_size"]),
        "n_samples": int(row["n_samples"]),
        "clique_exact": bool(row["clique_exact"]),
        "max_pair_distance": _number(row["max_pair_distance"]),
        "median_pair_distance": _number(row["median_pair_distance"]),
        "dup_count": _count(row["dup_count"]),
        "thumbs": thumbs,
        "extracted": bool(row.get("extracted", False)),
        "best_distance": _number(row.get("best_distance")),
        "train_key": shown(row.get("best_train_key", ""), NAME_LIMIT, full=False),
    }


def _table_row(row: dict[str, Any], link: str | None, verified: bool) -> dict[str, Any]:
    """A row of the table of every prompt (a row of :func:`prompt_table`); ``link``: the anchor it points to."""
    return {
        "link": link,
        "prompt_id": display_text(row["prompt_id"], NAME_LIMIT),
        "caption": display_text(row["caption"], TABLE_CAPTION_LIMIT),
        "dup_count": _number(row["dup_count"], "d"),
        "score": _number(row.get("score"), ".3g"),
        "robust_z": _number(row.get("robust_z"), ".2f"),
        "clique": f"{int(row['clique_size'])}/{int(row['n_samples'])}",
        "flagged": bool(row["flagged"]),
        "extracted": bool(row.get("extracted", False)),
        "matched_other": int(row.get("samples_matched_other", 0) or 0),
        "rate": _reproduction(row) if verified else "",
        "best_distance": _number(row.get("best_distance")),
    }


def _run_summary(memorized: pd.DataFrame, verified: bool) -> dict[str, Any]:
    """The run's counts: prompts, samples, rejected, flagged; when ``verified`` also the extracted
    prompts, the pooled reproduction rate and the reproductions of other captions' images."""
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
            extracted=int(memorized["extracted"].sum()),
            extracted_flagged=int((memorized["extracted"] & memorized["flagged"]).sum()),
            samples_verified=int(memorized["samples_verified"].sum()),
            rate=_rate(matched, samples, low, high),
            other_prompts=int((~memorized["extracted"] & (memorized["samples_matched_other"] > 0)).sum()),
            other_samples=int(memorized["samples_matched_other"].sum()),
        )
    return summary


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


def _reproduction(row: dict[str, Any]) -> str:
    """A prompt's reproduction rate for the page (``row``: a prompt with the verification columns)."""
    return _rate(int(row["samples_matched"]), int(row["n_samples"]), row["reproduction_ci_low"], row["reproduction_ci_high"])


def _maybe(value: Any) -> bool | None:
    """A nullable boolean as the page shows it: None when it is missing."""
    return None if pd.isna(value) else bool(value)


def _count(value: Any) -> int | None:
    """A count as the page shows it: an int, or None when it is missing."""
    return None if value is None or pd.isna(value) else int(value)
