"""The two ways reading a data set fails as a whole: a wrong config value, or nothing to read."""

from __future__ import annotations

from pathlib import Path


class DataConfigError(ValueError):
    """A ``data.*`` config value is wrong; the message starts with the key, e.g. ``data.format: ...``."""


class EmptyDatasetError(RuntimeError):
    """A data set (or this rank's shard of it) gave no usable record.

    Raised after the whole shard was read, so the message can say why: ``rejects`` holds
    the records that were skipped (all of them, when every record was bad).
    """

    def __init__(self, path: str | Path, rejects=None, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.rejects = rejects
        self.rank = rank
        self.world_size = world_size
        shard = f" (shard rank={rank} of world_size={world_size})" if world_size > 1 else ""
        summary = rejects.summary() if rejects is not None else "no reject log was kept"
        hint = ""
        if rejects is not None and len(rejects) == 0:
            hint = "; check data.path and data.format"
            if world_size > 1:
                hint += ", or use fewer ranks than there are records"
        super().__init__(f"data.path: no usable records in {path}{shard}: {summary}{hint}")
