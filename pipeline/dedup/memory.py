"""Each task's peak resident memory, recorded in ``<dedup>/memory/<phase>_<rank>.json`` to size array tasks."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: anonymous memory plus the pages of
    mapped files it touched. On Linux ``VmHWM`` of ``/proc/self/status``, which starts afresh
    at exec (``ru_maxrss`` would carry over the launching process's peak); elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> None:
    """Start this process's peak (``VmHWM``) afresh, so that a process running several tasks in
    turn records each task's own; a no-op where the kernel offers no reset (non-Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
