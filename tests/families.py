"""Tiny random-weight pipelines of every model family, saved to disk as a user's model would be.

The builders are :mod:`pipeline.families.random_pipelines` (stock diffusers and transformers
classes, tokenizers made locally, nothing downloaded); this module saves each family once into
a folder that ``model.path`` can name.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families import random_pipelines
from pipeline.families.random_pipelines import FAMILIES, TINY_SIZE  # noqa: F401  (the family tests' parameters)

# The conf/model/*.yaml whose settings each family's tests run with (paths pointed at the tiny model).
CONFIGS = {
    "sd": "sd14",
    "sd2": "sd21",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux_dev",
    "flux-schnell": "flux_schnell",
    "pixart": "pixart_sigma",
}


class TinyModels:
    """Saved tiny pipelines under ``root``, built on first use and kept (one per family)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.saved: dict[str, Path] = {}

    def path(self, family: str) -> Path:
        """The folder of the tiny ``family`` pipeline (``save_pretrained`` output)."""
        if family not in self.saved:
            self.saved[family] = random_pipelines.save_tiny_pipeline(family, self.root / family)
        return self.saved[family]
