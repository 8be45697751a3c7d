"""The generator's settings (validated once from its config) and the summary of a run."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.cli import setting


@dataclass(frozen=True)
class GenerateSettings:
    """The generator's own config keys (the sampling ones: :class:`SamplingSettings`)."""

    n_samples: int = setting(minimum=1)  # samples per prompt
    batch_size: int = setting(minimum=1)  # images per pipeline call, mixing prompts
    seed: int = setting()  # the base seed of every sample's seed
    max_prompts: int | None = setting(minimum=1)  # the first max_prompts prompts of the list; None: all
    png_workers: int = setting()  # PNG-encoding threads (at least 1 runs)
    png_compress_level: int = setting(minimum=0, maximum=9)  # zlib level
    progress: bool = setting()


@dataclass(frozen=True)
class RuntimeSettings:
    """How the model runs (:class:`pipeline.models.Runtime`, with ``device`` resolved)."""

    device: str = setting()
    dtype: str = setting()
    attention: str = setting()
    fuse_qkv: bool = setting()
    channels_last: bool = setting()
    tf32: bool = setting()
    compile: bool = setting()


@dataclass
class GenerationSummary:
    """What one generator run did on its shard (counts of prompts and images, seconds sampling)."""

    prompts: int  # this shard's prompts
    prompts_skipped: int  # already complete before this run
    images: int  # images made by this run
    seconds: float
    stopped_early: int = 0  # prompts this run stopped early with no sign of memorization (adaptive sampling)
    stopped_flagged: int = 0  # prompts this run stopped early because they were already flagged
    stopped_out_of_reach: int = 0  # prompts this run stopped because their budget could no longer complete a clique
    samples_rejected: int = 0  # samples adaptive sampling could not read back, left out of its checks (rejects.jsonl)
    stopped_extracted: int = 0  # prompts this run stopped once a sample reproduced one of their training images
    stopped_unlikely: int = 0  # prompts this run stopped because a clique was unlikely to complete (a heuristic)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0
