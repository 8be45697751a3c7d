"""Stage 1, the duplicate finder: ``python -m pipeline.dedup`` (see :mod:`pipeline.dedup.stage`).

* :mod:`~pipeline.dedup.stage`: the stage: its phases (embed, train, index, search, group) as executor steps, and its CLI;
* :mod:`~pipeline.dedup.embeddings_store`: embeddings on disk, per shard;
* :mod:`~pipeline.dedup.index`: the faiss index and its near-duplicate pair search;
* :mod:`~pipeline.dedup.buckets`: the array phases' IVF search: rows bucketed by cell on disk, each task joining its own cells;
* :mod:`~pipeline.dedup.grouping`: pairs to duplicate groups, and the ranking of captions;
* :mod:`~pipeline.dedup.records`: the group phase's records sorted by key and caption out of core.
"""

from pipeline.dedup.stage import (
    DedupSettings,
    format_summary,
    run_dedup,
    shard_bounds,
)

__all__ = ["DedupSettings", "format_summary", "run_dedup", "shard_bounds"]
