"""The generator's sampling loop: tasks from the round scheduler, sampled in batches that mix
prompts, each image written as a PNG on worker threads while the accelerator samples the next
batch."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.executor import StepContext
from pipeline.generate.rounds import RoundScheduler
from pipeline.generate.samples_on_disk import write_png
from pipeline.generate.sampling import PromptEncoder, SampleTask, SamplingSettings, sample_batch
from pipeline.generations import sample_path


class SampleBatches:
    """The queue of samples to make for one rank, and the loop that makes them.

    :meth:`enqueue` takes the scheduler's tasks; :meth:`run` samples ``batch_size`` of them at
    a time through ``pipe`` and hands each image to one of ``png_workers`` threads (zlib
    releases the GIL, so the accelerator never waits on encoding); each PNG on disk is reported
    to ``scheduler`` (:meth:`RoundScheduler.written`), whose next round's tasks join the queue.
    ``on_batch(tasks)`` is called after each batch is handed to the writers.
    """

    def __init__(
        self,
        pipe,
        settings: SamplingSettings,
        out_dir: Path,
        scheduler: RoundScheduler,
        ctx: StepContext,
        *,
        batch_size: int,
        png_workers: int,
        png_compress_level: int,
        on_batch: Callable[[list[SampleTask]], None] | None = None,
    ):
        self.pipe, self.settings, self.out_dir, self.scheduler, self.ctx = pipe, settings, out_dir, scheduler, ctx
        self.batch_size, self.png_workers, self.png_compress_level = batch_size, png_workers, png_compress_level
        self.on_batch = on_batch
        self.queue: deque[SampleTask] = deque()
        self.queued_per_caption: Counter[str] = Counter()
        self.pending: list[tuple[str, Future]] = []  # (prompt_id, its PNG's write)
        self.made = 0  # images sampled and handed to the writers
        self.bar = tqdm(
            total=0, unit="img", desc=f"generate {ctx.rank}/{ctx.world_size}", disable=not ctx.progress, dynamic_ncols=True
        )

    def enqueue(self, tasks: list[SampleTask]) -> None:
        self.queue.extend(tasks)
        self.queued_per_caption.update(t.caption for t in tasks)
        self.bar.total += len(tasks)  # shown at the next update

    def run(self) -> None:
        """Sample until the queue is empty and every write is done (raising any write error)."""
        batch_size = self.batch_size
        encoder = PromptEncoder(self.pipe, self.settings.guidance_scale, self.settings.negative_prompt)
        with ThreadPoolExecutor(max_workers=self.png_workers, thread_name_prefix="png") as writers:
            try:
                while self.queue or self.pending:
                    if len(self.queue) < batch_size and self.pending:
                        # Prompts whose round is being written may queue their next round: wait, so
                        # that batches stay full (with adaptive off, this happens once, at the end).
                        self._settle(wait_all=True)
                        continue
                    batch = [self.queue.popleft() for _ in range(min(batch_size, len(self.queue)))]
                    images = sample_batch(self.pipe, batch, self.settings, encoder)
                    self.queued_per_caption.subtract(t.caption for t in batch)
                    # Embeddings of a caption are dropped once none of its samples is queued, so
                    # memory stays flat over long prompt lists (a later round encodes it again).
                    encoder.forget({t.caption for t in batch if self.queued_per_caption[t.caption] <= 0})
                    for task, image in zip(batch, images):
                        path = sample_path(self.out_dir, task.prompt_id, task.index)
                        self.pending.append((task.prompt_id, writers.submit(write_png, path, image, self.png_compress_level)))
                    self.made += len(batch)
                    self._settle(wait_all=False)
                    # Bound the images held in memory when the writers fall behind.
                    while len(self.pending) > 4 * max(batch_size, self.png_workers):
                        self.pending[0][1].result()
                        self._settle(wait_all=False)
                    self.bar.update(len(batch))
                    self.ctx.stat("images", len(batch))
                    if self.on_batch is not None:
                        self.on_batch(batch)
            finally:
                self.bar.close()

    def _settle(self, wait_all: bool) -> None:
        """Check finished writes (raising any write error) and queue what the scheduler then asks for."""
        still = []
        for prompt_id, future in self.pending:
            if wait_all or future.done():
                future.result()
                self.enqueue(self.scheduler.written(prompt_id))
            else:
                still.append((prompt_id, future))
        self.pending = still
