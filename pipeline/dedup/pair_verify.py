"""The pair verifier: decides from both images whether a candidate pair is one picture.

The embedder's search proposes candidate pairs at a loose threshold (for recall); each
candidate is then decided here, from the two images, undoing what copies on the web go
through and comparing what is left:

1. :func:`prepare`, per image: reduced to at most 128 px a side, pure black or white bars
   cut from every side (letterboxes, img2dataset's white padding; the embedder's
   :func:`~pipeline.embedders.robust.picture_box`), each axis's two sides by the lesser of
   their runs (bars are centred; the rest is the picture's own light or dark ground) and 2 px
   more past each cut, resized to
   ``side x side``, split into luminance and chroma (Cb, Cr). The aspect ratio (width over
   height) of what is left is kept apart: a crop of up to 8% a side or a bar cut with some of
   a light ground changes it by up to about 1.3, and the comparison is of the squares.
2. :func:`compare`, per pair, for the second image as it is and mirrored: its luminance is
   aligned onto the first's (:func:`_alignments`: OpenCV's ECC maximisation,
   :func:`cv2.findTransformECC`, of an affine warp from the identity, at full and half
   resolution, and from the phase correlation's shift, :func:`cv2.phaseCorrelate`; the
   unrefined starts too), a warp refused unless it is a plausible edit (rotation up to
   ``max_rotation`` degrees, each axis scaled within ``max_scale``, shifted by at most
   ``max_shift`` of the side); then, over the pixels both images cover:

   * structure: the correlation of the two luminances after a high-pass (a Gaussian blur of
     ``side / 16`` px subtracted), so that a smooth ramp that any ramp resembles counts for
     nothing, and brightness, contrast and greyscale changes cancel;
   * tone: the correlation of the two low-passed luminances, for pictures with little detail;
   * change: the share of the overlap where the luminances, one fitted to the other by a gain
     and an offset, still differ by more than ``change_level`` (a title, a block of another
     colour: what a global correlation averages away);
   * levels: the ratios of the two mean luminances and of the two contrasts (brightness and
     contrast edits change them by at most about 1.3 each);
   * colour, where both images have colour (a mean chroma of at least ``colour_floor``): the
     chroma of one fitted to the other's by one gain (brightness and contrast scale chroma),
     and the residual's share of the first's chroma.

   :func:`decide`: the pair is one picture when its structure correlation reaches
   ``min_structure`` (``min_structure_toned`` with a tone correlation of ``min_tone``; with
   little detail, below ``detail_floor``: its tone correlation reaches ``min_tone``; with both
   luminances flat, below ``flat_floor``, or one nearly flat and both of one colour, neither counts), at
   most ``max_changed`` of it changed, its levels within ``max_brightness_ratio`` and
   ``max_contrast_ratio`` (contrasts compared where they stand above noise), their aspect
   ratios within ``max_aspect_ratio`` (two textures of one direction and frequency once
   squared, one drawn wide and one tall, are two pictures), and, with colour, its colour
   residual is at most ``max_colour``.

A wallpaper of a fine motif (a period of a few pixels at ``side``) loses its motif at ``side``,
and a crop's uneven scale leaves no start from which ECC finds the lattice. Where both images
are lattices (:func:`lattice_share`, at least ``min_lattice`` of the luminance's power in sharp
spectral peaks finer than 16 px at ``lattice_side``), a pair that does not match at ``side`` is
compared again at ``lattice_side`` (192 px, from a 256 px working copy), aligned by
:func:`lattice_alignments` (the linear part from the spectral peaks, the shift from the
cross-correlation, then ECC) and decided by the same rules.

A picture on a plain ground (a product shot, a logo or a drawing on white) loses to the bar
cut as much of its ground as reaches each side where the ground is white, and none of it
where a brightness or contrast edit has made it grey; how much reaches a side depends on each
copy's crop, padding, shadow and brightness too. Two copies' trimmed pictures may then
differ in shape and scale beyond any plausible warp. Where both images have a plain ground
and the trimmed pictures do not match, the pair is compared again on their ground views
(:func:`ground_view`: each picture's content, centred on its ground at its own scale, in a
square a few times its spread) by the same rules with ``min_structure_ground`` in place of
``min_structure``.

A match of a grey image with a picture of vivid colour, or of a grey image with little
detail, is :func:`ambiguous`: without colour, a grey copy of one gradient matches every gradient whose
luminance runs alike, and a grey copy of a sinusoidal stripe texture every stripe texture of a
similar direction and frequency. The stage keeps such a match only where it is the grey
image's best (:func:`ambiguity_score`; :func:`pipeline.dedup.verification.best_for_grey`):
a grey copy is a copy of one picture.

Everything here is a pure function of two images: no files, no configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from pipeline.embedders.robust import picture, sharp_peaks

_WARP_FLAGS = 1 | 16  # cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP: the warp maps the template's pixels
_INSET = 2  # pixels cut past a border: where a bar met the picture is a blend of both
_BAR_TOL, _BAR_EXTREME = 0.03, 0.04  # a bar's pixels within 0.03 of its colour, itself within 0.04 of black or white
# The ground view (:func:`ground_view`): a picture has a plain ground where _GROUND_SHARE of its
# outer two pixels on every side lie within _GROUND_TOL of their median colour (a shadow or a
# watermark may reach an edge).
_GROUND_TOL, _GROUND_SHARE = 0.08, 0.75
_GROUND_NOISE = 0.04  # a luminance this close to the ground's is ground (JPEG noise, a faint shadow's rim)
_GROUND_SPAN = 2.0  # the ground view's half side, in radii of gyration of the content (a disc's fits with room)
_GROUND_WORK_SIDE = 256  # pixels a side of the working copy the ground view is cut from


@dataclass(frozen=True)
class VerifySettings:
    """How the verifier decides a pair (see the module doc).

    Attributes:
        side: pixels of the square both images are compared at, >= 32.
        min_structure: high-pass luminance correlation in [-1, 1] a copy reaches.
        min_structure_toned: the structure correlation in [-1, 1] enough where the tone
            correlation reaches ``min_tone`` and the detail stays below ``toned_detail``
            (standard deviation, in [0, 1] units).
        min_tone: low-pass luminance correlation in [-1, 1] a copy of a picture with little detail reaches.
        detail_floor: standard deviation of the high-passed luminance (in [0, 1] units) below
            which a picture has little detail.
        faint_floor: such a standard deviation, below ``detail_floor``, from which a picture
            with little detail still has a faint texture of its own (JPEG noise stays below):
            its tone correlation must then reach ``min_tone_faint``, or its structure
            correlation ``min_structure_toned``.
        min_tone_faint: tone correlation in [-1, 1] enough alone where the detail is faint.
        flat_floor: standard deviation of the low-passed luminance (in [0, 1] units) below
            which a picture's luminance is flat.
        near_flat_floor: the standard deviation below which a picture's luminance is nearly
            flat: where one of two pictures without detail is, colour alone decides, within
            ``near_flat_colour`` (colour residual in [0, 1]).
        max_colour: colour residual in [0, 1] (share of the chroma not explained) a copy stays within.
        colour_floor: mean chroma magnitude (in [0, 1] units) above which an image has colour.
        vivid_chroma: mean chroma magnitude (in [0, 1] units) from which an image's colour tells
            it from pictures of a like luminance: a grey image's match with it is :func:`ambiguous`.
        max_brightness_ratio, max_contrast_ratio: the larger of the two images' mean luminances
            (contrasts) over the smaller stays within this, >= 1.
        min_local_structure: where neither image's colour is vivid (``vivid_chroma``) and the
            pair has detail, the 25th percentile in [-1, 1] of the structure correlations over a
            4 x 4 grid of tiles (those with detail) reaches this: charts of one layout correlate
            on their shared axes and grid, not in the tiles their lines cross.
        max_aspect_ratio: the larger of the two trimmed pictures' aspect ratios (width over
            height) over the smaller stays within this, >= 1.
        ground_view: whether a picture on a plain ground (of any one colour) is also
            compared with its content centred on that ground (:func:`ground_view`) where the
            trimmed pictures do not match.
        min_structure_ground: the structure correlation in [-1, 1] a match of two ground views
            reaches, in place of ``min_structure`` (a second look at a pair is held to more).
        max_texture_ratio: the larger of the two images' median high-pass magnitudes over the
            smaller stays within this, >= 1, where the larger reaches ``texture_floor`` (in
            [0, 1] units) and the structure correlation stays below ``texture_structure``.
        texture_structure: the structure correlation in [-1, 1] from which the texture ratio
            refuses nothing: detail that agrees this well is one picture's, and what one copy
            adds everywhere is grain (a rotation's resampling, JPEG noise on a flat ground).
        change_level: a luminance difference (in [0, 1] units, after a gain and an offset)
            that counts as a change.
        max_changed: share of the overlap in [0, 1] a copy may change (a watermark, JPEG rings).
        max_rotation: degrees of rotation an alignment may apply, >= 0.
        max_scale: each axis may be scaled by a factor within [1 / max_scale, max_scale], >= 1.
        max_shift: share of the side an alignment may shift by, in [0, 1].
        lattice_side: pixels of the square a lattice (a wallpaper: :func:`lattice_alignments`)
            is compared at too, from a working copy of 4/3 that: at ``side`` its fine motif is
            lost; 0 for none.
        min_lattice: the share of the luminance's power in [0, 1] in sharp spectral peaks
            finer than 16 px at ``lattice_side`` (:func:`lattice_share`) from which an image
            counts as a lattice.
    """

    side: int = 96
    min_structure: float = 0.55
    min_structure_toned: float = 0.3
    toned_detail: float = 0.025
    min_tone: float = 0.95
    detail_floor: float = 0.01
    faint_floor: float = 0.007
    min_tone_faint: float = 0.98
    max_colour: float = 0.4
    colour_floor: float = 0.02
    vivid_chroma: float = 0.04
    flat_floor: float = 0.01
    near_flat_floor: float = 0.03
    near_flat_colour: float = 0.2
    max_brightness_ratio: float = 1.6
    max_contrast_ratio: float = 2.6
    max_texture_ratio: float = 3.0
    texture_structure: float = 0.75
    max_aspect_ratio: float = 2.0
    min_local_structure: float = 0.3
    texture_floor: float = 0.005
    change_level: float = 0.12
    max_changed: float = 0.08
    max_rotation: float = 8.0
    max_scale: float = 1.35
    max_shift: float = 0.2
    lattice_side: int = 192
    min_lattice: float = 0.2
    ground_view: bool = True
    min_structure_ground: float = 0.7

    def __post_init__(self):
        if self.side < 32:
            raise ValueError(f"verify.side: must be >= 32 pixels, got {self.side}")
        if self.lattice_side and self.lattice_side < self.side:
            raise ValueError(f"verify.lattice_side: must be 0 (off) or >= side ({self.side}), got {self.lattice_side}")
        for name in (
            "min_structure",
            "min_structure_toned",
            "min_tone",
            "min_tone_faint",
            "min_local_structure",
            "min_structure_ground",
            "texture_structure",
        ):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"verify.{name}: must be a correlation in [-1, 1], got {getattr(self, name)}")
        for name in (
            "max_colour",
            "max_shift",
            "detail_floor",
            "faint_floor",
            "colour_floor",
            "vivid_chroma",
            "flat_floor",
            "near_flat_floor",
            "near_flat_colour",
            "toned_detail",
            "texture_floor",
            "change_level",
            "max_changed",
            "min_lattice",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"verify.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.max_rotation < 0:
            raise ValueError(f"verify.max_rotation: must be >= 0 degrees, got {self.max_rotation}")
        for name in ("max_scale", "max_brightness_ratio", "max_contrast_ratio", "max_texture_ratio", "max_aspect_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"verify.{name}: must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """One image made ready for :func:`compare`: float32 ``(side, side)`` luminance and its
    high-pass and low-pass parts, float32 ``(side, side, 2)`` chroma, whether it has colour,
    its mean chroma magnitude ``chroma_level`` (in [0, 1] units), the trimmed picture's
    ``aspect`` (width over height, > 0) before it was squared, for a lattice (``min_lattice``)
    the same at ``lattice_side`` (else None), and for a picture on a plain ground its
    :func:`ground_view` (else None; its ``aspect`` is its content's spread across over its
    spread down)."""

    luma: np.ndarray
    detail: np.ndarray
    tone: np.ndarray
    chroma: np.ndarray
    coloured: bool
    chroma_level: float = 0.0
    aspect: float = 1.0
    lattice: Prepared | None = None
    ground: Prepared | None = None


@dataclass
class Verdict:
    """What :func:`compare` found: ``match``, and the best alignment's scores (``structure``,
    ``tone``: correlations in [-1, 1]; ``colour``: residual share in [0, inf), NaN when either
    image is grey; ``detail``: the lesser standard deviation of the two high-passed
    luminances; ``changed``: the share of the overlap whose luminance differs by more than
    ``change_level`` after one gain and offset; ``contrast``: the lesser standard deviation of
    the two low-passed luminances; ``contrast_ratio``, ``brightness_ratio``, ``texture_ratio``
    (the median magnitudes of the high-passed luminances): the larger over the smaller of the
    two, >= 1; ``texture``: the larger median magnitude; ``aspect_ratio``: the larger of the
    two trimmed pictures' aspect ratios over the smaller, >= 1; ``chroma``: the larger of the
    two images' mean chroma magnitudes; ``local_structure``: the 25th percentile of the
    structure correlations over a 4 x 4 grid of tiles with detail, NaN without such a tile),
    which image is ``grey`` (first,
    second), whether the second image was ``mirrored``, the warp's ``rotation`` (degrees)
    and ``scale`` (per axis), and the ``view`` compared: ``"trimmed"`` (the pictures, bars
    cut), ``"lattice"`` (the same at ``lattice_side``) or ``"ground"`` (:func:`ground_view`)."""

    match: bool
    structure: float = float("nan")
    tone: float = float("nan")
    colour: float = float("nan")
    detail: float = float("nan")
    changed: float = float("nan")
    contrast: float = float("nan")
    contrast_ratio: float = float("nan")
    brightness_ratio: float = float("nan")
    texture: float = float("nan")
    texture_ratio: float = float("nan")
    aspect_ratio: float = float("nan")
    chroma: float = float("nan")
    local_structure: float = float("nan")
    grey: tuple[bool, bool] = (False, False)
    mirrored: bool = False
    rotation: float = float("nan")
    scale: tuple[float, float] = (float("nan"), float("nan"))
    view: str = "trimmed"


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(array, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def prepare(image: Image.Image, settings: VerifySettings = VerifySettings()) -> Prepared:
    """``image`` trimmed of black or white bars, resized to ``settings.side`` square and split
    into luminance (its detail and tone) and chroma (see the module doc); a lattice is also
    prepared at ``settings.lattice_side``, and a picture on a plain ground as its
    :func:`ground_view` (with ``settings.ground_view``)."""
    # Bars are pure black or white (padding, letterboxes); a light or dark ground is the picture's.
    prepared = _split(picture(image, _BAR_TOL, _BAR_EXTREME, _INSET), settings.side, settings)
    large: dict[int, Image.Image] = {}  # working copies by side, cut of their bars

    def working(side: int) -> Image.Image:
        if side not in large:
            large[side] = picture(image, _BAR_TOL, _BAR_EXTREME, _INSET * side // 128, work_side=side)
        return large[side]

    if settings.lattice_side:
        fine = working(round(settings.lattice_side * 4 / 3)).resize(
            (settings.lattice_side, settings.lattice_side), Image.Resampling.BICUBIC
        )
        # Only a lattice is split further (its detail, tone and chroma): most images are none.
        if lattice_share(_luminance(np.asarray(fine, dtype=np.float32) / 255.0)) >= settings.min_lattice:
            prepared.lattice = _split(fine, settings.lattice_side, settings)
    if settings.ground_view:
        prepared.ground = ground_view(working(_GROUND_WORK_SIDE), settings)
    return prepared


def ground_view(trimmed: Image.Image, settings: VerifySettings = VerifySettings()) -> Prepared | None:
    """``trimmed`` (a picture, bars cut) re-framed on its plain ground, or None where it has none.

    A product shot, a logo or a drawing on white: how much of its ground the bar cut takes
    depends on each copy's crop, padding, shadow and brightness (a ground a brightness or
    contrast edit made grey is no bar, and none of it goes), so two copies' trimmed pictures
    may differ in shape and scale beyond any plausible warp. A picture has a plain ground when
    the outer two pixels of every side mostly (``_GROUND_SHARE``) lie within ``_GROUND_TOL`` of
    one colour, their median; its content is where the blurred luminance departs
    from the ground's by more than ``_GROUND_NOISE``, weighted by how far. The view is a square
    of the ground's colour centred on the content's centre of mass, ``_GROUND_SPAN`` radii of
    gyration to each side, holding ``trimmed`` at its own scale: it is the same for any amount
    of ground around the content, and keeps the content's shape (no axis is stretched). Its
    ``aspect`` is the content's spread across over its spread down. None, too, for a picture
    whose content is empty or spreads over less than a pixel.
    """
    trimmed = trimmed.convert("RGB")
    rgb = np.asarray(trimmed, dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    if h < 8 or w < 8:
        return None
    ring = np.concatenate(
        [rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[2:-2, :2].reshape(-1, 3), rgb[2:-2, -2:].reshape(-1, 3)]
    )
    ground = np.median(ring, axis=0)
    if (np.abs(ring - ground).max(axis=1) <= _GROUND_TOL).mean() < _GROUND_SHARE:
        return None
    departure = np.abs(_blur(_luminance(rgb), 1.0) - float(_luminance(ground[None])[0]))
    weight = np.where(departure > _GROUND_NOISE, departure, 0.0)
    total = float(weight.sum())
    if total <= 0:
        return None
    ys, xs = np.mgrid[:h, :w]
    cy, cx = float((weight * ys).sum() / total), float((weight * xs).sum() / total)
    spread_y = math.sqrt(float((weight * (ys - cy) ** 2).sum() / total))
    spread_x = math.sqrt(float((weight * (xs - cx) ** 2).sum() / total))
    half = _GROUND_SPAN * math.hypot(spread_x, spread_y)
    if half < 2:
        return None
    size = int(round(2 * half))
    canvas = Image.new("RGB", (size, size), tuple(int(round(float(c) * 255)) for c in ground))
    canvas.paste(trimmed, (int(round(half - cx)), int(round(half - cy))))
    view = _split(canvas, settings.side, settings)
    view.aspect = spread_x / max(spread_y, 1e-6)
    return view


def _centred_power(image: np.ndarray) -> np.ndarray:
    """The power spectrum of ``image`` (float ``(n, n)``) less its mean, Hann-windowed, with
    the zero frequency at ``(n // 2, n // 2)``: float64 ``(n, n)``."""
    n = image.shape[0]
    window = np.outer(np.hanning(n), np.hanning(n))
    return np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))) ** 2


def _fine_peaks(power: np.ndarray) -> np.ndarray:
    """Bool ``(n, n)``: the sharp peaks (:func:`~pipeline.embedders.robust.sharp_peaks`) of a
    centred power spectrum (:func:`_centred_power`) at ``n / 16`` cycles per side or more (a
    period of at most 16 px at ``n``, 8 px at half of it: a motif the comparison at ``side``
    loses; stripes of a few periods it keeps)."""
    n = power.shape[0]
    fy, fx = np.mgrid[:n, :n] - n // 2
    return sharp_peaks(power) & (fx**2 + fy**2 >= (n / 16) ** 2)


def lattice_share(luma: np.ndarray) -> float:
    """The share of the power (the mean aside) of ``luma`` (float32 ``(n, n)``, Hann-windowed)
    in its fine sharp spectral peaks (:func:`_fine_peaks`), in [0, 1]: most of a fine
    wallpaper's, next to none of a photograph's or of stripes of a few periods."""
    power = _centred_power(luma)
    total = float(power.sum())
    if total < 1e-12:
        return 0.0
    return float(power[_fine_peaks(power)].sum() / total)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """float32 ``(h, w)`` luminance (BT.601) of float32 ``(h, w, 3)`` RGB in [0, 1]."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _split(trimmed: Image.Image, side: int, settings: VerifySettings) -> Prepared:
    """``trimmed`` resized to ``side`` square, as luminance (detail and tone) and chroma."""
    small = trimmed.resize((side, side), Image.Resampling.BICUBIC)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    luma = _luminance(rgb)
    chroma = np.stack([(rgb[..., 2] - luma) * 0.564, (rgb[..., 0] - luma) * 0.713], axis=-1).astype(np.float32)
    tone = _blur(luma, side / 16)
    level = float(np.sqrt((chroma**2).sum(axis=-1)).mean())
    aspect = trimmed.width / trimmed.height
    return Prepared(
        luma=luma,
        detail=luma - tone,
        tone=tone,
        chroma=chroma,
        coloured=level >= settings.colour_floor,
        chroma_level=level,
        aspect=aspect,
    )


def _correlation(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> float:
    """Weighted Pearson correlation of ``x`` and ``y`` (same shape), 0 when either is flat."""
    total = weight.sum()
    if total <= 0:
        return 0.0
    mx, my = (x * weight).sum() / total, (y * weight).sum() / total
    dx, dy = x - mx, y - my
    sxy = (weight * dx * dy).sum()
    sxx, syy = (weight * dx * dx).sum(), (weight * dy * dy).sum()
    if sxx <= 1e-12 or syy <= 1e-12:
        return 0.0
    return float(sxy / math.sqrt(sxx * syy))


def _local_structure(x: np.ndarray, y: np.ndarray, weight: np.ndarray, floor: float, grid: int = 4) -> float:
    """The 25th percentile of the structure correlations of ``x`` and ``y`` (float ``(side,
    side)`` high-passed luminances) over a ``grid x grid`` of tiles, counting the tiles that
    ``weight`` covers at least half of and where either standard deviation reaches ``floor``;
    NaN when none does. A copy correlates in most of its tiles (a watermark or a title takes a
    few); a picture of the same layout only in those its shared axes or frame cross."""
    t = x.shape[0] // grid
    n = t * grid

    def tiles(a: np.ndarray) -> np.ndarray:  # (grid * grid, t * t)
        return a[:n, :n].reshape(grid, t, grid, t).transpose(0, 2, 1, 3).reshape(grid * grid, t * t)

    xs, ys, ws = tiles(x), tiles(y), tiles(weight)
    total = ws.sum(axis=1)
    covered = total >= 0.5 * t * t
    total = np.maximum(total, 1e-12)[:, None]
    dx = xs - (xs * ws).sum(axis=1, keepdims=True) / total
    dy = ys - (ys * ws).sum(axis=1, keepdims=True) / total
    sxx, syy, sxy = (ws * dx * dx).sum(axis=1), (ws * dy * dy).sum(axis=1), (ws * dx * dy).sum(axis=1)
    detailed = np.maximum(sxx, syy) / total[:, 0] >= floor**2
    kept = covered & detailed
    if not kept.any():
        return float("nan")
    correlations = np.where((sxx > 1e-12) & (syy > 1e-12), sxy / np.sqrt(np.maximum(sxx * syy, 1e-24)), 0.0)
    return float(np.percentile(correlations[kept], 25))


def _warp_shape(warp: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Rotation (degrees) and per-axis scales of a 2 x 3 affine warp's linear part."""
    a, b, c, d = float(warp[0, 0]), float(warp[0, 1]), float(warp[1, 0]), float(warp[1, 1])
    return math.degrees(math.atan2(c - b, a + d)), (math.hypot(a, c), math.hypot(b, d))


def _plausible(warp: np.ndarray, settings: VerifySettings) -> bool:
    """Whether ``warp`` is an edit a copy goes through: small rotation, scale and shift (of the centre)."""
    rotation, (sx, sy) = _warp_shape(warp)
    limit = settings.max_scale
    shift = np.abs(warp[:, 2] - (np.eye(2) - warp[:, :2]) @ np.full(2, (settings.side - 1) / 2)).max()
    return (
        abs(rotation) <= settings.max_rotation
        and 1 / limit <= sx <= limit
        and 1 / limit <= sy <= limit
        and shift <= settings.max_shift * settings.side
    )


def _ecc(template: np.ndarray, moving: np.ndarray, warp: np.ndarray, motion: int) -> tuple[np.ndarray, float] | None:
    """One ECC maximisation from ``warp``; None when it does not converge."""
    import cv2

    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
    try:
        score, found = cv2.findTransformECC(template, moving, warp.astype(np.float32).copy(), motion, criteria, None, 3)
    except cv2.error:
        return None
    return (found, float(score)) if np.isfinite(found).all() else None


def _to_full(warp: np.ndarray) -> np.ndarray:
    """A warp found at half resolution, for full resolution (pixel centres: ``x_full = 2 x_half + 0.5``)."""
    full = warp.astype(np.float64).copy()
    full[:, 2] = 2 * warp[:, 2] + 0.5 - warp[:, :2] @ np.full(2, 0.5)
    return full.astype(np.float32)


def _alignments(template: np.ndarray, moving: np.ndarray, settings: VerifySettings) -> Iterator[np.ndarray]:
    """Plausible warps (2 x 3, float32, ECC's convention: template pixel -> moving pixel) that
    may align ``moving`` onto ``template`` (both float32 square): the identity and the phase
    correlation's shift, each refined to an affine warp by ECC and as it is, and the identity
    refined at half resolution first. The unrefined starts are kept: on a texture with
    structure in one direction only (stripes) the affine warp is ill-posed and may wander along
    the stripes. Lazily: the likeliest first."""
    import cv2

    identity = np.eye(2, 3, dtype=np.float32)
    refined = _ecc(template, moving, identity, cv2.MOTION_AFFINE)
    if refined is not None and _plausible(refined[0], settings):
        yield refined[0]
    # Coarse to fine: at half resolution the basin of convergence is twice as wide.
    half = template.shape[0] // 2
    coarse = _ecc(
        cv2.resize(template, (half, half), interpolation=cv2.INTER_AREA),
        cv2.resize(moving, (half, half), interpolation=cv2.INTER_AREA),
        identity,
        cv2.MOTION_AFFINE,
    )
    if coarse is not None:
        refined = _ecc(template, moving, _to_full(coarse[0]), cv2.MOTION_AFFINE)
        if refined is not None and _plausible(refined[0], settings):
            yield refined[0]
    side = template.shape[0]
    window = cv2.createHanningWindow((side, side), cv2.CV_64F)
    (dx, dy), _ = cv2.phaseCorrelate(template.astype(np.float64), moving.astype(np.float64), window)
    shifted = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    refined = _ecc(template, moving, shifted, cv2.MOTION_AFFINE)
    for warp in (None if refined is None else refined[0], shifted, identity):
        if warp is not None and _plausible(warp, settings):
            yield warp
    # Rotation and scale from the magnitude spectra (Fourier-Mellin): for periodic pictures
    # (stripes), where a scaled copy's pattern drifts by whole periods and ECC settles on the
    # wrong one.
    rotated = _spectral_warp(template, moving, window)
    if rotated is None:
        return
    refined = _ecc(template, moving, rotated, cv2.MOTION_AFFINE)
    for warp in (None if refined is None else refined[0], rotated):
        if warp is not None and _plausible(warp, settings):
            yield warp


def _spectral_warp(template: np.ndarray, moving: np.ndarray, window: np.ndarray) -> np.ndarray | None:
    """The rotation and scale about the centre that the log-polar magnitude spectra's phase
    correlation finds (a spectrum is blind to shifts), then the shift the images' own phase
    correlation finds once that is undone: a 2 x 3 float32 warp, ECC's convention; None when
    the spectra give no estimate within a factor of 2 in scale."""
    import cv2

    side = template.shape[0]

    def log_polar_spectrum(image: np.ndarray) -> np.ndarray:
        spectrum = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))))
        flags = cv2.WARP_POLAR_LOG | cv2.INTER_LINEAR | cv2.WARP_FILL_OUTLIERS
        return cv2.warpPolar(spectrum, (side, side), (side / 2, side / 2), side / 2, flags)

    (dx, dy), _ = cv2.phaseCorrelate(log_polar_spectrum(template), log_polar_spectrum(moving))
    log_scale = -dx * math.log(side / 2) / side  # columns are log radii; a spectrum scales inversely
    if not (math.isfinite(dy) and abs(log_scale) <= math.log(2.0)):  # a flat spectrum: no estimate
        return None
    angle = (-dy * 360.0 / side + 90.0) % 180.0 - 90.0  # rows are angles; a spectrum repeats every 180 degrees
    scale = math.exp(log_scale)
    warp = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, scale)
    aligned = cv2.warpAffine(moving, warp.astype(np.float32), (side, side), flags=_WARP_FLAGS, borderMode=cv2.BORDER_REFLECT)
    (sx, sy), _ = cv2.phaseCorrelate(template.astype(np.float64), aligned.astype(np.float64), window)
    warp[:, 2] += warp[:, :2] @ np.array([sx, sy])
    return warp.astype(np.float32)


def _inner(side: int) -> np.ndarray:
    """float32 ``(side, side)``: 1 inside a margin of ``max(2, side // 24)`` px, where a warped image's edge does not reach."""
    inner = np.zeros((side, side), np.float32)
    margin = max(2, side // 24)
    inner[margin:-margin, margin:-margin] = 1.0
    return inner


def lattice_peaks(power: np.ndarray, count: int = 10) -> np.ndarray:
    """The ``count`` strongest fine sharp peaks (:func:`_fine_peaks`) of a centred power
    spectrum (float ``(n, n)``, :func:`_centred_power`), one of each symmetric pair: float64
    ``(m, 2)`` frequencies ``(fx, fy)`` in cycles per side (refined between bins by a parabola
    of the magnitude), strongest first; ``m <= count``."""
    n = power.shape[0]
    magnitude = np.sqrt(power)
    fy, fx = np.mgrid[:n, :n] - n // 2
    keep = _fine_peaks(power) & ((fy > 0) | ((fy == 0) & (fx > 0)))
    rows, cols = np.nonzero(keep)
    order = np.argsort(-magnitude[rows, cols])[:count]

    def vertex(low: float, mid: float, high: float) -> float:
        curve = low - 2 * mid + high
        return 0.5 * (low - high) / curve if curve < 0 else 0.0

    peaks = []
    for r, c in zip(rows[order], cols[order]):
        dx = vertex(magnitude[r, c - 1], magnitude[r, c], magnitude[r, c + 1]) if 0 < c < n - 1 else 0.0
        dy = vertex(magnitude[r - 1, c], magnitude[r, c], magnitude[r + 1, c]) if 0 < r < n - 1 else 0.0
        peaks.append((c - n // 2 + dx, r - n // 2 + dy))
    return np.array(peaks, dtype=np.float64).reshape(-1, 2)


def lattice_alignments(
    template: np.ndarray, moving: np.ndarray, settings: VerifySettings, count: int = 2
) -> Iterator[np.ndarray]:
    """Plausible warps (2 x 3 float32, ECC's convention) aligning ``moving`` onto ``template``
    (high-passed float32 ``(side, side)``, ``settings.side``) where the template is a lattice:
    two or more sharp spectral peaks (:func:`lattice_peaks`) in different directions.

    The linear part is found on the spectra, which a shift leaves alone: where ``template(x) =
    moving(L x)``, a template peak ``p`` stands in the moving spectrum at ``L^-T p``. Each
    rotation (every degree up to ``max_rotation``) and per-axis scale (every 1% within
    ``max_scale``) is scored by the moving log-spectrum at the template's peaks so mapped, the
    best 8 refined on a finer grid, the best ``count`` kept. Each is shifted by the images'
    cross-correlation peak (a phase correlation whitens the spectrum, and on a lattice the
    noise between its harmonics then decides) and refined by ECC; both are yielded, the
    unrefined first. A lattice repeats: a shift by whole periods aligns it as well, and a
    crop's shift of a wallpaper is one."""
    import cv2
    from scipy.ndimage import map_coordinates

    side = template.shape[0]
    window = np.outer(np.hanning(side), np.hanning(side))
    template_fft = np.fft.fft2((template - template.mean()) * window)
    template_power = np.abs(np.fft.fftshift(template_fft)) ** 2
    peaks = lattice_peaks(template_power)
    if len(peaks) < 2:
        return
    unit = peaks / np.linalg.norm(peaks, axis=1, keepdims=True)
    if np.abs(unit[0, 0] * unit[1:, 1] - unit[0, 1] * unit[1:, 0]).max() < 0.3:  # stripes: one direction only
        return
    spectrum = _blur(np.log1p(np.sqrt(_centred_power(moving))).astype(np.float32), 0.7)
    template_spectrum = np.log1p(np.sqrt(template_power))
    weights = map_coordinates(template_spectrum, [peaks[:, 1] + side // 2, peaks[:, 0] + side // 2], order=1)

    def score(angles: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, x, y = (g.ravel() for g in np.meshgrid(np.radians(angles), sx, sy, indexing="ij"))
        cos, sin = np.cos(r), np.sin(r)
        linear = np.stack([np.stack([cos * x, -sin * y], -1), np.stack([sin * x, cos * y], -1)], -2)
        moved = np.einsum("nij,kj->nki", np.linalg.inv(np.transpose(linear, (0, 2, 1))), peaks)
        values = map_coordinates(spectrum, [moved[..., 1].ravel() + side // 2, moved[..., 0].ravel() + side // 2], order=1)
        return linear, values.reshape(moved.shape[:2]) @ weights

    limit = math.log(settings.max_scale)
    scales = np.exp(np.arange(-limit, limit + 1e-9, 0.01))
    linear, values = score(np.arange(-settings.max_rotation, settings.max_rotation + 1e-9, 1.0), scales, scales)
    refined = []
    for top in linear[np.argsort(-values)[:8]]:
        (rotation, (sx, sy)), fine = _warp_shape(np.hstack([top, np.zeros((2, 1))])), np.arange(-3, 4)
        found, found_values = score(rotation + 0.25 * fine, sx * np.exp(0.002 * fine), sy * np.exp(0.002 * fine))
        refined.append((float(found_values.max()), found[int(found_values.argmax())]))
    refined.sort(key=lambda pair: -pair[0])
    centre = np.full(2, (side - 1) / 2)
    for _, top in refined[:count]:
        warp = np.hstack([top, ((np.eye(2) - top) @ centre)[:, None]]).astype(np.float32)
        aligned = cv2.warpAffine(moving, warp, (side, side), flags=_WARP_FLAGS, borderMode=cv2.BORDER_REFLECT)
        correlation = np.real(np.fft.ifft2(np.fft.fft2((aligned - aligned.mean()) * window) * np.conj(template_fft)))
        r, c = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
        shift = np.array([(c + side // 2) % side - side // 2, (r + side // 2) % side - side // 2], np.float32)
        warp[:, 2] += warp[:, :2] @ shift
        if _plausible(warp, settings):
            yield warp
        ecc = _ecc(template, moving, warp, cv2.MOTION_AFFINE)
        if ecc is not None and _plausible(ecc[0], settings):
            yield ecc[0]


def measure(a: Prepared, b: Prepared, settings: VerifySettings = VerifySettings(), stop_at_match: bool = False) -> list[Verdict]:
    """The scores of ``b`` aligned onto ``a`` (from :func:`prepare` with the same ``settings``),
    as it is and mirrored: one :class:`Verdict` per orientation that aligned plausibly (0-2),
    each decided by ``settings`` (:func:`decide` decides them again under other thresholds);
    where none of them matches and both images have a :func:`ground_view`, those of the ground
    views follow (0-2 more, ``view="ground"``).
    ``stop_at_match``: return as soon as one orientation matches (what :func:`compare` needs)."""
    verdicts = _measure_views(a, b, settings, stop_at_match)
    if a.ground is not None and b.ground is not None and not any(v.match for v in verdicts):
        verdicts += _measure_views(a.ground, b.ground, settings, stop_at_match, view="ground")
    return verdicts


def _measure_views(
    a: Prepared, b: Prepared, settings: VerifySettings, stop_at_match: bool, view: str = "trimmed"
) -> list[Verdict]:
    """:func:`measure` of the two views ``a`` and ``b`` (and their lattices), called ``view``."""
    inner = _inner(settings.side)
    both = settings.lattice_side and a.lattice is not None and b.lattice is not None
    lattice = replace(settings, side=settings.lattice_side) if both else None
    lattice_inner = _inner(settings.lattice_side) if both else None
    verdicts = []
    for mirrored in (False, True):
        luma = b.luma[:, ::-1].copy() if mirrored else b.luma
        best: Verdict | None = None
        for warp in _alignments(a.luma, luma, settings):
            best = _better(best, _scores(a, b, warp, mirrored, inner, settings, view))
            if stop_at_match and best.match:
                break
        if lattice is not None and (best is None or not best.match):
            # A fine periodic motif: compared at lattice_side, aligned on its spectral peaks.
            fine_a, fine_b = a.lattice, b.lattice
            detail = fine_b.detail[:, ::-1].copy() if mirrored else fine_b.detail
            for warp in lattice_alignments(fine_a.detail, detail, lattice):
                best = _better(best, _scores(fine_a, fine_b, warp, mirrored, lattice_inner, lattice, "lattice"))
                if stop_at_match and best.match:
                    break
        if best is not None:
            verdicts.append(best)
            if stop_at_match and best.match:
                break
    return verdicts


def _rank(verdict: Verdict) -> tuple[bool, float]:
    """How verdicts of one pair compare: a match first, then the higher structure."""
    return verdict.match, verdict.structure


def _better(best: Verdict | None, verdict: Verdict) -> Verdict:
    """The better of ``best`` (None: none yet) and ``verdict`` by :func:`_rank` (``best`` on a tie)."""
    return verdict if best is None or _rank(verdict) > _rank(best) else best


def _scores(
    a: Prepared, b: Prepared, warp: np.ndarray, mirrored: bool, inner: np.ndarray, settings: VerifySettings, view: str
) -> Verdict:
    """The :class:`Verdict` of ``b`` (mirrored or not) warped onto ``a`` by ``warp``, ``view`` naming what they are."""
    side = settings.side

    def warped(array: np.ndarray) -> np.ndarray:
        import cv2

        array = array[:, ::-1].copy() if mirrored else array
        return cv2.warpAffine(array, warp, (side, side), flags=_WARP_FLAGS, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    valid = (warped(np.ones((side, side), np.float32)) * inner > 0.999).astype(np.float32)
    detail_b = warped(b.detail)
    colour = float("nan")
    if a.coloured and b.coloured:
        ca = a.chroma * valid[..., None]
        cb = np.stack([warped(b.chroma[..., c]) for c in range(2)], axis=-1) * valid[..., None]
        gain = float((ca * cb).sum() / max((cb * cb).sum(), 1e-12))
        gain = min(max(gain, 0.5), 2.0)
        colour = float(np.sqrt(((ca - gain * cb) ** 2).sum() / max((ca * ca).sum(), 1e-12)))
    # Where the luminances differ after one gain and offset fitted over the overlap: a local
    # change (a title, a block of another colour) that a global correlation averages away.
    luma_b = warped(b.luma)
    total = max(valid.sum(), 1.0)
    ma, mb = (a.luma * valid).sum() / total, (luma_b * valid).sum() / total
    cov = ((a.luma - ma) * (luma_b - mb) * valid).sum()
    gain = cov / max(((luma_b - mb) ** 2 * valid).sum(), 1e-12)
    residual = _blur((a.luma - ma - gain * (luma_b - mb)) * valid, 1.5)
    changed = float(((np.abs(residual) > settings.change_level) * valid).sum() / total)
    tone_b = warped(b.tone)
    std_a, std_b = _std(a.tone, valid), _std(tone_b, valid)
    texture_a, texture_b = _median_abs(a.detail, valid), _median_abs(detail_b, valid)
    rotation, scale = _warp_shape(warp)
    verdict = Verdict(
        match=False,
        structure=_correlation(a.detail, detail_b, valid),
        local_structure=_local_structure(a.detail, detail_b, valid, settings.detail_floor),
        tone=_correlation(a.tone, tone_b, valid),
        colour=colour,
        detail=min(_std(a.detail, valid), _std(detail_b, valid)),
        texture=max(texture_a, texture_b),
        texture_ratio=_ratio(texture_a, texture_b),
        changed=changed,
        contrast=min(std_a, std_b),
        contrast_ratio=_ratio(std_a, std_b),
        brightness_ratio=_ratio(float(ma), float(mb)),
        aspect_ratio=_ratio(a.aspect, b.aspect),
        chroma=max(a.chroma_level, b.chroma_level),
        grey=(not a.coloured, not b.coloured),
        mirrored=mirrored,
        rotation=rotation,
        scale=scale,
        view=view,
    )
    verdict.match = decide(verdict, settings)
    return verdict


def decide(verdict: Verdict, settings: VerifySettings) -> bool:
    """Whether ``verdict``'s scores make one picture under ``settings``' thresholds.

    Shape, by how much the two images hold:

    * detail in both (``detail_floor``): the structure correlation reaches ``min_structure``
      (``min_structure_ground`` where both are :func:`ground_view` images: a second look is held to more),
      or, with detail below ``toned_detail``, ``min_structure_toned`` where the tone
      correlation also reaches ``min_tone`` (near the floor, JPEG noise is a good part of the
      detail, and the tone still tells); where neither image's colour is vivid
      (``vivid_chroma``), the tiles' structure correlations' 25th percentile also reaches
      ``min_local_structure`` (charts of one layout share axes and a grid);
    * no detail, both luminances flat (``flat_floor``): nothing (colour and brightness decide);
    * one nearly flat (the smaller contrast below ``near_flat_floor``) and both in colour:
      nothing, where the colour residual is within ``near_flat_colour``. A nearly flat
      luminance's tone and contrast are set by what little else the picture holds (a saturated
      colour clipped by a brightness edit, what a bar cut leaves of a bar, a thin rule or a
      watermark across a gradient of one luminance); only colour can then tell;
    * otherwise the tone correlation reaches ``min_tone``, and the contrasts' ratio stays
      within ``max_contrast_ratio`` (a copy keeps its luminance contrast: greyscale keeps
      luminance). With detail, contrasts are compared only where both stand above
      ``flat_floor``: below it the low-passed luminance is noise or a texture's residue;
    * without detail but with a faint texture (``faint_floor``), moreover, the tone correlation
      reaches ``min_tone_faint`` or the structure correlation ``min_structure_toned``: the
      tiles of one smooth picture have tones that run alike, and textures that do not.

    In every case, the two trimmed pictures' aspect ratios are within ``max_aspect_ratio`` of
    each other (a copy keeps its picture's shape up to a crop), and where one image's typical detail (the median high-pass magnitude, which a
    watermark or a title over a small part leaves as it is) reaches ``texture_floor``, the
    other's is at least its ``1 / max_texture_ratio``: a smooth picture is no copy of a busy
    one (below the floor both are smooth, and the ratio of two noises says nothing). Where the
    structure correlation reaches ``texture_structure`` the ratio refuses nothing: a busy
    picture's detail does not correlate that well with a smooth one's, and a ratio beside it
    is grain one copy added (a badge rotated, a flat ground re-encoded).
    """
    if not math.isfinite(verdict.structure):
        return False
    larger_contrast = verdict.contrast * verdict.contrast_ratio if math.isfinite(verdict.contrast_ratio) else math.inf
    coloured = not math.isnan(verdict.colour)
    contrast_ok = verdict.contrast_ratio <= settings.max_contrast_ratio
    if verdict.detail >= settings.detail_floor:
        min_structure = settings.min_structure_ground if verdict.view == "ground" else settings.min_structure
        shape_ok = verdict.structure >= min_structure or (
            verdict.detail < settings.toned_detail
            and verdict.structure >= settings.min_structure_toned
            and verdict.tone >= settings.min_tone
        )
        contrast_ok = contrast_ok or verdict.contrast < settings.flat_floor
        if verdict.chroma < settings.vivid_chroma and verdict.local_structure < settings.min_local_structure:
            shape_ok = False  # no colour to tell: the detail must agree tile by tile, not only overall
    elif larger_contrast < settings.flat_floor or (
        verdict.contrast < settings.near_flat_floor and coloured and verdict.colour <= settings.near_flat_colour
    ):
        shape_ok, contrast_ok = True, True
    else:
        shape_ok = verdict.tone >= settings.min_tone
    if settings.faint_floor <= verdict.detail < settings.detail_floor:
        shape_ok = shape_ok and (verdict.tone >= settings.min_tone_faint or verdict.structure >= settings.min_structure_toned)
    colour_ok = not coloured or verdict.colour <= settings.max_colour
    return (
        shape_ok
        and contrast_ok
        and colour_ok
        and verdict.brightness_ratio <= settings.max_brightness_ratio
        and verdict.changed <= settings.max_changed
        and not verdict.aspect_ratio > settings.max_aspect_ratio  # NaN (unmeasured) refuses nothing
        and not (
            verdict.texture >= settings.texture_floor
            and verdict.texture_ratio > settings.max_texture_ratio
            and verdict.structure < settings.texture_structure
        )
    )


def ambiguous(verdict: Verdict, settings: VerifySettings) -> bool:
    """Whether a matching ``verdict`` leaves open which picture it is a copy of: exactly one
    image is grey and the other's colour is vivid (``vivid_chroma``: what would tell it from
    pictures of a like luminance, the grey image lacks), or one is grey and the pair has
    little detail (a smooth picture). A grey copy of a gradient matches every gradient whose
    luminance runs alike, and a grey copy of a stripe texture every stripe texture of a similar
    direction and frequency, so such a pair counts only when it is the grey image's best by
    :func:`ambiguity_score` (:func:`pipeline.dedup.verification.best_for_grey`)."""
    vivid = grey_and_vivid(verdict.grey, verdict.chroma, settings)
    return vivid or (any(verdict.grey) and verdict.detail < settings.detail_floor)


def grey_and_vivid(grey: tuple[bool, bool], chroma: float, settings: VerifySettings) -> bool:
    """Whether exactly one of two images is grey (``grey``: first, second) and the pair's larger
    mean chroma magnitude, ``chroma``, reaches ``vivid_chroma`` (the other image's colour is
    vivid): what makes a match :func:`ambiguous` whatever its detail. Known before comparing
    (from two :class:`Prepared`), so the stage always compares such a pair."""
    return grey[0] != grey[1] and chroma >= settings.vivid_chroma


def ambiguity_score(verdict: Verdict, settings: VerifySettings) -> float:
    """How well an :func:`ambiguous` match fits, to rank a grey image's matches: the structure
    correlation in [-1, 1] where the pair has detail (``detail_floor``), else the tone
    correlation less 2, in [-3, -1] (a match on detail outranks one on tone alone; without
    detail the structure correlation is noise)."""
    return verdict.structure if verdict.detail >= settings.detail_floor else verdict.tone - 2.0


def compare(a: Prepared, b: Prepared, settings: VerifySettings = VerifySettings()) -> Verdict:
    """Whether ``a`` and ``b`` (from :func:`prepare` with the same ``settings``) are one picture:
    the better of :func:`measure`'s orientations (a match first, then the higher structure);
    ``match=False`` and NaN scores when neither aligned plausibly."""
    verdicts = measure(a, b, settings, stop_at_match=True)
    if not verdicts:
        return Verdict(match=False)
    return max(verdicts, key=_rank)


def _ratio(x: float, y: float) -> float:
    """``max(x, y) / min(x, y)`` (>= 1; inf when the smaller is 0)."""
    low, high = min(x, y), max(x, y)
    return high / low if low > 1e-9 else float("inf")


def _median_abs(x: np.ndarray, weight: np.ndarray) -> float:
    """The median of ``|x|`` where ``weight`` > 0.5 (0 when nothing is): the typical detail,
    which a watermark or a title over a small part leaves as it is."""
    values = np.abs(x[weight > 0.5])
    return float(np.median(values)) if values.size else 0.0


def _std(x: np.ndarray, weight: np.ndarray) -> float:
    total = weight.sum()
    if total <= 0:
        return 0.0
    mean = (x * weight).sum() / total
    return float(math.sqrt((weight * (x - mean) ** 2).sum() / total))


def verify_pair(image_a: Image.Image, image_b: Image.Image, settings: VerifySettings = VerifySettings()) -> Verdict:
    """:func:`compare` of two images (each prepared here; prepare them once to compare many pairs)."""
    return compare(prepare(image_a, settings), prepare(image_b, settings), settings)
