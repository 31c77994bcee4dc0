"""How a run records an object it was given (a coupler, a path, a time sampler, a pair source).

A run's config keeps a text description of each object, and a resumed run compares them. ``repr`` serves where
an object has one of its own (otcfm's couplers, paths and samplers show their settings); Python's default
``repr`` holds a memory address, which differs in every process, so such objects are described by their type
(or a function by its name) instead.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["describe"]

_DEFAULT_REPR = re.compile(r"^<.* at 0x[0-9a-fA-F]+>$", re.DOTALL)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(obj: Any) -> str:
    """``repr(obj)``, or ``"object:module.Type"`` / ``"callable:module.name"`` where that is a default repr.

    Memory addresses inside other reprs (``functools.partial(<function f at 0x...>, ...)``, a bound method of
    an object with a default repr) are left out. Functions are told apart by name only: two lambdas look alike.
    """
    text = repr(obj)
    if not _DEFAULT_REPR.match(text):
        return _ADDRESS.sub("", text)
    named = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    kind = "callable" if named is obj else "object"
    return f"{kind}:{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', type(obj).__name__)}"
