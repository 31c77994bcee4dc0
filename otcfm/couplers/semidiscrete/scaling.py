"""The scale of semidiscrete scores: units that are powers of two (an exact rescaling), and the passes over the
dataset in blocks (squared norms, the mean cost, the warm start)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from otcfm._checks import check_finite, mark_invalid, value_checks_queued


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _drawn(draw: Any, count: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``count`` source samples, flattened, checked for NaN/Inf (named ``source``), on ``like``'s device and dtype."""
    x = _flat(draw(count, generator))
    check_finite(x, "source")
    return x.to(device=like.device, dtype=like.dtype)


def _exponent(unit: float) -> int:
    """``k`` of a power of two ``unit = 2^k``."""
    return math.frexp(unit)[1] - 1


def _times_power_of_two(x: Tensor, exponent: int) -> Tensor:
    """``x * 2^exponent``, exact barring under- or overflow of the result (in steps the dtype can hold); ``x``
    itself for ``exponent = 0``."""
    while exponent != 0:
        step = max(-60, min(60, exponent))
        x = x * 2.0**step
        exponent -= step
    return x


def _largest(x: Tensor) -> float:
    """``max |x|`` without a temporary of ``x``'s size."""
    low, high = torch.aminmax(x)
    return max(float(high), -float(low))


def _plain_range(dtype: torch.dtype) -> tuple[float, float]:
    """Magnitudes scored without a unit: within ``2^(e/4)`` of 1, ``e`` the dtype's extreme exponents (``[2^-31,
    2^32]`` for float32): their squares, summed over a row, stay normal numbers of the dtype."""
    info = torch.finfo(dtype)
    return 2.0 ** (math.frexp(info.tiny)[1] / 4), 2.0 ** (math.frexp(info.max)[1] / 4)


def _unit_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents ``k`` of the units ``2^k`` that scoring in ``dtype`` can use: ``1 / unit`` a number of the dtype
    with room for the products, ``unit^2`` (cost units) a float64."""
    top = math.frexp(torch.finfo(dtype).max)[1]
    return -min(top - 8, 500), 500


def _check_unit(unit: object, name: str) -> float:
    if isinstance(unit, bool) or not isinstance(unit, (int, float)) or not 0 < unit < math.inf:
        raise ValueError(f"{name}: expected a power of two as the unit, got {unit!r}")
    if math.frexp(unit)[0] != 0.5:
        raise ValueError(f"{name}: expected a power of two as the unit, got {unit!r}")
    return float(unit)


def _unit_for(data: Tensor, probe: Tensor) -> float:
    """The unit of a fit on ``data: (N, D)`` from the source ``probe: (M, D)``: 1 when the largest magnitude of both
    lies in :func:`_plain_range`, else the power of two just above it.

    Raises:
        ValueError: magnitudes no unit of :func:`_unit_range` brings into range, naming ``target`` or ``source``.
    """
    top_data, top_probe = _largest(data), _largest(probe)
    largest = max(top_data, top_probe)
    low, high = _plain_range(data.dtype)
    if largest == 0.0 or low <= largest <= high:
        return 1.0
    exponent = math.frexp(largest)[1]
    lowest, highest = _unit_range(data.dtype)
    if not lowest <= exponent <= highest:
        name = "target" if top_data >= top_probe else "source"
        raise ValueError(
            f"{name}: magnitudes up to {largest:.3g} cannot be scored in {data.dtype} at any power-of-two unit "
            f"(2^{lowest} to 2^{highest}); rescale the data"
            + (" or pass float64 data" if data.dtype != torch.float64 else "")
        )
    return math.ldexp(1.0, exponent)


def _scaled_batch(x: Tensor, unit: float) -> tuple[Tensor, float]:
    """``(c x / unit^2, c)`` for source samples ``x: (B, D)``: ``c = 1`` unless ``max |x| / unit``
    exceeds the dtype's plain range, then the power of two that brings it to 1. ``2 (c x / unit^2).y_j + c h_j`` is
    ``c`` times the score in units of ``unit^2``: the same partners, and no overflow however large ``x`` is.

    On CUDA, where reading ``max |x|`` on the host would stall each step, ``c = 1`` and such a batch is made NaN
    (:func:`otcfm._checks.mark_invalid`), which its loss then carries (as the value checks of :mod:`otcfm._checks`)."""
    exponent, high = _exponent(unit), _plain_range(x.dtype)[1]
    if value_checks_queued(x):
        x = mark_invalid(x, x.abs().amax() <= high * unit)
        extra = 0
    else:
        largest = _largest(x) / unit
        extra = math.frexp(largest)[1] if largest > high else 0
    if exponent == 0 and extra == 0:
        return x, 1.0
    return _times_power_of_two(x, -2 * exponent - extra), math.ldexp(1.0, -extra)


def _squared_norms(data: Tensor, unit: float, rows: int) -> Tensor:
    """``|y_j / unit|^2`` of the rows of ``data: (N, D)``: ``(N,)`` in its dtype, ``rows`` rows at a time (no
    temporary of the dataset's size)."""
    exponent = _exponent(unit)
    out = torch.empty(data.shape[0], dtype=data.dtype, device=data.device)
    for start in range(0, data.shape[0], rows):
        block = _times_power_of_two(data[start : start + rows], -exponent)
        out[start : start + rows] = (block * block).sum(1)
    return out


def _mean_cost(x: Tensor, data: Tensor, unit: float, rows: int) -> float:
    """Mean squared distance between source samples ``x`` (in units of ``unit``) and (up to 4096) data points, in
    units of ``unit^2``: ``mean |x|^2 + mean |y|^2 - 2 mean(x).mean(y)``, summed in float64 ``rows`` rows at a
    time."""
    y, exponent = data[:4096], _exponent(unit)
    column, square = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device), 0.0
    for start in range(0, y.shape[0], rows):
        block = _times_power_of_two(y[start : start + rows].double(), -exponent)
        column += block.sum(0)
        square += float(block.square().sum())
    a = x.double()
    mean = float(a.square().sum(1).mean()) + square / y.shape[0] - 2.0 * float(a.mean(0) @ (column / y.shape[0]))
    return max(mean, 1e-30)


def _affine_warm_start(x: Tensor, data: Tensor, unit: float, rows: int) -> Tensor:
    r"""Potentials whose pairing is the OT map to an isotropic Gaussian fit of the data: ``(N,)``, in units of
    ``unit^2`` (``x``, the source probe, is in units of ``unit``).

    With ``T(x) = s x + m`` (``s`` the ratio of the data's and the source's standard deviations, ``m`` matching
    the means), ``g_j = |y_j|^2 - |y_j - m|^2 / s`` makes ``argmax_j 2 x.y_j + g_j - |y_j|^2`` the data point
    nearest to ``T(x)``: far better than ``g = 0`` (nearest neighbour of ``x`` itself) when the data are more
    spread out or shifted than the source, so the ascent starts near the optimum. The data's mean and spread
    are summed in float64 ``rows`` rows at a time.
    """
    exponent, n = _exponent(unit), data.shape[0]

    def blocks() -> Any:
        for start in range(0, n, rows):
            yield start, _times_power_of_two(data[start : start + rows], -exponent)

    mean = sum(block.double().sum(0) for _, block in blocks()) / n
    spread_y = float(sum(float((block.double() - mean).square().sum()) for _, block in blocks())) / n
    spread_x = float(x.double().var(0, unbiased=False).sum())
    if spread_x <= 0 or spread_y <= 0:
        return torch.zeros(n, dtype=data.dtype, device=data.device)
    scale = math.sqrt(spread_y / spread_x)
    shift = (mean - scale * x.double().mean(0)).to(data.dtype)
    out = torch.empty(n, dtype=data.dtype, device=data.device)
    for start, block in blocks():
        out[start : start + block.shape[0]] = (block * block).sum(1) - ((block - shift) ** 2).sum(1) / scale
    return out
