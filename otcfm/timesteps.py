r"""Time samplers: the distribution of ``t`` in the flow-matching loss.

Each sampler is called as ``sampler(n, generator, device, dtype) -> (n,)``
with values in ``[0, 1]``. By name (:func:`get_time_sampler`): ``"uniform"``,
``"logit_normal"`` (Esser et al. 2024: ``t = sigmoid(m + s z)``,
``z ~ N(0, 1)``, which puts more weight on the middle of the path) and
``"u_shaped"`` (more weight near both ends, as used for Reflow).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_options, check_rate
from otcfm._checks import check_choice, check_time

__all__ = ["TIME_SAMPLERS", "CheckedSampler", "LogitNormal", "TimeSampler", "UShaped", "Uniform", "get_time_sampler"]


class TimeSampler(Protocol):
    """``sampler(n, generator, device, dtype) -> (n,)`` tensor of times in ``[0, 1]``."""

    def __call__(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor: ...


@dataclass(frozen=True)
class Uniform:
    """``t ~ U[0, 1]``."""

    def __call__(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        return _random.rand((n,), generator, device, dtype)


@dataclass(frozen=True)
class LogitNormal:
    """``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``.

    Args:
        mean: location in logit space (0 centres the mass at ``t = 0.5``).
        std: spread in logit space, ``> 0``.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        check_rate(self.std, "std")
        if not (isinstance(self.mean, numbers.Real) and not isinstance(self.mean, bool) and math.isfinite(self.mean)):
            raise (TypeError if not isinstance(self.mean, numbers.Real) else ValueError)(
                f"mean: expected a finite number, got {self.mean!r}"
            )

    def __call__(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.sigmoid(self.mean + self.std * _random.randn((n,), generator, device, dtype))


@dataclass(frozen=True)
class UShaped:
    r"""U-shaped density ``p(t) ∝ cosh(a (2t - 1))``: more weight near both ends (Lee et al. 2024, for Reflow).

    Drawn by inverting the CDF: ``t = (1 + asinh((2u - 1) sinh(a)) / a) / 2``, ``u ~ U[0, 1]``.

    Args:
        a: sharpness, ``> 0`` (``a -> 0`` gives the uniform density).
    """

    a: float = 2.0

    def __post_init__(self) -> None:
        check_rate(self.a, "a")
        if self.a > _MAX_A:
            raise ValueError(f"a: expected at most {_MAX_A} (sinh(a) overflows beyond), got {self.a}")

    def __call__(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        u = _random.rand((n,), generator, device, torch.float64)
        t = 0.5 * (1 + torch.asinh((2 * u - 1) * math.sinh(self.a)) / self.a)
        return t.clamp(0, 1).to(dtype)


_MAX_A = 700.0  # sinh(710) overflows a float

#: Registered time samplers by name.
TIME_SAMPLERS: dict[str, type] = {"uniform": Uniform, "logit_normal": LogitNormal, "u_shaped": UShaped}


@dataclass(frozen=True)
class CheckedSampler:
    """A user's time sampler whose every draw is checked: shape ``(n,)``, values in ``[0, 1]``.

    :func:`get_time_sampler` wraps callables other than the samplers of this module in it, so the
    flow-matching step checks ``t`` only where it comes from code it does not know.

    Args:
        sampler: ``sampler(n, generator, device, dtype) -> (n,)``.
    """

    sampler: TimeSampler

    def __call__(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        return check_time(self.sampler(n, generator, device, dtype), n)


def get_time_sampler(sampler: str | TimeSampler, **options: Any) -> TimeSampler:
    """Return a time sampler from a name in :data:`TIME_SAMPLERS`, or a callable, checked (as
    :func:`otcfm.get_coupler`).

    The samplers of this module are returned as they are; any other callable comes back wrapped in a
    :class:`CheckedSampler`, which checks its draws (``t: (n,)`` in ``[0, 1]``).

    Args:
        sampler: a name in :data:`TIME_SAMPLERS` or a callable ``sampler(n, generator, device, dtype) -> (n,)``.
        **options: keyword arguments of the named sampler (``get_time_sampler("logit_normal", mean=-0.4)``).

    Raises:
        ValueError: unknown name (the message lists the valid ones), invalid option values, or options together
            with a callable.
        TypeError: neither a name nor a callable, or an unknown option (named, with the valid ones).
    """
    if isinstance(sampler, str):
        check_choice(sampler, TIME_SAMPLERS, "time_sampler")
        cls = TIME_SAMPLERS[sampler]
        return cls(**check_options(cls, options, "time_sampler"))
    if options:
        raise ValueError(f"time_sampler: options {sorted(options)} apply to a name, not to a callable")
    if not callable(sampler):
        raise TypeError(f"time_sampler: expected a name or a callable, got {type(sampler).__name__}")
    if isinstance(sampler, (CheckedSampler, *TIME_SAMPLERS.values())):
        return sampler
    return CheckedSampler(sampler)
