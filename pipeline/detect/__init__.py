"""Stage 3, the detector: ``python -m pipeline.detect`` (see :mod:`pipeline.detect.stage`).

* :mod:`~pipeline.detect.stage`: the stage: screen, then verify; its settings and CLI;
* :mod:`~pipeline.detect.screen`: per prompt, the clique verdict of the near-copy rule (the executor step);
* :mod:`~pipeline.detect.verify`: every prompt's samples against the training set (extractions);
* :mod:`~pipeline.detect.candidates`: verification's candidate training images (groups, embedding index).
"""

from pipeline.detect.screen import find_memorized, stopped_under_another_rule
from pipeline.detect.stage import DetectSummary, run, run_detect

__all__ = ["DetectSummary", "find_memorized", "run", "run_detect", "stopped_under_another_rule"]
