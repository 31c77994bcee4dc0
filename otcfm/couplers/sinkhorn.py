r"""Entropic OT (Sinkhorn) in torch: stabilised scaling iterations with epsilon annealing, on the inputs' device."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_anneal, check_count, check_flag, check_rate
from otcfm._checks import all_finite, check_pair
from otcfm._memory import check_dense_fits
from otcfm.couplers.base import Pairing
from otcfm.couplers.blockwise import ANNEAL_BELOW, blockwise_sinkhorn, draw_partners
from otcfm.couplers.cost import check_source_labels, condition_cost, squared_euclidean_cost
from otcfm.couplers.plan import CostFn, OTCoupler, pairs_from_plan

__all__ = [
    "ANNEAL_BELOW",
    "FLOAT32_MIN_ENTRIES",
    "FLOAT32_MIN_EPSILON",
    "MIN_RELATIVE_EPSILON",
    "SINKHORN_BYTES_PER_ENTRY",
    "ConvergenceWarning",
    "SinkhornCoupler",
    "SinkhornResult",
    "marginal_weights",
    "sinkhorn_plan",
]

#: Smallest epsilon accepted, relative to the mean cost: below it float64 cannot resolve the plan.
MIN_RELATIVE_EPSILON = 1e-7
#: Dense plans of at least this many entries (``n0 * n1``, e.g. 2048 x 2048) between float32 inputs are solved in
#: float32 (see :class:`SinkhornCoupler` for the conditions): half the memory and two to four times faster than
#: float64 (memory-bound kernel products), at epsilons float32 resolves.
FLOAT32_MIN_ENTRIES = 2**22
#: Smallest epsilon, relative to the mean cost, solved in float32: the float32 cost's rounding is then a few 1e-4
#: of epsilon on ordinary data (more with heavy tails). Smaller ones go to float64.
FLOAT32_MIN_EPSILON = 1e-3
_FLOAT32_TINY = 2.0**-100  # a mean cost below this may have lost entries to underflow: float64 rescales it
_FLOAT32_LARGEST = 2.0**120  # costs (and their partial sums) must stay below this, well inside float32's range
#: The float32 path needs ``tol >= _FLOAT32_TOL / sqrt(n1)``: about 1000x the float32 rounding of the target marginal
#: (its error stalls near 2e-8 at 2048 points, where this asks for 1.3e-6); tighter tolerances go to float64.
_FLOAT32_TOL = 1000 * 2.0**-24


@dataclass(frozen=True)
class _Float32Problem:
    """The centred float32 clouds ``a: (n0, D)``, ``b: (n1, D)``, their squared norms, the mean cost and the
    absolute epsilon: a problem the float32 path of :class:`SinkhornCoupler` can hold."""

    a: Tensor
    b: Tensor
    a_sq: Tensor
    b_sq: Tensor
    mean: float
    epsilon: float


#: Peak bytes per cost entry of a dense float64 Sinkhorn solve: the cost, the kernel (which becomes the plan) and
#: the two temporaries of a log-domain step (the label term's, where labels are given, come and go before).
SINKHORN_BYTES_PER_ENTRY = 40
#: Likewise for the float32 path: its two buffers (cost and kernel) and the temporaries of a log-domain step.
_FLOAT32_BYTES_PER_ENTRY = 20


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before reaching its tolerance."""


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn_plan`.

    Attributes:
        plan: ``(B0, B1)`` entropic plan.
        f: ``(B0,)`` potential, cost units, with the weights folded in (``P = exp((f + g - C) / epsilon)``).
        g: ``(B1,)`` potential, likewise.
        epsilon: the absolute epsilon of the final iterations.
        iterations: Sinkhorn iterations made (annealing stages included).
        error: L2 norm of the larger violation of the returned plan's marginals, ``||P^T 1 - b||_2`` or
            ``||P 1 - a||_2`` (for the relaxed plans of :mod:`otcfm.couplers.relaxed`, see their functions).
        converged: ``error <= tol``.
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    epsilon: float
    iterations: int
    error: float
    converged: bool


def marginal_weights(w: Tensor | None, n: int, like: Tensor, name: str) -> Tensor:
    """Checked marginal weights ``(n,)`` on ``like``'s device and dtype: uniform when ``w`` is None."""
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"{name}: expected ({n},) finite positive weights")
    if abs(float(w.sum()) - 1.0) > 1e-9:
        raise ValueError(f"{name}: expected weights summing to 1, got {float(w.sum()):.12g}")
    return w


def absolute_epsilon(epsilon: float, relative: bool, cost: Tensor) -> float:
    """``epsilon`` in cost units: times ``cost.mean()`` when ``relative`` (and the mean is positive)."""
    return _in_cost_units(epsilon, relative, float(cost.mean()))


def _in_cost_units(epsilon: float, relative: bool, mean: float) -> float:
    """:func:`absolute_epsilon` for a cost whose mean is ``mean``."""
    return epsilon * mean if relative and mean > 0 else float(epsilon)


def sinkhorn_plan(
    cost: Tensor,
    epsilon: float,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    relative: bool = True,
    tol: float = 1e-6,
    max_iter: int = 2000,
    anneal: bool | Literal["auto"] = "auto",
) -> SinkhornResult:
    r"""Entropic optimal transport by stabilised Sinkhorn iterations.

    .. math::
        P^\epsilon = \arg\min_{P \in U(a, b)} \langle P, C \rangle - \epsilon H(P),\qquad
        P_{kl} = \exp\big((f_k + g_l - C_{kl}) / \epsilon\big)

    Iterations use the scaling form (two matrix-vector products each) on a
    kernel taken relative to log-domain potentials ``f, g``; the scalings are
    absorbed into the potentials before they under- or overflow, and a
    log-sum-exp step replaces any iteration whose kernel did (Schmitzer 2019),
    so it is stable for any ``epsilon > 0`` that float arithmetic can resolve
    and costs far less than a pure log-domain loop. The potentials start at
    ``f = min_l C_kl``, ``g = 0``. With annealing, epsilon starts at the
    largest cost and halves each iteration down to its target (epsilon
    scaling), which needs far fewer iterations at small epsilon; the plan at
    the target epsilon is the same. Stops when the target marginal is met,
    ``||P^T 1 - b||_2 <= tol`` (POT's criterion), or after ``max_iter``.
    The plan returned is checked against both marginals: ``converged`` only if each is met to ``tol``.
    Runs on ``cost``'s device and dtype.

    Args:
        cost: ``(B0, B1)`` cost matrix.
        epsilon: regularisation, ``> 0``; relative to the mean cost unless ``relative=False``.
        a: ``(B0,)`` positive source weights summing to 1; uniform when None.
        b: ``(B1,)`` positive target weights; uniform when None.
        relative: read ``epsilon`` as a fraction of ``cost.mean()``.
        tol: tolerance on the target marginal violation.
        max_iter: iteration limit (annealing included).
        anneal: use epsilon scaling: True, False, or ``"auto"``: only below :data:`ANNEAL_BELOW` of the
            mean cost, where it saves iterations (at larger epsilon a few dozen plain iterations converge).

    Returns:
        a :class:`SinkhornResult`; check ``converged``.

    Raises:
        ValueError: ``epsilon <= 0`` or below ``1e-7`` of the mean cost, NaN/Inf cost, bad weights.
        MemoryError: the solve would not fit in the available memory (CPU), before anything is allocated.
    """
    check_cost_matrix(cost)
    _check_memory(*cost.shape, SINKHORN_BYTES_PER_ENTRY - 8, "sinkhorn (dense)", cost.device)  # the cost exists
    return _result(_scaling(cost, epsilon, a, b, relative, tol, max_iter, anneal), a, b, tol)


#: Dense solves needing less than this many bytes (64 MiB) are not checked against the available memory: reading
#: it is a file read per call, kept out of the training steps of ordinary batches.
_CHECK_MEMORY_ABOVE = 2**26


def _check_memory(n0: int, n1: int, per_entry: int, what: str, device: torch.device) -> None:
    """:func:`~otcfm._memory.check_dense_fits` for a solve on the CPU (host memory says nothing of a GPU's) that
    needs at least :data:`_CHECK_MEMORY_ABOVE` bytes."""
    if n0 * n1 * per_entry >= _CHECK_MEMORY_ABOVE and torch.device(device).type == "cpu":
        check_dense_fits(n0, n1, per_entry, what)


def check_cost_matrix(cost: object) -> Tensor:
    """``cost`` must be a non-empty, finite, floating ``(B0, B1)`` tensor: the input of the plan functions."""
    if not isinstance(cost, Tensor) or not cost.is_floating_point():
        got = f"dtype {cost.dtype}" if isinstance(cost, Tensor) else type(cost).__name__
        raise TypeError(f"cost: expected a floating-point torch.Tensor, got {got}")
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost: expected a non-empty 2-D matrix, got shape {tuple(cost.shape)}")
    if not all_finite(cost):
        raise ValueError("cost: contains NaN or Inf")
    return cost


def _result(scaled: _Scaled, a: Tensor | None, b: Tensor | None, tol: float) -> SinkhornResult:
    """The :class:`SinkhornResult` of :func:`_scaling`'s iterations: the dense plan (formed in the kernel's memory),
    its potentials and the larger of its marginal errors against ``a`` and ``b`` (uniform when None), both read
    from the plan itself (one pass for the two sums, one host read)."""
    plan = scaled.kernel.mul_(scaled.u[:, None]).mul_(scaled.v[None, :])
    a, b = marginal_weights(a, plan.shape[0], plan, "a"), marginal_weights(b, plan.shape[1], plan, "b")
    errors = torch.stack([torch.linalg.vector_norm(plan.sum(0) - b), torch.linalg.vector_norm(plan.sum(1) - a)])
    error = float(errors.max())
    error = error if math.isfinite(error) else math.inf
    f, g = scaled.f + scaled.epsilon * scaled.u.log(), scaled.g + scaled.epsilon * scaled.v.log()
    return SinkhornResult(plan, f, g, scaled.epsilon, scaled.iterations, error, error <= tol)


@dataclass(frozen=True)
class _Scaled:
    """Where the iterations of :func:`_scaling` stopped: the plan is ``diag(u) kernel diag(v)``, with
    ``kernel = exp((f_k + g_l - C_kl) / epsilon)``; ``error`` is its target marginal error at the last check."""

    kernel: Tensor
    u: Tensor
    v: Tensor
    f: Tensor
    g: Tensor
    epsilon: float
    iterations: int
    error: float


def _scaling(
    cost: Tensor,
    epsilon: float,
    a: Tensor | None,
    b: Tensor | None,
    relative: bool,
    tol: float,
    max_iter: int,
    anneal: bool | Literal["auto"],
    out: Tensor | None = None,
    mean: float | None = None,
) -> _Scaled:
    """The stabilised scaling iterations of :func:`sinkhorn_plan`, in ``cost``'s dtype.

    The target marginal is checked every 10 iterations (its product ``K^T u`` is reused by the next one), or,
    with ``out`` (a buffer shaped like ``cost`` that the kernels are written into: the float32 path), every
    iteration: ``u`` and ``K^T u`` then come from one pass over the kernel (:func:`_rows_then_columns`).
    ``mean`` is ``cost.mean()`` when the caller knows it.
    """
    fused = out is not None
    check_rate(epsilon, "epsilon")
    check_rate(tol, "tol")
    check_count(max_iter, "max_iter")
    check_flag(relative, "relative")
    check_anneal(anneal)
    n0, n1 = cost.shape
    a, b = marginal_weights(a, n0, cost, "a"), marginal_weights(b, n1, cost, "b")
    scale = float(cost.mean()) if mean is None else mean
    eps = _in_cost_units(epsilon, relative, scale)
    if scale > 0 and eps < MIN_RELATIVE_EPSILON * scale:
        raise ValueError(
            f"epsilon: {eps:.3g} is below {MIN_RELATIVE_EPSILON:g} of the mean cost ({scale:.3g}), too small to be "
            "stable; use the exact coupler for the unregularised limit"
        )
    log_a, log_b = torch.log(a), torch.log(b)
    current = eps
    if anneal is True or (anneal == "auto" and scale > 0 and eps < ANNEAL_BELOW * scale):
        current = max(eps, float(cost.max()))
    # Start from f_k = min_l C_kl (the c-transform of zero) and g = 0: every kernel entry is <= 1 and every row
    # holds a 1 (one reduction instead of a log-sum-exp pass); a column that underflows is caught below.
    f = cost.amin(dim=1)
    g = torch.zeros(n1, dtype=cost.dtype, device=cost.device)
    kernel = _kernel(cost, f, None, current, out)
    u, v = torch.ones_like(f), torch.ones_like(g)
    error, iterations, scaled = math.inf, 0, False
    column: Tensor | None = None  # K^T u of the current u, when the last check computed it
    while iterations < max_iter:
        if column is None:  # fused: only at a (re)start, where u = 1
            column = kernel.sum(0) if fused else _matvec(kernel, u, transpose=True)
        v = b / column
        u, column = _rows_then_columns(kernel, v, a) if fused else (a / _matvec(kernel, v), None)
        iterations += 1
        scaled = True
        # NaN/Inf or 0 (a kernel that under- or overflowed), or scalings to absorb: max |log u|, |log v| > _ABSORB
        high, low = float(torch.maximum(u.amax(), v.amax())), float(torch.minimum(u.amin(), v.amin()))
        stale = not (math.isfinite(high) and low > 0)
        wide = high > _EXP_ABSORB or low < 1.0 / _EXP_ABSORB
        if stale:  # redo this step in the log domain
            f, g = _log_step(cost, f, g, log_a, log_b, current)
        elif wide or current > eps:  # absorb the scalings into the potentials
            f, g = f + current * u.log(), g + current * v.log()
        if stale or wide or current > eps:
            current = max(eps, current / 2)
            kernel = _kernel(cost, f, g, current, out)
            u, v = torch.ones_like(f), torch.ones_like(g)
            scaled, column = False, None
            continue
        if fused or iterations % 10 == 0 or iterations == max_iter:
            column = _matvec(kernel, u, transpose=True) if column is None else column
            error = float(torch.linalg.vector_norm(v * column - b))
            if error <= tol:
                break
    if not scaled or current > eps:
        # stopped by max_iter right after a reset of the scalings: finish with a log-domain row update
        f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
        kernel = _kernel(cost, f, g, eps, out)
        u, v = torch.ones_like(f), torch.ones_like(g)
        error = float(torch.linalg.vector_norm(kernel.sum(0) - b))
    # else u was updated last, so the rows of diag(u) K diag(v) sum to a exactly
    return _Scaled(kernel, u, v, f, g, eps, iterations, error)


_ABSORB = 30.0  # absorb scalings into the potentials once |log u| or |log v| exceeds this
_EXP_ABSORB = math.exp(_ABSORB)  # the same test without a log: torch's log starts its threads even on short vectors


def _matvec(matrix: Tensor, vector: Tensor, transpose: bool = False) -> Tensor:
    """``matrix @ vector`` (or ``matrix.T @ vector``). On the CPU through numpy's BLAS gemv on the same memory:
    2.4-3.5x faster than torch's CPU ``mv`` for a 1024 x 1024 float64 kernel (0.06 vs 0.14-0.18 ms, one thread)."""
    if matrix.device.type != "cpu" or matrix.requires_grad:
        return (matrix.T if transpose else matrix) @ vector
    array = matrix.numpy()
    return torch.from_numpy((array.T if transpose else array) @ vector.numpy())


def _rows_then_columns(kernel: Tensor, v: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``u = a / (K v)`` and ``K^T u`` in one pass over ``K``.

    On the CPU each block of rows (4 MiB) is read from memory once and used twice while it is in cache; the
    products are memory-bound, and one core's share of memory bandwidth is the limit, so with several torch
    threads the rows are split between as many Python threads (up to 2; torch's products release the GIL).
    At 4096 x 4096 in float32 on 2 cores this takes 0.6x the time of two full products.
    """
    if kernel.device.type != "cpu":
        u = a / (kernel @ v)
        return u, kernel.T @ u
    rows = max(1, 2**22 // (kernel.shape[1] * kernel.element_size()))
    u = torch.empty_like(a)
    n = kernel.shape[0]
    if torch.get_num_threads() < 2 or n < 4 * rows:
        column = torch.zeros_like(v)
        _pass(kernel, v, a, u, column, 0, n, rows)
        return u, column
    half, other, failed = n // 2, torch.zeros_like(v), []

    def second_half() -> None:
        try:
            _pass(kernel, v, a, u, other, half, n, rows)
        except BaseException as error:  # re-raised in the caller's thread below
            failed.append(error)

    helper = threading.Thread(target=second_half, name="otcfm-sinkhorn-rows")
    helper.start()
    column = torch.zeros_like(v)
    try:
        _pass(kernel, v, a, u, column, 0, half, rows)
    finally:
        helper.join()
    if failed:
        raise failed[0]
    return u, column.add_(other)


def _pass(kernel: Tensor, v: Tensor, a: Tensor, u: Tensor, column: Tensor, start: int, stop: int, rows: int) -> None:
    """Rows ``start:stop`` of :func:`_rows_then_columns`: their ``u`` into ``u``, ``K^T u`` added to ``column``."""
    for first in range(start, stop, rows):
        last = min(first + rows, stop)
        block = kernel[first:last]
        part = torch.mv(block, v, out=u[first:last]).reciprocal_().mul_(a[first:last])
        column.addmv_(block.T, part)


def _kernel(cost: Tensor, f: Tensor, g: Tensor | None, eps: float, out: Tensor | None = None) -> Tensor:
    """``exp((f_k + g_l - C_kl) / eps)``: the Gibbs kernel relative to the potentials (in ``out``, else new);
    ``g = None`` stands for zeros (one pass fewer)."""
    kernel = torch.sub(f[:, None], cost, out=out)
    return (kernel if g is None else kernel.add_(g[None, :])).mul_(1.0 / eps).exp_()


def _log_step(cost: Tensor, f: Tensor, g: Tensor, log_a: Tensor, log_b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One log-domain Sinkhorn iteration on potentials in which the marginal weights are folded.

    Potentials here absorb the weights: the plan is ``exp((f + g - C) / eps)``.
    """
    g = eps * (log_b - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
    f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
    return f, g


class SinkhornCoupler(OTCoupler):
    """Pair samples by an entropic OT plan (Sinkhorn): every source used once, its partner drawn from its row.

    As ``epsilon -> 0`` the pairing cost approaches the exact one; as
    ``epsilon`` grows the plan approaches the independent coupling. With the
    ``"bridge"`` path of diffusion ``sigma``, entropic OT at the absolute
    ``epsilon = 2 sigma^2`` gives the Schroedinger bridge:
    ``FlowMatcher.schrodinger_bridge(sigma)`` builds it, and so does
    ``FlowMatcher(coupler="sinkhorn", path="bridge", sigma=sigma)``; an instance
    at another epsilon beside the bridge path draws a
    :class:`~otcfm.flow.BridgeEpsilonWarning`.
    A run that stops at ``max_iter`` above ``tol`` emits a :class:`ConvergenceWarning`.

    Args:
        epsilon: regularisation, relative to the mean cost unless ``relative=False``.
        relative: see ``epsilon``.
        tol: tolerance on the target marginal (L2).
        max_iter: iteration limit.
        anneal: epsilon scaling (True, False, or ``"auto"``: below :data:`ANNEAL_BELOW` of the mean cost).
        cost: ``cost(x0, x1) -> (B0, B1)``; squared Euclidean by default.
        label_weight: see :class:`~otcfm.couplers.plan.OTCoupler`.
        replace: draw pairs with replacement from the whole plan (TorchCFM-compatible).
        memory_budget: bytes a dense ``(B0, B1)`` float64 plan may take; a larger problem (default cost, no labels,
            no ``replace``) is solved blockwise (:func:`~otcfm.couplers.blockwise.blockwise_sinkhorn`) and each
            partner drawn from its row of the implicit plan. None: always dense.

    Precision: dense problems are solved in float64, except those of at least :data:`FLOAT32_MIN_ENTRIES`
    entries (``B0 * B1``, e.g. 2048 x 2048 OT pools) between float32 inputs with the default cost, no labels and
    no ``replace``, at an epsilon of at least :data:`FLOAT32_MIN_EPSILON` of the mean cost, a ``tol`` float32 can
    meet (at least about ``6e-5 / sqrt(B1)``) and costs far inside float32's range: these are solved in float32 on
    the centred clouds (the plan within about 2e-4 of the float64 one, relative to its largest entry; 1e-5 at the
    default epsilon), with the marginal checked after every iteration. The coupler keeps the two float32 buffers
    (cost and kernel, up to 8192 x 8192 each) for the next call of the same shape; they go with the coupler.
    At 4096 x 4096 points in d = 32 that is about 4x faster than float64 on 2 CPU cores and takes the memory of
    one float64 plan.
    """

    name = "sinkhorn"

    def __init__(
        self,
        epsilon: float = 0.05,
        relative: bool = True,
        tol: float = 1e-5,
        max_iter: int = 5000,
        anneal: bool | Literal["auto"] = "auto",
        cost: CostFn = squared_euclidean_cost,
        label_weight: float | None = None,
        replace: bool = False,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__(cost, label_weight, replace)
        self.epsilon, self.tol, self.max_iter = (
            check_rate(epsilon, "epsilon"),
            check_rate(tol, "tol"),
            check_count(max_iter, "max_iter"),
        )
        self.memory_budget = None if memory_budget is None else check_count(memory_budget, "memory_budget")
        self._workspace = _Workspace()
        self.relative, self.anneal = check_flag(relative, "relative"), check_anneal(anneal)

    def plan(
        self,
        x0: Tensor,
        x1: Tensor,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SinkhornResult:
        """Entropic plan of ``x0: (B0, ...)``, ``x1: (B1, ...)``; a relative epsilon scales the label-free cost.

        Raises:
            ValueError: ``y0`` without ``y1``, and the checks of :func:`sinkhorn_plan`.
            MemoryError: the dense plan would not fit in the available memory (CPU), before anything is allocated.
        """
        check_source_labels(y0, y1)
        _check_memory(x0.shape[0], x1.shape[0], SINKHORN_BYTES_PER_ENTRY, "sinkhorn (dense, float64)", x0.device)
        base, unit = self.scaled_base_cost(x0, x1)  # checked finite; the label term of checked labels keeps it so
        eps = absolute_epsilon(self.epsilon if self.relative else self.epsilon / unit / unit, self.relative, base)
        weight = self.label_weight
        if weight is None and y1 is not None and not y1.is_floating_point():
            # Hard labels: a mismatch costs the largest transport cost. That is enough for the fewest label
            # crossings (swapping two crossing pairs saves 2 x that, and costs at most as much), and unlike
            # condition_cost's exact-OT penalty, (B0 + 1) x the largest cost, the kernel of the pairs that must
            # cross (label counts that differ) does not underflow, so the iterations can meet the marginals.
            weight = float(base.max()) or 1.0
        cost = condition_cost(base, y0, y1, weight, generator)
        scaled = _scaling(cost, eps, None, None, False, self.tol, self.max_iter, self.anneal)
        result = _result(scaled, None, None, self.tol)
        if unit == 1.0:
            return result
        square = unit * unit  # the inputs were rescaled (see scaled_base_cost): back to cost units (inf if beyond)
        return replace(result, f=result.f * square, g=result.g * square, epsilon=result.epsilon * square)

    def entropic_epsilon(self) -> tuple[float, bool] | None:
        """``(epsilon, relative)``: this coupler solves entropic OT."""
        return float(self.epsilon), bool(self.relative)

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        check_source_labels(y0, y1)  # one rule for every path below: source labels need target labels
        large = self.memory_budget is not None and x0.shape[0] * x1.shape[0] * 8 > self.memory_budget
        if large and self.cost is squared_euclidean_cost and y1 is None and not self.replace:
            return self._pair_blockwise(x0, x1, generator)
        problem = self._float32_problem(x0, x1, y1) if x0.shape[0] * x1.shape[0] >= FLOAT32_MIN_ENTRIES else None
        if problem is not None:
            held = self._workspace.holds(x0.shape[0], x1.shape[0], x0.device)
            per_entry = _FLOAT32_BYTES_PER_ENTRY - (8 if held else 0)  # buffers held are already counted as used
            _check_memory(x0.shape[0], x1.shape[0], per_entry, "sinkhorn (dense, float32)", x0.device)
            with self._workspace.lease(x0.shape[0], x1.shape[0], x0.device) as (cost, kernel):
                scaled = self._solve_float32(problem, cost, kernel)
                if math.isfinite(scaled.error):  # else (not seen; a guard) the float64 path below decides
                    self._warn(scaled.error <= self.tol, scaled.error, scaled.iterations, scaled.epsilon)
                    weights = scaled.kernel.mul_(scaled.v[None, :])  # row k of the plan, up to its factor u_k
                    j = _random.multinomial(weights, generator, x0.device)
                    return Pairing(torch.arange(x0.shape[0], device=x0.device), j)
        result = self.plan(x0, x1, y0, y1, generator)
        hard = y1 is not None and self.label_weight is None and not y1.is_floating_point()
        self._warn(result.converged, result.error, result.iterations, result.epsilon, hard)
        return pairs_from_plan(result.plan, generator, x0.device, self.replace)

    def _pair_blockwise(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Pairing:
        """Pairs from :func:`~otcfm.couplers.blockwise.blockwise_sinkhorn` on both clouds scaled by a power of two
        (exact; :func:`_unit`) where their squares would under- or overflow, as the dense path rescales its cost:
        the same pairs at any finite input scale."""
        unit = _unit(x0, x1)
        epsilon = self.epsilon
        if unit != 0:  # x / 2^unit; an absolute epsilon in the units of the scaled cost
            x0, x1 = _scaled(x0, -unit), _scaled(x1, -unit)
            epsilon = epsilon if self.relative else math.ldexp(epsilon, -2 * unit)
        blocks = blockwise_sinkhorn(
            x0, x1, epsilon, relative=self.relative, tol=self.tol, max_iter=self.max_iter, anneal=self.anneal,
            memory_budget=self.memory_budget,
        )  # fmt: skip
        try:
            reported = math.ldexp(blocks.epsilon, 2 * unit)  # back in cost units, for the message
        except OverflowError:
            reported = math.inf
        self._warn(blocks.converged, blocks.error, blocks.iterations, reported)
        j = draw_partners(x0, x1, blocks.g, blocks.epsilon, generator, self.memory_budget)
        return Pairing(torch.arange(x0.shape[0], device=x0.device), j.to(x0.device))

    def _float32_problem(self, x0: Tensor, x1: Tensor, y1: Tensor | None) -> _Float32Problem | None:
        """The centred clouds, their squared norms and the absolute epsilon, if float32 can hold the problem:
        float32 inputs, the default cost, no labels, no ``replace``, a tolerance above float32's marginal error
        (:data:`_FLOAT32_TOL`), costs that neither overflow nor underflow, and an epsilon of at least
        :data:`FLOAT32_MIN_EPSILON` of the mean cost; else None (the float64 path takes it)."""
        plain = self.cost is squared_euclidean_cost and y1 is None and not self.replace
        if not (plain and x0.dtype == torch.float32 and x1.dtype == torch.float32):
            return None
        if (self.relative and self.epsilon < FLOAT32_MIN_EPSILON) or self.tol < _FLOAT32_TOL / math.sqrt(x1.shape[0]):
            return None
        a, b = x0.detach().reshape(x0.shape[0], -1), x1.detach().reshape(x1.shape[0], -1)
        centre = 0.5 * (a.mean(0) + b.mean(0))  # the cost is translation-invariant; centring keeps its rounding small
        a, b = a - centre, b - centre
        a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
        # |a_k - b_l|^2 and every partial sum of the product below are at most 2 (|a_k|^2 + |b_l|^2)
        largest = 2.0 * (float(a_sq.max()) + float(b_sq.max()))
        if not math.isfinite(largest):
            check_pair(x0, x1)  # names x0 or x1 when the NaN/Inf came from an input
        mean = float(a_sq.mean()) + float(b_sq.mean()) - 2.0 * float(a.mean(0) @ b.mean(0))  # mean_kl C_kl
        eps = _in_cost_units(self.epsilon, self.relative, mean)
        if not (largest < _FLOAT32_LARGEST and mean > _FLOAT32_TINY and eps >= FLOAT32_MIN_EPSILON * mean):
            return None
        return _Float32Problem(a, b, a_sq, b_sq, mean, eps)

    def _solve_float32(self, problem: _Float32Problem, cost: Tensor, kernel: Tensor) -> _Scaled:
        """The scaling iterations on the float32 cost (written into the buffer ``cost``, kernels into ``kernel``),
        with the marginal checked every iteration (for free)."""
        a, b, a_sq, b_sq = problem.a, problem.b, problem.a_sq, problem.b_sq
        # C = [a, |a|^2, 1] [-2b, 1, |b|^2]^T: one product writes the whole cost (rounding may leave -1e-7s)
        one0, one1 = torch.ones_like(a_sq[:, None]), torch.ones_like(b_sq[:, None])
        torch.mm(torch.cat([a, a_sq[:, None], one0], 1), torch.cat([-2.0 * b, one1, b_sq[:, None]], 1).T, out=cost)
        return _scaling(
            cost, problem.epsilon, None, None, False, self.tol, self.max_iter, self.anneal, out=kernel,
            mean=problem.mean,
        )  # fmt: skip

    def _warn(self, converged: bool, error: float, iterations: int, epsilon: float, hard_labels: bool = False) -> None:
        if not converged:
            remedy = (
                "; with hard labels (label_weight=None) a mismatch costs the largest transport cost, and label "
                "counts that differ between the batches force some crossings, which take more iterations: raise "
                "max_iter, or give label_weight a smaller finite penalty"
                if hard_labels
                else ""
            )
            warnings.warn(
                f"sinkhorn did not converge: target marginal error {error:.3g} > tol {self.tol:g} after "
                f"{iterations} iterations (epsilon {epsilon:.3g}); raise max_iter or epsilon{remedy}",
                ConvergenceWarning,
                stacklevel=4,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_workspace"] = None  # buffers and a lock: not part of the coupler's value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._workspace = _Workspace()

    def __repr__(self) -> str:
        kind = "relative" if self.relative else "absolute"
        return f"SinkhornCoupler(epsilon={self.epsilon} ({kind}), tol={self.tol}, max_iter={self.max_iter})"


#: Clouds whose largest coordinate lies outside ``[2^-_UNIT_RANGE, 2^_UNIT_RANGE]`` are rescaled for the blockwise
#: path: beyond it float32 squares of their differences may under- or overflow.
_UNIT_RANGE = 32


def _unit(x0: Tensor, x1: Tensor) -> int:
    """``k`` such that ``x / 2^k`` has its largest coordinate in ``[0.5, 1)``, where the largest coordinate of
    ``x0, x1`` lies outside ``[2^-_UNIT_RANGE, 2^_UNIT_RANGE]``; else (and for all-zero clouds) 0."""
    largest = max(float(x0.detach().abs().max()), float(x1.detach().abs().max()))
    if largest == 0 or 2.0**-_UNIT_RANGE <= largest <= 2.0**_UNIT_RANGE:
        return 0
    return math.frexp(largest)[1]


def _scaled(x: Tensor, k: int) -> Tensor:
    """``x * 2^k`` in ``x``'s dtype, computed in float64 (exact: the factor need not exist in ``x``'s dtype)."""
    return (x.detach().to(torch.float64) * math.ldexp(1.0, k)).to(x.dtype)


class _Workspace:
    """Two reusable ``(n0, n1)`` float32 buffers (cost and kernel) for the float32 path of a coupler.

    A pool stream couples many problems of one shape; fresh 64 MiB buffers for each would cost a page fault per
    4 KiB, a sizeable part of the solve at 4096 x 4096. The buffers are kept up to
    :data:`_KEPT_ENTRIES` entries each (two of 256 MiB); larger ones are allocated per call. A call that finds the
    buffers leased (another thread is pairing with the same coupler) gets fresh ones instead of waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: tuple[Tensor, Tensor] | None = None

    def holds(self, n0: int, n1: int, device: torch.device) -> bool:
        """Whether buffers for an ``(n0, n1)`` problem on ``device`` are kept (a lease would allocate none)."""
        held = self._buffers
        return held is not None and held[0].shape == (n0, n1) and held[0].device == torch.device(device)

    @contextmanager
    def lease(self, n0: int, n1: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        if n0 * n1 > _KEPT_ENTRIES or not self._lock.acquire(blocking=False):
            yield _fresh(n0, n1, device), _fresh(n0, n1, device)
            return
        try:
            held = self._buffers
            if held is None or held[0].shape != (n0, n1) or held[0].device != torch.device(device):
                self._buffers = held = None  # free the old pair before allocating the new one
                self._buffers = held = (_fresh(n0, n1, device), _fresh(n0, n1, device))
            yield held
        finally:
            self._lock.release()


_KEPT_ENTRIES = 2**26  # 8192 x 8192


def _fresh(n0: int, n1: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor: one made under inference mode could not be reused outside
        return torch.empty((n0, n1), dtype=torch.float32, device=device)
