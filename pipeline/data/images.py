"""Decoding image bytes safely: corrupt, truncated and oversized images raise ``BadImage``."""

from __future__ import annotations

import io
import warnings

from PIL import Image

# Pillow's decompression-bomb guard stays on: an image above this many pixels is rejected.
# Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we treat the warning as an error.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class BadImage(ValueError):
    """The bytes do not decode to a usable image; the message says why."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to a fully loaded RGB image."""
    if not data:
        raise BadImage("empty image: the file has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadImage(
                        f"oversized image: {img.width}x{img.height} pixels is above the "
                        f"limit of {MAX_IMAGE_PIXELS}"
                    )
                img.load()  # forces the full decode, so truncation is caught here
                return img.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"oversized image: {err}") from err
    except Exception as err:  # Pillow raises many types for bad data; all mean the same here
        raise BadImage(f"corrupt image: {type(err).__name__}: {err}") from err
