"""The unit every stage reads: one captioned training image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.data.location import Location


@dataclass
class Record:
    """One captioned image of a training set.

    Attributes:
        key: stable identifier, unique within the data set and the same on every run:
            ``files``: the path under the root without suffix (``"000123"``,
            ``"00000/000000123"``); ``webdataset``: ``"<shard stem>/<key in the tar>"``;
            ``parquet``: the ``key`` column, else ``"<file stem>/<row index>"``;
            ``imagefolder``: the listed file path without suffix. Bytes of a name that
            are not UTF-8 appear as ``\\xNN`` escapes.
        caption: the image's caption, stripped of surrounding whitespace.
        image: the decoded image, always RGB. ``None`` only when a reader was asked not
            to decode images (e.g. when embeddings are precomputed).
        meta: whatever else the data set stores for the record (img2dataset's ``.json``,
            the other parquet columns or captions-file fields).
        location: where the image's bytes lie (:class:`~pipeline.data.location.Location`),
            or None when they cannot be read alone (a compressed tar).
    """

    key: str
    caption: str
    image: Image.Image | None
    meta: dict[str, Any] = field(default_factory=dict)
    location: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # A key made of a file or tar member name may hold bytes that are not UTF-8 (read as
        # lone surrogates), which parquet and JSON cannot store: they are spelled as escapes
        # (\xff), the same on every run, so that the record is kept and found again by key.
        try:
            self.key.encode("utf-8")
        except UnicodeEncodeError:
            self.key = self.key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
