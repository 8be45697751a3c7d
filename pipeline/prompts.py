"""The prompts the generator samples from: the duplicate finder's ranking or a plain list.

Three inputs, told apart by the file's suffix:

* ``selected.parquet`` from the duplicate finder (columns ``prompt_id``, ``caption``,
  ``dup_count``, ``keys``), or any ``.parquet``/``.csv`` with a caption column (and optionally
  a ``prompt_id`` column);
* a ``.txt`` file, one prompt per line.

Prompts without an id get one from their position among the kept prompts, zero-padded to
five digits like the duplicate finder's (``"00000"``, ``"00001"``, ...), so the same file
always gives the same ids. Empty captions are skipped and counted (a warning names the file
and how many); they would otherwise become unconditional samples.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data.sharding import check_shard
from pipeline.layout import normalise_dup_count, normalise_keys

log = logging.getLogger(__name__)

# A prompt id names a folder under generations/, so it must be a plain file name.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PromptsError(ValueError):
    """The ``prompts`` (or ``caption_column``) config points at something unusable."""


@dataclass(frozen=True)
class Prompt:
    """One caption to sample from. ``dup_count`` is the training-set duplicate count, if known."""

    prompt_id: str
    caption: str
    dup_count: int | None = None
    keys: tuple[str, ...] | None = None  # the training records of its duplicate group, if known


def read_prompts(path: str | Path, caption_column: str = "caption", limit: int | None = None) -> list[Prompt]:
    """Read the prompts in ``path``, in file order (the duplicate finder's ranking).

    ``limit`` keeps only the first ``limit`` prompts (the top of the ranking), before sharding.
    Raises :class:`PromptsError` naming the config key for a missing file, an unknown suffix,
    a missing caption column, duplicate or unsafe prompt ids, or no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"prompts: no such file {str(path)!r} (run the duplicate finder first, or set prompts=<file>)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        frame = pd.DataFrame({"caption": path.read_text(encoding="utf-8").splitlines()})
        caption_column = "caption"
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype={"prompt_id": str}, keep_default_na=False)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise PromptsError(f"prompts: {str(path)!r} must be a .txt (one prompt per line), .csv or .parquet file")
    if caption_column not in frame.columns:
        raise PromptsError(
            f"caption_column: {str(path)!r} has no column {caption_column!r} (columns: {', '.join(map(str, frame.columns))})"
        )
    return _to_prompts(frame, path, caption_column, limit)


def _to_prompts(frame: pd.DataFrame, path: Path, caption_column: str, limit: int | None) -> list[Prompt]:
    captions = frame[caption_column].map(lambda c: "" if c is None or (isinstance(c, float) and pd.isna(c)) else str(c).strip())
    keep = captions != ""
    skipped = int((~keep).sum())
    if skipped:
        log.warning("prompts: skipped %d empty caption(s) in %s", skipped, path)
    frame, captions = frame[keep], captions[keep]
    if "prompt_id" in frame.columns:
        ids = frame["prompt_id"].astype(str).tolist()
    else:
        width = max(5, len(str(len(frame) - 1)))
        ids = [f"{i:0{width}d}" for i in range(len(frame))]
    bad = [i for i in ids if not _SAFE_ID.match(i)]
    if bad:
        raise PromptsError(f"prompts: {str(path)!r} has prompt ids that are not plain file names, e.g. {bad[0]!r}")
    dups = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(dups):
        raise PromptsError(f"prompts: {str(path)!r} has duplicate prompt ids, e.g. {dups[0]!r}")
    counts = frame["dup_count"].tolist() if "dup_count" in frame.columns else [None] * len(ids)
    keys = frame["keys"].tolist() if "keys" in frame.columns else [None] * len(ids)
    prompts = [
        Prompt(pid, caption, normalise_dup_count(count), None if group is None else tuple(group))
        for pid, caption, count, group in zip(ids, captions.tolist(), counts, map(normalise_keys, keys))
    ]
    if limit is not None:
        prompts = prompts[: int(limit)]
    if not prompts:
        raise PromptsError(f"prompts: no non-empty caption in {str(path)!r}")
    return prompts


def shard_prompts(prompts: list[Prompt], rank: int, world_size: int) -> list[Prompt]:
    """Prompts ``rank, rank + world_size, ...``: every prompt goes to exactly one rank.

    Round-robin rather than contiguous blocks, so that each rank gets a share of the most
    duplicated captions (the top of the ranking) and the shards finish at similar times.
    """
    rank, world_size = check_shard(rank, world_size)
    return prompts[rank::world_size]
