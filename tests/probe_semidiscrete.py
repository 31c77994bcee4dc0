"""The semidiscrete coupler: classes absent from the data, input scales, fits far from their noise floor,
NaN from a source or sampler, the run lock around its fit."""

from __future__ import annotations

from pathlib import Path

from probe import Case


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return []
