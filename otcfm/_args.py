"""Checks of scalar arguments shared by the public functions: counts, rates, generators.

Each raises with the caller's name of the argument, its value and what was expected (the error policy of
docs/api.md). Booleans are not counts: ``steps=True`` is refused, not read as 1.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from numpy import bool_ as numpy_bool

__all__ = [
    "SEED_RANGE",
    "check_anneal",
    "check_count",
    "check_flag",
    "check_generator",
    "check_options",
    "check_rate",
    "check_seed",
]

#: Seeds a run takes: what ``torch.Generator.manual_seed`` accepts, less room for the offsets derived seeds add.
SEED_RANGE = (0, 2**63 - 1)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` must be an integer ``>= minimum`` (not a bool, not a float; numpy integers count)."""
    if type(value) is int and value >= minimum:  # the common case, without the ABC check below (~0.3 us)
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise (TypeError if not isinstance(value, numbers.Real) else ValueError)(
            f"{name}: expected {expected}, got {value!r}"
        )
    return int(value)


def check_rate(value: Any, name: str, allow_zero: bool = False) -> float:
    """``value`` must be a finite real number ``> 0`` (``>= 0`` with ``allow_zero``); numpy scalars count."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, numpy_bool)):
        raise TypeError(f"{name}: expected a finite number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` must be an integer in :data:`SEED_RANGE` (numpy integers count, booleans do not)."""
    low, high = SEED_RANGE
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer in [{low}, 2**63 - 1], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, 2**63 - 1], got {value!r}")
    return int(value)


def check_options(
    target: Callable[..., Any], options: dict[str, Any], name: str, fixed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``options`` must be keyword parameters of ``target`` (a class or function) other than the ``fixed`` ones
    its caller passes itself; an unknown one raises a ``TypeError`` naming it and listing the valid ones, instead
    of Python's bare "unexpected keyword argument"."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will say
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [k for k, p in parameters.items() if p.kind in kinds and k not in fixed]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"{name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} of "
            f"{getattr(target, '__qualname__', target)}; "
            + (f"valid: {', '.join(valid)}" if valid else "it takes no options")
        )
    return options


def check_flag(value: Any, name: str) -> bool:
    """``value`` must be ``True`` or ``False``: a string such as ``"False"`` is refused, not read as true."""
    if not isinstance(value, (bool, numpy_bool)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_anneal(value: Any, name: str = "anneal") -> bool | str:
    """Epsilon scaling: ``True``, ``False`` or ``"auto"``."""
    if value == "auto" and isinstance(value, str):
        return value
    if not isinstance(value, (bool, numpy_bool)):
        raise (TypeError if not isinstance(value, str) else ValueError)(
            f"{name}: expected True, False or 'auto', got {value!r}"
        )
    return bool(value)


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    """``generator`` must be a ``torch.Generator`` or None (``torch.Generator().manual_seed(0)`` for a seed)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name}: expected a torch.Generator or None, got {type(generator).__name__} "
            "(for a seed s, pass torch.Generator().manual_seed(s))"
        )
    return generator
