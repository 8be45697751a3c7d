"""Embeddings on disk in the layout clip-retrieval writes (and LAION ships its CLIP embeddings in).

::

    <root>/img_emb/img_emb_<n>.npy            float16 (rows, dim), each row of L2 norm 1
    <root>/metadata/metadata_<n>.parquet      one row per embedding row, same order:
                                              at least ``key`` and ``caption``

Shard ``n`` of the duplicate finder is rank ``n``'s part of the data set. Any folder in this
layout can be read instead of embedding (``embeddings_dir=...``), e.g. LAION's precomputed
CLIP embeddings, whose metadata files carry ``key`` and ``caption``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_npy, write_parquet

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("key", "caption")
_SHARD_NAME = re.compile(r"^img_emb_(\d+)\.npy$")


def embedding_path(root: str | Path, shard: int) -> Path:
    return Path(root) / "img_emb" / f"img_emb_{shard}.npy"


def metadata_path(root: str | Path, shard: int) -> Path:
    return Path(root) / "metadata" / f"metadata_{shard}.parquet"


def write_shard(root: str | Path, shard: int, embeddings: np.ndarray, metadata: pd.DataFrame) -> None:
    """Write one shard: ``embeddings`` (N, dim) as float16, ``metadata`` (N rows, key + caption).

    The metadata is written last; a shard is complete when both files exist (the caller's
    completion marker says so for certain).
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) != len(metadata):
        raise ValueError(f"shard {shard}: {embeddings.shape} embeddings for {len(metadata)} metadata rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
    if missing:
        raise ValueError(f"shard {shard}: metadata lacks columns {missing}")
    write_npy(embeddings.astype(np.float16), embedding_path(root, shard))
    write_parquet(metadata.reset_index(drop=True), metadata_path(root, shard))


def list_shards(root: str | Path) -> list[int]:
    """Shard numbers of ``root/img_emb/img_emb_<n>.npy``, ascending."""
    folder = Path(root) / "img_emb"
    if not folder.is_dir():
        return []
    found = (_SHARD_NAME.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def read_metadata(root: str | Path, shards: list[int] | None = None, columns=REQUIRED_COLUMNS) -> pd.DataFrame:
    """The metadata of ``shards`` (all by default) concatenated in shard order, with a
    ``shard`` column; row ``i`` describes row ``i`` of :func:`read_embeddings`."""
    root = Path(root)
    shards = list_shards(root) if shards is None else shards
    if not shards:
        raise FileNotFoundError(f"embeddings_dir: no img_emb/img_emb_<n>.npy files in {root}")
    parts = []
    for shard in shards:
        path = metadata_path(root, shard)
        if not path.exists():
            raise FileNotFoundError(f"embeddings_dir: {embedding_path(root, shard)} has no metadata file {path}")
        present = _parquet_columns(path)
        missing = [c for c in columns if c not in present]
        if missing:
            raise ValueError(f"embeddings_dir: {path} lacks columns {missing} (it has {sorted(present)})")
        frame = pd.read_parquet(path, columns=list(columns))
        frame["shard"] = shard
        parts.append(frame)
    metadata = pd.concat(parts, ignore_index=True)
    metadata["key"] = metadata["key"].astype(str)
    metadata["caption"] = metadata["caption"].fillna("").astype(str)
    duplicated = metadata["key"].duplicated()
    if duplicated.any():
        example = metadata.loc[duplicated, "key"].iloc[0]
        log.warning(
            "embeddings_dir: %d keys occur more than once (e.g. %r); groups.parquet will repeat them",
            int(duplicated.sum()),
            example,
        )
    return metadata


def _parquet_columns(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_schema(path).names)


def read_embeddings(root: str | Path, shards: list[int] | None = None) -> np.ndarray:
    """All embeddings of ``shards`` (all by default) as one float32 (N, dim) array of unit rows.

    Rows are re-normalised in float32 (float16 storage leaves them ~1e-3 off unit length);
    a file whose rows are far from unit length (not normalised at all) is normalised too,
    with a warning. Raises, naming the file, on a row-count or dimension mismatch. Holds the
    whole set: the array phases read only their share through :class:`EmbeddingRows`.
    """
    rows = EmbeddingRows(root, shards)
    return unit_rows(rows.read(0, rows.n), warn=str(rows.root))


def unit_rows(stored: np.ndarray, warn: str | None = None) -> np.ndarray:
    """float32 unit rows from stored (float16) rows: each row divided by its float32 norm.

    Row by row, so a row gets the same float32 values whichever batch it is read in (the
    array phases rely on that to find the same pairs as one process). ``warn``: a name for
    the warning given when rows are far from unit length (not normalised at all).
    """
    out = np.array(stored, dtype=np.float32)  # always a copy: the caller's rows stay as they are
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if warn is not None and len(out) and np.abs(norms - 1).max() > 0.02:
        log.warning("embeddings_dir: %s holds rows that are not unit length; normalising them", warn)
    np.divide(out, np.maximum(norms, 1e-12), out=out)
    return out


class EmbeddingRows:
    """The rows of an embeddings folder, addressed by global row number (shards in order),
    read a slice at a time: no call holds more than the rows it returns.

    Each read maps the shard files, copies the rows asked for and unmaps them, so that pages
    read do not stay in the process's resident memory. Checks every shard's shape and its
    metadata's row count on opening.

    Attributes:
        root: the folder; shards: shard numbers read, in order; sizes: rows per shard;
        offsets: int64 (len(shards) + 1,), global row of each shard's first row; n: rows;
        dim: embedding dimension; dtype: the stored dtype (float16 in this layout).
    """

    def __init__(self, root: str | Path, shards: list[int] | None = None):
        self.root = Path(root)
        self.shards = list_shards(self.root) if shards is None else list(shards)
        if not self.shards:
            raise FileNotFoundError(f"embeddings_dir: no img_emb/img_emb_<n>.npy files in {self.root}")
        sizes, dim, dtype = [], None, None
        for shard in self.shards:
            path = embedding_path(self.root, shard)
            if not path.exists():
                raise FileNotFoundError(f"embeddings_dir: {path} is missing")
            array = _open(path)
            if array.ndim != 2:
                raise ValueError(f"embeddings_dir: {path} holds an array of shape {array.shape}, not (rows, dim)")
            if dim is not None and array.shape[1] != dim:
                raise ValueError(f"embeddings_dir: {path} has dimension {array.shape[1]}, other shards {dim}")
            dim, dtype = array.shape[1], array.dtype
            meta = metadata_path(self.root, shard)
            if meta.exists():
                import pyarrow.parquet as pq

                rows = pq.read_metadata(meta).num_rows
                if rows != array.shape[0]:
                    raise ValueError(f"embeddings_dir: {path} has {array.shape[0]} rows but {meta} has {rows}")
            sizes.append(array.shape[0])
            del array
        self.sizes = sizes
        self.offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dim = int(dim)
        self.dtype = dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as stored (``dtype``, shape (stop - start, dim)), a copy."""
        start, stop = max(0, int(start)), min(self.n, int(stop))
        out = np.empty((max(0, stop - start), self.dim), dtype=self.dtype)
        for s, shard in enumerate(self.shards):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo < hi:
                array = _open(embedding_path(self.root, shard))
                out[lo - start : hi - start] = array[lo - self.offsets[s] : hi - self.offsets[s]]
                del array  # unmapped: its pages leave this process's resident set
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int, any order) as stored, shape (len(rows), dim), a copy."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            array = _open(embedding_path(self.root, self.shards[s]))
            out[where] = array[rows[where] - self.offsets[s]]
            del array
        return out


def _open(path: Path) -> np.ndarray:
    """The ``.npy`` at ``path``, memory-mapped; a file that does not hold what its header says
    (cut short, say) is refused in one line naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"embeddings_dir: {path} is unreadable: {error}") from None
