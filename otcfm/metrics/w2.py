"""Metrics of generated samples and flows; definitions as in docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from torch import Tensor

from otcfm._checks import check_batch
from otcfm._memory import check_dense_fits
from otcfm.couplers.cost import squared_distances_any_scale
from otcfm.couplers.exact import EMD_BYTES_PER_ENTRY, exact_plan
from otcfm.solvers import Method, integrate

__all__ = ["w2", "w2_by_steps"]


def w2(x: Tensor, y: Tensor) -> float:
    r"""Exact 2-Wasserstein distance between two empirical distributions.

    .. math::
        W_2(x, y) = \Big(\min_{P \in U(a, b)} \sum_{k,l} P_{kl} \|x_k - y_l\|^2\Big)^{1/2}

    with uniform weights ``a, b``, solved exactly (POT's network simplex, on
    the CPU in float64; samples are flattened), at any finite scale of the inputs. The estimate is biased upwards
    for finite samples: compare figures only at the same ``n``.

    Args:
        x: ``(N, ...)`` samples, e.g. generated.
        y: ``(M, ...)`` samples, e.g. held-out target.

    Returns:
        ``W2`` as a Python float.

    Raises:
        TypeError, ValueError: ``x`` or ``y`` is not a finite floating batch, or they differ in shape or dtype.
        MemoryError: the ``(N, M)`` solve would not fit in the available memory.
    """
    x, y = check_batch(x, "x"), check_batch(y, "y")
    if x.shape[1:] != y.shape[1:] or x.dtype != y.dtype:
        raise ValueError(
            f"x and y: expected samples of one shape and dtype, got {tuple(x.shape)} {x.dtype} and "
            f"{tuple(y.shape)} {y.dtype}"
        )
    check_dense_fits(x.shape[0], y.shape[0], EMD_BYTES_PER_ENTRY, "w2 (exact OT)")
    cost, unit = squared_distances_any_scale(x.detach(), y.detach())
    matrix = cost.cpu().numpy()
    plan = exact_plan(matrix)
    return math.sqrt(max(float(np.sum(plan * matrix)), 0.0)) * unit


def w2_by_steps(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    reference: Tensor,
    steps: Iterable[int] = (1, 2, 4, 8, 100),
    method: Method = "euler",
) -> dict[int, float]:
    """W2 between ``integrate(model, x0, k, method)`` and ``reference`` for each ``k`` in ``steps``.

    Args:
        model: velocity field ``model(x, t)``.
        x0: ``(N, ...)`` source samples, pushed through the flow.
        reference: ``(M, ...)`` held-out target samples.
        steps: numbers of solver steps.
        method: a fixed-step method of :func:`otcfm.integrate`.

    Returns:
        ``{steps: W2}``.
    """
    return {k: w2(integrate(model, x0, k, method), reference) for k in steps}
