"""Small steps every reader shares: clean a caption, decode an image, parse metadata.

Each step either returns the value or records the record in the ``RejectLog`` with the
reason and returns ``None``; the reader then skips the record and goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from PIL import Image

from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog


def clean_caption(value: Any) -> str:
    """A caption as text without surrounding whitespace; ``""`` when there is none."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def decode_or_reject(
    data: bytes | None | Callable[[], bytes], key: str, source: str, rejects: RejectLog
) -> Image.Image | None:
    """Decode ``data`` (bytes, or a function that reads them) to RGB, or reject the record."""
    try:
        raw = data() if callable(data) else data
    except OSError as err:
        rejects.add(key, source, f"unreadable file: {err}")
        return None
    if raw is None:
        rejects.add(key, source, "missing image: no image bytes")
        return None
    try:
        return decode_image(raw)
    except BadImage as err:
        rejects.add(key, source, str(err))
        return None


def parse_meta(data: bytes | str, key: str, source: str, rejects: RejectLog) -> dict[str, Any] | None:
    """Parse a JSON object (img2dataset's per-record ``.json``), or reject the record."""
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        rejects.add(key, source, f"unreadable metadata: {err}")
        return None
    if not isinstance(meta, dict):
        rejects.add(key, source, f"unreadable metadata: expected a JSON object, got {type(meta).__name__}")
        return None
    return meta
