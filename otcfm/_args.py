"""Checks of scalar arguments shared by the public functions: counts, rates, generators.

Each raises with the caller's name of the argument, its value and what was expected (the error policy of
docs/api.md). Booleans are not counts: ``steps=True`` is refused, not read as 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_count", "check_generator", "check_rate"]


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` must be an integer ``>= minimum`` (not a bool, not a float)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise (TypeError if not isinstance(value, (int, float)) else ValueError)(
            f"{name}: expected {expected}, got {value!r}"
        )
    return value


def check_rate(value: Any, name: str, allow_zero: bool = False) -> float:
    """``value`` must be a finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a finite number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    """``generator`` must be a ``torch.Generator`` or None (``torch.Generator().manual_seed(0)`` for a seed)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name}: expected a torch.Generator or None, got {type(generator).__name__} "
            "(for a seed s, pass torch.Generator().manual_seed(s))"
        )
    return generator
