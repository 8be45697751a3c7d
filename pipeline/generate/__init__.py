"""Stage 2, the generator: ``python -m pipeline.generate`` (see :mod:`pipeline.generate.stage`).

* :mod:`~pipeline.generate.stage`: the stage: its settings, :func:`generate`, its CLI;
* :mod:`~pipeline.generate.recipe`: the run's recipe, recorded and checked against the folder's;
* :mod:`~pipeline.generate.samples_on_disk`: samples written, found missing and read back, prompt records;
* :mod:`~pipeline.generate.step`: the executor step, a unit per prompt;
* :mod:`~pipeline.generate.prompt_samples`: what the round scheduler asks of each prompt's samples;
* :mod:`~pipeline.generate.batches`: the sampling loop, batches mixing prompts, PNGs on threads;
* :mod:`~pipeline.generate.sampling`: seeded batches through a diffusers pipeline;
* :mod:`~pipeline.generate.adaptive`: adaptive sampling's settings and round checks;
* :mod:`~pipeline.generate.rounds`: the scheduler of each prompt's rounds;
* :mod:`~pipeline.generate.regenerate`: any sample remade from its recorded recipe.

The generations folder it writes is read through :mod:`pipeline.generations`.
"""

from pipeline.generate.samples_on_disk import read_samples
from pipeline.generate.stage import GenerationSummary, generate, run
from pipeline.generate.step import GenerateStep

__all__ = ["GenerateStep", "GenerationSummary", "generate", "read_samples", "run"]
