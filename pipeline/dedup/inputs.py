"""What the duplicate finder reads, identified for its units' markers, and kept apart from what it writes.

The embed units record the data set's identity (:func:`data_identity`): a replaced image,
an edited caption file or an added shard redoes the embedding, and the later phases, which
chain on the embed units' digests, redo their work too. Precomputed embeddings are identified
by their files (:func:`embedding_files_identity`, the vectors; :func:`metadata_identity`, the
keys and captions the groups are built from). Identities are names, sizes and modification
times (:mod:`pipeline.identity`), read without opening a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.embeddings_store import embedding_path, metadata_path
from pipeline.identity import digest_of, file_identity, tree_identity


def data_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of the files the data layer reads for the ``data`` config: every non-hidden
    file under ``data.path`` (images, sidecar ``.txt``/``.json``, ``.tar`` or ``.parquet``
    shards, captions files) or the one file ``data.path`` names, plus an imagefolder's
    ``data.captions`` file, which may lie outside the folder.

    Returns ``{"files": count, "digest": 16 hex digits}``. Walks the whole tree: a caller
    computes it once per process, before reading any record, so a file changed while it is
    read makes the next run differ rather than match.
    """
    path = data.get("path")
    if path in (None, "", "???"):
        return {"files": 0, "digest": digest_of(None)}
    entries = tree_identity(path)
    captions = data.get("captions")
    if data.get("format") == "imagefolder" and captions:
        caption_file = Path(path) / str(captions)  # an absolute ``captions`` replaces the folder
        entries = [*entries, ["captions", str(caption_file), *file_identity(caption_file)[1:]]]
    return {"files": len(entries), "digest": digest_of(entries)}


def embedding_files_identity(root: str | Path, shards: list[int]) -> list[list[Any]]:
    """``[[name, size, mtime_ns], ...]`` of ``root``'s ``img_emb/img_emb_<n>.npy`` for ``shards``."""
    return [file_identity(embedding_path(root, shard)) for shard in shards]


def metadata_identity(root: str | Path, shards: list[int]) -> str:
    """The digest of the names, sizes and modification times of ``root``'s
    ``metadata/metadata_<n>.parquet`` for ``shards``: the keys and captions the groups list."""
    return digest_of([file_identity(metadata_path(root, shard)) for shard in shards])


def writes_into(out_dir: str | Path, inputs: Mapping[str, str | Path | None]) -> str | None:
    """One line saying which of ``inputs`` (config key -> path; None entries ignored) the output
    folder ``out_dir`` is, or lies inside, or None when it lies apart from all of them. Paths
    are compared resolved (links followed), so a link to a folder counts as that folder."""
    out = Path(os.path.realpath(out_dir))
    for key, value in inputs.items():
        if value in (None, "", "???"):
            continue
        given = Path(os.path.realpath(Path(str(value)).expanduser()))
        if out == given or given in out.parents:
            return f"{key}: {value} holds the output folder {out_dir}; inputs are read-only: choose a run_dir outside it"
    return None
