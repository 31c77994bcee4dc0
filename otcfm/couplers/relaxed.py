r"""Entropic OT with relaxed marginals: unbalanced (KL-penalised marginals) and partial (a fraction of the mass).

Both solve their problem on the inputs' device: on the kernel itself where it cannot underflow (fast), in the log
domain otherwise (finite at any epsilon that float arithmetic resolves), and both return the plan. Pairs are then
``B0`` draws with replacement from the whole plan (as TorchCFM does with these plans): a source sample whose row
carries little mass, an outlier the relaxed problem chose not to transport, is rarely used.

- Unbalanced (Chizat et al. 2018; POT's ``sinkhorn_knopp_unbalanced`` with ``reg_type="kl"``):

  .. math::
      \min_{P \ge 0} \langle P, C \rangle + \epsilon\, KL(P \| a b^\top)
      + \rho\, KL(P 1 \| a) + \rho\, KL(P^\top 1 \| b)

  by the scaling iterations ``u = (a / K v)^{\rho / (\rho + \epsilon)}``, ``v = (b / K^T u)^{\rho/(\rho+\epsilon)}``,
  ``K = exp(-C / epsilon) * a b^T``, written for ``log u, log v``.
- Partial (Benamou et al. 2015; POT's ``entropic_partial_wasserstein``): transport only the mass ``m``,

  .. math::
      \min_{P \ge 0,\ P 1 \le a,\ P^\top 1 \le b,\ 1^\top P 1 = m} \langle P, C \rangle - \epsilon H(P)

  by Dykstra's iterated Bregman projections onto the three constraint sets, in log form.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from otcfm._args import check_count, check_flag, check_rate
from otcfm.couplers.base import Pairing
from otcfm.couplers.cost import condition_cost, squared_euclidean_cost
from otcfm.couplers.plan import CostFn, OTCoupler, pairs_from_plan
from otcfm.couplers.sinkhorn import (
    MIN_RELATIVE_EPSILON,
    ConvergenceWarning,
    SinkhornResult,
    _check_memory,
    _matvec,
    absolute_epsilon,
    check_cost_matrix,
    marginal_weights,
)

__all__ = ["PartialCoupler", "UnbalancedCoupler", "partial_plan", "unbalanced_plan"]


#: Peak bytes per entry of the cost of :func:`unbalanced_plan`: the cost, the log kernel and two temporaries of a
#: log-sum-exp (the scaling form needs fewer).
UNBALANCED_BYTES_PER_ENTRY = 32
#: Likewise for :func:`partial_plan`: the plan, three Dykstra corrections, the previous plan and three projections.
PARTIAL_BYTES_PER_ENTRY = 80


def _check(cost: Tensor, epsilon: float, tol: float, max_iter: int) -> None:
    """The plan functions' checks: a valid cost, settings, an epsilon float64 resolves (as :func:`sinkhorn_plan`
    asks), and memory for the solve."""
    check_cost_matrix(cost)
    check_rate(epsilon, "epsilon")
    check_rate(tol, "tol")
    check_count(max_iter, "max_iter")
    mean = float(cost.mean())
    if mean > 0 and epsilon < MIN_RELATIVE_EPSILON * mean:
        raise ValueError(
            f"epsilon: {epsilon:.3g} is below {MIN_RELATIVE_EPSILON:g} of the mean cost ({mean:.3g}), too small to be "
            "resolved in float64; raise it, or use the exact coupler for the unregularised limit"
        )


def unbalanced_fixed_point_error(plan: Tensor, f: Tensor, g: Tensor, reg_m: float, a: Tensor, b: Tensor) -> float:
    r"""How far an unbalanced plan is from the first-order conditions of its marginal penalties (relative).

    At the optimum of :func:`unbalanced_plan`'s problem, with ``P = diag(u) K diag(v)``, ``f = epsilon log u`` and
    ``g = epsilon log v``, the scaling updates ``u = (a / K v)^{\rho / (\rho + \epsilon)}`` give
    ``P 1 = u \odot K v = a \odot u^{-\epsilon / \rho}``, that is

    .. math::
        P 1 = a\, e^{-f / \rho},\qquad P^\top 1 = b\, e^{-g / \rho}.

    Returns ``max(|log(P 1) - log a + f / rho|, |log(P^T 1) - log b + g / rho|)`` over rows and columns: the
    factor by which a marginal misses its condition (``inf`` for an empty row or a non-finite plan). The
    iterations' own criterion, the change of ``log u`` and ``log v``, bounds it in exact arithmetic; a stalled
    or float-limited run does not meet it.

    Args:
        plan: ``(B0, B1)``; f: ``(B0,)``; g: ``(B1,)``; a: ``(B0,)``; b: ``(B1,)``; reg_m: ``rho``, in cost units.
    """
    rows = plan.sum(1).log() - a.log() + f / reg_m
    cols = plan.sum(0).log() - b.log() + g / reg_m
    error = float(torch.maximum(rows.abs().max(), cols.abs().max()))
    return error if math.isfinite(error) else math.inf


def partial_constraint_error(plan: Tensor, mass: float, a: Tensor, b: Tensor) -> float:
    r"""How far a partial plan is from its constraints ``P 1 <= a``, ``P^T 1 <= b``, ``1^T P 1 = m`` (relative).

    Returns the largest of ``max_k (P 1)_k / a_k - 1``, ``max_l (P^T 1)_l / b_l - 1`` (0 when every bound holds)
    and ``|1^T P 1 - m| / m`` (``inf`` for a non-finite plan).

    Args:
        plan: ``(B0, B1)``; a: ``(B0,)``; b: ``(B1,)``; mass: ``m``.
    """
    rows = float((plan.sum(1) / a).max()) - 1.0
    cols = float((plan.sum(0) / b).max()) - 1.0
    error = max(rows, cols, 0.0, abs(float(plan.sum()) - mass) / mass)
    return error if math.isfinite(error) else math.inf


def unbalanced_plan(
    cost: Tensor,
    epsilon: float,
    reg_m: float,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> SinkhornResult:
    """Entropic unbalanced OT plan of ``cost: (B0, B1)`` (absolute ``epsilon`` and marginal penalty ``reg_m``).

    Stops when the scalings change by a factor within ``1 +- tol`` (``max |log u - log u_prev|``, and for ``v``;
    POT's criterion, the change of ``u`` itself, overflows where ``u`` does) or after ``max_iter`` iterations.
    The plan returned is then checked against the first-order conditions of its problem,
    ``P 1 = a exp(-f / rho)`` and ``P^T 1 = b exp(-g / rho)`` (:func:`unbalanced_fixed_point_error`): a run that
    stalled (float64 no longer resolves the change of the scalings) has ``converged=False`` like one that ran out
    of iterations. ``error`` is the change, or the fixed-point error where that is larger;
    ``f, g`` are ``epsilon * log u``, ``epsilon * log v``.

    Returns:
        a :class:`~otcfm.couplers.SinkhornResult` whose plan's marginals are near, not equal to, ``a`` and ``b``.

    Raises:
        ValueError: a bad cost or setting; ``epsilon`` below ``1e-7`` of the mean cost.
        MemoryError: the solve would not fit in the available memory (CPU).
    """
    _check(cost, epsilon, tol, max_iter)
    check_rate(reg_m, "reg_m")
    n0, n1 = cost.shape
    _check_memory(n0, n1, UNBALANCED_BYTES_PER_ENTRY - 8, "unbalanced OT", cost.device)  # the cost exists
    a, b = marginal_weights(a, n0, cost, "a"), marginal_weights(b, n1, cost, "b")
    power = reg_m / (reg_m + epsilon)
    result = None
    if float(cost.abs().max()) / epsilon < _SCALING_RANGE:  # the kernel itself is in range (no shift: see below)
        result = _unbalanced_scaling(cost, epsilon, power, a, b, tol, max_iter)
    if result is None:
        result = _unbalanced_log(cost, epsilon, power, a.log(), b.log(), tol, max_iter)
    fixed_point = unbalanced_fixed_point_error(result.plan, result.f, result.g, reg_m, a, b)
    return _checked(result, fixed_point, _fixed_point_tol(tol))


def _fixed_point_tol(tol: float) -> float:
    """The fixed-point error accepted of a run stopped at the change ``tol``: the change bounds it in exact
    arithmetic, and float64 rounds ``log P 1`` to about 1e-12 (a few units of the largest ``C / epsilon``)."""
    return 2.0 * tol + 1e-10


def _checked(result: SinkhornResult, constraint_error: float, limit: float) -> SinkhornResult:
    """``result`` with ``converged`` false and ``error`` the larger of the two where its plan misses its constraints
    (``constraint_error`` above ``limit``)."""
    if constraint_error <= limit:
        return result
    return replace(result, error=max(result.error, constraint_error), converged=False)


def _unbalanced_log(
    cost: Tensor, epsilon: float, power: float, log_a: Tensor, log_b: Tensor, tol: float, max_iter: int
) -> SinkhornResult:
    """:func:`unbalanced_plan`'s iterations on ``log u, log v`` (finite at any epsilon float64 resolves)."""
    log_kernel = -cost / epsilon + log_a[:, None] + log_b[None, :]
    log_u, log_v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    error, iterations = math.inf, 0
    while iterations < max_iter:
        previous_u, previous_v = log_u, log_v
        log_u = power * (log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1))
        log_v = power * (log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0))
        iterations += 1
        error = float(torch.maximum((log_u - previous_u).abs().max(), (log_v - previous_v).abs().max()))
        if error < tol:
            break
    plan = torch.exp(log_kernel.add_(log_u[:, None]).add_(log_v[None, :]))
    return SinkhornResult(plan, epsilon * log_u, epsilon * log_v, epsilon, iterations, error, error < tol)


def partial_plan(
    cost: Tensor,
    epsilon: float,
    mass: float,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float = 1e-9,
    max_iter: int = 1000,
) -> SinkhornResult:
    """Entropic partial OT plan of ``cost: (B0, B1)`` moving total mass ``mass`` (absolute ``epsilon``).

    Dykstra's iterations (multiplicative where the kernel cannot underflow, else in log form); stops when the plan
    changes by less than ``tol`` in Frobenius norm (checked every 10 iterations, as POT does) and meets its
    constraints to ``sqrt(tol)`` (:func:`partial_constraint_error`: row sums at most ``a``, column sums at most
    ``b``, relative; the total mass), or after ``max_iter``. At small epsilon Dykstra's iterates can stand still
    for many iterations far from the constraints; such a plan, and one stopped by ``max_iter``, has
    ``converged=False``. ``error`` is the change, or the constraint error where that is larger; ``f, g`` are
    zero (the projections keep no potentials).

    Raises:
        ValueError: ``mass`` not in ``(0, min(sum a, sum b)]``, and the checks of :func:`unbalanced_plan`.
        MemoryError: the solve would not fit in the available memory (CPU).
    """
    _check(cost, epsilon, tol, max_iter)
    n0, n1 = cost.shape
    a, b = marginal_weights(a, n0, cost, "a"), marginal_weights(b, n1, cost, "b")
    if not (isinstance(mass, (int, float)) and 0 < mass <= min(float(a.sum()), float(b.sum())) + 1e-12):
        raise ValueError(f"mass: expected a number in (0, 1], the fraction of the mass to transport, got {mass!r}")
    _check_memory(n0, n1, PARTIAL_BYTES_PER_ENTRY - 8, "partial OT", cost.device)  # the cost exists
    limit = math.sqrt(tol)
    result = None
    if float(cost.max() - cost.min()) / epsilon < _SCALING_RANGE:
        result = _partial_scaling(cost, epsilon, mass, a, b, tol, max_iter)
    if result is None:
        result = _partial_log(cost, epsilon, mass, a, b, tol, max_iter)
    return _checked(result, partial_constraint_error(result.plan, mass, a, b), limit)


def _partial_log(
    cost: Tensor, epsilon: float, mass: float, a: Tensor, b: Tensor, tol: float, max_iter: int
) -> SinkhornResult:
    """:func:`partial_plan`'s iterations in log form (finite at any epsilon float64 resolves)."""
    log_a, log_b, log_m, limit = torch.log(a), torch.log(b), math.log(mass), math.sqrt(tol)
    log_p = -cost / epsilon
    log_p = log_p + (log_m - torch.logsumexp(log_p.reshape(-1), 0))
    log_q1, log_q2, log_q3 = (torch.zeros_like(log_p) for _ in range(3))
    error, iterations = math.inf, 0
    while iterations < max_iter:
        previous = log_p
        shifted = log_p + log_q1  # projection 1: rows at most a
        projected = shifted + torch.clamp(log_a - torch.logsumexp(shifted, dim=1), max=0.0)[:, None]
        log_q1 = log_q1 + log_p - projected
        shifted = projected + log_q2  # projection 2: columns at most b
        second = shifted + torch.clamp(log_b - torch.logsumexp(shifted, dim=0), max=0.0)[None, :]
        log_q2 = log_q2 + projected - second
        shifted = second + log_q3  # projection 3: total mass m
        log_p = shifted + (log_m - torch.logsumexp(shifted.reshape(-1), 0))
        log_q3 = log_q3 + second - log_p
        iterations += 1
        if iterations % 10 == 0 or iterations == max_iter:
            error = float(torch.linalg.matrix_norm(torch.exp(previous) - torch.exp(log_p)))
            if error < tol and partial_constraint_error(torch.exp(log_p), mass, a, b) <= limit:
                break
    zeros0, zeros1 = torch.zeros_like(log_a), torch.zeros_like(log_b)
    return SinkhornResult(torch.exp(log_p), zeros0, zeros1, epsilon, iterations, error, error < tol)


#: Below this range of ``cost / epsilon`` the kernel cannot underflow and Dykstra runs in the scaling form, about
#: 3x faster than the log form (no exp/log per entry and iteration).
_SCALING_RANGE = 600.0


def _unbalanced_scaling(
    cost: Tensor, epsilon: float, power: float, a: Tensor, b: Tensor, tol: float, max_iter: int
) -> SinkhornResult | None:
    """:func:`unbalanced_plan`'s iterations on the kernel itself (POT's form); None if a value under- or overflowed.

    Unlike balanced OT, the fixed point is not invariant to a constant factor of the kernel (the marginal
    penalties weigh the total mass), so the kernel is ``exp(-C / epsilon) a b^T`` exactly, used only when
    ``|C| / epsilon`` is in range.
    """
    kernel = torch.exp(-cost / epsilon) * a[:, None] * b[None, :]
    u, v = torch.ones_like(a), torch.ones_like(b)
    error, iterations = math.inf, 0
    while iterations < max_iter:
        previous_u, previous_v = u, v
        u = (a / _matvec(kernel, v)) ** power
        v = (b / _matvec(kernel, u, transpose=True)) ** power
        iterations += 1
        error = float(torch.maximum((u.log() - previous_u.log()).abs().max(), (v.log() - previous_v.log()).abs().max()))
        if not math.isfinite(error):
            return None
        if error < tol:
            break
    plan = kernel.mul_(u[:, None]).mul_(v[None, :])
    return SinkhornResult(plan, epsilon * u.log(), epsilon * v.log(), epsilon, iterations, error, error < tol)


def _partial_scaling(
    cost: Tensor, epsilon: float, mass: float, a: Tensor, b: Tensor, tol: float, max_iter: int
) -> SinkhornResult | None:
    """:func:`partial_plan`'s iterations in multiplicative form; None if a value under- or overflowed.

    Every iterate is ``diag(u) K diag(v)`` for the kernel ``K = exp((min C - C) / epsilon)``: each projection
    scales the rows, the columns or the whole plan, so Dykstra's corrections are a vector over the rows (``q1``),
    one over the columns (``q2``) and a number (``q3``), and an iteration costs two matrix-vector products (``K v``
    serves the total-mass projection and the next row projection). The plan is formed only where the stopping rule
    looks at it (every 10 iterations). On the CPU the loop runs on numpy views of the same memory, whose small
    vector operations cost less than torch's.
    """
    kernel_t = torch.exp((cost.min() - cost) / epsilon)
    on_cpu = kernel_t.device.type == "cpu"
    kernel, a_, b_ = (x.numpy() if on_cpu else x for x in (kernel_t, a, b))
    u, v = a_ * 0 + mass / float(kernel.sum()), b_ * 0 + 1.0
    q1, q2, q3 = a_ * 0 + 1.0, b_ * 0 + 1.0, 1.0
    kv = kernel @ v
    error, iterations = math.inf, 0
    while iterations < max_iter:
        previous_u, previous_v = u, v
        shifted = u * q1  # projection 1: rows at most a
        scale = (a_ / (shifted * kv)).clip(max=1.0)
        q1, u = 1.0 / scale, shifted * scale
        shifted = v * q2  # projection 2: columns at most b
        scale = (b_ / (shifted * (kernel.T @ u))).clip(max=1.0)
        q2, v = 1.0 / scale, shifted * scale
        kv = kernel @ v
        total = q3 * (u @ kv)  # projection 3: total mass m (a number, read on the host only at the checks)
        q3, u = total / mass, u * (q3 * mass / total)
        iterations += 1
        if iterations % 10 == 0 or iterations == max_iter:
            p = _scaled(kernel_t, u, v)
            error = float(torch.linalg.matrix_norm(_scaled(kernel_t, previous_u, previous_v) - p))
            if not all(math.isfinite(x) for x in (error, float(q3), float(q1.sum()), float(q2.sum()))):
                return None
            if error < tol and partial_constraint_error(p, mass, a, b) <= math.sqrt(tol):
                break
    zeros0, zeros1 = torch.zeros_like(a), torch.zeros_like(b)
    return SinkhornResult(_scaled(kernel_t, u, v), zeros0, zeros1, epsilon, iterations, error, error < tol)


def _scaled(kernel: Tensor, u: Tensor | np.ndarray, v: Tensor | np.ndarray) -> Tensor:
    """The plan ``diag(u) K diag(v)`` of scalings held as tensors or as numpy arrays."""
    u, v = torch.as_tensor(u, device=kernel.device), torch.as_tensor(v, device=kernel.device)
    return u[:, None] * kernel * v[None, :]


class _RelaxedCoupler(OTCoupler):
    """Shared pairing of the relaxed couplers: ``B0`` draws with replacement from the whole plan."""

    sources_in_order = False

    def __init__(
        self, epsilon: float, relative: bool, tol: float, max_iter: int, cost: CostFn, label_weight: float | None
    ) -> None:
        super().__init__(cost, label_weight, replace=True)
        check_rate(epsilon, "epsilon")
        check_rate(tol, "tol")
        check_count(max_iter, "max_iter")
        self.epsilon, self.tol, self.max_iter = float(epsilon), tol, max_iter
        self.relative = check_flag(relative, "relative")

    #: Peak bytes per cost entry of the solve (the cost included).
    bytes_per_entry = 8

    def _solve(self, cost: Tensor, eps: float, scale: float) -> SinkhornResult:
        raise NotImplementedError

    def plan(
        self,
        x0: Tensor,
        x1: Tensor,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SinkhornResult:
        """The relaxed plan of ``x0: (B0, ...)``, ``x1: (B1, ...)``; relative settings scale with the mean cost.

        Raises:
            MemoryError: the dense solve would not fit in the available memory (CPU), before anything is allocated.
        """
        _check_memory(x0.shape[0], x1.shape[0], self.bytes_per_entry, f"{self.name} OT", x0.device)
        base, _ = self.scaled_base_cost(x0, x1)
        eps = absolute_epsilon(self.epsilon, self.relative, base)
        scale = eps / self.epsilon  # the mean cost when relative, else 1
        return self._solve(condition_cost(base, y0, y1, self.label_weight, generator), eps, scale)

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        result = self.plan(x0, x1, y0, y1, generator)
        if not result.converged:
            warnings.warn(
                f"{self.name} OT did not converge: error {result.error:.3g} (tol {self.tol:g}) after "
                f"{result.iterations} iterations, the plan misses its constraints or stopped early; raise max_iter "
                "or epsilon",
                ConvergenceWarning,
                stacklevel=3,
            )
        return pairs_from_plan(result.plan, generator, x0.device, replace=True)


class UnbalancedCoupler(_RelaxedCoupler):
    """Pairs drawn from an entropic unbalanced OT plan (TorchCFM's ``method="unbalanced"``).

    The marginals are penalised by ``reg_m * KL`` instead of being imposed, so mass that is expensive to move
    (outliers, a target mode the batch over-represents) may be left out.

    Args:
        epsilon: regularisation; relative to the mean cost unless ``relative=False``.
        reg_m: marginal penalty ``rho``; relative to the mean cost like ``epsilon`` (large: balanced OT).
        relative: read ``epsilon`` and ``reg_m`` as fractions of the batch's mean cost.
        tol, max_iter: stopping rule of :func:`unbalanced_plan`.
        cost, label_weight: see :class:`~otcfm.couplers.plan.OTCoupler`.
    """

    name = "unbalanced"
    bytes_per_entry = UNBALANCED_BYTES_PER_ENTRY

    def __init__(
        self,
        epsilon: float = 0.05,
        reg_m: float = 1.0,
        relative: bool = True,
        tol: float = 1e-6,
        max_iter: int = 1000,
        cost: CostFn = squared_euclidean_cost,
        label_weight: float | None = None,
    ) -> None:
        super().__init__(epsilon, relative, tol, max_iter, cost, label_weight)
        self.reg_m = check_rate(reg_m, "reg_m")

    def _solve(self, cost: Tensor, eps: float, scale: float) -> SinkhornResult:
        return unbalanced_plan(cost, eps, self.reg_m * scale, tol=self.tol, max_iter=self.max_iter)

    def __repr__(self) -> str:
        kind = "relative" if self.relative else "absolute"
        return f"UnbalancedCoupler(epsilon={self.epsilon}, reg_m={self.reg_m} ({kind}))"


class PartialCoupler(_RelaxedCoupler):
    """Pairs drawn from an entropic partial OT plan that moves only the fraction ``mass`` (TorchCFM's ``"partial"``).

    Cost: :func:`partial_plan` runs Dykstra's iterations, two ``B0 x B1`` matrix-vector products each, until the plan
    settles to ``tol`` (hundreds of iterations at the default epsilon): a few times the time of ``"exact"`` at
    B = 256, more where it needs more iterations (docs/benchmarks.md, "The partial coupler's cost").

    Args:
        epsilon: regularisation; relative to the mean cost unless ``relative=False``.
        mass: fraction of the mass transported, in ``(0, 1]``.
        relative: read ``epsilon`` as a fraction of the batch's mean cost.
        tol, max_iter: stopping rule of :func:`partial_plan`.
        cost, label_weight: see :class:`~otcfm.couplers.plan.OTCoupler`.
    """

    name = "partial"
    bytes_per_entry = PARTIAL_BYTES_PER_ENTRY

    def __init__(
        self,
        epsilon: float = 0.05,
        mass: float = 0.9,
        relative: bool = True,
        tol: float = 1e-7,
        max_iter: int = 1000,
        cost: CostFn = squared_euclidean_cost,
        label_weight: float | None = None,
    ) -> None:
        super().__init__(epsilon, relative, tol, max_iter, cost, label_weight)
        if not (isinstance(mass, (int, float)) and not isinstance(mass, bool) and 0 < mass <= 1):
            raise ValueError(f"mass: expected a number in (0, 1], the fraction of the mass to transport, got {mass!r}")
        self.mass = float(mass)

    def _solve(self, cost: Tensor, eps: float, scale: float) -> SinkhornResult:
        return partial_plan(cost, eps, self.mass, tol=self.tol, max_iter=self.max_iter)

    def __repr__(self) -> str:
        kind = "relative" if self.relative else "absolute"
        return f"PartialCoupler(epsilon={self.epsilon} ({kind}), mass={self.mass})"
