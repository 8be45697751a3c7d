"""The offline default embedder: coarse colour thumbnails, no weights, no GPU.

Near-duplicates on the web differ by what leaves a picture's coarse layout alone:
re-encoding, rescaling, small crops and shifts, colour tweaks, a caption burned in. A
thumbnail of a few pixels a side keeps the layout and averages those changes away, so it
finds such copies; it does not find semantic duplicates (the same scene photographed twice),
for which use a CLIP embedder (``embedder=open_clip``). Its weak spot is a caption drawn
on a nearly flat image (a moon, a star field): the text is then most of the picture.

For each scale ``s`` (4x4 and 8x8 by default) the image is shrunk to ``s x s`` with an
antialiasing filter, then per channel the mean is removed (brightness changes cancel), the
result is divided by its RMS contrast (contrast changes cancel; images flatter than
``contrast_floor`` are not amplified, so their JPEG noise cannot dominate) and clipped at
``clip`` robust standard deviations (a caption drawn on a flat image cannot dominate). The
mean colour is appended with weight ``colour_weight``, so that two scenes with the same
layout in different colours stay apart. The concatenation is L2-normalised.

Why these values: on the demo set (and two more built with other seeds) this variant keeps
pair precision and recall of the planted duplicates above 0.99 for every threshold in
0.74-0.86, the widest such range among the variants we measured (8x8 or 16x16 alone, with
and without blur, clipping, mean colour, a coarse colour layout; RGB, YCbCr or Lab). 16x16
thumbnails are more sensitive to shifts and crops; without the 4x4 scale, flat images with
overlaid text fall apart; without the mean colour, gradient backgrounds of different colours
come together. The default threshold, 0.84, sits high in that range: lower, more unrelated
smooth gradient scenes chain into false groups; higher, the hardest copies (text on a flat
image, a shifted texture) drop out. Measured: pair precision 0.9999, recall 0.9993 on the demo set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.embedders.base import PerImageEmbedder

# Every image is first reduced to this size (fast for large images: Pillow's reducing_gap
# shrinks by integer factors first); the scales are taken from it.
_BASE_SIZE = 64


class ThumbnailEmbedder(PerImageEmbedder):
    """Multi-scale, contrast-normalised colour thumbnails.

    Args:
        scales: thumbnail sides in pixels; each gives ``3 * s * s`` dimensions.
        colour_weight: weight of the mean colour (3 dimensions, values in [-0.5, 0.5]).
        clip: clip each pixel at this many robust standard deviations; None: no clipping.
        contrast_floor: RMS contrast (pixel values in [0, 1]) below which an image's
            structure is not scaled up to unit norm.
        threshold: cosine similarity at or above which two images count as near-duplicates.

    ``embed`` returns float32 ``(N, 3 * sum(s * s) + 3)`` rows of unit norm.
    """

    name = "thumbnail"

    def __init__(
        self,
        scales: Sequence[int] = (4, 8),
        colour_weight: float = 1.0,
        clip: float | None = 3.0,
        contrast_floor: float = 0.03,
        threshold: float | None = 0.84,
    ):
        scales = tuple(int(s) for s in scales)
        if not scales or any(s < 1 or s > _BASE_SIZE for s in scales):
            raise ValueError(f"embedder.scales: each scale must be 1..{_BASE_SIZE} pixels, got {list(scales)}")
        if colour_weight < 0:
            raise ValueError(f"embedder.colour_weight: must be >= 0, got {colour_weight}")
        if clip is not None and clip <= 0:
            raise ValueError(f"embedder.clip: must be > 0 or null, got {clip}")
        self.scales = scales
        self.colour_weight = float(colour_weight)
        self.clip = None if clip is None else float(clip)
        self.contrast_floor = float(contrast_floor)
        self.threshold = threshold
        self.dim = 3 * sum(s * s for s in scales) + 3
        self.name = f"thumbnail{'-'.join(map(str, scales))}"

    def embed_one(self, image: Image.Image) -> np.ndarray:
        """The embedding of one image: float32 ``(dim,)``, unit norm."""
        base = image.convert("RGB").resize((_BASE_SIZE, _BASE_SIZE), Image.Resampling.LANCZOS, reducing_gap=2.0)
        mean = np.asarray(base, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0
        weight = 1.0 / np.sqrt(len(self.scales))  # each scale counts the same
        parts = []
        for side in self.scales:
            thumb = np.asarray(base.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
            parts.append(weight * self._structure(thumb - thumb.reshape(-1, 3).mean(axis=0)))
        parts.append(self.colour_weight * (mean - 0.5))
        vector = np.concatenate(parts)
        norm = np.linalg.norm(vector)
        if norm < 1e-12:
            # A perfectly flat mid-grey image (or colour_weight 0 and a flat image) has no
            # feature at all; all such images get the same unit vector, as they look the same.
            vector = np.zeros_like(vector)
            vector[-1] = 1.0
            return vector.astype(np.float32)
        return (vector / norm).astype(np.float32)

    def _structure(self, residual: np.ndarray) -> np.ndarray:
        """Mean-free thumbnail -> flattened, clipped, of unit RMS (less for flat images)."""
        if self.clip is not None:
            # Median absolute deviation: a robust scale that a few text pixels do not inflate.
            scale = 1.4826 * np.median(np.abs(residual)) + 1e-3
            residual = np.clip(residual, -self.clip * scale, self.clip * scale)
        flat = residual.ravel()
        rms = float(np.sqrt(np.mean(flat**2)))
        return flat / (np.sqrt(flat.size) * max(rms, self.contrast_floor, 1e-6))
