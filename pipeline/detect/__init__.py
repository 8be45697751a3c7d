"""Stage 3, the detector: ``python -m pipeline.detect`` (see :mod:`pipeline.detect.stage`).

* :mod:`~pipeline.detect.stage`: per prompt, the clique verdict of the near-copy rule; its CLI;
* :mod:`~pipeline.detect.verify`: flagged samples against the training set (extractions).
"""

from pipeline.detect.stage import (
    find_memorized,
    run,
    run_detect,
    stopped_under_another_rule,
)

__all__ = ["find_memorized", "run", "run_detect", "stopped_under_another_rule"]
