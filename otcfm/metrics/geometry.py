"""How coupled segments ``x0 -> x1`` sit: crossings (2-D) and swap-improvable pairs (any dimension)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from otcfm._checks import check_pair

__all__ = ["crossing_rate", "swap_fraction"]


def swap_fraction(x0: Tensor, x1: Tensor) -> float:
    r"""Fraction of pairs of couples whose partners a swap would bring closer.

    .. math::
        \frac{2}{n(n-1)} \sum_{a < b} \mathbb{1}\big[\langle x_0^a - x_0^b,\, x_1^a - x_1^b \rangle < 0\big]

    For the squared Euclidean cost this is the fraction of pairs whose swap
    lowers the total cost: 0 inside an exact OT batch (cyclical monotonicity),
    about 0.5 for independent pairs. Samples are flattened; float64; values
    below ``-1e-10`` of the largest inner product count as negative.

    Args:
        x0: ``(n, ...)`` sources, row ``a`` coupled with ``x1[a]``.
        x1: ``(n, ...)`` targets.

    Returns:
        the fraction in ``[0, 1]`` (0 when ``n < 2``).
    """
    x0, x1 = check_pair(x0, x1, same_batch=True)
    n = x0.shape[0]
    if n < 2:
        return 0.0
    a, b = _unit_scale(x0.reshape(n, -1).to(torch.float64), x1.reshape(n, -1).to(torch.float64))
    gram = a @ b.T  # <x0_a, x1_b>
    diag = gram.diagonal()
    inner = diag[:, None] + diag[None, :] - gram - gram.T
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=inner.device), diagonal=1)
    tol = 1e-10 * float(gram.abs().max())
    return float((inner[upper] < -tol).to(torch.float64).mean())


def _unit_scale(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` times the power of two that brings their largest entry into ``[0.5, 1)``: exact, and the
    signs of the products tested below neither overflow (coordinates of 1e160) nor underflow (1e-100)."""
    largest = max(float(a.abs().max()), float(b.abs().max()))
    if largest == 0:
        return a, b
    exponent = math.frexp(largest)[1]
    return torch.ldexp(a, torch.tensor(-exponent)), torch.ldexp(b, torch.tensor(-exponent))


def _orient(p: Tensor, q: Tensor, r: Tensor) -> Tensor:
    """Sign-carrying area of the triangle (p, q, r), broadcast over leading dimensions."""
    return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])


def crossing_rate(x0: Tensor, x1: Tensor) -> float:
    """Fraction of pairs of 2-D segments ``x0[a] -> x1[a]`` and ``x0[b] -> x1[b]`` that cross.

    Proper crossings only (the segments' interiors meet; touching end points
    and collinear overlaps do not count). An exact OT coupling of the squared
    Euclidean cost crosses rarely but can: its straight paths never meet at
    the same time ``t``, yet two segments may pass the same point at different
    times (for the unsquared distance they could not cross at all). O(n^2), float64.

    Args:
        x0: ``(n, 2)`` segment starts.
        x1: ``(n, 2)`` segment ends.

    Returns:
        the fraction of the ``n (n - 1) / 2`` pairs that cross (0 when ``n < 2``).

    Raises:
        ValueError: samples that are not 2-D points.
    """
    x0, x1 = check_pair(x0, x1, same_batch=True)
    if x0.shape[1:] != (2,):
        raise ValueError(f"x0, x1: crossing_rate needs 2-D points of shape (n, 2), got {tuple(x0.shape)}")
    n = x0.shape[0]
    if n < 2:
        return 0.0
    p, q = _unit_scale(x0.to(torch.float64), x1.to(torch.float64))
    crossings = 0
    for start in range(0, n, 512):  # rows in chunks: memory O(512 n)
        pa, qa = p[start : start + 512, None, :], q[start : start + 512, None, :]
        pb, qb = p[None, :, :], q[None, :, :]
        d1, d2 = _orient(pa, qa, pb), _orient(pa, qa, qb)
        d3, d4 = _orient(pb, qb, pa), _orient(pb, qb, qa)
        crossing = (d1 * d2 < 0) & (d3 * d4 < 0)
        rows = torch.arange(start, min(start + 512, n), device=p.device)[:, None]
        crossings += int((crossing & (rows < torch.arange(n, device=p.device)[None, :])).sum())
    return crossings / (n * (n - 1) / 2)
