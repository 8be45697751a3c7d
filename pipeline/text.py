"""Untrusted text (captions, prompt ids, file names, training keys) made safe to show.

Such text comes from web captions and from other tools' folders, so it may hold characters
that change how the text around it reads: bidi controls (U+202E makes ``file\\u202egnp.exe``
read as ``file...exe.png``), terminal escape sequences, NUL bytes, or 100 KB of caption.
"""

from __future__ import annotations

import re
from typing import Any

# Shown as escapes rather than raw: C0 and C1 controls (NUL, ESC, newlines included), the line
# and paragraph separators, the bidi embeddings, overrides and isolates, the directional marks,
# and lone surrogates (which no UTF-8 writer accepts). Ordinary RTL letters and joiners
# (ZWJ/ZWNJ, needed by Persian, Indic scripts and emoji) are left alone.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def display_text(value: Any, limit: int | None = 200) -> str:
    """``value`` as one line of plain text that is safe to print or put in a page.

    Control, bidi-control and lone-surrogate characters become visible escapes (``\\x00``,
    ``\\u202e``); everything else is kept as it is. Beyond ``limit`` characters of the original
    (``None``: no limit) the rest is replaced by ``… (N more characters)``. ``None`` gives "".
    The result still needs HTML escaping in a page, and a ``<bdi>`` (or ``dir="auto"``) around
    it so that right-to-left text does not reorder what sits beside it.
    """
    text = "" if value is None else str(value)
    more = len(text) - limit if limit is not None else 0
    if more > 0:
        return _UNSAFE.sub(_escape, text[:limit]) + f"… ({more:,} more characters)"
    return _UNSAFE.sub(_escape, text)
