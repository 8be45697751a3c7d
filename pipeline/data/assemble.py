"""Small steps every reader shares: clean a caption, decode an image, parse metadata.

Each step either returns the value or records the record in the ``RejectLog`` with the
reason and returns ``None``; the reader then skips the record and goes on.

Text has one policy in every format: captions and metadata must be valid UTF-8. A record
whose caption is not is rejected as ``unreadable caption: not valid UTF-8 (...)``, never
read with replacement characters (two captions differing only in a bad byte would then
read the same).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from PIL import Image

from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog


class BadText(ValueError):
    """Text that is not valid UTF-8; the message says where: ``not valid UTF-8 (byte 0xe9 at offset 3)``."""


def utf8_problem(value: Any) -> str | None:
    """Where ``value`` is not valid UTF-8, in words; None when it is (or holds no text).

    Bytes are decoded strictly. Text must hold no lone surrogate: that is what reading with
    ``errors="surrogateescape"`` gives for an invalid byte (``"\\udce9"`` for 0xe9) and what
    JSON's ``"\\ud800"`` escape gives, and UTF-8 cannot encode it. Dicts (keys too) and
    lists are searched, for parsed JSON and rows.
    """
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"byte 0x{value[err.start]:02x} at offset {err.start}"
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            char = ord(value[err.start])
            if 0xDC80 <= char <= 0xDCFF:  # the byte surrogateescape could not decode
                return f"byte 0x{char - 0xDC00:02x} at character {err.start}"
            return f"lone surrogate U+{char:04X} at character {err.start}"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            problem = utf8_problem(k) or utf8_problem(v)
            if problem is not None:
                return f"in {k!r}: {problem}"
    elif isinstance(value, (list, tuple)):
        for v in value:
            problem = utf8_problem(v)
            if problem is not None:
                return problem
    return None


def clean_caption(value: Any) -> str:
    """A caption as text without surrounding whitespace; ``""`` when there is none.

    The one place that decides what a caption's text is, for every format: bytes and text
    that are not valid UTF-8 (see :func:`utf8_problem`) raise ``BadText``. A leading
    byte-order mark (Windows editors write one) is dropped.
    """
    if value is None:
        return ""
    problem = utf8_problem(value)
    if problem is not None:
        raise BadText(f"not valid UTF-8 ({problem})")
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value).removeprefix("\ufeff").strip()


def caption_or_reject(value: Any, key: str, source: str, rejects: RejectLog, empty: str) -> str | None:
    """The caption in ``value`` (see :func:`clean_caption`), or reject the record.

    The reason is ``unreadable caption: not valid UTF-8 (...)``, or ``missing caption: <empty>``
    when there is no text (``empty`` says where none was found).
    """
    try:
        caption = clean_caption(value)
    except BadText as err:
        rejects.add(key, source, f"unreadable caption: {err}")
        return None
    if not caption:
        rejects.add(key, source, f"missing caption: {empty}")
        return None
    return caption


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
    """Parse a JSON object (img2dataset's per-record ``.json``), or reject the record.

    As for captions, the text and every string in it must be valid UTF-8 (a ``"\\udce9"``
    escape is not): else the reason is ``unreadable metadata: not valid UTF-8 (...)``.
    """
    problem = utf8_problem(data)
    if problem is None:
        try:
            meta = json.loads(data)
        except ValueError as err:
            rejects.add(key, source, f"unreadable metadata: {err}")
            return None
        problem = utf8_problem(meta)
    if problem is not None:
        rejects.add(key, source, f"unreadable metadata: not valid UTF-8 ({problem})")
        return None
    if not isinstance(meta, dict):
        rejects.add(key, source, f"unreadable metadata: expected a JSON object, got {type(meta).__name__}")
        return None
    return meta
