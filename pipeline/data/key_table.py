"""Records keyed by another tool's keys, found by URL: a download of listed images.

img2dataset names the records it downloads by its own counter (``000010005``) and keeps each
one's source URL in its metadata (the ``.json`` beside the image, or the parquet ``url``
column). A data set downloaded from a list of ``url`` and ``key`` (the detector's
``candidates.parquet``) is read under the list's keys with ``data.key_table=<that list>``: each
record takes the key listed for its URL, so that keys from the duplicate finder (a prompt's
group) find their images in the download.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.data.errors import DataConfigError
from pipeline.data.record import Record
from pipeline.data.rejects import RejectLog


def read_key_table(path: str | Path) -> dict[str, str]:
    """``{url: key}`` from a parquet file with ``url`` and ``key`` columns (``data.key_table``)."""
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"data.key_table: {path} does not exist")
    try:
        table = pq.read_table(path, columns=["url", "key"])
    except (OSError, KeyError, ValueError) as err:
        raise DataConfigError(f"data.key_table: {path} is not a parquet file with url and key columns ({err})") from err
    return {str(url): str(key) for url, key in zip(table.column("url").to_pylist(), table.column("key").to_pylist()) if url}


def rekey_by_url(records: Iterator[Record], keys_by_url: dict[str, str], rejects: RejectLog) -> Iterator[Record]:
    """``records`` under the keys listed for their ``meta["url"]``; a record whose URL is not
    listed is rejected (``not listed: ...``), the reason naming its own key."""
    for record in records:
        url = record.meta.get("url") if isinstance(record.meta, dict) else None
        key = keys_by_url.get(str(url)) if url is not None else None
        if key is None:
            rejects.add(record.key, str(url), "not listed: the record's url is not in data.key_table")
            continue
        record.key = key
        yield record
