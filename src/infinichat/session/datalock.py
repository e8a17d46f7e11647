"""One writer per data directory: an advisory lock file held for the life of the process.

`serve` and the in-process `chat` both write the sessions database of a data directory; two of them at once
would overwrite each other's turns. The lock is `flock` on `DIR/lock`: the kernel drops it when the process
exits or crashes, so a lock file left behind by a killed process is never stale (its text, who held it, is only
a hint for the error message of the next process that finds it held).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


class DataDirLock:
    """The held lock of one data directory; `release()` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file (pid and purpose), as one short line."""
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join(text.split())[:200]


def lock_data_dir(data_dir: str | Path, purpose: str) -> DataDirLock:
    """Take the data directory for this process, or raise InfinichatError saying who holds it.

    `purpose` (e.g. "serve http://127.0.0.1:8000") is written into the lock file for the next process's
    error message."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): run unguarded, but say so
        log.warning("no file locking on this platform: do not run two infinichat processes on one data directory")
        return DataDirLock(Path(data_dir), None)
    d = Path(data_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InfinichatError(f"cannot create the lock file in the data directory {d}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        who = _holder(fd)
        os.close(fd)
        raise InfinichatError(
            f"the data directory {d} is in use by another infinichat process ({who or 'unknown'}); "
            "stop it, choose another --data-dir, or chat through the server with --server URL"
        ) from None
    with contextlib.suppress(OSError):  # the note is only a hint: a full disk must not refuse the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {purpose}\n".encode(), 0)
    return DataDirLock(d, fd)
