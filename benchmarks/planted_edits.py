"""A planted set of LAION-style edited copies, in img2dataset's three layouts, and its score.

    python benchmarks/planted_edits.py --out data/planted --seed 0            # build + score
    python benchmarks/planted_edits.py --out data/planted --seed 1 --originals 300 --no-score
    python -m pipeline.dedup data=files data.path=data/planted/files \\
        data.ground_truth=data/planted/files_ground_truth.parquet run_name=planted_files

What is planted: ``--originals`` distinct pictures (default 600), photo-like but
synthetic (coloured 1/f noise under shapes and lighting, the demo set's drawn scenes,
crops of scikit-image's photographs), plus hard negatives that merely look alike: tiles cut
from one large picture, "posters" of one template that differ only in their title and one
colour block, and smooth gradients of various colours. A few originals (``--heavy``,
default 12) are copied 20-60 times and some (``--light``, default 30) 2-6 times; the first
record of each original is the picture itself. Every copy goes through a random combination
of the edits copies on the web go through (see :func:`edit_copy`): resize, crop of up to 8%
a side, rotation by up to 3 degrees, brightness/contrast, greyscale, horizontal mirror, a
text watermark, letterbox bars (black or white) to another aspect ratio, JPEG quality 30-95.

Every record then goes through what img2dataset does with a downloaded image by default
(``resize_mode=border``, ``image_size=256``: longest side to 256 px, padded with white to a
square, JPEG quality 95) and is written in img2dataset's layouts, with its sidecar files:

* ``files/00000/000000123.jpg`` + ``.txt`` + ``.json`` (+ ``00000_stats.json``): keys ``00000/000000123``;
* ``webdataset/00000.tar`` of ``000000123.jpg/.txt/.json`` (+ ``00000.parquet``, ``00000_stats.json``):
  keys ``00000/000000123``;
* ``parquet/00000.parquet`` with ``key``, ``jpg``, ``caption``...: keys ``000000123``.

``<format>_ground_truth.parquet`` beside them has ``key`` and ``original_id`` (what the dedup
stage's ``data.ground_truth`` scores against) plus ``kind``, ``edits``, ``dup_count``.

``--kinds stripes,drawing,screenshot,chart,pattern,map,mosaic,logo,product,clipart,badge,meme`` adds picture kinds
(:data:`EXTRA_KINDS`, 6-8% of the originals each): sinusoidal stripe textures, line drawings,
screenshots of text, bar and line charts, wallpapers of one repeated motif, street maps,
mosaics of flat Voronoi cells, logos of flat shapes and a word, product shots on white, clip
art of outlined flat shapes on white, badges with a word on a plain ground, photographs under a
band of caption text. ``--recolour R`` turns the hue of a
share ``R`` of the copies by 5-20 degrees and scales their saturation.

Scoring (without ``--no-score``) runs the dedup stage (:func:`pipeline.dedup.stage.run_dedup`,
the same code as ``python -m pipeline.dedup``) on each format with the default offline
embedder, its candidate pairs verified from both images (``--no-verify``: the embedder's pairs
at its threshold), and prints pair precision and recall, candidates per record and the
verifier's cost per pair; ``--thresholds`` also prints the embedder alone at other thresholds
from the same embeddings (exact search, connected components), for calibration.

``--sweep`` builds the set in memory only and prints pair precision and recall over candidate
thresholds 0.50-0.90 for the embedder alone and for the verifier with its defaults and with
each setting moved either way (:data:`SWEEP_CHANGES`), with the widest run of thresholds where
both stay >= 0.95 (:func:`passing_window`).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from pipeline.demo.dataset import SKIMAGE_PHOTOS, drawn_scene, made_up_word, make_caption

FORMATS = ("files", "webdataset", "parquet")
EDITS = ("resize", "crop", "rotate", "brightness_contrast", "greyscale", "mirror", "text", "letterbox", "jpeg")
# How often each optional edit is applied to a copy (resize and jpeg always are).
EDIT_RATES = {
    "crop": 0.5,
    "rotate": 0.35,
    "brightness_contrast": 0.5,
    "greyscale": 0.2,
    "mirror": 0.3,
    "text": 0.4,
    "letterbox": 0.35,
}
# Shares of the originals that are hard negatives (the rest are photo-like pictures).
HARD_NEGATIVE_SHARES = {"tile": 0.08, "poster": 0.06, "gradient": 0.06}
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)
IMG2DATASET_SIZE = 256  # img2dataset's default image_size (resize_mode=border)


@dataclass
class Original:
    original_id: str
    kind: str  # photo | drawn | skimage | tile | poster | gradient
    caption: str
    image: Image.Image
    copies: int = 1


@dataclass
class PlantedRecord:
    jpeg: bytes
    caption: str
    original_id: str
    kind: str
    dup_count: int
    edits: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Originals


def random_size(rng: np.random.Generator, low: int = 240, high: int = 640) -> tuple[int, int]:
    """(width, height) of a picture of random aspect ratio, longest side in [low, high]."""
    aspect = float(rng.choice(ASPECTS))
    longest = int(rng.integers(low, high + 1))
    return (longest, max(16, round(longest / aspect))) if aspect >= 1 else (max(16, round(longest * aspect)), longest)


def noise_field(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """A 1/f^beta random field of ``shape`` (as natural images' spectra fall), scaled to [0, 1]."""
    h, w = shape
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0.0
    field_ = np.fft.irfft2(spectrum, s=(h, w))
    return (field_ - field_.min()) / (np.ptp(field_) + 1e-9)


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A synthetic photograph: coloured 1/f noise (sky, ground, texture), lighting, a few soft shapes."""
    w, h = size
    palette = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
    coarse = [noise_field(rng, (h // 4, w // 4), float(rng.uniform(2.0, 3.2))) for _ in range(2)]
    coarse = [
        np.asarray(Image.fromarray((c * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255
        for c in coarse
    ]
    rgb = palette[0] + coarse[0][..., None] * (palette[1] - palette[0]) + coarse[1][..., None] * (palette[2] - palette[0]) * 0.6
    fine = noise_field(rng, (h, w), float(rng.uniform(1.0, 2.0)))
    rgb += (fine[..., None] - 0.5) * float(rng.uniform(10, 60))
    light = (
        np.linspace(*rng.uniform(0.6, 1.2, size=2), h)[:, None]
        if rng.uniform() < 0.5
        else np.linspace(*rng.uniform(0.6, 1.2, size=2), w)[None, :]
    )
    rgb = rgb * light[..., None]
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    layer = image.copy()
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 6))):
        x0, y0 = int(rng.integers(-w // 6, w)), int(rng.integers(-h // 6, h))
        bw, bh = int(rng.integers(w // 10, w // 2)), int(rng.integers(h // 10, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.uniform() < 0.5:
            draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=fill)
        else:
            draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 6)))], fill=fill)
    layer = layer.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3.0))))
    return Image.blend(image, layer, float(rng.uniform(0.6, 1.0)))


def skimage_crop(rng: np.random.Generator, name: str) -> Image.Image:
    """A random crop of one of scikit-image's photographs, of random aspect ratio."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    photo = Image.fromarray(array).convert("RGB")
    aspect = float(rng.choice(ASPECTS))
    cw = int(photo.width * rng.uniform(0.5, 0.9))
    ch = min(photo.height, max(16, round(cw / aspect)))
    left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    return photo.crop((left, top, left + cw, top + ch))


def tiles(rng: np.random.Generator, count: int) -> list[Image.Image]:
    """``count`` tiles cut side by side from large photo-like pictures (3 x 3 per picture)."""
    out: list[Image.Image] = []
    while len(out) < count:
        big = photo_like(rng, (900, 720))
        for r in range(3):
            for c in range(3):
                out.append(big.crop((c * 300, r * 240, (c + 1) * 300, (r + 1) * 240)))
    return out[:count]


def posters(rng: np.random.Generator, count: int) -> list[Image.Image]:
    """``count`` posters, 3 per template: same background, frame and shapes; each its own title
    and one block in its own colour. The blocks' luminances differ by at least 0.4 (of 1), so
    that the posters differ in a greyscale copy too (a greyscale copy of one would otherwise
    be as much a copy of another; no embedder can tell)."""
    out: list[Image.Image] = []
    while len(out) < count:
        w, h = 360, 480
        background = tuple(int(c) for c in rng.integers(0, 256, size=3))
        frame = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shapes = [
            (
                tuple(int(v) for v in rng.integers(0, 360, size=2)),
                int(rng.integers(30, 90)),
                tuple(int(c) for c in rng.integers(0, 256, size=3)),
            )
            for _ in range(3)
        ]
        block = (int(rng.integers(20, 160)), int(rng.integers(150, 260)))
        for level in rng.permutation([0.1, 0.5, 0.9]):
            image = Image.new("RGB", (w, h), background)
            draw = ImageDraw.Draw(image)
            draw.rectangle((8, 8, w - 9, h - 9), outline=frame, width=10)
            for (x, y), r, colour in shapes:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            draw.rectangle((block[0], block[1], block[0] + 180, block[1] + 120), fill=colour_of_luminance(rng, float(level)))
            title = " ".join(made_up_word(rng) for _ in range(2)).upper()
            draw.text((30, 400), title, fill=frame, font=ImageFont.load_default(size=40))
            out.append(image)
    return out[:count]


def colour_of_luminance(rng: np.random.Generator, level: float) -> tuple[int, int, int]:
    """A random colour of luminance ``level`` (0..1, Rec. 601 weights) as near as 8 bits allow."""
    for _ in range(100):
        rgb = rng.uniform(0, 1, size=3)
        rgb = np.clip(rgb + (level - rgb @ np.array([0.299, 0.587, 0.114])), 0, 1)
        if abs(rgb @ np.array([0.299, 0.587, 0.114]) - level) < 0.02:
            break
    return tuple(int(round(c * 255)) for c in rgb)


def gradient(rng: np.random.Generator, colours: np.ndarray | None = None) -> Image.Image:
    """A smooth two-colour gradient (linear in a random direction, or radial); ``colours``:
    its two end colours, float ``(2, 3)`` in 0..255 (default: random)."""
    w, h = random_size(rng)
    a, b = (rng.integers(0, 256, size=(2, 3)) if colours is None else np.asarray(colours)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.uniform() < 0.7:
        angle = rng.uniform(0, 2 * np.pi)
        t = (x / w - 0.5) * np.cos(angle) + (y / h - 0.5) * np.sin(angle)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
    else:
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        t = t / t.max()
    return Image.fromarray(np.clip(a + t[..., None] * (b - a), 0, 255).astype(np.uint8))


def distinct_gradients(rng: np.random.Generator, count: int) -> list[Image.Image]:
    """``count`` gradients whose end colours are saturated hues evenly spaced round the colour
    wheel (so no two share a colour, as two random gradients may)."""
    import colorsys

    hues = (np.arange(count) / count + rng.uniform()) % 1.0
    images = []
    for hue in hues:
        a = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95)) * 255
        b = np.array(colorsys.hsv_to_rgb((hue + 0.15) % 1.0, 0.7, 0.35)) * 255
        images.append(gradient(rng, np.stack([a, b])))
    return images


def stripes(rng: np.random.Generator) -> Image.Image:
    """A sinusoidal stripe texture: one sinusoid (two, crossed, for a quarter of them) of random
    direction, 2-10 periods across the longest side and random phase, between two random colours."""
    w, h = random_size(rng)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    t = np.zeros((h, w), np.float32)
    waves = 2 if rng.uniform() < 0.25 else 1
    for _ in range(waves):
        angle, periods = rng.uniform(0, np.pi), rng.uniform(2, 10)
        t += np.sin(2 * np.pi * periods * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    t = (t / waves + 1) / 2
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    return Image.fromarray(np.clip(a + t[..., None] * (b - a), 0, 255).astype(np.uint8))


def line_drawing(rng: np.random.Generator) -> Image.Image:
    """A line drawing: 6-20 thin dark strokes (lines, arcs, ellipses, polylines) on a light ground."""
    w, h = random_size(rng)
    ground = tuple(int(c) for c in rng.integers(225, 256, size=3))
    ink = tuple(int(c) for c in rng.integers(0, 70, size=3))
    image = Image.new("RGB", (w, h), ground)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 21))):
        width = int(rng.integers(1, 4))
        points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        box = (min(p[0] for p in points), min(p[1] for p in points), max(p[0] for p in points), max(p[1] for p in points))
        roll = rng.uniform()
        if roll < 0.35:
            draw.line(points, fill=ink, width=width)
        elif roll < 0.6:
            draw.arc(box, int(rng.integers(0, 360)), int(rng.integers(0, 360)), fill=ink, width=width)
        elif roll < 0.8:
            draw.ellipse(box, outline=ink, width=width)
        else:
            line = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.line(line, fill=ink, width=width, joint="curve")
    return image


def screenshot(rng: np.random.Generator) -> Image.Image:
    """A screenshot of text: a coloured title bar, then 6-16 lines of made-up words in a
    small font, on a light or dark ground."""
    w, h = random_size(rng, 320, 640)
    dark = rng.uniform() < 0.3
    ground = tuple(int(c) for c in (rng.integers(20, 60, size=3) if dark else rng.integers(235, 256, size=3)))
    ink = tuple(int(c) for c in (rng.integers(190, 256, size=3) if dark else rng.integers(0, 60, size=3)))
    image = Image.new("RGB", (w, h), ground)
    draw = ImageDraw.Draw(image)
    bar = int(rng.integers(18, 40))
    draw.rectangle((0, 0, w, bar), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    size = int(rng.integers(11, 20))
    font = ImageFont.load_default(size=size)
    y = bar + int(rng.integers(6, 20))
    for _ in range(int(rng.integers(6, 17))):
        if y > h - size:
            break
        line = " ".join(made_up_word(rng) for _ in range(int(rng.integers(2, 9))))
        draw.text((int(rng.integers(8, 30)), y), line, fill=ink, font=font)
        y += int(size * rng.uniform(1.3, 2.2))
    return image


def chart(rng: np.random.Generator) -> Image.Image:
    """A chart: axes, grid lines, 4-14 bars of random heights and colours or 1-3 polylines,
    numbered ticks and a title of made-up words, on a white or light ground."""
    w, h = random_size(rng, 300, 640)
    ground = tuple(int(c) for c in rng.integers(240, 256, size=3))
    image = Image.new("RGB", (w, h), ground)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(10, 16)))
    left, right, top, bottom = int(w * 0.12), int(w * 0.95), int(h * 0.15), int(h * 0.85)
    draw.text(
        (left, int(h * 0.03)), " ".join(made_up_word(rng) for _ in range(int(rng.integers(2, 6)))), fill=(20, 20, 20), font=font
    )
    for k in range(int(rng.integers(3, 7))):
        y = bottom - (bottom - top) * k / 5
        draw.line((left, y, right, y), fill=(215, 215, 215), width=1)
        draw.text((4, y - 6), str(int(k * rng.integers(5, 50))), fill=(60, 60, 60), font=font)
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    if rng.uniform() < 0.5:
        n = int(rng.integers(4, 15))
        width = (right - left) / n
        for b in range(n):
            height = float(rng.uniform(0.05, 1.0)) * (bottom - top)
            fill = tuple(int(c) for c in rng.integers(0, 220, size=3))
            draw.rectangle((left + b * width + 2, bottom - height, left + (b + 0.8) * width, bottom), fill=fill)
    else:
        for _ in range(int(rng.integers(1, 4))):
            xs = np.linspace(left, right, int(rng.integers(5, 30)))
            ys = bottom - np.clip(np.cumsum(rng.normal(0, 0.1, len(xs))) + rng.uniform(0.2, 0.8), 0, 1) * (bottom - top)
            fill = tuple(int(c) for c in rng.integers(0, 200, size=3))
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=fill, width=int(rng.integers(1, 4)))
    return image


def pattern(rng: np.random.Generator) -> Image.Image:
    """A wallpaper: one random motif (2-5 shapes on a ground, 24-96 px) repeated edge to
    edge, its rows offset by half a motif for half of them."""
    w, h = random_size(rng)
    side = int(rng.integers(24, 97))
    motif = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, size=3)))
    draw = ImageDraw.Draw(motif)
    for _ in range(int(rng.integers(2, 6))):
        box = sorted(rng.integers(0, side, size=2).tolist()), sorted(rng.integers(0, side, size=2).tolist())
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = (box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1)
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(shape, fill=fill)
    image = Image.new("RGB", (w, h))
    offset = side // 2 if rng.uniform() < 0.5 else 0
    for row, y in enumerate(range(0, h, side)):
        for x in range(-side, w, side):
            image.paste(motif, (x + (offset if row % 2 else 0), y))
    return image


def street_map(rng: np.random.Generator) -> Image.Image:
    """A street map: a pale ground, 2-6 parks and lakes (flat green and blue polygons), 8-30
    roads (polylines, a grey casing under a white or yellow fill, 2-12 px) and 3-10 labels of
    made-up words."""
    w, h = random_size(rng, 300, 640)
    image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(228, 246, size=3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy, r = float(rng.uniform(0, w)), float(rng.uniform(0, h)), float(rng.uniform(20, 0.3 * min(w, h)))
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 10))))
        radii = r * rng.uniform(0.6, 1.2, len(angles))
        points = list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist()))
        water = rng.uniform() < 0.4
        draw.polygon(points, fill=(160, 200, 235) if water else (190, 225, 175))
    for _ in range(int(rng.integers(8, 31))):
        width = int(rng.integers(2, 13))
        points = [(int(rng.integers(-20, w + 20)), int(rng.integers(-20, h + 20))) for _ in range(int(rng.integers(2, 5)))]
        draw.line(points, fill=(170, 170, 170), width=width + 2, joint="curve")
        draw.line(points, fill=(255, 255, 255) if rng.uniform() < 0.75 else (250, 220, 120), width=width, joint="curve")
    font = ImageFont.load_default(size=int(rng.integers(10, 16)))
    for _ in range(int(rng.integers(3, 11))):
        draw.text((int(rng.integers(0, w - 40)), int(rng.integers(0, h - 12))), made_up_word(rng), fill=(70, 70, 70), font=font)
    return image


def mosaic(rng: np.random.Generator) -> Image.Image:
    """A mosaic: the Voronoi cells of 20-150 random points, each a flat random colour, with dark
    grout 1-3 px wide where cells meet."""
    w, h = random_size(rng)
    n = int(rng.integers(20, 151))
    seeds = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    colours = rng.integers(0, 256, size=(n, 3)).astype(np.uint8)
    ys, xs = np.mgrid[0:h, 0:w]
    nearest = np.zeros((h, w), dtype=np.int32)
    best = np.full((h, w), np.inf)
    for i, (sx, sy) in enumerate(seeds):
        d = (xs - sx) ** 2 + (ys - sy) ** 2
        closer = d < best
        nearest[closer], best[closer] = i, d[closer]
    pixels = colours[nearest]
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= nearest[:, 1:] != nearest[:, :-1]
    edge[1:, :] |= nearest[1:, :] != nearest[:-1, :]
    grout = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * int(rng.integers(0, 2)) + 1))
    pixels[np.asarray(grout) > 0] = rng.integers(20, 70, size=3).astype(np.uint8)
    return Image.fromarray(pixels)


def logo(rng: np.random.Generator) -> Image.Image:
    """A logo: 1-3 flat shapes (circle, square, triangle, ring) and a made-up word of 3-9
    letters in a large font, in 1-3 colours on a flat white or coloured ground."""
    w, h = random_size(rng, 240, 480)
    ground = (255, 255, 255) if rng.uniform() < 0.6 else tuple(int(c) for c in rng.integers(0, 256, size=3))
    image = Image.new("RGB", (w, h), ground)
    draw = ImageDraw.Draw(image)
    palette = [tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in range(int(rng.integers(1, 4)))]
    side = min(w, h)
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.1, 0.3)) * side
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h * 0.6))
        fill = palette[int(rng.integers(len(palette)))]
        roll = rng.uniform()
        if roll < 0.3:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif roll < 0.55:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif roll < 0.8:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 4)))
    word = made_up_word(rng)[:9].upper()
    font = ImageFont.load_default(size=int(rng.integers(24, 56)))
    draw.text((int(w * rng.uniform(0.05, 0.3)), int(h * rng.uniform(0.65, 0.8))), word, fill=palette[0], font=font)
    return image


def product(rng: np.random.Generator) -> Image.Image:
    """A product shot: one object (a shaded ellipse or rounded box of a random colour, often with
    a smaller part on top and a label band) on a pure white ground, a soft grey shadow beneath,
    the object taking 35-75% of the shorter side; white reaches the picture's edges, as on a
    shop's page."""
    w, h = random_size(rng)
    ground = np.full((h, w, 3), 255.0, dtype=np.float32)
    side = min(w, h)
    ow, oh = float(rng.uniform(0.35, 0.75)) * side, float(rng.uniform(0.35, 0.75)) * side
    cx, cy = w / 2 + float(rng.uniform(-0.1, 0.1)) * w, h / 2 + float(rng.uniform(-0.05, 0.1)) * h
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xs - cx) / (ow / 2), (ys - cy) / (oh / 2)
    power = 2.0 if rng.uniform() < 0.5 else float(rng.uniform(4, 8))  # an ellipse or a rounded box
    body = (np.abs(u) ** power + np.abs(v) ** power) <= 1.0
    shadow = np.exp(-(((xs - cx) / (ow * 0.6)) ** 2 + ((ys - (cy + oh * 0.52)) / (oh * 0.08)) ** 2))
    ground *= 1.0 - 0.35 * shadow[..., None]
    colour = rng.integers(20, 236, size=3).astype(np.float32)
    light = np.clip(1.15 - 0.35 * (u + 0.4 * v) - 0.15 * np.sqrt(np.clip(u * u + v * v, 0, 1)), 0.55, 1.3)
    shaded = np.clip(colour[None, None] * light[..., None], 0, 255)
    highlight = np.exp(-(((u + 0.35) / 0.18) ** 2 + ((v + 0.3) / 0.35) ** 2))[..., None]
    shaded = shaded * (1 - 0.6 * highlight) + 250.0 * 0.6 * highlight
    ground[body] = shaded[body]
    if rng.uniform() < 0.6:  # a label band across the body
        band = body & (np.abs(v - float(rng.uniform(-0.2, 0.2))) < float(rng.uniform(0.12, 0.25)))
        ground[band] = rng.integers(0, 256, size=3).astype(np.float32) * light[band][:, None] ** 0.5
    image = Image.fromarray(ground.astype(np.uint8))
    if rng.uniform() < 0.5:  # a cap or lid
        draw = ImageDraw.Draw(image)
        cw, ch = ow * float(rng.uniform(0.2, 0.5)), oh * float(rng.uniform(0.08, 0.18))
        top = cy - oh / 2 - ch * 0.6
        draw.rounded_rectangle(
            (cx - cw / 2, top, cx + cw / 2, top + ch), radius=ch / 3, fill=tuple(int(c) for c in rng.integers(0, 200, size=3))
        )
    return image.filter(ImageFilter.GaussianBlur(0.6))


def clipart(rng: np.random.Generator) -> Image.Image:
    """Clip art: a figure of 3-6 overlapping flat shapes (ellipses, rounded boxes, polygons),
    each of a flat colour outlined in dark grey, somewhere off centre on white, with a short
    word under it half the time."""
    w, h = random_size(rng)
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    side = min(w, h)
    cx, cy = w * float(rng.uniform(0.3, 0.7)), h * float(rng.uniform(0.3, 0.6))
    reach = side * float(rng.uniform(0.15, 0.3))
    outline = tuple(int(c) for c in rng.integers(0, 70, size=3))
    width = max(2, int(side / 120))
    for _ in range(int(rng.integers(3, 7))):
        x, y = cx + float(rng.uniform(-1, 1)) * reach, cy + float(rng.uniform(-1, 1)) * reach
        rx, ry = float(rng.uniform(0.2, 0.6)) * reach, float(rng.uniform(0.2, 0.6)) * reach
        fill = tuple(int(c) for c in rng.integers(30, 250, size=3))
        roll = rng.uniform()
        if roll < 0.4:
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=fill, outline=outline, width=width)
        elif roll < 0.7:
            draw.rounded_rectangle(
                (x - rx, y - ry, x + rx, y + ry), radius=min(rx, ry) / 3, fill=fill, outline=outline, width=width
            )
        else:
            corners = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=corners))
            points = [(x + rx * float(np.cos(t)), y + ry * float(np.sin(t))) for t in angles]
            draw.polygon(points, fill=fill, outline=outline, width=width)
    if rng.uniform() < 0.5:
        font = ImageFont.load_default(size=max(10, int(side * rng.uniform(0.06, 0.1))))
        draw.text((cx - reach, min(h - side * 0.12, cy + reach * 1.5)), made_up_word(rng), fill=outline, font=font)
    return image


def badge(rng: np.random.Generator) -> Image.Image:
    """A badge: a circle, rounded box or shield of a flat colour with a rim of another and a
    short word across it, somewhere off centre on a plain ground of a random colour (white a
    third of the time), as a sticker or an icon is shown."""
    w, h = random_size(rng, 240, 520)
    ground = (255, 255, 255) if rng.uniform() < 1 / 3 else tuple(int(c) for c in rng.integers(0, 256, size=3))
    image = Image.new("RGB", (w, h), ground)
    draw = ImageDraw.Draw(image)
    r = float(rng.uniform(0.2, 0.35)) * min(w, h)
    cx, cy = float(rng.uniform(r * 1.1, w - r * 1.1)), float(rng.uniform(r * 1.1, h - r * 1.1))
    fill, rim = (tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in range(2))
    rim_width = max(3, int(r * rng.uniform(0.06, 0.15)))
    roll = rng.uniform()
    if roll < 0.4:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=rim, width=rim_width)
    elif roll < 0.7:
        draw.rounded_rectangle(
            (cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), radius=r / 4, fill=fill, outline=rim, width=rim_width
        )
    else:
        shield = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r * 0.2), (cx, cy + r), (cx - r, cy + r * 0.2)]
        draw.polygon(shield, fill=fill, outline=rim, width=rim_width)
    word = made_up_word(rng)[:6].upper()
    font = ImageFont.load_default(size=max(10, int(r * rng.uniform(0.3, 0.5))))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text((cx - (right - left) / 2, cy - (bottom - top) / 2 - top), word, fill=rim, font=font)
    return image


def meme(rng: np.random.Generator) -> Image.Image:
    """A captioned photograph, as memes and news posts are shared: a photo-like picture under a
    band of white (or, a third of the time, black) 15-30% of the height holding one or two lines
    of a few words in the other colour."""
    w, h = random_size(rng)
    band = int(h * rng.uniform(0.15, 0.3))
    image = Image.new("RGB", (w, h), (255, 255, 255))
    paper, ink = ((0, 0, 0), (255, 255, 255)) if rng.uniform() < 1 / 3 else ((255, 255, 255), (0, 0, 0))
    image.paste(paper, (0, 0, w, band))
    image.paste(photo_like(rng, (w, h - band)), (0, band))
    draw = ImageDraw.Draw(image)
    lines = int(rng.integers(1, 3))
    font = ImageFont.load_default(size=max(10, int(band / (lines + 1.2))))
    for line in range(lines):
        words = " ".join(made_up_word(rng) for _ in range(int(rng.integers(2, 5))))
        draw.text((w * float(rng.uniform(0.03, 0.15)), band * (0.12 + line / (lines + 0.4))), words, fill=ink, font=font)
    return image


# Picture kinds a planted set may add (``extra_kinds``), with the share of originals each takes.
EXTRA_KINDS = {
    "stripes": 0.08,
    "drawing": 0.08,
    "screenshot": 0.08,
    "chart": 0.08,
    "pattern": 0.08,
    "map": 0.06,
    "mosaic": 0.06,
    "logo": 0.06,
    "product": 0.06,
    "clipart": 0.06,
    "badge": 0.06,
    "meme": 0.06,
}
KIND_MAKERS = {
    "stripes": stripes,
    "drawing": line_drawing,
    "screenshot": screenshot,
    "chart": chart,
    "pattern": pattern,
    "map": street_map,
    "mosaic": mosaic,
    "logo": logo,
    "product": product,
    "clipart": clipart,
    "badge": badge,
    "meme": meme,
}


def decode(data: bytes) -> Image.Image:
    """Encoded bytes as the data layer reads them (8-bit RGB)."""
    from pipeline.data import decode_image

    return decode_image(data)


def make_originals(rng: np.random.Generator, n: int, extra_kinds: tuple[str, ...] = ()) -> list[Original]:
    """``n`` originals: hard negatives (tiles, posters, gradients), each of ``extra_kinds``
    (:data:`EXTRA_KINDS`) and photo-like pictures, shuffled."""
    unknown = set(extra_kinds) - set(EXTRA_KINDS)
    if unknown:
        raise ValueError(f"unknown picture kinds {sorted(unknown)}; known: {sorted(EXTRA_KINDS)}")
    counts = {kind: int(round(share * n)) for kind, share in HARD_NEGATIVE_SHARES.items()}
    images: list[tuple[str, Image.Image]] = [("tile", im) for im in tiles(rng, counts["tile"])]
    images += [("poster", im) for im in posters(rng, counts["poster"])]
    images += [("gradient", gradient(rng)) for _ in range(counts["gradient"])]
    for kind in extra_kinds:
        images += [(kind, KIND_MAKERS[kind](rng)) for _ in range(int(round(EXTRA_KINDS[kind] * n)))]
    # Each photograph once ("cat" is "chelsea"): two crops of one photograph may overlap.
    photos = [name for name in SKIMAGE_PHOTOS if name != "cat"]
    rng.shuffle(photos)
    for _ in range(n - len(images)):
        roll = rng.uniform()
        if roll < 0.03 and photos:
            images.append(("skimage", skimage_crop(rng, photos.pop())))
        elif roll < 0.4:
            images.append(("drawn", drawn_scene(rng, 96).resize(random_size(rng), Image.Resampling.BICUBIC)))
        else:
            images.append(("photo", photo_like(rng, random_size(rng))))
    order = rng.permutation(len(images))
    used: set[str] = set()
    return [Original(f"orig-{i:05d}", images[j][0], make_caption(rng, used), images[j][1]) for i, j in enumerate(order)]


# ----------------------------------------------------------------------------------------
# Edits


def letterbox(image: Image.Image, rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on bars of ``colour`` that pad it to another aspect ratio."""
    w, h = image.size
    aspect = w / h
    target = float(rng.choice([a for a in ASPECTS if abs(a - aspect) > 0.1] or [aspect * 1.3]))
    size = (w, max(h, round(w / target))) if target < aspect else (max(w, round(h * target)), h)
    if size == (w, h):
        size = (w, h + max(4, h // 6))
    canvas = Image.new("RGB", size, colour)
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text drawn over ``image``: a word or two, 4-10% of its height, anywhere, opaque or half-transparent."""
    w, h = image.size
    text = " ".join(made_up_word(rng) for _ in range(int(rng.integers(1, 3))))
    font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.04, 0.10))))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, w - (right - left))))
    y = int(rng.integers(0, max(1, h - (bottom - top))))
    colour = [(255, 255, 255), (0, 0, 0), tuple(int(c) for c in rng.integers(0, 256, size=3))][int(rng.integers(0, 3))]
    draw.text((x, y), text, fill=(*colour, int(rng.choice([128, 200, 255]))), font=font)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by up to 3 degrees: corners filled with black or white, or cropped away."""
    angle = float(rng.uniform(-3, 3))
    if rng.uniform() < 0.5:
        fill = (0, 0, 0) if rng.uniform() < 0.5 else (255, 255, 255)
        return image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill)
    w, h = image.size
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    # Inner rectangle free of corners: shrink each side by the corners' reach.
    s = abs(np.sin(np.radians(angle)))
    dx, dy = int(np.ceil(h * s / 2)) + 1, int(np.ceil(w * s / 2)) + 1
    return rotated.crop((dx, dy, w - dx, h - dy))


def recolour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``image`` with its hue turned by 5-20 degrees either way and its saturation scaled by 0.7-1.3."""
    hue, saturation, value = image.convert("HSV").split()
    turn = int(round(float(rng.uniform(5, 20)) * rng.choice([-1, 1]) * 256 / 360))
    hue = hue.point(lambda x: (x + turn) % 256)
    factor = float(rng.uniform(0.7, 1.3))
    saturation = saturation.point(lambda x: min(255, round(x * factor)))
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def edit_copy(
    image: Image.Image, rng: np.random.Generator, rates: dict[str, float] | None = None
) -> tuple[Image.Image, list[str], int]:
    """A copy of ``image`` through a random combination of edits.

    Returns ``(copy, edits applied, JPEG quality)``; the JPEG encoding (quality 30-95)
    happens when the copy is encoded. ``rates``: probability of each optional edit
    (default :data:`EDIT_RATES`; 1.0 forces one, 0.0 turns it off).
    """
    rates = EDIT_RATES if rates is None else rates
    applied = []
    if rng.uniform() < rates.get("crop", 0):
        w, h = image.size
        left, right = (rng.uniform(0, 0.08, size=2) * w).astype(int)
        top, bottom = (rng.uniform(0, 0.08, size=2) * h).astype(int)
        image = image.crop((int(left), int(top), w - int(right), h - int(bottom)))
        applied.append("crop")
    if rng.uniform() < rates.get("rotate", 0):
        image, _ = rotate(image, rng), applied.append("rotate")
    # Always resized: copies on the web come in every size.
    scale = float(rng.uniform(0.35, 1.4))
    size = (max(24, round(image.width * scale)), max(24, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    applied.append("resize")
    if rng.uniform() < rates.get("brightness_contrast", 0):
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.3)))
        applied.append("brightness_contrast")
    if "recolour" in rates and rng.uniform() < rates["recolour"]:  # drawn only when asked: other sets stay as they were
        image = recolour(image, rng)
        applied.append("recolour")
    if rng.uniform() < rates.get("greyscale", 0):
        image = ImageOps.grayscale(image).convert("RGB")
        applied.append("greyscale")
    if rng.uniform() < rates.get("mirror", 0):
        image = ImageOps.mirror(image)
        applied.append("mirror")
    if rng.uniform() < rates.get("text", 0):
        image = watermark(image, rng)
        applied.append("text")
    if rng.uniform() < rates.get("letterbox", 0):
        image = letterbox(image, rng, (0, 0, 0) if rng.uniform() < 0.5 else (255, 255, 255))
        applied.append("letterbox")
    applied.append("jpeg")
    return image, applied, int(rng.integers(30, 96))


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def img2dataset_resize(data: bytes, size: int = IMG2DATASET_SIZE) -> tuple[bytes, dict]:
    """What img2dataset's default resizer (``resize_mode=border``) does to downloaded bytes:
    longest side to ``size`` (area filter down, Lanczos up), centred on white to ``size x size``,
    JPEG quality 95. Returns the bytes and the width/height fields of its ``.json``."""
    with Image.open(io.BytesIO(data)) as img:
        image = img.convert("RGB")
    ow, oh = image.size
    scale = size / max(ow, oh)
    resized = image.resize(
        (max(1, round(ow * scale)), max(1, round(oh * scale))), Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    )
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return jpeg_bytes(canvas, 95), {"width": size, "height": size, "original_width": ow, "original_height": oh}


# ----------------------------------------------------------------------------------------
# The set


def build_records(
    seed: int = 0,
    n_originals: int = 600,
    heavy: int = 12,
    heavy_copies: tuple[int, int] = (20, 60),
    light: int = 30,
    light_copies: tuple[int, int] = (2, 6),
    rates: dict[str, float] | None = None,
    extra_kinds: tuple[str, ...] = (),
) -> list[PlantedRecord]:
    """Every record of a planted set, in random order (not yet resized by img2dataset)."""
    if heavy + light > n_originals:
        raise ValueError(f"heavy + light originals ({heavy} + {light}) exceed the {n_originals} originals")
    rng = np.random.default_rng(seed)
    originals = make_originals(rng, n_originals, extra_kinds)
    chosen = rng.permutation(n_originals)
    for index in chosen[:heavy]:
        originals[index].copies = int(rng.integers(heavy_copies[0], heavy_copies[1] + 1))
    for index in chosen[heavy : heavy + light]:
        originals[index].copies = int(rng.integers(light_copies[0], light_copies[1] + 1))
    records = []
    for original in originals:
        records.append(
            PlantedRecord(
                jpeg_bytes(original.image, 95),
                original.caption,
                original.original_id,
                original.kind,
                original.copies,
                ["original"],
            )
        )
        for _ in range(original.copies - 1):
            copy, applied, quality = edit_copy(original.image, rng, rates)
            records.append(
                PlantedRecord(
                    jpeg_bytes(copy, quality), original.caption, original.original_id, original.kind, original.copies, applied
                )
            )
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def write_planted(
    out_dir: str | Path, records: list[PlantedRecord], per_shard: int = 10000, formats: tuple[str, ...] = FORMATS
) -> dict[str, Path]:
    """Write ``records`` through img2dataset's resizer in each of ``formats`` under ``out_dir``.

    Returns ``{format: path}``; ``out_dir/<format>_ground_truth.parquet`` is written beside each.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resized = [img2dataset_resize(r.jpeg) for r in records]
    paths = {}
    for fmt in formats:
        root = out_dir / fmt
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        truth = []
        for shard in range((len(records) + per_shard - 1) // per_shard):
            rows = []
            for index in range(shard * per_shard, min(len(records), (shard + 1) * per_shard)):
                record, (jpg, sizes) = records[index], resized[index]
                # img2dataset's key: the shard number, then the index within the shard.
                key = f"{shard:05d}{index - shard * per_shard:0{len(str(per_shard - 1))}d}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": record.caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    **sizes,
                }
                rows.append((key, jpg, record, meta))
                truth.append(
                    {
                        "key": key if fmt == "parquet" else f"{shard:05d}/{key}",
                        "original_id": record.original_id,
                        "kind": record.kind,
                        "dup_count": record.dup_count,
                        "edits": ",".join(record.edits),
                    }
                )
            _write_shard(root, fmt, shard, rows)
        pd.DataFrame(truth).to_parquet(out_dir / f"{fmt}_ground_truth.parquet", index=False)
        paths[fmt] = root
    return paths


def _write_shard(root: Path, fmt: str, shard: int, rows: list) -> None:
    stem = f"{shard:05d}"
    table = pd.DataFrame([meta for _, _, _, meta in rows])
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
    (root / f"{stem}_stats.json").write_text(json.dumps(stats))
    if fmt == "files":
        folder = root / stem
        folder.mkdir()
        for key, jpg, record, meta in rows:
            (folder / f"{key}.jpg").write_bytes(jpg)
            (folder / f"{key}.txt").write_text(record.caption, encoding="utf-8")
            (folder / f"{key}.json").write_text(json.dumps(meta))
        table.to_parquet(root / f"{stem}.parquet", index=False)
    elif fmt == "webdataset":
        with tarfile.open(root / f"{stem}.tar", "w") as tar:
            for key, jpg, record, meta in rows:
                for suffix, payload in (("jpg", jpg), ("txt", record.caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        table.to_parquet(root / f"{stem}.parquet", index=False)
    elif fmt == "parquet":
        table["jpg"] = [jpg for _, jpg, _, _ in rows]
        table.to_parquet(root / f"{stem}.parquet", index=False)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def build_planted(
    out_dir: str | Path,
    seed: int = 0,
    n_originals: int = 600,
    heavy: int = 12,
    light: int = 30,
    per_shard: int = 10000,
    rates: dict[str, float] | None = None,
    formats: tuple[str, ...] = FORMATS,
    extra_kinds: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Build a planted set into ``out_dir`` (see the module doc); returns ``{format: path}``."""
    records = build_records(seed, n_originals, heavy, light=light, rates=rates, extra_kinds=extra_kinds)
    return write_planted(out_dir, records, per_shard, formats)


# ----------------------------------------------------------------------------------------
# Scoring


def data_config(out_dir: str | Path, fmt: str) -> dict:
    """The ``data`` config (as ``conf/data/<fmt>.yaml`` with its path and ground truth) of one format."""
    return {"format": fmt, "path": str(Path(out_dir) / fmt), "ground_truth": str(Path(out_dir) / f"{fmt}_ground_truth.parquet")}


def score_with_dedup(
    out_dir: str | Path,
    fmt: str,
    embedder,
    threshold: float | None = None,
    run_dir: str | Path | None = None,
    verify: bool = True,
    candidate_threshold: float | None = None,
    candidate_neighbours: int | None = None,
) -> dict:
    """Run the dedup stage on one format; returns its summary's ``evaluation`` plus timing and,
    when verifying, the verify phase's counts (``verification``).

    ``verify``: candidates from the embedder at ``candidate_threshold`` (default: the
    embedder's) and each image's ``candidate_neighbours`` nearest (default: the stage's) down
    to the embedder's ``candidate_floor``, each
    verified from both images (the stage's default); else pairs at ``threshold`` (default: the
    embedder's) taken as they are."""
    from pipeline.dedup.settings import VerifyStage
    from pipeline.dedup.stage import DedupSettings, run_dedup

    data = data_config(out_dir, fmt)
    run_dir = Path(run_dir) if run_dir else Path(out_dir) / "runs" / fmt
    if run_dir.exists():
        shutil.rmtree(run_dir)
    candidates = getattr(embedder, "candidate_threshold", None) if candidate_threshold is None else candidate_threshold
    settings = DedupSettings(
        threshold=embedder.threshold if threshold is None else threshold,
        top_k=50,
        min_group_size=2,
        verify=VerifyStage(
            enabled=verify,
            candidate_threshold=candidates,
            candidate_floor=getattr(embedder, "candidate_floor", None),
            **({} if candidate_neighbours is None else {"candidate_neighbours": candidate_neighbours}),
        ),
    )
    summary = run_dedup(run_dir, settings, data=data, embedder=embedder, ground_truth=data["ground_truth"], progress=False)
    return {
        **summary["evaluation"],
        "records": summary["records_read"],
        "timing": summary["timing_seconds"],
        "verification": summary.get("verification"),
    }


def embed_format(out_dir: str | Path, fmt: str, embedder) -> tuple[np.ndarray, list[str], float]:
    """``(embeddings float32 (N, dim), keys, seconds embedding took)`` of one format's records."""
    from pipeline.data import iter_records

    images, keys = [], []
    for record in iter_records(fmt, Path(out_dir) / fmt):
        images.append(record.image)
        keys.append(record.key)
    start = time.perf_counter()
    vectors = embedder.embed(images)
    return vectors, keys, time.perf_counter() - start


def scores_at(vectors: np.ndarray, keys: list[str], truth: pd.DataFrame, thresholds, k: int | None = 32) -> dict[float, dict]:
    """Pair precision/recall of exact search + connected components at each threshold (the
    dedup stage's grouping, with its ``k`` neighbours per image), from one set of embeddings."""
    from pipeline.dedup.grouping import connected_groups, pair_scores

    sims = vectors.astype(np.float32) @ vectors.astype(np.float32).T
    np.fill_diagonal(sims, -2.0)
    if k is not None and k < len(keys) - 1:
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1 : k]  # each row's k-th largest
        sims = np.where(sims >= kth, sims, -2.0)
    label = dict(zip(truth["key"].astype(str), truth["original_id"].astype(str)))
    true_labels = [label[k_] for k_ in keys]
    out = {}
    for threshold in thresholds:
        i, j = np.nonzero(sims >= threshold)
        groups = connected_groups(len(keys), i, j)
        out[float(threshold)] = pair_scores(groups.tolist(), true_labels)
    return out


# ----------------------------------------------------------------------------------------
# The sweep: candidate thresholds x verifier settings


def planted_images(records: list[PlantedRecord]) -> list[Image.Image]:
    """The records' pictures as img2dataset writes them and the data layer reads them back."""
    return [decode(img2dataset_resize(r.jpeg)[0]) for r in records]


def measure_candidates(
    images: list[Image.Image],
    embedder,
    loosest: float,
    k: int | None = 32,
    settings=None,
    progress: bool = False,
    neighbours: int = 0,
    floor: float | None = None,
) -> dict:
    """Every candidate pair at ``loosest`` (exact search, each image's ``k`` most similar, as
    the stage's search keeps them), plus each image's ``neighbours`` most similar down to
    ``floor`` (as ``verify.candidate_neighbours`` and ``candidate_floor`` add them), and the
    verifier's scores of each: ``{"i", "j", "similarity", "neighbour", "verdicts"}``
    (``neighbour``: the pair is among either image's ``neighbours`` nearest at ``floor`` or
    above; ``verdicts[e]``: :func:`~pipeline.dedup.pair_verify.measure`'s list for pair ``e``)."""
    from tqdm.auto import tqdm

    from pipeline.dedup.pair_verify import VerifySettings, measure, prepare

    settings = settings or VerifySettings()
    vectors = embedder.embed(images).astype(np.float32)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -2.0)
    keep = sims >= loosest
    if k is not None and k < len(images) - 1:
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1 : k]
        keep &= sims >= kth
    near = np.zeros_like(keep)
    if neighbours and floor is not None:
        nearest = np.argsort(-sims, axis=1)[:, :neighbours]
        near[np.arange(len(sims))[:, None], nearest] = True
        near &= sims >= floor
    keep |= keep.T  # a pair is a candidate when either image keeps the other
    near |= near.T
    i, j = np.nonzero(np.triu(keep | near, 1))
    prepared = [prepare(im, settings) for im in images]
    start = time.perf_counter()
    pairs = tqdm(list(zip(i, j)), desc="measuring candidates", disable=not progress, mininterval=10.0)
    verdicts = [measure(prepared[a], prepared[b], settings) for a, b in pairs]
    seconds = time.perf_counter() - start
    return {
        "i": i,
        "j": j,
        "similarity": sims[i, j],
        "neighbour": near[i, j],
        "verdicts": verdicts,
        "seconds_per_pair": seconds / max(len(i), 1),
    }


def sweep_scores(measured: dict, labels: list[str], thresholds, variants: dict) -> pd.DataFrame:
    """Pair precision and recall for each candidate threshold and verifier variant
    (``{name: VerifySettings}``; ``None`` names the embedder alone, no verification): groups are
    connected components of the candidates at the threshold (or among an image's nearest:
    ``measured["neighbour"]``) that the variant accepts, the ambiguous ones only where they are
    a grey image's best (as the stage joins them).

    A variant re-decides the scores :func:`measure_candidates` measured (each orientation's
    best alignment under the settings it measured with): exact for those settings' own
    thresholds, and for a variant that changes only thresholds, what its alignment would find
    unless another alignment of the pair scores differently under it."""
    from pipeline.dedup.grouping import connected_groups, pair_scores
    from pipeline.dedup.pair_verify import ambiguity_score, ambiguous, decide
    from pipeline.dedup.verification import AMBIGUOUS, best_for_grey

    rows = []
    n, i, j = len(labels), measured["i"], measured["j"]
    for name, settings in variants.items():
        accepted = np.ones(len(i), dtype=bool)
        unsure = np.zeros(len(i), dtype=bool)
        table = np.zeros(len(i), dtype=AMBIGUOUS)
        table["i"], table["j"] = i, j
        if settings is not None:  # as compare() decides: a matching orientation first, then the higher structure
            for e, verdicts in enumerate(measured["verdicts"]):
                best = max(verdicts, key=lambda v: (decide(v, settings), v.structure), default=None)
                accepted[e] = best is not None and decide(best, settings)
                if accepted[e] and ambiguous(best, settings):
                    unsure[e] = True
                    table[e] = (i[e], j[e], ambiguity_score(best, settings), *best.grey)
        near = measured.get("neighbour", np.zeros(len(i), dtype=bool)) if settings is not None else np.zeros(len(i), dtype=bool)
        for threshold in thresholds:
            candidate = (measured["similarity"] >= threshold) | near
            chosen = accepted & ~unsure & candidate
            candidates = np.flatnonzero(unsure & candidate)
            chosen[candidates[best_for_grey(table[candidates])]] = True
            groups = connected_groups(n, i[chosen], j[chosen])
            score = pair_scores(groups.tolist(), labels)
            rows.append(
                {"variant": name, "threshold": float(threshold), "precision": score["precision"], "recall": score["recall"]}
            )
    return pd.DataFrame(rows)


def passing_window(table: pd.DataFrame, target: float = 0.95) -> tuple[float, float] | None:
    """The widest run of consecutive thresholds of ``table`` (one variant) where precision and
    recall are both >= ``target``: ``(lowest, highest)``, or None when no threshold passes."""
    table = table.sort_values("threshold")
    best, run = None, []
    for row in table.itertuples():
        if row.precision >= target and row.recall >= target:
            run.append(row.threshold)
            if best is None or run[-1] - run[0] > best[1] - best[0]:
                best = (run[0], run[-1])
        else:
            run = []
    return best


# Candidate thresholds the sweep scores, and the verifier variants: the defaults, then one
# setting at a time moved either way.
SWEEP_THRESHOLDS = tuple(round(0.5 + 0.02 * i, 2) for i in range(21))
SWEEP_CHANGES = {
    "min_structure": (0.45, 0.65),
    "min_tone": (0.9, 0.98),
    "max_colour": (0.3, 0.5),
    "max_changed": (0.04, 0.12),
    "max_brightness_ratio": (1.4, 1.8),
    "max_contrast_ratio": (2.2, 3.0),
    "max_aspect_ratio": (1.6, 3.0),
    "min_tone_faint": (0.95, 0.99),
    "vivid_chroma": (0.02, 0.08),
    "min_local_structure": (0.0, 0.5),
    "min_structure_ground": (0.6, 0.8),
    "texture_structure": (0.65, 0.85),
}


def sweep_variants() -> dict:
    """``{name: VerifySettings or None}``: the embedder alone, the defaults, and each of
    :data:`SWEEP_CHANGES` applied alone."""
    import dataclasses

    from pipeline.dedup.pair_verify import VerifySettings

    base = VerifySettings()
    variants = {"embedder alone": None, "verified (defaults)": base}
    for name, values in SWEEP_CHANGES.items():
        for value in values:
            variants[f"{name}={value}"] = dataclasses.replace(base, **{name: value})
    return variants


def run_sweep(
    seed: int,
    n_originals: int,
    heavy: int,
    light: int,
    kinds: tuple[str, ...],
    out: str | None,
    neighbours: int | None = None,
    rates: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Build a planted set in memory, measure its candidates and print the sweep (see
    :func:`sweep_scores`); ``neighbours``: each image's nearest proposed as candidates (default
    the stage's ``verify.candidate_neighbours``; 0: candidates at the threshold only)."""
    from pipeline.dedup.settings import VerifyStage
    from pipeline.embedders.robust import RobustEmbedder

    start = time.perf_counter()
    records = build_records(seed, n_originals, heavy, light=light, rates=rates, extra_kinds=kinds)
    images = planted_images(records)
    labels = [r.original_id for r in records]
    embedder = RobustEmbedder()
    measured = measure_candidates(
        images,
        embedder,
        min(SWEEP_THRESHOLDS),
        progress=True,
        neighbours=VerifyStage().candidate_neighbours if neighbours is None else neighbours,
        floor=embedder.candidate_floor,
    )
    table = sweep_scores(measured, labels, SWEEP_THRESHOLDS, sweep_variants())
    table.insert(0, "seed", seed)
    table.insert(1, "kinds", ",".join(kinds) or "-")
    print(
        f"seed {seed}, {len(records)} records, kinds +{','.join(kinds) or '-'}: {len(measured['i'])} candidates at "
        f"{min(SWEEP_THRESHOLDS)}, {1000 * measured['seconds_per_pair']:.1f} ms per pair ({time.perf_counter() - start:.0f} s)"
    )
    for name, part in table.groupby("variant", sort=False):
        window = passing_window(part)
        cells = " ".join(f"{p:.3f}/{r:.3f}" for p, r in zip(part["precision"], part["recall"]))
        print(f"  {name:<28} window {window}  P/R by threshold: {cells}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_json(out, orient="records", lines=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/planted", help="folder for the set (each format a sub-folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--originals", type=int, default=600)
    parser.add_argument("--heavy", type=int, default=12, help="originals copied 20-60 times")
    parser.add_argument("--light", type=int, default=30, help="originals copied 2-6 times")
    parser.add_argument("--per-shard", type=int, default=10000, help="records per shard (img2dataset's number_sample_per_shard)")
    parser.add_argument("--no-build", action="store_true", help="score the set already in --out")
    parser.add_argument("--no-score", action="store_true", help="only build")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[], help="also score these thresholds (exact search)")
    parser.add_argument("--kinds", default="", help=f"picture kinds to add, comma-separated: {', '.join(EXTRA_KINDS)}")
    parser.add_argument("--no-verify", action="store_true", help="score the embedder's pairs as they are (no pair verification)")
    parser.add_argument(
        "--sweep", action="store_true", help="build in memory and score candidate thresholds x verifier settings (no files)"
    )
    parser.add_argument("--sweep-out", default=None, help="with --sweep: write the table here (JSON lines)")
    parser.add_argument(
        "--recolour", type=float, default=0.0, help="share of copies whose hue is turned 5-20 degrees (default none)"
    )
    parser.add_argument(
        "--candidate-neighbours",
        type=int,
        default=None,
        help="with --sweep: each image's nearest proposed (default: the stage's)",
    )
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    rates = {**EDIT_RATES, "recolour": args.recolour} if args.recolour else None

    if args.sweep:
        run_sweep(args.seed, args.originals, args.heavy, args.light, kinds, args.sweep_out, args.candidate_neighbours, rates)
        return
    if not args.no_build:
        start = time.perf_counter()
        build_planted(args.out, args.seed, args.originals, args.heavy, args.light, args.per_shard, rates, extra_kinds=kinds)
        truth = pd.read_parquet(Path(args.out) / "files_ground_truth.parquet")
        print(
            f"planted set: {len(truth)} records from {truth.original_id.nunique()} originals "
            f"(seed {args.seed}) in {', '.join(FORMATS)} under {args.out} ({time.perf_counter() - start:.0f} s)"
        )
    if args.no_score:
        return
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        embedder = instantiate(compose(config_name="dedup").embedder)  # the stage's default embedder
    print(f"embedder {embedder.name}, threshold {embedder.threshold}")
    if not args.no_verify:
        print(f"pairs verified: candidates at {embedder.candidate_threshold}")
    for fmt in FORMATS:
        ev = score_with_dedup(args.out, fmt, embedder, verify=not args.no_verify)
        rate = ev["records"] / ev["timing"]["embed"] if ev["timing"].get("embed") else float("nan")
        verified = ev.get("verification") or {}
        print(
            f"  {fmt:<10} pair precision {ev['precision']:.4f}, recall {ev['recall']:.4f} "
            f"({ev['correct_pairs']} of {ev['predicted_pairs']} predicted / {ev['true_pairs']} true pairs; "
            f"{ev['records']} records, {rate:.0f} images/s read + embedded"
            + (
                f"; {verified['candidates']} candidates, {verified['candidates_per_record']:.2f} per record, "
                f"{verified['compared']} compared at {1000 * verified['seconds_per_pair']:.1f} ms per pair)"
                if verified
                else ")"
            )
        )
        if args.thresholds:
            vectors, keys, _ = embed_format(args.out, fmt, embedder)
            truth = pd.read_parquet(Path(args.out) / f"{fmt}_ground_truth.parquet")
            for threshold, s in scores_at(vectors, keys, truth, args.thresholds).items():
                print(f"    threshold {threshold:.3f}: precision {s['precision']:.4f}, recall {s['recall']:.4f}")


if __name__ == "__main__":
    main()
