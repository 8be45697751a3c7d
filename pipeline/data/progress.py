"""A progress bar over a stream of records, with the running count of rejects beside it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from pipeline.data.rejects import RejectLog

T = TypeVar("T")


def with_progress(
    items: Iterable[T],
    desc: str,
    rejects: RejectLog | None = None,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "img",
) -> Iterator[T]:
    """Yield ``items`` unchanged while a tqdm bar (on stderr) counts them.

    ``total`` is usually unknown for a stream (the bar then shows count and rate). When a
    ``rejects`` log is given, the bar also shows how many records were skipped so far.
    """
    if not enabled:
        yield from items
        return
    bar = tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0)
    shown = 0

    def show_rejects() -> None:
        nonlocal shown
        if rejects is not None and len(rejects) != shown:
            shown = len(rejects)
            bar.set_postfix(rejected=shown, refresh=False)

    try:
        for item in items:
            show_rejects()
            bar.update(1)
            yield item
        show_rejects()  # records rejected after the last one yielded
    finally:
        bar.close()
