"""One writer per run directory: an advisory lock file, released by the OS when its process ends.

:func:`run_lock` takes ``DIR/.lock`` with ``fcntl.flock`` (POSIX). A second process training into the same
directory gets a clear error naming the process that holds it; a killed process (even SIGKILL) releases its lock,
so a stale lock file never blocks a resume. Where ``fcntl`` does not exist (Windows) the lock is skipped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLocked", "run_lock"]

LOCK_NAME = ".lock"


class RunLocked(ValueError):
    """Another process holds the directory's lock."""


@contextmanager
def run_lock(directory: str | os.PathLike, argument: str = "out") -> Iterator[None]:
    """Hold the lock of ``directory`` (created if needed) for the duration of the block.

    Raises:
        RunLocked: another live process holds it (the message names its pid and host).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = directory / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115 - closed in finally
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLocked(
                f"{argument}: {directory} is in use by {holder}; wait for it to finish or choose another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()
