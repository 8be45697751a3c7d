"""The prompts the generator samples from: the duplicate finder's ranking or a plain list.

Three inputs, told apart by the file's suffix:

* ``selected.parquet`` from the duplicate finder (columns ``prompt_id``, ``caption``,
  ``dup_count``, ``keys``), or any ``.parquet``/``.csv`` with a caption column (and optionally
  a ``prompt_id`` column);
* a ``.txt`` file, one prompt per line: lines end at ``\n`` alone (a ``\r`` before it is
  dropped), so the other characters Unicode counts as line breaks (U+2028, U+2029, U+0085,
  form feed, ``\x0b``, ``\x1c``-``\x1e``) stay inside their caption. The file must be UTF-8:
  an invalid byte raises :class:`PromptsError` naming the file and the line.

Text columns may be stored as strings or as bytes (pyarrow ``binary``): bytes are decoded as
UTF-8, never written as ``b'...'``. A caption that is not valid UTF-8 is skipped, with a
warning naming the file, how many and their prompt ids (or row numbers); a prompt id that is
not valid UTF-8 raises, as does any id that is not a plain file name.

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
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.assemble import BadText, clean_caption
from pipeline.data.sharding import check_shard
from pipeline.io import unsafe_name
from pipeline.layout import normalise_dup_count, normalise_keys

log = logging.getLogger(__name__)

# A prompt id names a folder under generations/, so it must be a plain file name (matched whole:
# ``$`` alone would let a trailing newline through).
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
        frame = pd.DataFrame({"caption": read_lines(path)})
        caption_column = "caption"
    elif suffix == ".csv":
        try:
            frame = pd.read_csv(path, dtype={"prompt_id": str}, keep_default_na=False)
        except UnicodeDecodeError:
            raise PromptsError(f"prompts: {str(path)!r} is not valid UTF-8; save it as UTF-8") from None
    elif suffix == ".parquet":
        frame = _read_parquet(path, caption_column)
    else:
        raise PromptsError(f"prompts: {str(path)!r} must be a .txt (one prompt per line), .csv or .parquet file")
    if caption_column not in frame.columns:
        raise PromptsError(
            f"caption_column: {str(path)!r} has no column {caption_column!r} (columns: {', '.join(map(str, frame.columns))})"
        )
    return _to_prompts(frame, path, caption_column, limit)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split at ``\n`` only, a ``\r`` before it dropped.

    A leading byte-order mark is dropped; a final ``\n`` ends the last line rather than
    starting an empty one. Raises :class:`PromptsError` naming the file and the 1-based line
    of the first byte that is not valid UTF-8.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PromptsError(
            f"prompts: {str(path)!r} line {line} is not valid UTF-8 (byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _read_parquet(path: Path, caption_column: str) -> pd.DataFrame:
    """A prompts parquet as a frame, its ``prompt_id`` and caption columns as bytes.

    pyarrow does not check the UTF-8 of a parquet file's strings and converting a column
    with one bad string fails as a whole: read as bytes, each value is decoded on its own.
    """
    try:
        table = pq.read_table(path)
        for name in {"prompt_id", caption_column} & set(table.column_names):
            type_ = table.schema.field(name).type
            if pa.types.is_string(type_) or pa.types.is_large_string(type_):
                binary = pa.large_binary() if pa.types.is_large_string(type_) else pa.binary()
                table = table.set_column(table.column_names.index(name), name, table.column(name).cast(binary))
        return table.to_pandas()
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise PromptsError(f"prompts: cannot read {str(path)!r}: {type(err).__name__}: {err}") from None


def _caption(value) -> str | None:
    """A caption cell as stripped text (``""`` when null); None when it is not valid UTF-8."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    try:
        return clean_caption(value)
    except BadText:
        return None


def _prompt_id(value) -> str:
    """A ``prompt_id`` cell as text; bytes are UTF-8 (an invalid byte is kept as a ``\\xNN`` escape,
    which no plain file name holds)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _to_prompts(frame: pd.DataFrame, path: Path, caption_column: str, limit: int | None) -> list[Prompt]:
    captions = frame[caption_column].map(_caption)
    unreadable = captions.isna()
    if unreadable.any():
        rows = frame[unreadable]
        where = (
            [f"prompt id {_prompt_id(v)!r}" for v in rows["prompt_id"]]
            if "prompt_id" in frame.columns
            else [f"row {i}" for i in range(len(frame)) if unreadable.iloc[i]]
        )
        shown = ", ".join(where[:10]) + (", ..." if len(where) > 10 else "")
        log.warning("prompts: skipped %d caption(s) that are not valid UTF-8 in %s: %s", len(where), path, shown)
    captions = captions.fillna("")
    empty = (captions == "") & ~unreadable
    keep = ~empty & ~unreadable
    skipped = int(empty.sum())
    if skipped:
        log.warning("prompts: skipped %d empty caption(s) in %s", skipped, path)
    frame, captions = frame[keep], captions[keep]
    if "prompt_id" in frame.columns:
        ids = frame["prompt_id"].map(_prompt_id).tolist()
    else:
        width = max(5, len(str(len(frame) - 1)))
        ids = [f"{i:0{width}d}" for i in range(len(frame))]
    bad = [i for i in ids if not _SAFE_ID.fullmatch(i) or unsafe_name(i) is not None]
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
