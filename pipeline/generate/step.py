"""The generator as a step of the stage executor (:mod:`pipeline.executor`): a unit per prompt."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.executor import StepContext, Unit
from pipeline.generate.adaptive import AdaptiveSettings
from pipeline.generate.batches import SampleBatches
from pipeline.generate.prompt_samples import PromptSamples
from pipeline.generate.sampling import SampleTask, SamplingSettings
from pipeline.generations import NO_SIGN, STOP_REASONS, marker_complete, marker_info, sample_path, samples_present, shard_file
from pipeline.io import write_parquet
from pipeline.layout import REJECTS, normalise_keys
from pipeline.training_images import GroupMatcher

log = logging.getLogger(__name__)


class GenerateStep:
    """The generator's executor step: a unit per prompt of this shard, done once all its
    ``n_samples`` samples exist or adaptive sampling stopped it (its completion marker, which
    the detector reads, holds ``n_samples``, ``n_generated``, ``stopped_early``, ``stop_reason``
    and, when stopped, the ``adaptive`` settings). :meth:`run` samples every unfinished prompt's
    rounds (:class:`pipeline.generate.rounds.RoundScheduler` over
    :class:`pipeline.generate.prompt_samples.PromptSamples`) in batches that mix prompts
    (:class:`pipeline.generate.batches.SampleBatches`), writing PNGs on ``png_workers`` threads.
    With ``stop_when_extracted``, ``matcher`` compares each round's new samples with the
    training images of the prompt's ``keys`` (a prompt without keys is never stopped that way),
    and with ``near_training`` tells whether its samples came that near."""

    name = "generate"
    # Every rank's rejects, also those of runs with another world_size: prompts outlive it.
    rejects_per_world_size = False

    def __init__(
        self,
        pipe,
        rows: list[dict[str, Any]],
        out_dir: Path,
        *,
        settings: SamplingSettings,
        n_samples: int,
        batch_size: int,
        adaptive: AdaptiveSettings | None,
        png_workers: int,
        png_compress_level: int,
        on_batch: Callable[[list[SampleTask]], None] | None,
        matcher: GroupMatcher | None = None,
        every_prompt: Sequence[tuple[str, str, list[str] | None]] = (),
    ):
        self.pipe, self.rows, self.out_dir, self.settings = pipe, rows, out_dir, settings
        # (prompt_id, prompt digest, keys) of every rank's prompts, in prompt-list order.
        self.every_prompt = list(every_prompt) or [(row["prompt_id"], row["prompt_digest"], row["keys"]) for row in rows]
        self.n_samples, self.batch_size, self.adaptive = n_samples, batch_size, adaptive
        self.png_workers, self.png_compress_level = max(1, int(png_workers)), png_compress_level
        self.on_batch = on_batch
        self.matcher = matcher
        self.rejects_file = out_dir / REJECTS  # the executor merges the ranks' rejects there
        self.made = 0
        self.seconds = 0.0
        self.samples: PromptSamples | None = None  # set by run

    @property
    def stops(self) -> dict[str, int]:
        """Prompts this run stopped, per stop reason."""
        return self.samples.stops if self.samples is not None else dict.fromkeys(STOP_REASONS, 0)

    @property
    def rejected(self) -> set[str]:
        """Samples this run could not read back (their reject keys)."""
        return self.samples.rejected if self.samples is not None else set()

    def units(self) -> list[Unit]:
        adaptive = self.adaptive.describe() if self.adaptive is not None else None
        # stop_when_extracted decides by the prompt's training images: its keys decide its stop.
        extracted_stops = self.adaptive is not None and self.adaptive.stop_when_extracted
        return [
            Unit(
                prompt_id,
                {"n_samples": self.n_samples, "adaptive": adaptive, "prompt": digest, "keys": keys if extracted_stops else None},
            )
            for prompt_id, digest, keys in self.every_prompt
        ]

    def is_complete(self, unit: Unit, marker: dict[str, Any]) -> bool:
        """A prompt sampled in full serves any budget up to its own; one adaptive sampling
        stopped, only an adaptive run with the same settings (a brute-force rerun fills it up);
        either only for the caption and recipe its samples were made from."""
        settings = marker.get("settings")
        if not isinstance(settings, dict) or settings.get("prompt") != unit.settings["prompt"]:
            return False
        if marker.get("stop_reason") is not None and settings.get("keys") != unit.settings["keys"]:
            return False  # a stop taken against other training images
        return marker_complete(marker, self.n_samples, self.adaptive, any_rule=False) and samples_present(
            self.out_dir, unit.name, marker
        )

    def write_shard_file(self, rank: int, world_size: int) -> None:
        """The recipe rows plus each prompt's state (samples made so far, stopped early or not)
        as this shard's ``prompts_<rank>-of-<world_size>.parquet``."""
        out_dir, n_samples, rows = self.out_dir, self.n_samples, self.rows
        for row in rows:
            info = marker_info(out_dir, row["prompt_id"])
            if info is not None and marker_complete(info, n_samples):  # counts checked there
                row["n_generated"] = min(int(info.get("n_generated", n_samples)), n_samples)
                row["stopped_early"] = bool(info.get("stopped_early", False))
                row["stop_reason"] = info.get("stop_reason", NO_SIGN if row["stopped_early"] else None)
            else:
                row["n_generated"] = sum(sample_path(out_dir, row["prompt_id"], i).exists() for i in range(n_samples))
                row["stopped_early"] = False
                row["stop_reason"] = None
        write_parquet(pd.DataFrame(rows, columns=list(rows[0]) if rows else None), shard_file(out_dir, rank, world_size))

    def run(self, units: Sequence[Unit], ctx: StepContext) -> None:
        rows = {row["prompt_id"]: row for row in self.rows}
        # 1. The prompts' samples on disk and the checks on them, behind their round scheduler.
        groups = {pid: normalise_keys(row.get("keys")) or [] for pid, row in rows.items()}
        self.samples = PromptSamples(
            self.out_dir, ctx, units, n_samples=self.n_samples, adaptive=self.adaptive, matcher=self.matcher, groups=groups
        )
        scheduler = self.samples.scheduler()
        batches = SampleBatches(
            self.pipe,
            self.settings,
            self.out_dir,
            scheduler,
            ctx,
            batch_size=self.batch_size,
            png_workers=self.png_workers,
            png_compress_level=self.png_compress_level,
            on_batch=self.on_batch,
        )
        # 2. The recipe on disk before sampling starts, whatever happens next.
        self.write_shard_file(ctx.rank, ctx.world_size)
        # 3. Every prompt's first round (a prompt its samples on disk already decide finishes here).
        for unit in units:
            batches.enqueue(scheduler.start(unit.name, rows[unit.name]["caption"], rows[unit.name]["seeds"]))
        log.info(
            "generate: shard %d/%d: %d prompts to sample, %d images to make%s",
            ctx.rank,
            ctx.world_size,
            len(units),
            len(batches.queue),
            f" in the first round (adaptive: rounds end at {scheduler.ends}"
            + (", or sooner where a stop on the verdict could apply)" if self.adaptive.needs_clique else ")")
            if self.adaptive is not None
            else "",
        )
        # 4. Sample, write, and queue each prompt's next round until every prompt is finished.
        try:
            with ctx.track_time("sampling"):
                batches.run()
        finally:
            self.made += batches.made
        self.seconds = ctx.seconds["sampling"]
