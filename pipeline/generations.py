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

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.parquet"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Sample:
    """One generated image: its index within the prompt and its path relative to the folder."""

    index: int
    file: str  # e.g. "00003/00012.png"


def read_prompts(generations_dir: str | Path) -> pd.DataFrame:
    """The prompts of a generations folder: a DataFrame (prompt_id: str, caption: str), sorted.

    Prompts listed in ``prompts.parquet`` come with their caption (also when their folder is
    missing: they then have no samples); sub-folders it does not list are added with an empty
    caption and a warning.
    """
    root = Path(generations_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"generations_dir: {root} is not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    table = root / PROMPTS_FILE
    if table.exists():
        try:
            prompts = pd.read_parquet(table)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{table}: unreadable parquet file: {err}") from err
        missing = {"prompt_id", "caption"} - set(prompts.columns)
        if missing:
            raise ValueError(f"{table}: missing column(s) {sorted(missing)}; it needs prompt_id and caption")
        prompts = prompts[["prompt_id", "caption"]].copy()
        prompts["prompt_id"] = prompts["prompt_id"].astype(str)
        prompts["caption"] = prompts["caption"].fillna("").astype(str)
        prompts = prompts.drop_duplicates("prompt_id", keep="first")
        unlisted = sorted(set(folders) - set(prompts["prompt_id"]))
        if unlisted:
            log.warning("%d folder(s) in %s are not in %s, read with empty captions: %s",
                        len(unlisted), root, PROMPTS_FILE, ", ".join(unlisted[:5]))
            prompts = pd.concat([prompts, pd.DataFrame({"prompt_id": unlisted, "caption": ""})])
    else:
        prompts = pd.DataFrame({"prompt_id": folders, "caption": [""] * len(folders)})
    return prompts.sort_values("prompt_id", kind="stable").reset_index(drop=True)


def list_samples(generations_dir: str | Path, prompt_id: str) -> list[Sample]:
    """The sample images of one prompt, in order of their index.

    When every file name is a number (the generator's ``00012.png``) that number is the index;
    otherwise files are numbered by their position in name order.
    """
    folder = Path(generations_dir) / prompt_id
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES)
    numbered = all(p.stem.isdigit() for p in files)
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
