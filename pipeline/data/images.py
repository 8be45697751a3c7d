"""Decoding image bytes safely: corrupt, truncated and oversized images raise ``BadImage``.

Every image comes out as 8-bit RGB, whatever mode it was stored in (see :func:`to_rgb`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Pillow's decompression-bomb guard stays on: an image above this many pixels is rejected.
# Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we treat the warning as an error.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Modes with an alpha band; other modes can have a transparent colour (``info["transparency"]``).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Where an image is transparent it shows this, as img2dataset's resizer does ("alpha matting").
BACKGROUND = (255, 255, 255)


class BadImage(ValueError):
    """The bytes do not decode to a usable image; the message says why."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to a fully loaded 8-bit RGB image (see :func:`to_rgb`)."""
    if not data:
        raise BadImage("empty image: the file has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadImage(f"oversized image: {img.width}x{img.height} pixels is above the limit of {MAX_IMAGE_PIXELS}")
                img.load()  # forces the full decode, so truncation is caught here
                return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"oversized image: {err}") from err
    except Exception as err:  # Pillow raises many types for bad data; all mean the same here
        raise BadImage(f"corrupt image: {type(err).__name__}: {err}") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, keeping what tells images apart in every mode.

    * 16-bit greyscale (``I;16``, ``I;16B`` ...) and ``I`` (32-bit integers, the mode some
      Pillow versions give 16-bit PNGs): ``v`` becomes ``round(v / 257)``, the inverse of
      the usual 8-to-16-bit ``k -> 257 k``; values outside 0..65535 are clipped. (Pillow's
      own conversion clips at 255, so nearly every 16-bit image turns solid white.)
    * ``F`` (32-bit floats): ``round(255 x)`` when no value is above 1 (the unit scale),
      else taken on Pillow's 0..255 scale; clipped, NaN as 0.
    * alpha or a transparent colour (``RGBA``, ``LA``, ``PA``, ``P`` with transparency ...):
      composited on :data:`BACKGROUND`, so the colour hidden under a transparent pixel
      does not count and a transparent image matches its flattened copy.
    * every other mode (``L``, ``P``, ``CMYK``, ``YCbCr``, ``1`` ...): Pillow's conversion.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        # round(v * 255 / 65535) in integers; v / 257 is never exactly halfway (257 is odd).
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255
        return Image.fromarray(np.floor(np.clip(values, 0, 255) + 0.5).astype(np.uint8)).convert("RGB")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")
