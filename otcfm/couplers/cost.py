"""Cost matrices of the OT couplers: squared Euclidean, plus an optional label / condition term."""

from __future__ import annotations

import torch
from torch import Tensor

from otcfm import _random

__all__ = ["condition_cost", "squared_euclidean_cost"]


def squared_euclidean_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean cost between flattened samples, in float64.

    ``C[a, b] = ||x0[a] - x1[b]||^2``, computed as ``|x0|^2 + |x1|^2 - 2 x0.x1``
    in float64 (clamped at 0) on the inputs' device.

    Args:
        x0: ``(B0, ...)``.
        x1: ``(B1, ...)``.

    Returns:
        ``(B0, B1)`` float64 tensor.
    """
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


def condition_cost(
    cost: Tensor,
    y0: Tensor | None,
    y1: Tensor | None,
    weight: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    r"""Add a label or condition term to a cost matrix ``cost: (B0, B1)``.

    - Integer labels ``y: (B,)``: a pair with different labels costs ``weight``
      more. ``weight=None`` makes the constraint hard: the penalty
      ``B0 * max(cost) + 1`` exceeds any saving in transport cost, so the
      plan first minimises the number of cross-label pairs (zero when both
      batches hold the same label counts), then the transport cost.
    - Floating conditions ``y: (B,)`` or ``(B, k)``: ``weight * ||y0 - y1||^2``
      (``weight=None`` means 1).
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
    if y1 is None:
        return cost
    if y0 is None:
        if y1.is_floating_point():
            raise ValueError("y0: continuous conditions y1 need source conditions y0 as well")
        n0, n1 = cost.shape
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
    if y0.ndim != 1 or y1.ndim != 1:
        raise ValueError("y0, y1: integer labels must have shape (B,)")
    mismatch = (y0.to(cost.device)[:, None] != y1.to(cost.device)[None, :]).to(cost.dtype)
    penalty = cost.shape[0] * float(cost.max()) + 1.0 if weight is None else weight
    return cost + penalty * mismatch
