"""Splitting a data set among ``world_size`` processes so that each record goes to exactly one.

Two ways, chosen per data set:

* by file, when a data set has at least as many shard files (``.tar``, ``.parquet``) as
  ranks: rank ``r`` reads files ``r, r + world_size, ...`` and nothing else;
* by record, otherwise (and always for the ``files`` and ``imagefolder`` layouts): every
  rank walks the whole data set in the same order and keeps record ``i`` when
  ``i % world_size == rank``. Only the kept records are decoded.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TypeVar

from pipeline.data.rejects import RejectLog

T = TypeVar("T")


def check_shard(rank: int, world_size: int) -> tuple[int, int]:
    """Validate ``rank``/``world_size`` (as ints) or raise a ``ValueError`` naming the key."""
    try:
        world_size = operator.index(world_size)
    except TypeError:
        raise ValueError(f"world_size: must be an integer, got {world_size!r}") from None
    if world_size < 1:
        raise ValueError(f"world_size: must be at least 1, got {world_size}")
    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank: must be an integer, got {rank!r}") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def split_files(files: Sequence[T], rank: int, world_size: int) -> tuple[list[T], bool]:
    """Which of ``files`` rank ``rank`` reads, and whether it must also split them by record.

    Returns ``(files_to_read, by_record)``: with at least one file per rank, a round-robin
    share of the files and ``False``; with fewer files than ranks, all files and ``True``.
    """
    if len(files) >= world_size:
        return list(files[rank::world_size]), False
    return list(files), True


def owns(index: int, rank: int, world_size: int) -> bool:
    """Whether record number ``index`` (in the order every rank sees) belongs to ``rank``."""
    return index % world_size == rank


def owned_count(start: int, count: int, rank: int, world_size: int) -> int:
    """How many of the record numbers ``start`` to ``start + count - 1`` belong to ``rank``."""
    first = start + (rank - start) % world_size  # the first number from ``start`` on that is ours
    return max(0, (start + count - first + world_size - 1) // world_size)


def add_lost(rejects: RejectLog, key: str, source: str, reason: str, start: int, count: int, rank: int, world_size: int) -> None:
    """Log the records numbered ``start`` to ``start + count - 1``, lost together, that ``rank`` owns.

    For a shard that broke part-way: one entry on each rank that owns some of them, with its
    share as the count, so the ranks' counts add up to ``count`` and no record is counted twice.
    """
    share = owned_count(start, count, rank, world_size)
    if share:
        rejects.add(key, source, reason, count=share)
