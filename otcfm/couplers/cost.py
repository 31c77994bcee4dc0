"""Cost matrices of the OT couplers: squared Euclidean, plus an optional label / condition term."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from otcfm import _random
from otcfm._checks import check_pair

__all__ = [
    "check_source_labels",
    "condition_cost",
    "pairwise_squared_distances",
    "rescaled_squared_distances",
    "squared_distances_any_scale",
    "squared_euclidean_cost",
]


def squared_euclidean_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean cost between flattened samples, in float64.

    ``C[a, b] = ||x0[a] - x1[b]||^2``, computed as ``|x0|^2 + |x1|^2 - 2 x0.x1``
    in float64 (clamped at 0) on the inputs' device.

    Args:
        x0: ``(B0, ...)`` floating, finite.
        x1: ``(B1, ...)`` of the same sample shape, dtype and device.

    Returns:
        ``(B0, B1)`` float64 tensor.

    Raises:
        TypeError, ValueError: ``x0`` or ``x1`` is not such a batch (named in the message).
    """
    check_pair(x0, x1)
    return pairwise_squared_distances(x0, x1)


def pairwise_squared_distances(x0: Tensor, x1: Tensor) -> Tensor:
    """:func:`squared_euclidean_cost` without the input checks, for callers that validated ``x0`` and ``x1``."""
    a = x0.reshape(x0.shape[0], -1).to(torch.float64)
    b = x1.reshape(x1.shape[0], -1).to(torch.float64)
    if a.shape[1] <= 4:  # for a few features, summing per feature is faster than a matmul and exact
        cost = torch.sub(a[:, 0, None], b[None, :, 0]).square_()
        for k in range(1, a.shape[1]):
            diff = torch.sub(a[:, k, None], b[None, :, k])
            cost.addcmul_(diff, diff)
        return cost
    cost = torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0)  # one (B0, B1) buffer, updated in place
    cost += (a * a).sum(1, keepdim=True)
    return cost.clamp_min_(0.0)


#: A total squared distance below this (about 1e-271) is recomputed rescaled: its entries may have underflowed.
TINY_TOTAL = 2.0**-900


def squared_distances_any_scale(x0: Tensor, x1: Tensor) -> tuple[Tensor, float]:
    """Squared distances of finite ``x0``, ``x1`` as ``(cost / unit^2, unit)``, exact at any finite scale.

    The plain float64 cost (``unit = 1``) unless its squares overflowed or underflowed; then
    :func:`rescaled_squared_distances`.
    """
    cost = pairwise_squared_distances(x0, x1)
    total = float(cost.sum())
    if math.isfinite(total) and total >= TINY_TOTAL:
        return cost, 1.0
    return rescaled_squared_distances(x0, x1)


def rescaled_squared_distances(x0: Tensor, x1: Tensor) -> tuple[Tensor, float]:
    """Squared distances of finite ``x0``, ``x1``, scaled by a power of two so float64 neither over- nor underflows.

    Both batches are multiplied by ``2^-k``, with ``2^k`` the power of two nearest above
    ``max(|x0|, |x1|)``: an exact operation, so the returned cost is the true one divided by
    ``unit^2`` (``unit = 2^k``, or 1 when every entry is 0) and has the same optimal plans.
    Used where the plain float64 cost overflowed (inputs near 1e160 and beyond) or underflowed.

    Returns:
        ``(cost, unit)``: ``(B0, B1)`` float64 cost in units of ``unit^2``, and ``unit``.
    """
    a, b = x0.detach().to(torch.float64), x1.detach().to(torch.float64)
    largest = max(float(a.abs().max()), float(b.abs().max()))
    if largest == 0.0:
        return pairwise_squared_distances(a, b), 1.0
    unit = math.ldexp(1.0, math.frexp(largest)[1])
    return pairwise_squared_distances(a / unit, b / unit), unit


def check_source_labels(y0: Tensor | None, y1: Tensor | None) -> None:
    """Source labels ``y0`` need target labels ``y1`` (the pairs' labels come from ``y1``): the one rule every
    coupler path that takes labels applies, before it chooses how to solve.

    Raises:
        ValueError: ``y0`` given without ``y1``.
    """
    if y0 is not None and y1 is None:  # nothing to pair them with: they were ignored without a word
        raise ValueError("y0: source labels need target labels y1 (the pairs' labels come from y1); give both")


def condition_cost(
    cost: Tensor,
    y0: Tensor | None,
    y1: Tensor | None,
    weight: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    r"""Add a label or condition term to a cost matrix ``cost: (B0, B1)``.

    - Integer labels ``y: (B,)`` (or ``(B, 1)``): a pair with different labels costs ``weight``
      more. ``weight=None`` makes the constraint hard: the penalty
      ``(B0 + 1) * max(cost)`` (1 for a zero cost) exceeds any saving in transport cost, so the
      plan first minimises the number of cross-label pairs (zero when both
      batches hold the same label counts), then the transport cost.
    - Floating conditions ``y: (B,)`` or ``(B, k)``: ``weight * ||y0 - y1||^2``
      (``weight=None`` means 1).
    - Only ``y0`` given: an error (there are no target labels to pair them with).
    - Only ``y1`` given (a source without labels, e.g. noise): the source
      samples are i.i.d., so each is given the label of a random target
      (``y0 = y1[perm]``), and the plan couples within labels. Each label then
      receives an unbiased share of the source, which keeps ``x0 | y``
      distributed as the source: what class-conditional sampling from noise
      assumes.

    Args:
        cost: ``(B0, B1)`` float cost.
        y0: ``(B0,)`` / ``(B0, k)`` labels or None.
        y1: ``(B1,)`` / ``(B1, k)`` labels or None.
        weight: penalty of a label mismatch or weight of the condition distance.
        generator: draws the labels of an unlabelled source.

    Returns:
        the cost with the condition term, ``(B0, B1)``.
    """
    check_source_labels(y0, y1)
    if y1 is None:
        return cost
    n0, n1 = cost.shape
    for y, rows, name in ((y0, n0, "y0"), (y1, n1, "y1")):
        if y is not None and (not isinstance(y, Tensor) or y.ndim not in (1, 2) or y.shape[0] != rows):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{name}: expected shape ({rows},) or ({rows}, k), one per row of the cost, got {got}")
    if y0 is None:
        if y1.is_floating_point():
            raise ValueError("y0: continuous conditions y1 need source conditions y0 as well")
        order = (
            _random.randperm(n1, generator, y1.device) if n0 <= n1 else _random.randint(n1, (n0,), generator, y1.device)
        )
        y0 = y1[order[:n0]]
    if y0.is_floating_point() != y1.is_floating_point():
        raise ValueError("y0, y1: expected both integer labels or both floating conditions")
    if y1.is_floating_point():
        a = y0.reshape(y0.shape[0], -1).to(cost.dtype)
        b = y1.reshape(y1.shape[0], -1).to(cost.dtype)
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"y0, y1: conditions of different sizes {a.shape[1]} and {b.shape[1]}")
        return cost + (1.0 if weight is None else weight) * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    y0, y1 = (y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y for y in (y0, y1))  # (B, 1) labels: (B,)
    if y0.ndim != 1 or y1.ndim != 1:
        raise ValueError(
            f"y0, y1: integer labels must have shape (B,) or (B, 1), got {tuple(y0.shape)} and {tuple(y1.shape)}"
        )
    mismatch = (y0.to(cost.device)[:, None] != y1.to(cost.device)[None, :]).to(cost.dtype)
    largest = float(cost.max())
    # relative to the cost, so that a solver normalising the cost sees the transport term at any input scale
    penalty = ((cost.shape[0] + 1) * largest if largest > 0 else 1.0) if weight is None else weight
    return cost + penalty * mismatch
