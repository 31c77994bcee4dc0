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

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = ["keeps_global_rng", "multinomial", "multinomial_replace", "rand", "randint", "randn", "randperm"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def keeps_global_rng(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Give the caller torch's global CPU random state back when ``function`` returns or raises.

    For the long-running entry points (``train``, Reflow's): what they draw comes from explicit generators, but a
    user's sampler, ``Dataset`` or model may draw from the global state while it is probed or fingerprinted.
    """

    @functools.wraps(function)
    def kept(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with torch.random.fork_rng(devices=[]):
            return function(*args, **kwargs)

    return kept


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
    """One index per row of ``weights: (R, C)`` (non-negative, every row with positive mass): shape ``(R,)``.

    Row ``r`` gives ``k`` with probability ``w_rk / sum_k w_rk``, by inversion in two levels: one uniform per
    row is searched in the running sums of blocks of :data:`_BLOCK` columns, then within the chosen block.
    Block sums are taken in the weights' dtype, at least float32 (a float64 sum of float32 weights is slower, for
    no accuracy the float32 weights have), running sums in float64. One pass over ``weights`` that
    vectorises, much faster than a full running sum or ``torch.multinomial`` on large plans
    (docs/benchmarks.md, couplers).
    """
    source = weights.device if generator is None else generator.device
    w = weights.to(device=source)
    rows, cols = w.shape
    whole = cols - cols % _BLOCK
    exact = torch.promote_types(w.dtype, torch.float32)  # half-precision weights are summed in float32
    sums = [w[:, :whole].reshape(rows, -1, _BLOCK).sum(2, dtype=exact)] if whole else []
    if whole < cols:
        sums.append(w[:, whole:].sum(1, keepdim=True, dtype=exact))
    cdf = torch.cat(sums, dim=1).double().cumsum_(1)  # (R, number of blocks)
    u = torch.rand((rows, 1), generator=generator, device=source, dtype=torch.float64).mul_(cdf[:, -1:])
    block = torch.searchsorted(cdf, _below(u, cdf[:, -1:]), right=True)  # first block whose running sum passes u
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp_min(0)), 0.0)
    columns = block * _BLOCK + torch.arange(_BLOCK, device=source)  # (R, _BLOCK), past the end masked below
    inner = torch.where(columns < cols, w.gather(1, columns.clamp_max(cols - 1)).double(), 0.0).cumsum_(1)
    k = torch.searchsorted(inner, _below(u - before, inner[:, -1:]), right=True)
    return _to((block * _BLOCK + k).squeeze(1), device)


_BLOCK = 64


def _below(u: Tensor, total: Tensor) -> Tensor:
    """``u`` capped just below ``total``, so that an inverse search never runs past the last positive weight."""
    return torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))


def multinomial_replace(weights: Tensor, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` indices drawn with replacement from ``weights: (K,)`` (non-negative): shape ``(n,)``."""
    source = weights.device if generator is None else generator.device
    draws = torch.multinomial(weights.to(source), n, replacement=True, generator=generator)
    return _to(draws, device)
