"""Input validation shared by the public functions.

Every check raises with the argument's name and what was expected, so a user
sees ``x1: expected ... got ...`` instead of a shape error deep in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_batch", "check_pair", "check_time", "check_choice"]


def check_batch(x: object, name: str, finite: bool = True) -> Tensor:
    """Check that ``x`` is a non-empty, finite, floating tensor of shape ``(B, ...)``.

    ``finite=False`` skips the NaN/Inf scan, for callers that detect NaN/Inf later at
    no extra cost (a squared-distance cost matrix is finite only if both inputs are).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has no batch dimension, an empty batch, or NaN/Inf.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected shape (B, ...) with at least 2 dimensions, got shape {tuple(x.shape)}; "
            "use x.unsqueeze(-1) for 1-D data"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def check_pair(x0: object, x1: object, same_batch: bool = False, finite: bool = True) -> tuple[Tensor, Tensor]:
    """Check a source batch ``x0: (B0, ...)`` and a target batch ``x1: (B1, ...)``.

    The trailing shapes must match; ``same_batch=True`` also requires ``B0 == B1``;
    ``finite`` as in :func:`check_batch`.
    """
    x0 = check_batch(x0, "x0", finite)
    x1 = check_batch(x1, "x1", finite)
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x0 and x1: expected the same sample shape, got x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)}"
        )
    if same_batch and x0.shape[0] != x1.shape[0]:
        raise ValueError(f"x0 and x1: expected the same batch size, got {x0.shape[0]} and {x1.shape[0]}")
    if x0.device != x1.device:
        raise ValueError(f"x0 and x1: expected the same device, got {x0.device} and {x1.device}")
    return x0, x1


def check_time(t: object, batch: int, name: str = "t") -> Tensor:
    """Check that ``t`` is a tensor of shape ``(batch,)`` with values in ``[0, 1]``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({batch},), got {type(t).__name__}")
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name}: expected values in [0, 1], got min {t.min().item():.4g}, max {t.max().item():.4g}")
    return t


def check_choice(value: str, choices: dict | list | tuple, name: str) -> str:
    """Check that a string option is one of ``choices``, listing them on error."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in sorted(choices))
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {valid}")
    return value
