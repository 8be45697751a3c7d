"""Stage 1, the duplicate finder: ``python -m pipeline.dedup`` (see :mod:`pipeline.dedup.stage`).

* :mod:`~pipeline.dedup.stage`: the stage, as numbered steps, and its CLI;
* :mod:`~pipeline.dedup.settings`: its settings, read from the config and checked once;
* :mod:`~pipeline.dedup.phases`: the six phases (embed, train, index, search, verify, group), each an executor step;
* :mod:`~pipeline.dedup.units`: the phases' units, the settings that decide each, and their order;
* :mod:`~pipeline.dedup.launch`: every phase as an array from one command (local processes, or SLURM arrays chained by afterok);
* :mod:`~pipeline.dedup.embedding`: images to embeddings, a batch at a time;
* :mod:`~pipeline.data.embeddings_store` (shared with the detector): embeddings on disk, per shard;
* :mod:`~pipeline.dedup.index`: the faiss index and its near-duplicate pair search;
* :mod:`~pipeline.dedup.buckets`: the array phases' IVF search: rows bucketed by cell on disk, each task joining its own cells;
* :mod:`~pipeline.dedup.pair_verify`: the pair verifier: two images aligned and compared, one picture or not;
* :mod:`~pipeline.dedup.verification`: the verify phase's work: each task's share of the candidate pairs, verified a chunk of images at a time;
* :mod:`~pipeline.dedup.grouping`: pairs to duplicate groups (union-find over the pair files), and the ranking of captions;
* :mod:`~pipeline.dedup.records`: the group phase's records sorted by key and caption out of core;
* :mod:`~pipeline.dedup.scratch`: the group phase's scratch folders;
* :mod:`~pipeline.dedup.summary`: ``summary.json``, its evaluation, and the terminal lines;
* :mod:`~pipeline.dedup.memory`: each task's peak memory.
"""

from pipeline.dedup.settings import DedupSettings
from pipeline.dedup.stage import run, run_dedup
from pipeline.dedup.summary import DedupSummary, format_summary
from pipeline.dedup.units import shard_bounds

__all__ = ["DedupSettings", "DedupSummary", "format_summary", "run", "run_dedup", "shard_bounds"]
