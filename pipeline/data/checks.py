"""Turning "the reader yielded nothing" into a clear error instead of a silently empty run."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.data.errors import EmptyDatasetError
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog

log = logging.getLogger(__name__)


def require_records(
    records: Iterable[Record], path: str | Path, rejects: RejectLog, rank: int = 0, world_size: int = 1
) -> Iterator[Record]:
    """Yield ``records``; when they run out, raise ``EmptyDatasetError`` if there were none.

    The check runs only once the stream is exhausted (a consumer that stops early sees no
    error). At the end, a non-empty ``rejects`` is also logged as a warning with its summary,
    so skipped records are visible even when the caller keeps no rejects file.
    """
    count = 0
    for record in records:
        count += 1
        yield record
    if count == 0:
        raise EmptyDatasetError(path, rejects, rank, world_size)
    if len(rejects):
        shard = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        log.warning("read %d records from %s%s; %s", count, path, shard, rejects.summary())
