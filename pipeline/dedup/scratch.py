"""The group phase's scratch folders: one per process under the stage's folder, removed when it ends."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Scratch folders of the group phase: <out>/group_tmp.<host>.<pid>.<random>, one per process.
SCRATCH_PREFIX = "group_tmp."


@contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """A new folder under ``out`` for this process's temporary files, removed afterwards.

    Its name holds the host and process id, so that two processes never share one and the
    folders a killed process left on this host (whose process has ended) are removed here
    first; those of another host are left alone (their process may still be running).
    """
    host = socket.gethostname().replace(".", "_")
    out.mkdir(parents=True, exist_ok=True)
    for folder in out.glob(f"{SCRATCH_PREFIX}{host}.*"):
        parts = folder.name.split(".")
        if len(parts) == 4 and parts[2].isdigit() and not _running(int(parts[2])):
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{host}.{os.getpid()}.", dir=out))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this host (one of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True
