"""Records a stage skipped, with the reason, so that no input is lost silently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class RejectLog:
    """Collects skipped records; optionally appends each one to a JSON-lines file.

    Each line of the file is ``{"key": ..., "source": ..., "reason": ...}``, plus ``"count"``
    when the entry stands for more than one record (a shard that broke part-way, a file
    with the wrong columns); a line without it stands for one record. A reason reads
    ``"kind: detail"`` (``"corrupt image: ..."``, ``"missing caption: ..."``) and the summary
    counts records by kind. With a file, only the first ``keep_in_memory`` entries stay in
    ``entries`` (a LAION shard can have millions of failed downloads); ``len()`` and the
    counts always cover all. Give each rank its own file (e.g. ``rejects_<rank>.jsonl``).

    ``once=True`` is for a stage that reruns over the same inputs and appends to the file of
    its earlier runs: an entry already in the file (same key, source and reason) is counted
    but not written again, so the file lists each rejected record once.
    """

    def __init__(self, path: str | Path | None = None, keep_in_memory: int = 10_000, once: bool = False):
        self.path = Path(path) if path is not None else None
        self.reasons: Counter[str] = Counter()
        self.entries: list[dict[str, str | int]] = []
        self.keep_in_memory = keep_in_memory
        self._count = 0
        self._written: set[tuple] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if once:
                self._written = set(map(_identity, _read_entries(self.path)))

    def add(self, key: str, source: str, reason: str, count: int = 1) -> None:
        """Record that ``key`` (read from ``source``) was skipped, and why.

        ``count`` is how many records the entry stands for (at least 1): ``len()``, the
        counts and the summary add it up.
        """
        if count < 1:
            raise ValueError(f"count: an entry stands for at least one record, got {count}")
        entry: dict[str, str | int] = {"key": key, "source": source, "reason": reason}
        if count != 1:
            entry["count"] = count
        self._count += count
        if self.path is None or len(self.entries) < self.keep_in_memory:
            self.entries.append(entry)
        # The counter groups by the kind of problem, not its full message.
        self.reasons[reason.split(":", 1)[0]] += count
        if self._written is not None:
            if _identity(entry) in self._written:
                return
            self._written.add(_identity(entry))
        if self.path is not None:
            # A key or path from a hostile file name can hold lone surrogates, which UTF-8
            # cannot encode; backslashreplace writes them as JSON's own "\udcxx" escapes.
            with self.path.open("a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        """The number of records rejected (not of entries)."""
        return self._count

    def counts(self) -> dict[str, int]:
        """Records rejected per kind of problem (``"corrupt image"``, ``"missing caption"`` ...), most first."""
        return dict(self.reasons.most_common())

    def summary(self) -> str:
        if not self._count:
            return "0 records rejected"
        kinds = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        where = f" (see {self.path})" if self.path is not None else ""
        return f"{self._count} records rejected: {kinds}{where}"


def _identity(entry: dict) -> tuple:
    return (entry.get("key"), entry.get("source"), entry.get("reason"))


def _read_entries(path: Path) -> list[dict]:
    """The entries of a reject file; a missing file has none, an unreadable line is ignored."""
    if not path.is_file():
        return []
    entries = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries
