"""Exact minibatch optimal transport (OT-CFM): network simplex or Jonker-Volgenant, chosen per problem."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from otcfm._checks import check_choice
from otcfm._memory import check_dense_fits
from otcfm.couplers.base import Pairing
from otcfm.couplers.cost import squared_euclidean_cost
from otcfm.couplers.plan import CostFn, OTCoupler, pairs_from_plan

__all__ = [
    "AUTO_LSA_MAX_BATCH",
    "AUTO_LSA_MIN_FEATURES",
    "EMD_BYTES_PER_ENTRY",
    "LSA_BYTES_PER_ENTRY",
    "ExactCoupler",
    "exact_plan",
    "linear_assignment",
]

Solver = Literal["auto", "emd", "lsa"]
#: With ``solver="auto"``, equal batches of at least this many features, or of at most
#: :data:`AUTO_LSA_MAX_BATCH` samples, use Jonker-Volgenant (scipy), which beats the network
#: simplex there; the network simplex wins on large low-dimensional batches. See docs/benchmarks.md.
AUTO_LSA_MIN_FEATURES = 16
AUTO_LSA_MAX_BATCH = 128
#: :func:`linear_assignment` warm-starts batches of at least this many samples with
#: :data:`AUCTION_ROUNDS` rounds (at most) of an auction.
AUCTION_MIN_BATCH = 512
AUCTION_ROUNDS = 300
#: Peak bytes per cost entry of a network simplex solve from the inputs: POT's solver (25, measured with
#: POT 0.9.7 at 1000-8000 samples) plus the cost, its normalised copy and a margin.
EMD_BYTES_PER_ENTRY = 48
#: Likewise for Jonker-Volgenant: the cost, its reduced copy, the auction's scratch and scipy's state.
LSA_BYTES_PER_ENTRY = 32


def _check_weights(w: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name}: expected finite non-negative weights")
    if abs(w.sum() - 1.0) > 1e-9:
        raise ValueError(f"{name}: expected weights summing to 1, got sum {w.sum():.12g}")
    return w


def exact_plan(
    cost: np.ndarray,
    a: np.ndarray | None = None,
    b: np.ndarray | None = None,
    num_iter_max: int | None = None,
) -> np.ndarray:
    r"""Solve the discrete OT problem exactly with POT's network simplex (``ot.emd``).

    .. math::
        P^\star = \arg\min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b} \langle P, C \rangle

    Runs on the CPU in float64 (inputs are copied there).

    Args:
        cost: ``(B0, B1)`` cost matrix.
        a: ``(B0,)`` source weights, non-negative, summing to 1; uniform when None.
        b: ``(B1,)`` target weights; uniform when None.
        num_iter_max: network simplex iteration limit; ``max(100_000, 10 * B0 * B1)``
            when None (POT's fixed default of 100,000 stops short on large batches).

    Returns:
        ``(B0, B1)`` float64 optimal plan.

    Raises:
        ValueError: bad weights or a cost with NaN/Inf.
        RuntimeError: the solver stopped before optimality (iteration limit) or
            found the problem infeasible; the message names the cause.
        MemoryError: the solve would not fit in the available memory.
    """
    cost = _check_cost(cost)
    n0, n1 = cost.shape
    check_dense_fits(n0, n1, EMD_BYTES_PER_ENTRY - 8, "exact OT (network simplex)")  # the cost exists already
    return _emd(cost, _check_weights(a, n0, "a"), _check_weights(b, n1, "b"), num_iter_max)


def _check_cost(cost: np.ndarray) -> np.ndarray:
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or not np.isfinite(cost).all():
        raise ValueError("cost: expected a finite 2-D matrix")
    return cost


def _normalised(cost: np.ndarray) -> np.ndarray:
    """``cost`` times the power of two that brings its largest entry into ``[0.5, 1)`` (a new array).

    Exact (only exponents change) and plan-preserving. The network simplex compares reduced costs
    with an absolute tolerance, so an unnormalised cost of tiny entries (inputs near 1e-8 and below)
    would stop it at a non-optimal plan; normalised, it is optimal at any input scale.
    """
    largest = float(np.abs(cost).max()) if cost.size else 0.0
    return cost * math.ldexp(1.0, -math.frexp(largest)[1]) if largest > 0 else cost.copy()


def _emd(cost: np.ndarray, a: np.ndarray, b: np.ndarray, num_iter_max: int | None) -> np.ndarray:
    """:func:`exact_plan` on a validated float64 C-contiguous cost and weights."""
    import ot

    n0, n1 = cost.shape
    cost = _normalised(cost)
    if num_iter_max is None:
        num_iter_max = max(100_000, 10 * n0 * n1)
    with warnings.catch_warnings():
        # POT reports a non-optimal exit only as a warning; it becomes the error below.
        warnings.filterwarnings("ignore", message="numItermax reached", category=UserWarning)
        plan, log = ot.emd(a, b, cost, numItermax=num_iter_max, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(
            f"exact OT did not reach optimality ({log['warning']}); "
            f"batch {n0}x{n1}, num_iter_max={num_iter_max}: raise num_iter_max"
        )
    return plan


def _auction_prices(reduced: np.ndarray, epsilon: float, max_rounds: int) -> np.ndarray:
    """Column prices from a few rounds of Bertsekas' auction (Jacobi form) on a square cost, ``(n,)``.

    Every unassigned row bids for its cheapest column ``j`` (cost plus price) and raises ``price[j]`` by
    its margin over the second cheapest plus ``epsilon``; the highest bid per column wins. The prices are
    ``epsilon``-optimal column duals of the rows assigned so far; only they are used, as a warm start.
    """
    n = reduced.shape[0]
    price, owner, column_of = np.zeros(n), np.full(n, -1), np.full(n, -1)
    for _ in range(max_rounds):
        free = np.flatnonzero(column_of < 0)
        if free.size == 0:
            break
        values = reduced[free] + price
        rows = np.arange(free.size)
        best = values.argmin(axis=1)
        first = values[rows, best]
        values[rows, best] = np.inf
        bids = price[best] + values.min(axis=1) - first + epsilon
        order = np.lexsort((-bids, best))  # by column, highest bid first
        winners = np.ones(order.size, dtype=bool)
        winners[1:] = best[order][1:] != best[order][:-1]
        won_rows, won_columns = free[order][winners], best[order][winners]
        outbid = owner[won_columns]
        column_of[outbid[outbid >= 0]] = -1
        owner[won_columns], column_of[won_rows] = won_rows, won_columns
        price[won_columns] = bids[order][winners]
    return price


def linear_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching (scipy's Jonker-Volgenant ``linear_sum_assignment``), warm-started.

    A square cost is first reduced: ``C - min_j C[i, j]`` row by row, then column by column, and for
    :data:`AUCTION_MIN_BATCH` rows or more, column prices from a few auction rounds are added and the rows
    reduced again. Adding a constant to a row or a column shifts every complete matching's cost by the same
    amount, so the optimal matchings are unchanged and the result is exact; the reductions are an initial
    dual solution that shortens scipy's shortest augmenting path search (1.6x-2.7x faster than raw scipy for
    1024 and 2048 samples in ``benchmarks/couplers.py``). Rectangular problems are solved unreduced.

    Args:
        cost: ``(B0, B1)`` finite cost; rectangular allowed.

    Returns:
        ``(rows, cols)``, each of length ``min(B0, B1)``, rows sorted.
    """
    return _assignment(_check_cost(cost))


def _assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`linear_assignment` of a validated float64 cost (left unchanged)."""
    from scipy.optimize import linear_sum_assignment

    n = cost.shape[0]
    if n == cost.shape[1] and n:
        cost = cost - cost.min(axis=1, keepdims=True)  # a new array: the caller's is not touched
        cost -= cost.min(axis=0, keepdims=True)
        epsilon = 1e-3 * float(cost.mean())
        if n >= AUCTION_MIN_BATCH and epsilon > 0:  # a zero cost (all points equal) needs no warm start
            cost += _auction_prices(cost, epsilon, AUCTION_ROUNDS)
            cost -= cost.min(axis=1, keepdims=True)
    return linear_sum_assignment(cost)


class ExactCoupler(OTCoupler):
    """Pair samples by an exact minibatch OT plan (Tong et al. 2023, OT-CFM).

    The plan minimises the total cost (squared Euclidean between flattened
    samples by default). For equal batch sizes the optimal plan is a
    permutation and is returned as such: every source and every target sample
    is used exactly once, nothing is drawn. For ``B0 != B1`` every source is
    used once and its partner is drawn from its row of the plan.

    Solvers: ``"emd"`` (POT's network simplex, any batch sizes), ``"lsa"``
    (scipy's Jonker-Volgenant, equal batch sizes), ``"auto"``: ``"lsa"`` for
    equal batches (no ``replace``) with at least :data:`AUTO_LSA_MIN_FEATURES`
    features or at most :data:`AUTO_LSA_MAX_BATCH` samples, ``"emd"`` otherwise. Both are exact; a non-optimal network
    simplex exit raises ``RuntimeError``.

    Args:
        solver: ``"auto"``, ``"emd"`` or ``"lsa"``.
        cost: ``cost(x0, x1) -> (B0, B1)``; squared Euclidean by default.
        num_iter_max: network simplex iteration limit (scales with the batch when None).
        label_weight: see :class:`~otcfm.couplers.plan.OTCoupler`.
        replace: draw pairs with replacement from the plan (TorchCFM-compatible; uses ``"emd"``).
    """

    name = "exact"

    def __init__(
        self,
        solver: Solver = "auto",
        cost: CostFn = squared_euclidean_cost,
        num_iter_max: int | None = None,
        label_weight: float | None = None,
        replace: bool = False,
    ) -> None:
        super().__init__(cost, label_weight, replace)
        check_choice(solver, ("auto", "emd", "lsa"), "solver")
        if solver == "lsa" and replace:
            raise ValueError("solver: 'lsa' returns a matching, not a plan to draw from; use 'emd' with replace=True")
        if num_iter_max is not None and num_iter_max <= 0:
            raise ValueError(f"num_iter_max: expected a positive integer, got {num_iter_max}")
        self.solver = solver
        self.num_iter_max = num_iter_max

    @property
    def one_to_one(self) -> bool:  # type: ignore[override]
        """Equal batches give a permutation unless pairs are drawn with replacement."""
        return not self.replace

    def choose_solver(self, n0: int, n1: int, features: int) -> str:
        """The solver used for a ``(n0, n1)`` problem on samples of ``features`` features."""
        if self.solver != "auto":
            return self.solver
        if n0 == n1 and not self.replace and (features >= AUTO_LSA_MIN_FEATURES or n0 <= AUTO_LSA_MAX_BATCH):
            return "lsa"
        return "emd"

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        n0, n1 = x0.shape[0], x1.shape[0]
        solver = self.choose_solver(n0, n1, x0[0].numel())
        if solver == "lsa":
            check_dense_fits(n0, n1, LSA_BYTES_PER_ENTRY, "exact OT (Jonker-Volgenant)")
        else:
            check_dense_fits(n0, n1, EMD_BYTES_PER_ENTRY, "exact OT (network simplex)")
        cost, device = self.cost_matrix(x0, x1, y0, y1, generator), x0.device
        matrix = np.ascontiguousarray(cost.cpu().numpy())  # validated (finite float64) by cost_matrix
        if solver == "lsa":
            if n0 != n1:
                raise ValueError(f"solver: 'lsa' needs equal batch sizes, got {n0} and {n1}; use 'emd' or 'hungarian'")
            rows, cols = _assignment(matrix)
            return Pairing(torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
        plan = _emd(matrix, np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1), self.num_iter_max)
        if n0 == n1 and not self.replace:
            cols = plan.argmax(axis=1)
            rows = np.arange(n0)
            if np.bincount(cols, minlength=n1).max() == 1 and (plan[rows, cols] * n0 >= 1 - 1e-9).all():
                return Pairing(torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
        return pairs_from_plan(torch.from_numpy(plan), generator, device, self.replace)

    def __repr__(self) -> str:
        return f"ExactCoupler(solver={self.solver!r}, num_iter_max={self.num_iter_max}, replace={self.replace})"
