"""The report's images: the plot of rates by duplicate count, the thumbnails of samples and
training images, and the PNG data URIs that inline them in the page (no file beside it)."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.text import display_text

log = logging.getLogger(__name__)


def plot_rates(rates: pd.DataFrame, verified: bool = True) -> bytes:
    """Rates by duplicate-count bin with 95% Wilson intervals as error bars, as PNG bytes: the
    share of prompts flagged (and extracted) on the left, and, when verified, the pooled
    reproduction rate of samples on the right.

    ``rates``: a row per bin, as :func:`pipeline.report.tables.rates_by_duplicates` returns it.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 2 if verified else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), dpi=100, squeeze=False)
    _prompts_panel(axes[0][0], rates, verified)
    if verified:
        _samples_panel(axes[0][1], rates)
    for ax in axes[0]:
        ax.set_xticks(np.arange(len(rates)), rates["bin"])
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


def _prompts_panel(ax, rates: pd.DataFrame, verified: bool) -> None:
    """The share of prompts flagged (and extracted) per bin, each bin's prompt count above it."""
    _rate_points(ax, rates, "flag_rate", -0.1 if verified else 0.0, "flagged (clique)", "#ef6c00")
    if verified:
        _rate_points(ax, rates, "extraction_rate", 0.1, "extracted (a sample within the threshold)", "#c62828")
    for xi, n in zip(np.arange(len(rates)), rates["prompts"]):
        ax.annotate(f"n={n}", (xi, 1.04), ha="center", va="bottom", fontsize=8, color="#555")
    ax.set_ylabel("share of prompts")
    ax.set_title("prompts", fontsize=10)


def _samples_panel(ax, rates: pd.DataFrame) -> None:
    """The pooled reproduction rate of samples per bin, matched/samples above it."""
    _rate_points(ax, rates, "reproduction_rate", 0.0, "samples within the threshold", "#6a1b9a")
    for xi, k, n in zip(np.arange(len(rates)), rates["samples_matched"], rates["samples"]):
        ax.annotate(f"{k}/{n}", (xi, 1.04), ha="center", va="bottom", fontsize=8, color="#555")
    ax.set_ylabel("reproduction rate (samples)")
    ax.set_title("samples, pooled per bin", fontsize=10)


def _rate_points(ax, rates: pd.DataFrame, name: str, offset: float, label: str, color: str) -> None:
    """Rate ``name`` of each bin as a point at its bin's position + ``offset``, its Wilson interval
    (``<name>_ci_low``, ``<name>_ci_high``) as an error bar."""
    x = np.arange(len(rates))
    rate = rates[name].to_numpy(dtype=float)
    errors = [rate - rates[f"{name}_ci_low"].to_numpy(float), rates[f"{name}_ci_high"].to_numpy(float) - rate]
    ax.errorbar(x + offset, rate, yerr=np.clip(errors, 0, None), fmt="o", capsize=4, color=color, label=label)


def png_data_uri(image: Image.Image | bytes) -> str:
    """A ``data:image/png;base64,...`` URI of a PIL image or of PNG bytes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def load_thumbnail(path: Path, size: int) -> Image.Image | None:
    """The image at ``path`` as RGB, shrunk to fit ``size`` x ``size`` (small images stay as they
    are; the page scales them up pixelated); ``None`` when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as err:
        # The file name comes from the generations folder, possibly another tool's.
        log.warning("cannot read %s for the report: %s", display_text(path, None), display_text(err, None))
        return None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def thumbnail_uri(path: Path, size: int) -> str | None:
    """The data URI of :func:`load_thumbnail`'s image; None when it cannot be read."""
    thumb = load_thumbnail(path, size)
    return png_data_uri(thumb) if thumb is not None else None
