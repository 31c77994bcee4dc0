"""Exact minibatch optimal transport (OT-CFM) with POT's network simplex."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from otcfm.couplers.base import Coupler, Pairing, pairs_from_plan, squared_euclidean_cost

__all__ = ["ExactCoupler", "exact_plan"]

CostFn = Callable[[Tensor, Tensor], Tensor]


def exact_plan(
    cost: np.ndarray,
    a: np.ndarray | None = None,
    b: np.ndarray | None = None,
    num_iter_max: int | None = None,
) -> np.ndarray:
    r"""Solve the discrete OT problem exactly with POT's ``ot.emd``.

    .. math::
        P^\star = \arg\min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b} \langle P, C \rangle

    Runs on the CPU in float64 (the inputs are copied there).

    Args:
        cost: ``(B0, B1)`` cost matrix.
        a: ``(B0,)`` source weights summing to 1; uniform when None.
        b: ``(B1,)`` target weights summing to 1; uniform when None.
        num_iter_max: network simplex iteration limit; ``max(100_000, 10 * B0 * B1)``
            when None (POT's fixed default of 100,000 stops short on large batches).

    Returns:
        ``(B0, B1)`` float64 optimal plan.

    Raises:
        RuntimeError: the solver stopped before optimality (iteration limit) or
            found the problem infeasible; the message names the cause.
    """
    import ot  # POT is imported where used, to keep `import otcfm` fast

    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n0, n1 = cost.shape
    a = np.full(n0, 1.0 / n0) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(n1, 1.0 / n1) if b is None else np.asarray(b, dtype=np.float64)
    if num_iter_max is None:
        num_iter_max = max(100_000, 10 * n0 * n1)
    with warnings.catch_warnings():
        # POT reports a non-optimal exit only as a warning; we turn it into an error below.
        warnings.filterwarnings("ignore", message="numItermax reached", category=UserWarning)
        plan, log = ot.emd(a, b, cost, numItermax=num_iter_max, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(
            f"exact OT did not reach optimality ({log['warning']}); "
            f"batch {n0}x{n1}, num_iter_max={num_iter_max}: raise num_iter_max"
        )
    return plan


class ExactCoupler(Coupler):
    """Pair samples by an exact minibatch OT plan (Tong et al. 2023, OT-CFM).

    The plan minimises the total ``cost`` (squared Euclidean between flattened
    samples by default). For equal batch sizes the optimal plan is a
    permutation and is returned as such: every source and every target sample
    is used exactly once, nothing is drawn. For ``B0 != B1`` every source
    sample is used once and its partner is drawn from its row of the plan.

    Args:
        cost: ``cost(x0, x1) -> (B0, B1)`` tensor; squared Euclidean by default.
        num_iter_max: iteration limit of the network simplex; scales with the
            batch when None. A non-optimal exit raises ``RuntimeError``.
    """

    name = "exact"

    def __init__(self, cost: CostFn = squared_euclidean_cost, num_iter_max: int | None = None) -> None:
        if not callable(cost):
            raise TypeError(f"cost: expected a callable cost(x0, x1) -> (B0, B1) tensor, got {cost!r}")
        if num_iter_max is not None and num_iter_max <= 0:
            raise ValueError(f"num_iter_max: expected a positive integer, got {num_iter_max}")
        self.cost = cost
        self.num_iter_max = num_iter_max

    def pair(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Pairing:
        cost = self.cost(x0, x1)
        if cost.shape != (x0.shape[0], x1.shape[0]):
            raise ValueError(f"cost: expected a ({x0.shape[0]}, {x1.shape[0]}) matrix, got {tuple(cost.shape)}")
        matrix = cost.detach().to(device="cpu", dtype=torch.float64).numpy()
        if not np.isfinite(matrix).all():
            raise ValueError("cost: contains NaN or Inf")
        plan = exact_plan(matrix, num_iter_max=self.num_iter_max)
        return pairs_from_plan(plan, generator, x0.device)

    def __repr__(self) -> str:
        return f"ExactCoupler(num_iter_max={self.num_iter_max})"
