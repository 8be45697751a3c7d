"""Atomic writes, completion markers and writer locks: what makes every stage safe to interrupt,
rerun and launch twice."""

from __future__ import annotations

import errno
import fcntl
import filecmp
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file: either the old file (or none) or the new one. The
    file gets the mode that the umask gives any new file. A file that already holds exactly the
    new bytes is left as it is (its modification time too), so that a rerun which recomputes the
    same result does not make the stages after it redo their work. An ``OSError`` of the block
    or the move names ``path`` as its file when it named none or the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600 whatever the umask; outputs get the mode a plain open()
        # would give them, so that colleagues on a shared cluster can read them.
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        if not _same_bytes(tmp, path):
            os.replace(tmp, path)
    except OSError as err:
        # Name the file meant, not the temporary one (or none: a full disk fails a write()
        # without a file name).
        if err.filename is None or str(err.filename) == tmp:
            err.filename, err.filename2 = str(path), None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _same_bytes(new: str | Path, old: Path) -> bool:
    """Whether the file ``old`` exists and holds exactly the bytes of ``new``."""
    try:
        return old.is_file() and os.path.getsize(new) == old.stat().st_size and filecmp.cmp(new, old, shallow=False)
    except OSError:
        return False


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore it
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_parquet(df, path: str | Path) -> Path:
    """Write a pandas DataFrame to parquet atomically."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_npy(array, path: str | Path) -> Path:
    """Write a numpy array as ``.npy`` atomically."""
    import numpy as np

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save given a name would add ".npy" to it
            np.save(f, array)

    return atomic_write(path, save)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


# Longest name a unit may have: file systems cap a name at 255 bytes, and a unit's files add
# suffixes (".json", ".png") and temporary-file affixes to it.
MAX_NAME_BYTES = 200


def unsafe_name(name: object) -> str | None:
    """Why ``name`` cannot name a file or folder inside a run directory, or None when it can.

    Names from other tools (prompt ids, folder names) become paths under the run directory: a
    name must be one plain path component, so that nothing is written outside the directory
    ("..", "/", absolute paths), it cannot clash with the hidden ``.done`` markers, and it
    survives being stored in JSON and parquet (UTF-8 without control characters).
    """
    if not isinstance(name, str) or not name:
        return "empty"
    if name in (".", ".."):
        return f"{name!r} is a reference to a folder"
    if name.startswith("."):
        return "starts with '.' (hidden names are reserved for markers and locks)"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (at most {MAX_NAME_BYTES})"
    return None


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in the file at ``path``, or None: absent, unreadable (a folder, not
    UTF-8), not JSON, or JSON but not an object (``[]``, ``"x"``, ``5``)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def marker_path(directory: str | Path, name: str) -> Path:
    """Where the completion marker of unit ``name`` (a shard, a prompt) lives."""
    return Path(directory) / ".done" / f"{name}.json"


def is_done(directory: str | Path, name: str) -> bool:
    return marker_path(directory, name).exists()


def mark_done(directory: str | Path, name: str, info: dict[str, Any] | None = None) -> Path:
    """Record that unit ``name`` is complete; write it last, after the unit's outputs."""
    return write_json(info or {}, marker_path(directory, name))


LOCK_FOLDER = ".lock"
# What flock raises on file systems that do not support it (some NFS and Lustre mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderBusyError(RuntimeError):
    """Another live process holds the writer lock of ``folder`` for ``rank``.

    ``holder``: what that process wrote into the lock file (``pid`` and ``host``), empty when
    it had not written it yet.
    """

    def __init__(self, folder: Path, rank: int, holder: dict[str, str]):
        self.folder, self.rank, self.holder = folder, rank, holder
        super().__init__(f"{folder} is being written by another process ({describe_holder(holder, rank)})")


def describe_holder(holder: dict[str, str], rank: int) -> str:
    """``pid N, rank R``, with ``on HOST`` when the holder runs on another machine."""
    pid = holder.get("pid") or "unknown"
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {pid}{where}, rank {rank}"


def lock_path(folder: str | Path, rank: int) -> Path:
    """The writer lock of shard ``rank`` in ``folder``: hidden, so never taken for an output."""
    return Path(folder) / LOCK_FOLDER / f"rank_{rank}.lock"


@contextmanager
def writer_lock(folder: str | Path, rank: int = 0):
    """Hold the writer lock of ``folder`` for shard ``rank`` while the block runs.

    An exclusive ``flock`` on :func:`lock_path`: the kernel drops it when the holder exits,
    however it dies, so a lock file left behind never blocks. Raises :class:`FolderBusyError` at
    once when another process holds it. Shards of an array (other ranks) lock other files and
    never wait on each other. Folders this call created are removed again when the block leaves
    nothing in them but the lock, so that a stage that failed before writing leaves no empty
    output folder. On a file system without ``flock`` the block runs unlocked (logged).
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    path = lock_path(folder, rank)
    fd = _acquire(folder, path, rank)
    try:
        if fd is not None:
            record = f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        yield path
    finally:
        if fd is not None:
            # Unlinked while still held: a process that opened this file meanwhile finds it gone
            # once it holds it (see _acquire), and opens a fresh one.
            path.unlink(missing_ok=True)
            os.close(fd)
        for directory in (path.parent, *created):
            try:
                directory.rmdir()  # only when empty: another rank's lock or any output keeps it
            except OSError:
                break


def _acquire(folder: Path, path: Path, rank: int) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None without flock support."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~current_umask())
        except FileNotFoundError:
            continue  # another rank removed the empty lock folder between mkdir and open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderBusyError(folder, rank, holder) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            log.warning("%s: the file system does not support flock (%s); running without a writer lock", folder, err.strerror)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # its holder released and unlinked it after this process opened it: retry


def _read_holder(fd: int) -> dict[str, str]:
    """The ``key=value`` lines a lock's holder wrote (pid, host); empty when unreadable."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
