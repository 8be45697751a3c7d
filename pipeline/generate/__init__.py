"""Stage 2, the generator: ``python -m pipeline.generate`` (see :mod:`pipeline.generate.stage`).

* :mod:`~pipeline.generate.stage`: the stage: recipe, the executor step that samples, its CLI;
* :mod:`~pipeline.generate.sampling`: seeded batches through a diffusers pipeline;
* :mod:`~pipeline.generate.adaptive`: adaptive sampling's settings and round checks;
* :mod:`~pipeline.generate.rounds`: the scheduler of each prompt's rounds;
* :mod:`~pipeline.generate.regenerate`: any sample remade from its recorded recipe.

The generations folder it writes is read through :mod:`pipeline.generations`.
"""

from pipeline.generate.stage import (
    GenerateStep,
    GenerationSummary,
    generate,
    read_samples,
    run,
)

__all__ = ["GenerateStep", "GenerationSummary", "generate", "read_samples", "run"]
