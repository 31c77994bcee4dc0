"""Flags and numbers: booleans taken only as True / False, numpy scalars where Python numbers are accepted,
seeds in the generator's range, meta tensors and devices."""

from __future__ import annotations

from pathlib import Path

from probe import Case


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return []
