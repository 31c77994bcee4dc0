"""Plans and potentials checked against their own constraints: relaxed (unbalanced, partial) plans at tiny
epsilon, blockwise and dense Sinkhorn at extreme scales, labels on every Sinkhorn path, memory estimates."""

from __future__ import annotations

from pathlib import Path

from probe import Case


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return []
