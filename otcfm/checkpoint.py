"""Checkpoint and pair files: atomic writes, a content checksum, and one clear error for any bad file.

Files are ordinary ``torch.save`` archives of a dict (``torch.load(path, weights_only=True)`` reads them), with one
extra entry, ``"sha256"``: a digest of every other entry (tensor values, dtypes and shapes, and every key and
scalar), computed before writing and verified by :func:`load`. So a flipped bit in the tensor data or in the pickled
metadata, a truncated, empty, random or foreign file, each gives one ``ValueError`` naming the file and what is
wrong, instead of a raw torch error or, worse, wrong weights. Loading never runs code (``weights_only=True``).

Writes go to a temporary file beside the target, are fsynced, then renamed over it (atomic on POSIX and Windows),
with Ctrl-C held back until the rename is done: an interrupted write never leaves a broken file, and the
interrupt is raised right after. :func:`remove_stale_temporaries` deletes what a killed writer (SIGKILL, power
loss) left behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKSUM_KEY", "atomic_save", "digest", "load", "remove_stale_temporaries"]

CHECKSUM_KEY = "sha256"


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: nested dicts, lists, tuples, tensors and scalars, in order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        h.update(f"T{data.dtype}{tuple(data.shape)}:".encode())
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy())  # hashed in place: no copy of the bytes
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) inside the block and raise it as KeyboardInterrupt right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def atomic_save(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the dict ``obj`` plus its checksum to ``path`` atomically (temporary file, fsync, rename).

    Ctrl-C during the write is held back until the file is in place, then raised.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"obj: expected a dict, got {type(obj).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    with _sigint_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({**content, CHECKSUM_KEY: digest(content)}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike, name: str) -> int:
    """Delete ``.{name}.*.tmp`` files in ``directory`` (left by a writer that was killed); returns how many.

    Call it only while no other process writes there (the training engine holds a lock on the directory).
    """
    removed = 0
    for stale in Path(directory).glob(f".{name}.*.tmp"):
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def load_failure(error: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line: torch's own message is several paragraphs,
    and its advice to unpickle arbitrary objects (``weights_only=False``) does not apply to otcfm's files."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if reason.startswith("Weights only load failed"):
        reason = "it holds objects other than tensors and plain values, which otcfm never unpickles (numpy arrays?)"
    return reason


def load(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a file written by :func:`atomic_save` (on the CPU) and verify its checksum.

    Args:
        path: the file.
        what: how the file is named in errors (``"checkpoint"``, ``"pair chunk"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an empty, truncated, foreign or corrupt file, or a checksum mismatch; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{what}: {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: one message naming it
        raise ValueError(
            f"{what}: {path} ({size} bytes) is not a readable otcfm file: truncated, corrupt or foreign "
            f"({load_failure(error)})"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not an otcfm file")
    saved = state.pop(CHECKSUM_KEY, None)
    if saved is not None and saved != digest(state):
        raise ValueError(f"{what}: {path} fails its checksum: the file is corrupt (e.g. a flipped bit)")
    return state
