"""Random draws from an explicit ``torch.Generator``, placed on the caller's device.

A ``torch.Generator`` lives on one device and can only draw there; these helpers
draw on the generator's device and move the result to ``device``, so a CPU
generator seeds a GPU run reproducibly. Without a generator they draw on
``device`` itself, from torch's default generator of that device (nothing to
copy). A CPU draw for a CUDA device is copied without waiting for the GPU
(``non_blocking``: a copy from pageable memory is staged at once, so the host
may free its tensor), so drawing is no synchronisation point of a training step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["multinomial", "multinomial_replace", "rand", "randint", "randn", "randperm"]


def _to(x: Tensor, device: torch.device) -> Tensor:
    device = torch.device(device)
    return x.to(device, non_blocking=x.device.type == "cpu" and device.type == "cuda")


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A uniformly random permutation of ``range(n)``: shape ``(n,)``, int64."""
    if generator is None or generator.device == device:
        return torch.randperm(n, generator=generator, device=device)
    return _to(torch.randperm(n, generator=generator, device=generator.device), device)


def randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal draws of ``shape``."""
    if generator is None or generator.device == device:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return _to(torch.randn(shape, generator=generator, device=generator.device, dtype=dtype), device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Uniform draws on ``[0, 1)`` of ``shape``."""
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return _to(torch.rand(shape, generator=generator, device=generator.device, dtype=dtype), device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform integers in ``[0, high)`` of ``shape``, int64."""
    if generator is None or generator.device == device:
        return torch.randint(high, shape, generator=generator, device=device)
    return _to(torch.randint(high, shape, generator=generator, device=generator.device), device)


def multinomial(weights: Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One index per row of ``weights: (R, C)`` (non-negative, rows need not sum to 1): shape ``(R,)``."""
    source = weights.device if generator is None else generator.device
    draws = torch.multinomial(weights.to(source), 1, generator=generator)
    return _to(draws.squeeze(1), device)


def multinomial_replace(weights: Tensor, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` indices drawn with replacement from ``weights: (K,)`` (non-negative): shape ``(n,)``."""
    source = weights.device if generator is None else generator.device
    draws = torch.multinomial(weights.to(source), n, replacement=True, generator=generator)
    return _to(draws, device)
