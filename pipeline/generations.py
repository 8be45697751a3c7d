"""Reading a folder of generated samples, in the generator's layout or any tool's.

Layout: ``<generations_dir>/<prompt_id>/<sample>.png`` (the generator names samples
``00000.png``, ``00001.png`` ...), plus ``prompts.parquet`` with at least ``prompt_id`` and
``caption`` (one row per prompt or per sample; further columns are ignored here). A folder
without ``prompts.parquet`` is read with its sub-folder names as prompt ids and empty captions,
so that samples made by another tool can be screened too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog
from pipeline.io import unsafe_name

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.parquet"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Sample:
    """One generated image: its index within the prompt and its path relative to the folder."""

    index: int
    file: str  # e.g. "00003/00012.png"


def read_prompts(generations_dir: str | Path, rejects: RejectLog | None = None) -> pd.DataFrame:
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
    table = root / PROMPTS_FILE
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
        log.warning("%d folder(s) in %s are not in %s, read with empty captions: %s",
                    len(unlisted), root, PROMPTS_FILE, ", ".join(unlisted[:5]))
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
        log.warning("%d prompt id(s) in %s are not plain file names and are skipped, e.g. %s (%s)",
                    len(bad), ascii(source), ascii(bad[0][0]), bad[0][1])
    return kept


def sample_files(generations_dir: str | Path, prompt_id: str) -> list[Path]:
    """Every file with a sample suffix in the prompt's folder, in name order (symlinks to
    devices or folders are not files and are left out)."""
    folder = Path(generations_dir) / prompt_id
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES and p.is_file())


def list_samples(generations_dir: str | Path, prompt_id: str, rejects: RejectLog | None = None) -> list[Sample]:
    """The sample images of one prompt, in order of their index.

    When every file name is a number (the generator's ``00012.png``) that number is the index;
    otherwise files are numbered by their position in name order. A file whose name cannot be
    stored (control characters, invalid UTF-8, see :func:`pipeline.io.unsafe_name`) is left
    out and recorded in ``rejects``.
    """
    files = []
    for path in sample_files(generations_dir, prompt_id):
        reason = unsafe_name(path.name)
        if reason is None:
            files.append(path)
        elif rejects is not None:
            rejects.add(ascii(f"{prompt_id}/{path.name}"), ascii(str(path)), f"unsafe file name: {reason}")
    numbered = all(p.stem.isdigit() and p.stem.isascii() for p in files)
    indexed = [(int(p.stem) if numbered else i, p) for i, p in enumerate(files)]
    indexed.sort(key=lambda item: item[0])
    return [Sample(index, f"{prompt_id}/{p.name}") for index, p in indexed]


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
