"""The demo data set: a small LAION-like training set with planted duplicates.

Built offline from images that ship with scikit-image plus procedurally drawn scenes, and
written in img2dataset's ``files`` layout (``<key>.jpg`` + ``<key>.txt``). Duplication is
planted the way LAION has it: a few originals repeated many times (exact copies, re-encoded
JPEGs, small resizes, crops, shifts, colour changes, overlaid text), bands repeated a few
times, and many singletons. ``ground_truth.parquet`` says which original each record copies.

    python -m pipeline.demo.dataset out_dir=data/demo seed=0 image_size=64
"""

from __future__ import annotations

import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from pipeline.io import atomic_write, write_parquet

log = logging.getLogger(__name__)

# Photographs bundled with scikit-image (no download). chelsea and cat are the same picture.
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "clock",
    "retina",
    "colorwheel",
    "brick",
    "logo",
)

DEFAULT_BANDS = {"heavy": (6, 150), "high": (6, 40), "mid": (8, 10), "low": (12, 3), "single": (900, 1)}

# How a copy differs from its original, with the share of copies made that way.
COPY_TRANSFORMS = {
    "exact": 0.25,
    "jpeg": 0.15,
    "resize": 0.12,
    "crop": 0.12,
    "shift": 0.12,
    "color": 0.12,
    "text": 0.12,
}

_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class Original:
    original_id: str
    band: str
    copies: int
    source: str  # "skimage:<name>" or "drawn"
    caption: str
    image: Image.Image


def made_up_word(rng: np.random.Generator) -> str:
    """A pronounceable non-word, so that captions share no vocabulary by accident."""
    syllables = rng.integers(2, 4)
    return "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables))


def make_caption(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        words = [made_up_word(rng) for _ in range(rng.integers(3, 5))]
        caption = " ".join(words)
        if caption not in used and not used.intersection(words):
            used.add(caption)
            used.update(words)
            return caption


def caption_variant(caption: str, rng: np.random.Generator) -> str:
    """A caption a re-upload of the same picture might carry."""
    kind = rng.integers(0, 3)
    if kind == 0:
        return f"{caption} wallpaper"
    if kind == 1:
        return f"photo of {caption}"
    words = caption.split()
    rng.shuffle(words)
    return " ".join(words)


def skimage_photo(name: str, size: int) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    image = image.convert("RGB")  # grey and RGBA photos become RGB
    return center_square(image).resize((size, size), Image.Resampling.LANCZOS)


def center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def drawn_scene(rng: np.random.Generator, size: int) -> Image.Image:
    """A random scene: a two-colour gradient background and a few filled shapes.

    Drawn at 4x and downsampled, so edges are smooth like a photo's.
    """
    big = size * 4
    top, bottom = np.array(random_colour(rng)), np.array(random_colour(rng))
    t = np.linspace(0.0, 1.0, big)[:, None, None]
    angle_mix = rng.uniform(0, 1)
    s = np.linspace(0.0, 1.0, big)[None, :, None]
    w = angle_mix * t + (1 - angle_mix) * s
    background = (top * (1 - w) + bottom * w).astype(np.uint8)
    background = np.broadcast_to(background, (big, big, 3)).copy()
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 7)):
        x0, y0 = rng.integers(-big // 4, big, size=2)
        w_, h_ = rng.integers(big // 6, big // 2, size=2)
        box = (int(x0), int(y0), int(x0 + w_), int(y0 + h_))
        kind = rng.integers(0, 4)
        fill = random_colour(rng)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        elif kind == 2:
            points = [tuple(int(v) for v in rng.integers(0, big, size=2)) for _ in range(3)]
            draw.polygon(points, fill=fill)
        else:
            draw.line(box, fill=fill, width=int(rng.integers(big // 32, big // 10)))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def transform_copy(image: Image.Image, kind: str, rng: np.random.Generator, words: list[str]) -> Image.Image:
    """A near-duplicate of ``image``: the kind of change re-uploads on the web go through."""
    size = image.width
    if kind in ("exact", "jpeg"):  # jpeg: the re-encoding happens when written
        return image.copy()
    if kind == "resize":
        scale = rng.uniform(0.6, 0.9)
        small = image.resize((max(8, int(size * scale)),) * 2, Image.Resampling.BILINEAR)
        return small.resize((size, size), Image.Resampling.BILINEAR)
    if kind == "crop":
        keep = rng.uniform(0.88, 0.96)
        side = int(size * keep)
        left, top = rng.integers(0, size - side + 1, size=2)
        return image.crop((int(left), int(top), int(left) + side, int(top) + side)).resize((size, size), Image.Resampling.BICUBIC)
    if kind == "shift":
        dx, dy = (int(v) for v in rng.integers(-size // 20 - 1, size // 20 + 2, size=2))
        array = np.asarray(image)
        array = np.roll(array, (dy, dx), axis=(0, 1))
        return Image.fromarray(array)
    if kind == "color":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
        return ImageEnhance.Color(image).enhance(rng.uniform(0.85, 1.15))
    if kind == "text":
        image = image.copy()
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(6, size // 8))
        x, y = int(rng.integers(0, size // 3)), int(rng.choice([0, size - size // 6]))
        draw.text((x, y), str(rng.choice(words)), fill=random_colour(rng), font=font)
        return image
    raise ValueError(f"unknown copy transform {kind!r}")


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_originals(bands: dict[str, tuple[int, int]], size: int, rng: np.random.Generator) -> list[Original]:
    """Originals, heaviest band first; the photographs go to the most duplicated bands."""
    used_words: set[str] = set()
    photos = list(SKIMAGE_PHOTOS)
    originals = []
    ordered = sorted(bands.items(), key=lambda item: -item[1][1])
    for band, (count, copies) in ordered:
        for _ in range(count):
            if photos and copies > 1:
                name = photos.pop(0)
                image, source = skimage_photo(name, size), f"skimage:{name}"
            else:
                image, source = drawn_scene(rng, size), "drawn"
            original_id = f"orig-{len(originals):05d}"
            originals.append(Original(original_id, band, copies, source, make_caption(rng, used_words), image))
    return originals


def build_records(originals: list[Original], rng: np.random.Generator, variant_rate: float) -> list[dict]:
    """Every record of the data set (image bytes + caption + ground truth), shuffled."""
    kinds = list(COPY_TRANSFORMS)
    weights = np.array(list(COPY_TRANSFORMS.values()))
    weights = weights / weights.sum()
    words = [w for o in originals for w in o.caption.split()]
    records = []
    for original in originals:
        for copy_index in range(original.copies):
            # The first copy is the original itself; the rest vary.
            kind = "original" if copy_index == 0 else str(rng.choice(kinds, p=weights))
            image = original.image if kind == "original" else transform_copy(original.image, kind, rng, words)
            quality = int(rng.integers(40, 80)) if kind == "jpeg" else 95
            caption = original.caption
            if kind != "original" and rng.uniform() < variant_rate:
                caption = caption_variant(caption, rng)
            records.append(
                {
                    "jpeg": jpeg_bytes(image, quality),
                    "caption": caption,
                    "original_id": original.original_id,
                    "original_caption": original.caption,
                    "band": original.band,
                    "dup_count": original.copies,
                    "transform": kind,
                    "source": original.source,
                }
            )
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def build_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    image_size: int = 64,
    bands: dict[str, tuple[int, int]] | None = None,
    caption_variant_rate: float = 0.15,
) -> pd.DataFrame:
    """Write the demo set to ``out_dir/images`` and its ground truth; return the ground truth.

    The output depends only on the arguments (and the Pillow version's JPEG encoder).
    Ground truth columns: ``key``, ``caption``, ``original_id``, ``original_caption``,
    ``band``, ``dup_count`` (copies of that original in the set), ``transform``, ``source``.
    """
    bands = {name: (int(n), int(c)) for name, (n, c) in (bands or DEFAULT_BANDS).items()}
    for name, (n, c) in bands.items():
        if n < 0 or c < 1:
            raise ValueError(f"bands.{name}: need [originals >= 0, copies >= 1], got [{n}, {c}]")
    if image_size < 16:
        raise ValueError(f"image_size: must be at least 16 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    originals = make_originals(bands, image_size, rng)
    records = build_records(originals, rng, caption_variant_rate)

    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    staging = out_dir / ".images.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    rows = []
    for index, record in enumerate(records):
        key = f"{index:06d}"
        (staging / f"{key}.jpg").write_bytes(record.pop("jpeg"))
        (staging / f"{key}.txt").write_text(record["caption"] + "\n", encoding="utf-8")
        rows.append({"key": key, **record})
    # Swap the finished folder in whole, so an interrupted build never leaves a partial set.
    if images_dir.exists():
        shutil.rmtree(images_dir)
    staging.rename(images_dir)
    ground_truth = pd.DataFrame(rows)
    write_parquet(ground_truth, out_dir / "ground_truth.parquet")
    originals_dir = out_dir / "originals"
    originals_dir.mkdir(exist_ok=True)
    for original in originals:
        atomic_write(originals_dir / f"{original.original_id}.png", lambda tmp, im=original.image: im.save(tmp, format="PNG"))
    return ground_truth


def summarize(ground_truth: pd.DataFrame) -> str:
    per_band = (
        ground_truth.groupby("band")
        .agg(originals=("original_id", "nunique"), records=("key", "size"), copies=("dup_count", "first"))
        .sort_values("copies", ascending=False)
    )
    return f"{len(ground_truth)} records from {ground_truth.original_id.nunique()} originals\n{per_band.to_string()}"


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from pipeline.cli import CONF_DIR, config_int, config_number, stage_main

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo_data")
    @stage_main("demo.dataset")
    def _run(cfg: DictConfig) -> None:
        ground_truth = build_demo_dataset(
            cfg.out_dir,
            seed=config_int(cfg, "seed"),
            image_size=config_int(cfg, "image_size"),
            bands={k: tuple(v) for k, v in cfg.bands.items()},
            caption_variant_rate=config_number(cfg, "caption_variant_rate", minimum=0, maximum=1),
        )
        print(summarize(ground_truth))
        print(
            f"demo data set written to {Path(cfg.out_dir) / 'images'} (ground truth: {Path(cfg.out_dir) / 'ground_truth.parquet'})"
        )

    _run()


if __name__ == "__main__":
    main()
