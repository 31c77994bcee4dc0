r"""Straightness and path energy of a learned flow, from simulated trajectories.

Along Euler trajectories ``X_{t_k}`` on ``t_k = k / K`` with velocities
``v_k = v(X_{t_k}, t_k)`` (the same evaluations the solver uses):

- straightness (Liu et al. 2022): ``S = (1/K) sum_k E ||(X_1 - X_0) - v_k||^2``, 0 for straight constant-speed paths;
- path energy: ``PE = (1/K) sum_k E ||v_k||^2``;
- normalised path energy (Tong et al. 2023): ``NPE = |PE - W2^2(q0, q1)| / W2^2(q0, q1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from otcfm._args import check_count
from otcfm._checks import check_batch
from otcfm.metrics.w2 import w2
from otcfm.solvers import check_output

__all__ = ["FlowStatistics", "flow_statistics", "path_energy", "straightness"]


@dataclass(frozen=True)
class FlowStatistics:
    """Straightness, path energy and (given a reference) NPE of one simulated flow.

    Attributes:
        straightness: ``S`` (0 = straight).
        path_energy: ``PE``.
        npe: ``|PE - W2^2| / W2^2`` against ``W2(x0, reference)``, or None without a reference; where the
            reference is ``x0`` itself (``W2 = 0``), 0 for a flow that stays put and ``inf`` for one that moves.
        steps: Euler steps used.
    """

    straightness: float
    path_energy: float
    npe: float | None
    steps: int


def flow_statistics(
    model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int = 100, reference: Tensor | None = None
) -> FlowStatistics:
    """Simulate ``x0: (N, ...)`` with ``steps`` Euler steps and measure the path.

    Args:
        model: velocity field ``model(x, t)``.
        x0: ``(N, ...)`` source samples.
        steps: Euler steps.
        reference: ``(M, ...)`` target samples for NPE; the W2 is between ``x0`` and ``reference``.

    Returns:
        :class:`FlowStatistics`.
    """
    check_batch(x0, "x0")
    check_count(steps, "steps")
    with torch.no_grad():
        x, h = x0, 1.0 / steps
        velocities = []
        for k in range(steps):
            v = check_output(model(x, torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)), x)
            velocities.append(v)
            x = x + h * v
        displacement = (x - x0).reshape(x.shape[0], -1)
        flat = [v.reshape(v.shape[0], -1) for v in velocities]
        s = sum(float(((displacement - v) ** 2).sum(1).mean()) for v in flat) / steps
        pe = sum(float((v**2).sum(1).mean()) for v in flat) / steps
    if not (math.isfinite(s) and math.isfinite(pe)):
        raise ValueError("model: the trajectory holds NaN or Inf (the model returned NaN/Inf or the flow diverged)")
    npe = None
    if reference is not None:
        w2_squared = w2(x0, reference) ** 2
        npe = abs(pe - w2_squared) / w2_squared if w2_squared > 0 else (0.0 if pe == 0 else math.inf)
    return FlowStatistics(s, pe, npe, steps)


def straightness(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int = 100) -> float:
    """``S`` of :func:`flow_statistics`."""
    return flow_statistics(model, x0, steps).straightness


def path_energy(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int = 100) -> float:
    """``PE`` of :func:`flow_statistics`."""
    return flow_statistics(model, x0, steps).path_energy
