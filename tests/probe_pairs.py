"""Pair sets and messages: foreign chunks, pairs of mismatched shapes, sampler rows, dtype mismatches, 0-d
teacher tensors, and messages that name what the user passed."""

from __future__ import annotations

from pathlib import Path

from probe import Case


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return []
