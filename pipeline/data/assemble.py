"""Small steps every reader shares: clean a caption, decode an image, parse metadata.

Each step either returns the value or records the record in the ``RejectLog`` with the
reason and returns ``None``; the reader then skips the record and goes on.

Text has one policy in every format: captions and metadata must be valid UTF-8. A record
whose caption is not is rejected as ``unreadable caption: not valid UTF-8 (...)``, never
read with replacement characters (two captions differing only in a bad byte would then
read the same).

Text also has a size limit, set per data set (:class:`TextLimits`, ``data.max_caption_bytes``
and ``data.max_metadata_bytes``): no real caption is near 64 KiB, and a record whose caption
or metadata is above its limit is rejected as a whole (``oversized caption: ...``,
``oversized metadata: ...``), never kept without them. Readers check a file's or tar
member's size before reading it (:class:`TooLarge` stands for what was not read), so an
oversized one is never held in memory.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.errors import DataConfigError
from pipeline.data.images import BadImage, decode_image
from pipeline.data.rejects import RejectLog

MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TextLimits:
    """The most bytes a record's caption and its metadata may hold (``data.max_caption_bytes``,
    ``data.max_metadata_bytes``), each a positive integer."""

    caption: int = MAX_CAPTION_BYTES
    metadata: int = MAX_METADATA_BYTES

    @classmethod
    def from_options(cls, max_caption_bytes: Any, max_metadata_bytes: Any) -> TextLimits:
        """Checked limits; a value that is not a positive integer raises ``DataConfigError`` naming its key."""
        return cls(_positive("max_caption_bytes", max_caption_bytes), _positive("max_metadata_bytes", max_metadata_bytes))


def _positive(name: str, value: Any) -> int:
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise DataConfigError(f"data.{name}: must be a positive integer (bytes), got {value!r}")
    return number


@dataclass(frozen=True)
class TooLarge:
    """Text that was not read because it is above its limit: ``size`` bytes, or more when not ``exact``."""

    size: int
    exact: bool = True

    def reason(self, kind: str, option: str, limit: int) -> str:
        """``oversized <kind>: <size> bytes, above data.<option> = <limit>``."""
        size = f"{self.size} bytes" if self.exact else f"more than {self.size} bytes"
        return f"oversized {kind}: {size}, above data.{option} = {limit}"


def read_at_most(path: Path, limit: int) -> bytes | TooLarge:
    """The bytes of the file at ``path``, or :class:`TooLarge` when it holds more than ``limit``.

    The size is taken from the open file before reading, and at most ``limit + 1`` bytes are
    read, so a file that grows, or reads on past its stated size, is bounded too.
    Raises ``OSError`` when the file cannot be read.
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            return TooLarge(size)
        data = f.read(limit + 1)
    return TooLarge(limit, exact=False) if len(data) > limit else data


def text_size(value: Any) -> int | None:
    """The size in bytes of ``value`` as UTF-8 (bytes as they are); None when it is not text."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", errors="surrogatepass"))
    return None


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


def caption_or_reject(
    value: Any, key: str, source: str, rejects: RejectLog, empty: str, limit: int = MAX_CAPTION_BYTES
) -> str | None:
    """The caption in ``value`` (see :func:`clean_caption`), or reject the record.

    The reason is ``oversized caption: ...`` when ``value`` is a :class:`TooLarge` or holds
    more than ``limit`` bytes, ``unreadable caption: not valid UTF-8 (...)``, or
    ``missing caption: <empty>`` when there is no text (``empty`` says where none was found).
    """
    size = value.size if isinstance(value, TooLarge) else text_size(value)
    if size is not None and size > limit:
        too_large = value if isinstance(value, TooLarge) else TooLarge(size)
        rejects.add(key, source, too_large.reason("caption", "max_caption_bytes", limit))
        return None
    try:
        caption = clean_caption(value)
    except BadText as err:
        rejects.add(key, source, f"unreadable caption: {err}")
        return None
    if not caption:
        rejects.add(key, source, f"missing caption: {empty}")
        return None
    return caption


def decode_or_reject(data: bytes | None | Callable[[], bytes], key: str, source: str, rejects: RejectLog) -> Image.Image | None:
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


def parse_meta(
    data: bytes | str | TooLarge, key: str, source: str, rejects: RejectLog, limit: int = MAX_METADATA_BYTES
) -> dict[str, Any] | None:
    """Parse a JSON object (img2dataset's per-record ``.json``), or reject the record.

    Above ``limit`` bytes (or a :class:`TooLarge`) the reason is ``oversized metadata: ...``
    and nothing is parsed. As for captions, the text and every string in it must be valid
    UTF-8 (a ``"\\udce9"`` escape is not): else the reason is ``unreadable metadata: not valid UTF-8 (...)``.
    """
    size = data.size if isinstance(data, TooLarge) else text_size(data)
    if size is not None and size > limit:
        too_large = data if isinstance(data, TooLarge) else TooLarge(size)
        rejects.add(key, source, too_large.reason("metadata", "max_metadata_bytes", limit))
        return None
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
