"""The generations folder: reading samples in the generator's layout or any tool's, and the
generator's own bookkeeping in it (shard tables, completion markers), which readers share.

Layout: ``<generations_dir>/<prompt_id>/<sample>.png`` (the generator names samples
``00000.png``, ``00001.png`` ...), plus ``prompts.parquet`` with at least ``prompt_id`` and
``caption`` (one row per prompt or per sample; further columns are ignored here). A folder
without ``prompts.parquet`` is read with its sub-folder names as prompt ids and empty captions,
so that samples made by another tool can be screened too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.clique import MAX_STEPS
from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog
from pipeline.identity import digest_of, files_digest
from pipeline.io import marker_path, read_json_object, unsafe_name, write_json, write_parquet
from pipeline.layout import PROMPTS_TABLE

log = logging.getLogger(__name__)

PROMPTS_FILE = PROMPTS_TABLE
# Each shard's part of the prompt table: prompts_<rank>-of-<world_size>.parquet.
_SHARD_NAME = f"{Path(PROMPTS_TABLE).stem}_{{rank}}-of-{{world_size}}{Path(PROMPTS_TABLE).suffix}"
# In each prompt's folder: what its samples were made from (:func:`prompt_record`).
PROMPT_RECORD = ".prompt.json"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Sample:
    """One generated image: its index within the prompt and its path relative to the folder."""

    index: int
    file: str  # e.g. "00003/00012.png"


def read_prompts(
    generations_dir: str | Path, rejects: RejectLog | None = None, table: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The prompts of a generations folder: a DataFrame (prompt_id: str, caption: str), sorted.

    Prompts listed in ``prompts.parquet`` come with their caption (also when their folder is
    missing: they then have no samples); sub-folders it does not list are added with an empty
    caption and a warning. The folder may come from another tool, so every prompt id must be
    a plain file name (:func:`pipeline.io.unsafe_name`): one that is not ("../x", an absolute
    path, an empty or null id) is skipped with a warning and recorded in ``rejects``, never
    used as a path.
    """
    root = Path(generations_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"generations_dir: {root} is not a directory")
    folders = _keep_safe(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), str(root), rejects)
    listed = table
    table = root / PROMPTS_FILE
    if listed is None or listed.empty:
        if not table.exists():
            return pd.DataFrame({"prompt_id": folders, "caption": [""] * len(folders)}, dtype=str)
        try:
            listed = pd.read_parquet(table)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{table}: unreadable parquet file: {err}") from err
    missing = {"prompt_id", "caption"} - set(listed.columns)
    if missing:
        raise ValueError(f"{table}: missing column(s) {sorted(missing)}; it needs prompt_id and caption")
    captions: dict[str, str] = {}
    ids = [_as_id(value) for value in listed["prompt_id"]]
    for pid, caption in zip(ids, listed["caption"]):
        if unsafe_name(pid) is None:
            captions.setdefault(pid, _as_caption(caption))  # the first row of a repeated id wins
    _keep_safe(ids, str(table), rejects)
    unlisted = [name for name in folders if name not in captions]
    if unlisted:
        log.warning(
            "%d folder(s) in %s are not in %s, read with empty captions: %s",
            len(unlisted),
            root,
            PROMPTS_FILE,
            ", ".join(unlisted[:5]),
        )
        captions.update(dict.fromkeys(unlisted, ""))
    ordered = sorted(captions)
    return pd.DataFrame({"prompt_id": ordered, "caption": [captions[p] for p in ordered]}, dtype=str)


def _as_id(value) -> str | None:
    """A prompt id as text; None for a null (it has no name to stand for)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.decode("utf-8", errors="surrogateescape") if isinstance(value, bytes) else str(value)


def _as_caption(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _keep_safe(names: list, source: str, rejects: RejectLog | None) -> list[str]:
    """``names`` without those that cannot name a folder; each one left out is logged and rejected."""
    kept, bad = [], []
    for name in names:
        reason = unsafe_name(name)
        if reason is None:
            kept.append(name)
        else:
            bad.append((name, reason))
            if rejects is not None:
                rejects.add(ascii(name), ascii(source), f"unsafe prompt id: {ascii(name)} {reason}; its samples are not read")
    if bad:
        log.warning(
            "%d prompt id(s) in %s are not plain file names and are skipped, e.g. %s (%s)",
            len(bad),
            ascii(source),
            ascii(bad[0][0]),
            bad[0][1],
        )
    return kept


def sample_files(generations_dir: str | Path, prompt_id: str) -> list[Path]:
    """Every file with a sample suffix in the prompt's folder, in name order (symlinks to
    devices or folders are not files and are left out)."""
    folder = Path(generations_dir) / prompt_id
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES and p.is_file())


def sample_index(name: str) -> int | None:
    """The index a sample file name gives (``00012.png`` -> 12), or None when its stem is not
    a plain decimal number (such a file is not one of the generator's samples)."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in SAMPLE_SUFFIXES or not (stem.isdigit() and stem.isascii()):
        return None
    return int(stem)


def list_samples(generations_dir: str | Path, prompt_id: str, rejects: RejectLog | None = None) -> list[Sample]:
    """The sample images of one prompt, in order of their index.

    A sample's index is fixed by its file name: ``00012.png`` is sample 12, whatever else lies
    in the folder. When the folder holds numbered files, a file whose name is not a number
    (a contact sheet, an editor's backup) is not a sample: it is left out and recorded in
    ``rejects``, and so is a second file with an index already taken (``12.png`` beside
    ``00012.png``: the generator's five-digit ``.png`` name wins, else the first in name
    order). A folder with no numbered file at all (another tool's naming) is numbered by
    position in name order. A file whose name cannot be stored (control characters, invalid
    UTF-8, see :func:`pipeline.io.unsafe_name`) is left out and recorded in ``rejects``.
    """

    def reject(path: Path, reason: str) -> None:
        if rejects is not None:
            rejects.add(ascii(f"{prompt_id}/{path.name}"), ascii(str(path)), reason)

    files = []
    for path in sample_files(generations_dir, prompt_id):
        reason = unsafe_name(path.name)
        if reason is None:
            files.append(path)
        else:
            reject(path, f"unsafe file name: {reason}")
    if not any(sample_index(p.name) is not None for p in files):
        return [Sample(i, f"{prompt_id}/{p.name}") for i, p in enumerate(files)]
    by_index: dict[int, Path] = {}
    # The generator's own name for an index first, so that it wins over look-alikes.
    for path in sorted(files, key=lambda p: (p.name != f"{sample_index(p.name) or 0:05d}.png", p.name)):
        index = sample_index(path.name)
        if index is None:
            reject(path, "not a sample: the folder's samples are numbered files (00012.png) and this name is not a number")
        elif index in by_index:
            reject(path, f"not a sample: index {index} is already {by_index[index].name}")
        else:
            by_index[index] = path
    return [Sample(index, f"{prompt_id}/{by_index[index].name}") for index in sorted(by_index)]


def samples_identity(generations_dir: str | Path, prompt_id: str) -> list[list[Any]]:
    """``[[file name, sha1 of its bytes], ...]`` of every sample file of the prompt's folder,
    in name order (None for one that cannot be read): what decides a verdict on its samples."""
    return files_digest(sample_files(generations_dir, prompt_id))


def load_samples(
    generations_dir: str | Path, samples: list[Sample], rejects: RejectLog | None = None
) -> tuple[list[Sample], list[np.ndarray]]:
    """Decode samples to uint8 (H, W, 3) arrays; unreadable ones are skipped into ``rejects``.

    Returns the samples that decoded and their images, in the same order.
    """
    root = Path(generations_dir)
    rejects = rejects if rejects is not None else RejectLog()
    kept, images = [], []
    for sample in samples:
        path = root / sample.file
        try:
            image = decode_image(path.read_bytes())
        except BadImage as err:
            rejects.add(sample.file, str(path), str(err))
            continue
        except OSError as err:
            rejects.add(sample.file, str(path), f"unreadable file: {err}")
            continue
        kept.append(sample)
        images.append(np.asarray(image))
    return kept, images


# The generator's folder: shard tables, markers, sample paths ---------------------------


# Why adaptive sampling stopped a prompt (a marker's and prompts.parquet's ``stop_reason``;
# null when sampled in full): no near-copy pair among its first samples; a clique of the
# detector's size already there; or one that can no longer be completed within the budget.
NO_SIGN, FLAGGED, OUT_OF_REACH = "no_close_pairs", "flagged", "out_of_reach"
# Two more: a sample already within the verification threshold of one of the prompt's training
# images (it cannot become un-extracted; its clique and reproduction rate are then those of the
# samples made); and a clique judged unlikely to complete (a heuristic bound, not a proof: see
# pipeline.generate.adaptive).
EXTRACTED, UNLIKELY = "extracted", "unlikely"
# Every stop reason, in the order summaries list them.
STOP_REASONS = (NO_SIGN, FLAGGED, OUT_OF_REACH, EXTRACTED, UNLIKELY)


def stored_rule(adaptive: Any) -> dict[str, Any] | None:
    """The near-copy rule stored with adaptive sampling's decisions (an ``adaptive`` value of
    prompts.parquet, JSON text, or of a marker), as :meth:`NearCopyRule.describe` gives it;
    None when there is none or it cannot be read.

    Folders made before the rule was stored whole hold the adaptive section's own
    ``threshold``, ``min_clique`` and ``grid``: tiled L2 at the samples' size with the default
    clique search, which is what adaptive sampling measured then.
    """
    try:
        value = json.loads(adaptive) if isinstance(adaptive, (str, bytes)) else adaptive
        if not isinstance(value, Mapping):
            return None
        if isinstance(value.get("rule"), Mapping):
            return dict(value["rule"])
        if "rule" not in value and {"threshold", "min_clique", "grid"} <= set(value):
            return {
                "metric": "tiled_l2",
                "grid": int(value["grid"]),
                "size": None,
                "threshold": float(value["threshold"]),
                "min_clique": int(value["min_clique"]),
                "max_clique_steps": MAX_STEPS,
            }
    except (ValueError, TypeError):
        return None
    return None


def sample_path(out_dir: str | Path, prompt_id: str, index: int) -> Path:
    return Path(out_dir) / prompt_id / f"{index:05d}.png"


def shard_file(out_dir: str | Path, rank: int, world_size: int) -> Path:
    """This shard's part of the prompt table (its prompts' recipes), unioned by :func:`consolidate_prompts`."""
    return Path(out_dir) / _SHARD_NAME.format(rank=rank, world_size=world_size)


def marker_info(out_dir: Path, prompt_id: str) -> dict[str, Any] | None:
    """The completion marker's content for ``prompt_id``, or None when it has none that is a
    JSON object (absent, a folder, empty, not UTF-8, not JSON, ``[]``): then the prompt is not done."""
    return read_json_object(marker_path(out_dir, prompt_id))


def prompt_done(out_dir: Path, prompt_id: str, n_samples: int, adaptive: Any = None, *, any_rule: bool = True) -> bool:
    """Whether ``prompt_id`` needs no more samples for a budget of ``n_samples`` (see
    :func:`marker_complete`)."""
    info = marker_info(out_dir, prompt_id)
    return (
        info is not None
        and marker_complete(info, n_samples, adaptive, any_rule=any_rule)
        and samples_present(out_dir, prompt_id, info)
    )


def samples_present(out_dir: str | Path, prompt_id: str, info: Mapping[str, Any]) -> bool:
    """Whether every sample a completion marker holding ``info`` counts is still on disk (a
    deleted folder or file makes its prompt incomplete again, never a verdict on fewer samples)."""
    made = _count(info.get("n_generated", info.get("n_samples", 0)))
    if made is None:
        return False
    return all(sample_path(out_dir, prompt_id, i).is_file() for i in range(made))


def marker_complete(info: Mapping[str, Any], n_samples: int, adaptive: Any = None, *, any_rule: bool = True) -> bool:
    """Whether a prompt whose completion marker holds ``info`` needs no more samples for a
    budget of ``n_samples``.

    A prompt that adaptive sampling stopped early counts as done for readers (``any_rule``,
    the default: the detector, :func:`load_prompts`); for the generator (``any_rule=False``)
    only when this run is adaptive with the same rule, so a brute-force rerun fills it up
    (``adaptive``: the generator's adaptive settings, with ``enabled`` and ``describe()``).
    A prompt sampled in full serves any budget up to its own.
    """
    budget, made = _count(info.get("n_samples", 0)), _count(info.get("n_generated", n_samples))
    if budget is None or made is None or budget < n_samples:
        return False  # a marker whose counts are not integers covers nothing
    # Stopped by adaptive sampling (no sign of a clique, or flagged already): fewer samples than the budget.
    partial = info.get("stopped_early") or made < n_samples
    if not partial or any_rule:
        return True
    return adaptive is not None and adaptive.enabled and info.get("adaptive") == adaptive.describe()


def _count(value: Any) -> int | None:
    """A marker's count as a non-negative int; None for anything else (a list, null, text, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return None
    return int(value) if float(value).is_integer() else None


def prompt_record_path(out_dir: str | Path, prompt_id: str) -> Path:
    """Where the generator records what a prompt's samples were made from (hidden, so it is
    never read as a sample, and deleted with the prompt's folder)."""
    return Path(out_dir) / prompt_id / PROMPT_RECORD


def read_prompt_record(out_dir: str | Path, prompt_id: str) -> dict[str, Any] | None:
    """The prompt's record (``caption``, ``negative_prompt``, ``recipe`` and their ``digest``),
    or None when it has none or it is not a JSON object."""
    return read_json_object(prompt_record_path(out_dir, prompt_id))


def prompt_record(caption: str, negative_prompt: Any, recipe_digest: str) -> dict[str, Any]:
    """What decides a prompt's samples besides their seeds: its caption, the negative prompt
    and the run's recipe (model identity included), with their ``digest``."""
    record = {"caption": caption, "negative_prompt": negative_prompt, "recipe": recipe_digest}
    return {**record, "digest": digest_of(record)}


def write_prompt_record(out_dir: str | Path, prompt_id: str, record: Mapping[str, Any]) -> Path:
    return write_json(dict(record), prompt_record_path(out_dir, prompt_id))


def consolidate_prompts(out_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """Union every shard's ``prompts_*-of-*.parquet`` into ``prompts.parquet``; returns it
    (``write=False``: only returns it, for readers that must not write into the folder).

    Safe to call at any time and from several processes: shard files are replaced atomically,
    so each is read whole, and so is the result. A prompt listed by several files (runs with
    different ``world_size`` over the same folder) keeps the rows that describe its samples
    (their ``prompt_digest`` is the one its folder records, :func:`read_prompt_record`), and of
    those the one with the most samples. Returns an empty frame, and writes nothing, when no
    shard has started yet.
    """
    out_dir = Path(out_dir)
    frames = [pd.read_parquet(f) for f in sorted(out_dir.glob(_SHARD_NAME.format(rank="*", world_size="*")))]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    merged = pd.concat(frames, ignore_index=True)
    if "prompt_digest" in merged.columns:
        recorded = {}
        for pid in merged["prompt_id"].astype(str).unique():
            record = read_prompt_record(out_dir, pid) if unsafe_name(pid) is None else None
            if record is not None:
                recorded[pid] = record.get("digest")
        current = [recorded.get(str(pid)) == digest for pid, digest in zip(merged["prompt_id"], merged["prompt_digest"])]
        has_current = {str(pid) for pid, ok in zip(merged["prompt_id"], current) if ok}
        keep = [ok or str(pid) not in has_current for pid, ok in zip(merged["prompt_id"], current)]
        merged = merged[np.asarray(keep, dtype=bool)]
    merged = merged.sort_values(["prompt_index", "n_samples"], ascending=[True, False], kind="stable")
    merged = merged.drop_duplicates("prompt_id", keep="first").reset_index(drop=True)
    if write:
        write_parquet(merged, out_dir / PROMPTS_FILE)
    return merged


def load_prompts(out_dir: str | Path, complete_only: bool = False, write: bool = True) -> pd.DataFrame:
    """The consolidated prompt table; with ``complete_only``, only prompts whose marker exists
    (for a budget of the row's ``n_samples``; a prompt stopped early by adaptive sampling is complete).

    Without shard files (a folder copied without them) ``prompts.parquet`` is read as it is.
    ``write=False`` leaves ``prompts.parquet`` as it is (see :func:`consolidate_prompts`).
    """
    out_dir = Path(out_dir)
    table = consolidate_prompts(out_dir, write=write)
    if table.empty and (out_dir / PROMPTS_FILE).is_file():
        try:
            table = pd.read_parquet(out_dir / PROMPTS_FILE)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{out_dir / PROMPTS_FILE}: unreadable parquet file: {err}") from err
    if complete_only and len(table):
        budgets = table["n_samples"] if "n_samples" in table.columns else [0] * len(table)
        done = [prompt_done(out_dir, str(pid), int(n)) for pid, n in zip(table["prompt_id"], budgets)]
        table = table[np.asarray(done, dtype=bool)].reset_index(drop=True)
    return table
