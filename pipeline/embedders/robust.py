"""The offline default embedder: trimmed, mirror-invariant, whitened low-frequency DCT.

Built for the copies LAION holds (issue #17): resized, cropped up to 8% a side, letterboxed
on black or white (and padded white again by img2dataset), rotated a few degrees, mirrored,
greyscale, re-encoded as JPEG, brightened or contrast-changed, with text over them.

Per image: reduce to at most 128 px a side; cut uniform black or white bars from every side
(:func:`trim_borders`, repeated so nested bars go too) and ``inset`` 2 px more past each (the
line where a bar met the picture is a blend of both); resize what is left to 32 x 32 (the
aspect ratio is dropped: bars change it); split into luminance and chroma (Cb, Cr).

* Luminance: mean removed, clipped at 2 robust standard deviations (text, filled rotation
  corners: few pixels far from the rest), 2-D DCT, the 6 x 6 lowest frequencies (DC
  dropped), each multiplied by ``(1 + |f|)^0.75`` (``whiten``: photographs' spectra fall as
  1/f, so without it the smoothest component decides and unrelated smooth pictures match).
  Normalised to unit norm: brightness and contrast changes cancel. Low frequencies survive
  JPEG, resizing, small crops and rotations. Below a contrast of ``luma_floor`` (standard
  deviation 0.02) the part fades: there it is JPEG noise (a gradient between two colours of
  one luminance).
* Mirror invariance: a horizontal mirror negates exactly the coefficients of odd horizontal
  frequency. The even ones are kept as they are, the odd ones ``a`` replaced by the upper
  triangle of ``a a^T / |a|`` (same norm), which a sign flip leaves unchanged; the dot product
  of two such parts is ``|a||a'| cos^2``, so copies keep their similarity while their relative
  signs still tell different pictures apart (``|a|`` alone would not).
* Chroma: the same on the 3 x 3 lowest frequencies of Cb and Cr (the mean colour included).
  Its share of the squared norm follows the picture's smoothness (:meth:`RobustEmbedder._smoothness`,
  from the luminance, so a grey copy gets the same): 0.05 for a picture with structure (a
  greyscale copy keeps sqrt(0.95) = 0.975 of its similarity), up to 0.4 for a smooth gradient,
  whose normalised structure is that of every gradient of its direction.
* Global: mean luminance and its standard deviation, times ``global_weight`` 3 and the
  smoothness: they tell gradients apart; in other pictures they would mostly measure
  brightness and contrast edits.

Calibration (``python benchmarks/planted_edits.py --no-build --thresholds ...``: the dedup
stage, exact search, k = 32, connected components; 2-core AMD EPYC, shared). Pair precision /
recall, identical in files, webdataset and parquet:

* planted seed 0 (600 originals, 1136 records): 0.78: 0.974/0.988, 0.82: 0.982/0.972, 0.85: 0.994/0.961
* planted seed 1 (600 originals, 1138 records): 0.78: 0.975/0.996, 0.82: 0.986/0.985, 0.85: 0.990/0.976
* planted seed 2 (600 originals, 1137 records): 0.78: 0.966/0.981, 0.82: 0.980/0.969, 0.85: 0.983/0.961
* precision and recall >= 0.95 on all three from 0.78 to 0.85; 0.82 is about the middle.
* planted seed 3 (not used for tuning, 1224 records): 0.78: 0.792/0.971, 0.82: 0.802/0.956,
  0.85: 0.974/0.915: two heavily copied gradients join through a chain of gradients of
  neighbouring colours (pairs at 0.84-0.90) below 0.85; at 0.85 the greyscale copies of one
  split from it. **Not the target there**, at any threshold.
* demo set: 0.9989 / 0.9709 at 0.82; it selects 28 of the 48 groups the thumbnail embedder
  (which the demo set is calibrated for, 0.9999 / 0.9993) selects.

Known misses: a greyscale copy of a smooth gradient (colour is 0.4 of its norm: a grey copy
keeps at most sqrt(0.6) = 0.77), and of a gradient between colours of one luminance (a flat
grey field); posters of one template (similarity up to 0.97: clipping takes the one block
that tells them apart); gradients of similar colours chain into one group below 0.85 when
there are many. About 50 images/s on one core of the shared machine (256 px images, decoding
excluded; the thumbnail embedder 135 images/s in the same run).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.embedders.base import PerImageEmbedder

# Images are first reduced to at most this many pixels a side (Pillow's reducing_gap shrinks
# big images by integer factors first, which is fast); the borders are found at this size.
_WORK_SIDE = 128


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix, float64 ``(n, n)``: ``D @ x`` transforms a length-``n`` signal."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def trim_borders(rgb: np.ndarray, tol: float = 0.06, max_share: float = 0.45, rounds: int = 3) -> tuple[int, int, int, int]:
    """The box ``(top, bottom, left, right)`` (rows/columns kept: ``rgb[top:bottom, left:right]``)
    left when uniform black or white bars are cut from each side of ``rgb`` (float ``(H, W, 3)``
    in [0, 1]).

    A line (row or column) at an edge is a bar when 95% of its pixels are within ``tol`` of
    the line's median colour, and that colour is near black or near white (letterbox bars,
    img2dataset's white padding, a rotated copy's black or white corners do not qualify as they
    hold picture). Bars of different colours nest (black bars padded with white by img2dataset),
    so the cut repeats up to ``rounds`` times. No side loses more than ``max_share`` of the image:
    a picture that is mostly flat keeps its size.
    """
    h, w = rgb.shape[:2]
    top, bottom, left, right = 0, h, 0, w
    for _ in range(rounds):
        before = (top, bottom, left, right)
        box = rgb[top:bottom, left:right]
        columns = box.transpose(1, 0, 2)
        top += _side_run(box, tol, max_share * h - top)
        bottom -= _side_run(box[::-1], tol, max_share * h - (h - bottom))
        left += _side_run(columns, tol, max_share * w - left)
        right -= _side_run(columns[::-1], tol, max_share * w - (w - right))
        if (top, bottom, left, right) == before:
            break
    return top, bottom, left, right


def _side_run(lines: np.ndarray, tol: float, limit: float) -> int:
    """The bar run at one side, or 0 when it would pass ``limit`` (a mostly flat picture, not a bar)."""
    limit = int(max(limit, 0))
    run = _bar_run(lines, tol, limit + 1)
    return run if run <= limit and run < len(lines) else 0


def _bar_run(lines: np.ndarray, tol: float, limit: float, chunk: int = 8) -> int:
    """How many leading rows of ``lines`` (float ``(n, m, 3)``) form one bar (see :func:`trim_borders`).

    Looked at ``chunk`` lines at a time: most edges are no bar, and that shows in the first line.
    """
    count = int(min(max(limit, 0), len(lines)))
    if count == 0 or 0.12 <= lines[0].mean() <= 0.88:  # cheap: most edges are no bar
        return 0
    first = None
    for start in range(0, count, chunk):
        head = lines[start : min(count, start + chunk)]
        median = np.median(head, axis=1)  # (lines, 3): each line's colour
        first = median[0] if first is None else first
        # 95% of the pixels, not all: the line where a bar meets the next one (or the picture)
        # is a blend of both over a pixel or two at its ends.
        flat = (np.abs(head - median[:, None, :]).max(axis=2) <= tol).mean(axis=1) >= 0.95
        level = median.mean(axis=1)
        black_or_white = ((level < 0.12) | (level > 0.88)) & (np.ptp(median, axis=1) <= 0.1)
        same_colour = np.abs(median - first).max(axis=1) <= tol  # another colour: the next round's bar
        bar = flat & black_or_white & same_colour
        if not bar.all():
            return start + int(np.argmin(bar))
    return count


class RobustEmbedder(PerImageEmbedder):
    """Trimmed, contrast-normalised, mirror-invariant low-frequency DCT of luminance, plus colour.

    Args:
        side: the trimmed image is resized to ``side x side`` before the DCT.
        keep: DCT coefficients ``(v, u)`` with ``v, u < keep`` are kept (the DC term aside).
        chroma_keep: the same for the two chroma channels (their DC, the mean colour, included).
        chroma_weight: share of the squared norm given to colour (0..1) in a picture with
            structure; a greyscale copy keeps ``sqrt(1 - chroma_weight)`` of its similarity.
        chroma_weight_smooth: the share in a smooth picture (smoothness 1, see
            :meth:`_smoothness`), where colour is what tells pictures apart; in between, linear.
        smooth_from: share of the luminance's AC energy in its three lowest frequencies at
            which a picture starts to count as smooth (0..1).
        whiten: luminance coefficient ``(v, u)`` is multiplied by ``(1 + sqrt(u^2 + v^2))^whiten``
            (photographs' spectra fall as 1/f: without it the smoothest component decides).
        global_weight: weight of the mean luminance and its standard deviation (2 dimensions,
            values within [-0.5, 0.5]) times the smoothness: they tell gradients apart.
        clip: the mean-free luminance is clipped at this many robust standard deviations
            (text, rotation corners), or null.
        trim_tol: a border line's pixels lie within this of its colour (values in [0, 1]).
        inset: pixels (of the <= 128 px working copy) cut past each bar found.
        luma_floor: luminance contrast (standard deviation, values in [0, 1]) below which the
            luminance part fades (quadratically): under it the structure is mostly JPEG noise.
        threshold: cosine similarity at or above which two images count as near-duplicates.

    ``embed`` returns float32 ``(N, dim)`` rows of unit norm.
    """

    name = "robust"

    def __init__(
        self,
        side: int = 32,
        keep: int = 6,
        chroma_keep: int = 3,
        chroma_weight: float = 0.05,
        chroma_weight_smooth: float = 0.4,
        smooth_from: float = 0.5,
        whiten: float = 0.75,
        global_weight: float = 3.0,
        clip: float | None = 2.0,
        trim_tol: float = 0.06,
        inset: int = 2,
        luma_floor: float = 0.02,
        threshold: float | None = 0.82,
    ):
        if not 2 <= keep <= side:
            raise ValueError(f"embedder.keep: must be 2..side ({side}), got {keep}")
        if not 1 <= chroma_keep <= side:
            raise ValueError(f"embedder.chroma_keep: must be 1..side ({side}), got {chroma_keep}")
        if not (0 <= chroma_weight < 1 and 0 <= chroma_weight_smooth < 1):
            raise ValueError(f"embedder.chroma_weight(_smooth): must be in [0, 1), got {chroma_weight}, {chroma_weight_smooth}")
        if not 0 <= smooth_from < 1:
            raise ValueError(f"embedder.smooth_from: must be in [0, 1), got {smooth_from}")
        if luma_floor <= 0:
            raise ValueError(f"embedder.luma_floor: must be > 0, got {luma_floor}")
        if inset < 0:
            raise ValueError(f"embedder.inset: must be >= 0, got {inset}")
        if whiten < 0 or global_weight < 0:
            raise ValueError(f"embedder.whiten, embedder.global_weight: must be >= 0, got {whiten}, {global_weight}")
        if clip is not None and clip <= 0:
            raise ValueError(f"embedder.clip: must be > 0 or null, got {clip}")
        self.side, self.keep, self.chroma_keep = int(side), int(keep), int(chroma_keep)
        self.chroma_weight, self.chroma_weight_smooth = float(chroma_weight), float(chroma_weight_smooth)
        self.smooth_from, self.inset, self.luma_floor = float(smooth_from), int(inset), float(luma_floor)
        self.clip = None if clip is None else float(clip)
        self.trim_tol = float(trim_tol)
        self.whiten = float(whiten)
        self.global_weight = float(global_weight)
        self.threshold = threshold
        self._dct = dct_matrix(self.side).astype(np.float32)
        self._luma_index = _split(self.side, self.keep, drop_dc=True)
        self._chroma_index = _split(self.side, self.chroma_keep, drop_dc=False)
        self.dim = _dim(self._luma_index) + 2 * _dim(self._chroma_index) + 2
        v, u = np.mgrid[0 : self.side, 0 : self.side]
        self._gain = ((1.0 + np.sqrt(u**2 + v**2)) ** self.whiten).astype(np.float32)
        self.name = f"robust{self.side}-{self.keep}-{self.chroma_keep}-w{self.whiten:g}"

    def embed_one(self, image: Image.Image) -> np.ndarray:
        """The embedding of one image: float32 ``(dim,)``, unit norm."""
        image = image.convert("RGB")
        scale = _WORK_SIDE / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX, reducing_gap=2.0
            )
        top, bottom, left, right = trim_borders(np.asarray(image, dtype=np.float32) / 255.0, self.trim_tol)
        # A trimmed side loses ``inset`` more pixels: the line where a bar met the picture is a
        # blend of both (and JPEG rings there), which on a low-contrast picture outweighs it.
        top, left = top + (self.inset if top > 0 else 0), left + (self.inset if left > 0 else 0)
        bottom -= self.inset if bottom < image.height else 0
        right -= self.inset if right < image.width else 0
        if bottom - top < 2 or right - left < 2:  # nothing left: keep the whole image
            top, bottom, left, right = 0, image.height, 0, image.width
        small = image.crop((left, top, right, bottom)).resize((self.side, self.side), Image.Resampling.BOX)
        rgb = np.asarray(small, dtype=np.float32) / 255.0
        luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        cb = (rgb[..., 2] - luma) * 0.564
        cr = (rgb[..., 0] - luma) * 0.713
        smooth = self._smoothness(luma)
        coefficients, contrast = self._luma(luma)
        luma_part = self._describe(coefficients, self._luma_index)
        chroma = [self._describe(self._coefficients(c), self._chroma_index) for c in (cb, cr)]
        chroma_part = np.concatenate(chroma)
        norm_l, norm_c = np.linalg.norm(luma_part), np.linalg.norm(chroma_part)
        # Colour is a small share of the squared norm for a picture with structure (a grey copy,
        # which has none, keeps sqrt(1 - 0.05) = 0.975 of its similarity), a larger one for a
        # smooth picture, whose normalised structure says little (two gradients of one direction
        # have the same). Smoothness comes from the luminance alone, so a grey copy gets the same.
        weight = self.chroma_weight + (self.chroma_weight_smooth - self.chroma_weight) * smooth
        # Mean luminance and contrast, only for smooth pictures too: for the others they mostly
        # measure brightness/contrast edits.
        stats = np.array([luma.mean() - 0.5, luma.std()], np.float32) * (self.global_weight * smooth)
        # Below a luminance contrast of luma_floor the structure is mostly JPEG noise, or text over
        # a flat picture (an iso-luminant gradient: its colours differ, its luminance does not): it
        # fades, quadratically so that noise is soon a negligible share of the norm.
        fade = min(1.0, contrast / self.luma_floor) ** 2
        vector = np.concatenate([np.sqrt(1 - weight) * fade * luma_part / max(norm_l, 1e-6),
                                 np.sqrt(weight) * chroma_part / max(norm_c, 0.05), stats])  # fmt: skip
        norm = np.linalg.norm(vector)
        if norm < 1e-9:
            vector = np.zeros(self.dim, np.float32)
            vector[0] = 1.0
            return vector
        return (vector / norm).astype(np.float32)

    def _smoothness(self, luma: np.ndarray) -> float:
        """How much ``luma`` (``(side, side)``) is one smooth ramp, in [0, 1]: the share of its AC
        energy in the three lowest frequencies, mapped from [smooth_from, 1] to [0, 1]
        (a linear gradient about 1; photographs, drawings, posters mostly 0)."""
        energy = self._coefficients(luma - luma.mean()) ** 2
        share = (energy[0, 1] + energy[1, 0] + energy[1, 1]) / max(float(energy.sum()), 1e-12)
        return float(np.clip((share - self.smooth_from) / (1 - self.smooth_from), 0.0, 1.0))

    def _coefficients(self, channel: np.ndarray) -> np.ndarray:
        return self._dct @ channel @ self._dct.T

    def _luma(self, luma: np.ndarray) -> tuple[np.ndarray, float]:
        """Whitened DCT coefficients ``(side, side)`` of the luminance less its mean, clipped at
        ``clip`` robust standard deviations (text, rotation corners: a few pixels far from the
        rest), and that clipped residual's standard deviation (the picture's contrast, values in
        [0, 0.5]). Its contrast is normalised later, with the coefficients kept."""
        residual = luma - luma.mean()
        if self.clip is not None:
            scale = 1.4826 * np.median(np.abs(residual)) + 1e-3
            residual = np.clip(residual, -self.clip * scale, self.clip * scale)
        return self._coefficients(residual) * self._gain, float(residual.std())

    @staticmethod
    def _describe(coefficients: np.ndarray, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Mirror-invariant description of DCT ``coefficients``: those even in the horizontal
        frequency as they are; the odd ones (which a mirror negates) as their outer product."""
        even, odd = coefficients.ravel()[index[0]], coefficients.ravel()[index[1]]
        n = np.linalg.norm(odd)
        outer = np.outer(odd, odd)[np.triu_indices(len(odd))]
        outer = outer * _TRIU_WEIGHTS.setdefault(len(odd), _triu_weights(len(odd)))
        return np.concatenate([even, outer / max(n, 1e-9)])


_TRIU_WEIGHTS: dict[int, np.ndarray] = {}


def _triu_weights(n: int) -> np.ndarray:
    """sqrt(2) off the diagonal: the upper triangle of ``a a^T`` then has the norm of the whole."""
    r, c = np.triu_indices(n)
    return np.where(r == c, 1.0, np.sqrt(2.0)).astype(np.float32)


def _split(side: int, keep: int, drop_dc: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into a ``side x side`` coefficient array of the ``(v, u)`` with ``v, u < keep``:
    ``(even u, odd u)``, the DC term ``(0, 0)`` left out when ``drop_dc``."""
    v, u = np.mgrid[0:keep, 0:keep]
    v, u = v.ravel(), u.ravel()
    flat = v * side + u
    even = (u % 2 == 0) & ~(drop_dc & (u == 0) & (v == 0))
    return flat[even], flat[u % 2 == 1]


def _dim(index: tuple[np.ndarray, np.ndarray]) -> int:
    n_odd = len(index[1])
    return len(index[0]) + n_odd * (n_odd + 1) // 2
