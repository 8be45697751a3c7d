"""The samples of a generations folder as the generator writes and reads them back: one PNG per
sample (``<out_dir>/<prompt_id>/<index:05d>.png``, :func:`pipeline.generations.sample_path`),
and the per-prompt records that keep a prompt id from naming samples of another caption."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.rejects import RejectLog
from pipeline.generations import (
    Sample,
    consolidate_prompts,
    load_samples,
    read_prompt_record,
    sample_files,
    sample_path,
    write_prompt_record,
)
from pipeline.io import atomic_write
from pipeline.prompts import Prompt
from pipeline.text import display_text


def refuse_changed_prompts(out_dir: Path, prompts: Sequence[Prompt], records: dict[str, dict[str, Any]]) -> None:
    """Refuse (a ValueError naming the first prompt and the choice to make) when a prompt's
    folder holds samples made from another caption or recipe than ``records`` says now.

    Prompt ids are positions or ranks, so an edited prompt list or a new ranking gives an id
    another caption; regenerating would delete the evidence on disk, keeping it would label
    it with the wrong caption. A folder without a record (one no prompt record was written into) is
    checked against the caption its prompt table lists.
    """
    listed = consolidate_prompts(out_dir, write=False)
    listed_captions = dict(zip(listed["prompt_id"].astype(str), listed["caption"])) if "caption" in listed.columns else {}
    changed = []
    for p in prompts:
        if not sample_files(out_dir, p.prompt_id):
            continue
        record = read_prompt_record(out_dir, p.prompt_id)
        if record is not None:
            if record.get("digest") != records[p.prompt_id]["digest"]:
                changed.append((p, record.get("caption")))
        elif p.prompt_id in listed_captions and listed_captions[p.prompt_id] != p.caption:
            changed.append((p, listed_captions[p.prompt_id]))
    if not changed:
        return
    p, then = changed[0]
    what = (
        f"another caption ({display_text(then, 80)!r} then, {display_text(p.caption, 80)!r} now)"
        if then != p.caption
        else "another recipe"
    )
    more = f" ({len(changed)} prompts in all)" if len(changed) > 1 else ""
    raise ValueError(
        f"prompts: prompt {p.prompt_id}{more}: its samples in {out_dir / p.prompt_id} were made from {what}; "
        f"delete that folder to sample it anew, or use another run_name (or out_dir) to keep both"
    )


def record_prompts(out_dir: Path, prompts: Sequence[Prompt], records: dict[str, dict[str, Any]]) -> None:
    """Write each prompt's record (caption and recipe digest) into its folder where it differs
    from the one there: from now on its samples are those of ``records``."""
    for p in prompts:
        if (read_prompt_record(out_dir, p.prompt_id) or {}).get("digest") != records[p.prompt_id]["digest"]:
            write_prompt_record(out_dir, p.prompt_id, records[p.prompt_id])


def write_png(path: Path, image: np.ndarray, compress_level: int) -> Path:
    """Write one uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", compress_level=compress_level))


def missing_samples(out_dir: Path, prompt_id: str, end: int, start: int = 0) -> list[int]:
    """Indexes in ``[start, end)`` of the samples of ``prompt_id`` with no PNG yet. From the
    start (``start`` 0), also clears the temporaries a killed run left in the prompt's folder."""
    folder = out_dir / prompt_id
    if not folder.is_dir():
        return list(range(start, end))
    if start == 0:
        for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write; only this rank owns the folder
            stale.unlink(missing_ok=True)
    return [i for i in range(start, end) if not sample_path(out_dir, prompt_id, i).exists()]


def read_samples(
    out_dir: Path, prompt_id: str, count: int, rejects: RejectLog | None = None, start: int = 0
) -> np.ndarray | list[np.ndarray]:
    """The samples ``[start, count)`` of ``prompt_id`` (default: the first ``count``) that can be
    read, as uint8 (k, H, W, 3) with k <= count - start (a list when their sizes differ). A
    sample that is missing or does not decode is skipped and recorded in ``rejects``, as the
    detector skips it (:func:`pipeline.generations.load_samples`)."""
    samples = [Sample(index, f"{prompt_id}/{sample_path(out_dir, prompt_id, index).name}") for index in range(start, count)]
    _, images = load_samples(out_dir, samples, rejects)
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    return images
