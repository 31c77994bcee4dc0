"""A run's output directory, whose checkpoint a resume reads once.

A resume needs the checkpoint in several places: the command line takes the settings a run recorded, a semidiscrete
run its fitted potentials, and the engine its training state. A :class:`RunDirectory` given as ``out`` carries one
read of ``checkpoint.pt`` through all of them; it reads the file again only when the file changed (another inode,
size or modification time), so it never hands out a stale state.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from otcfm import checkpoint as ckpt

__all__ = ["CHECKPOINT_NAME", "RunDirectory", "file_stamp"]

#: The file of a run's training checkpoint, in its output directory.
CHECKPOINT_NAME = "checkpoint.pt"


class RunDirectory(os.PathLike):
    """The output directory of a run (``os.PathLike``: wherever a path is taken, it is its directory).

    Args:
        path: the directory (it need not exist yet).

    Example::

        out = RunDirectory("runs/mine")
        steps = (out.saved() or {}).get("step", 0)  # reads runs/mine/checkpoint.pt, if there is one
        otcfm.train(config, out=out, resume=True)  # resumes from that read, not a second one
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"out: expected a directory path, got {type(path).__name__}")
        if str(path) == "":
            raise ValueError("out: expected a directory, got ''")
        self.path = Path(path)
        self._state: dict[str, Any] | None = None
        self._stamp: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, out: str | os.PathLike | None) -> RunDirectory | None:
        """``out`` itself when it is a :class:`RunDirectory` (its read is kept), None for None, else a new one."""
        if out is None or isinstance(out, RunDirectory):
            return out
        return cls(out)

    @property
    def checkpoint_path(self) -> Path:
        """``path / "checkpoint.pt"``."""
        return self.path / CHECKPOINT_NAME

    def saved(self) -> dict[str, Any] | None:
        """The content of the run's checkpoint (:func:`otcfm.checkpoint.load`), None when there is none; read once
        while the file is unchanged.

        Raises:
            ValueError: a checkpoint that cannot be read (corrupt, truncated, foreign), naming the file.
        """
        stamp = file_stamp(self.checkpoint_path)
        if stamp is None:
            self._state, self._stamp = None, None
            return None
        if stamp != self._stamp:
            self._state, self._stamp = ckpt.load(self.checkpoint_path), stamp
        return self._state

    def release(self) -> None:
        """Let go of the read checkpoint (its weights and optimiser state), once what needed it has it."""
        self._state, self._stamp = None, None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime in ns)`` of a regular file, None where there is none."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None
