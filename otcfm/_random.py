"""Random draws from an explicit ``torch.Generator``, placed on the caller's device.

A ``torch.Generator`` lives on one device and can only draw there; these helpers
draw on the generator's device (CPU when ``generator`` is None) and move the
result to ``device``, so a CPU generator seeds a GPU run reproducibly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["multinomial", "multinomial_replace", "rand", "randint", "randn", "randperm"]


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A uniformly random permutation of ``range(n)``: shape ``(n,)``, int64."""
    return torch.randperm(n, generator=generator, device=_device(generator)).to(device)


def randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal draws of ``shape``."""
    return torch.randn(shape, generator=generator, device=_device(generator), dtype=dtype).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Uniform draws on ``[0, 1)`` of ``shape``."""
    return torch.rand(shape, generator=generator, device=_device(generator), dtype=dtype).to(device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform integers in ``[0, high)`` of ``shape``, int64."""
    return torch.randint(high, shape, generator=generator, device=_device(generator)).to(device)


def multinomial(weights: Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One index per row of ``weights: (R, C)`` (non-negative, rows need not sum to 1): shape ``(R,)``."""
    draws = torch.multinomial(weights.to(_device(generator)), 1, generator=generator)
    return draws.squeeze(1).to(device)


def multinomial_replace(weights: Tensor, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` indices drawn with replacement from ``weights: (K,)`` (non-negative): shape ``(n,)``."""
    draws = torch.multinomial(weights.to(_device(generator)), n, replacement=True, generator=generator)
    return draws.to(device)
