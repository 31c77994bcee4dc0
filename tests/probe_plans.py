"""Plans and potentials checked against their own constraints: relaxed (unbalanced, partial) plans at tiny
epsilon, blockwise and dense Sinkhorn at extreme scales, labels on every Sinkhorn path, memory estimates.

A plan is right when it meets its constraints, or honestly flagged when it says it does not (``converged=False``,
or a :class:`~otcfm.couplers.ConvergenceWarning` from a coupler):

- partial OT: ``P 1 <= a``, ``P^T 1 <= b`` (to :data:`BOUND`) and ``1^T P 1 = m`` (to :data:`MASS`);
- unbalanced OT: the first-order conditions of its KL-penalised marginals, ``P 1 = a exp(-f / rho)`` and
  ``P^T 1 = b exp(-g / rho)`` with ``f, g`` the plan's own potentials (to :data:`FIXED_POINT`, relative);
- balanced Sinkhorn: ``P 1 = a``, ``P^T 1 = b`` (to :data:`MARGINAL`, L2);
- a pairing: the same pairs as the dense float64 path on the clouds at scale 1 (:data:`AGREEMENT` of them).

Labels given to any Sinkhorn path are honoured (pairs within labels) or refused alike (``y0`` without ``y1``);
a dense solve that cannot fit raises ``MemoryError`` before it allocates (the available memory is set to 1 GiB
for the call, so the case costs nothing whatever the machine has).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from probe import Case

import otcfm._memory
import otcfm.couplers.sinkhorn as sinkhorn
from otcfm.couplers import (
    ConvergenceWarning,
    PartialCoupler,
    SinkhornCoupler,
    SinkhornResult,
    UnbalancedCoupler,
    partial_plan,
    sinkhorn_plan,
    unbalanced_plan,
)
from otcfm.couplers.blockwise import BlockwiseSinkhorn, blockwise_sinkhorn

#: Largest excess of a partial plan's row or column sum over its bound, relative to the bound.
BOUND = 1e-4
#: Largest error of a partial plan's total mass, relative to the mass.
MASS = 1e-6
#: Largest relative error of an unbalanced plan's first-order conditions.
FIXED_POINT = 1e-4
#: Largest L2 error of a balanced plan's marginals.
MARGINAL = 1e-4
#: Share of the pairs that must equal the dense path's at scale 1.
AGREEMENT = 0.9
#: Relative epsilons of the relaxed cases (fractions of the mean cost).
TINY = (1e-3, 1e-4, 1e-6)


@dataclass(frozen=True)
class Outcome:
    """What a coupler call returned and whether it warned that it did not converge."""

    value: Any
    warned: bool


def _points(n: int = 32, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) * scale + (seed % 2)).to(dtype)


def _pair_of(n: int = 32, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x0, x1 = _points(n, 0), _points(n, 1)
    return (x0 * scale).to(dtype), (x1 * scale).to(dtype)


def _cost(n: int = 32, scale: float = 1.0) -> torch.Tensor:
    x0, x1 = _pair_of(n, scale)
    return (x0[:, None] - x1[None]).square().sum(-1)


def _warned(call: Callable[[], Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call()
    return Outcome(value, any(issubclass(w.category, ConvergenceWarning) for w in caught))


def _partial_ok(result: SinkhornResult, mass: float) -> bool:
    if not result.converged:
        return True
    plan = result.plan.double()
    n0, n1 = plan.shape
    if not bool(torch.isfinite(plan).all()):
        return False
    rows, cols = float((plan.sum(1) * n0).max()), float((plan.sum(0) * n1).max())
    return rows <= 1 + BOUND and cols <= 1 + BOUND and abs(float(plan.sum()) - mass) <= MASS * mass


def _unbalanced_ok(result: SinkhornResult, rho: float) -> bool:
    if not result.converged:
        return True
    plan, f, g = result.plan.double(), result.f.double(), result.g.double()
    n0, n1 = plan.shape
    if not all(bool(torch.isfinite(t).all()) for t in (plan, f, g)):
        return False
    rows = plan.sum(1) / (torch.exp(-f / rho) / n0)
    cols = plan.sum(0) / (torch.exp(-g / rho) / n1)
    return float(torch.maximum((rows - 1).abs().max(), (cols - 1).abs().max())) <= FIXED_POINT


def _balanced_ok(result: SinkhornResult) -> bool:
    if not result.converged:
        return True
    plan = result.plan.double()
    n0, n1 = plan.shape
    if not bool(torch.isfinite(plan).all()):
        return False
    rows = float(torch.linalg.vector_norm(plan.sum(1) - 1.0 / n0))
    cols = float(torch.linalg.vector_norm(plan.sum(0) - 1.0 / n1))
    return rows <= MARGINAL and cols <= MARGINAL


def _blockwise_ok(result: BlockwiseSinkhorn, x0: torch.Tensor, x1: torch.Tensor, relative: float) -> bool:
    """The implicit plan ``exp((f + g - C) / eps)`` on the true float64 cost meets its marginals at ``relative``
    times the mean cost, or is flagged."""
    if not result.converged:
        return True
    a, b = x0.double(), x1.double()
    cost = (a[:, None] - b[None]).square().sum(-1)
    if abs(result.epsilon - relative * float(cost.mean())) > 1e-3 * relative * float(cost.mean()):
        return False
    plan = torch.exp((result.f.double()[:, None] + result.g.double()[None, :] - cost) / result.epsilon)
    return _balanced_ok(SinkhornResult(plan, result.f, result.g, result.epsilon, result.iterations, 0.0, True))


def _agrees(outcome: Outcome, reference: torch.Tensor) -> bool:
    return outcome.warned or float((outcome.value.j.cpu() == reference).double().mean()) >= AGREEMENT


def _dense_reference(epsilon: float, n: int = 64) -> torch.Tensor:
    x0, x1 = _pair_of(n)
    return SinkhornCoupler(epsilon=epsilon)(x0, x1, generator=torch.Generator().manual_seed(1)).j


def _labels_within(outcome: Outcome, y0: torch.Tensor, y1: torch.Tensor) -> bool:
    i, j = outcome.value
    return outcome.warned or bool((y0[i] == y1[j]).all())


def _small_float32_threshold() -> Any:
    """Take the float32 dense path from 64 x 64 entries on (as tests/test_sinkhorn_float32.py does)."""
    return mock.patch.object(sinkhorn, "FLOAT32_MIN_ENTRIES", 64 * 64)


def _with_memory(call: Callable[[], Any], gib: float = 1.0) -> Callable[[], Any]:
    def limited() -> Any:
        with mock.patch.object(otcfm._memory, "available_bytes", lambda: int(gib * 2**30)):
            return call()

    return limited


def _relaxed_cases() -> list[Case]:
    cases = []
    cost = _cost()
    mean = float(cost.mean())
    for relative in TINY:
        eps = relative * mean
        cases.append(
            Case(
                "plan-relaxed",
                "partial_plan",
                lambda e=eps: partial_plan(cost, e, 0.9),
                ("epsilon",),
                detail=f"eps={relative:g}",
                expect=lambda r: _partial_ok(r, 0.9),
            )
        )
        cases.append(
            Case(
                "plan-relaxed",
                "unbalanced_plan",
                lambda e=eps: unbalanced_plan(cost, e, mean),
                ("epsilon",),
                detail=f"eps={relative:g}",
                expect=lambda r: _unbalanced_ok(r, mean),
            )
        )
    cases += [
        Case(
            "plan-relaxed",
            "partial_plan",
            lambda: partial_plan(cost, 1e-3, 0.9),
            ("epsilon",),
            detail="absolute 1e-3",
            expect=lambda r: _partial_ok(r, 0.9),
        ),
        Case(
            "plan-relaxed",
            "unbalanced_plan",
            lambda: unbalanced_plan(cost, 1e-30, 1.0),
            ("epsilon",),
            detail="absolute 1e-30",
            expect=lambda r: _unbalanced_ok(r, 1.0),
        ),
        Case(
            "plan-relaxed",
            "partial_plan",
            lambda: partial_plan(cost * 1e-30, 1e-33 * mean, 0.5),
            ("epsilon",),
            detail="cost 1e-30",
            expect=lambda r: _partial_ok(r, 0.5),
        ),
        Case(
            "plan-relaxed",
            "unbalanced_plan",
            lambda: unbalanced_plan(cost * 1e30, 1e27 * mean, 1e30 * mean),
            ("epsilon",),
            detail="cost 1e30",
            expect=lambda r: _unbalanced_ok(r, 1e30 * mean),
        ),
    ]
    for scale in (1e-30, 1.0, 1e30):
        x0, x1 = _pair_of(32, scale, torch.float32)
        cases.append(
            Case(
                "plan-relaxed",
                "PartialCoupler.plan",
                lambda a=x0, b=x1: PartialCoupler(epsilon=1e-4).plan(a, b),
                ("epsilon",),
                detail=f"scale={scale:g}",
                expect=lambda r: _partial_ok(r, 0.9),
            )
        )
        cases.append(
            Case(
                "plan-relaxed",
                "UnbalancedCoupler.plan",
                lambda a=x0, b=x1: UnbalancedCoupler(epsilon=1e-4).plan(a, b),
                ("epsilon",),
                detail=f"scale={scale:g}",
                expect=lambda r: _unbalanced_ok(r, 1.0 * r.epsilon / 1e-4),
            )
        )
    x0, x1 = _pair_of(32)
    cases.append(
        Case(
            "plan-relaxed",
            "PartialCoupler",
            lambda: _warned(lambda: PartialCoupler(epsilon=1e-4)(x0, x1, generator=torch.Generator().manual_seed(0))),
            ("epsilon",),
            detail="pairs",
            expect=lambda o: o.warned or _partial_ok(PartialCoupler(epsilon=1e-4).plan(x0, x1), 0.9),
        )
    )
    return cases


def _sinkhorn_cases() -> list[Case]:
    cost = _cost()
    cases = [
        Case(
            "plan-sinkhorn",
            "sinkhorn_plan",
            lambda e=eps, s=scale: sinkhorn_plan(cost * s, e),
            ("epsilon",),
            detail=f"eps={eps:g},scale={scale:g}",
            expect=_balanced_ok,
        )
        for eps in (1e-3, 1e-6)
        for scale in (1e-30, 1e30)
    ]
    for scale, dtype in ((1e-30, torch.float32), (1e30, torch.float32), (1e-200, torch.float64)):
        x0, x1 = _pair_of(64, scale, dtype)
        cases.append(
            Case(
                "plan-blockwise",
                "SinkhornCoupler(memory_budget)",
                lambda a=x0, b=x1: _warned(
                    lambda: SinkhornCoupler(epsilon=1e-2, memory_budget=4096)(
                        a, b, generator=torch.Generator().manual_seed(1)
                    )
                ),
                ("x0", "x1"),
                detail=f"scale={scale:g},{dtype}",
                expect=lambda o: _agrees(o, _dense_reference(1e-2)),
            )
        )
    for scale, dtype in ((1e-30, torch.float32), (1e-30, torch.float64), (1e30, torch.float32)):
        x0, x1 = _pair_of(64, scale, dtype)
        cases.append(
            Case(
                "plan-blockwise",
                "blockwise_sinkhorn",
                lambda a=x0, b=x1: blockwise_sinkhorn(a, b, 0.05, tol=1e-7, max_iter=5000, memory_budget=4096),
                ("x0", "x1"),
                detail=f"scale={scale:g},{dtype}",
                expect=lambda r, a=x0, b=x1: _blockwise_ok(r, a, b, 0.05),
            )
        )
    return cases


def _label_cases() -> list[Case]:
    x0, x1 = _pair_of(64, 1.0, torch.float32)
    y = torch.arange(64) % 2
    paths: dict[str, Callable[[], SinkhornCoupler]] = {
        "dense": lambda: SinkhornCoupler(),
        "blockwise": lambda: SinkhornCoupler(memory_budget=4096),
        "float32": lambda: SinkhornCoupler(),
    }
    cases = []
    for path, make in paths.items():

        def alone(m: Callable[[], SinkhornCoupler] = make, p: str = path) -> Any:
            with _small_float32_threshold() if p == "float32" else contextlib.nullcontext():
                return m()(x0, x1, y0=y, generator=torch.Generator().manual_seed(0))

        def both(m: Callable[[], SinkhornCoupler] = make, p: str = path) -> Any:
            with _small_float32_threshold() if p == "float32" else contextlib.nullcontext():
                return _warned(lambda: m()(x0, x1, y0=y, y1=y, generator=torch.Generator().manual_seed(0)))

        cases.append(Case("plan-labels", f"SinkhornCoupler[{path}]", alone, ("y0",), detail="y0 alone"))
        cases.append(
            Case(
                "plan-labels",
                f"SinkhornCoupler[{path}]",
                both,
                ("y0", "y1"),
                detail="y0 and y1",
                expect=lambda o: _labels_within(o, y, y),
            )
        )
    return cases


def _memory_cases() -> list[Case]:
    n = 20_000
    x0, x1 = _points(n, 0, dtype=torch.float32), _points(n, 1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    calls: dict[str, Callable[[], Any]] = {
        "SinkhornCoupler": lambda: SinkhornCoupler()(x0, x1, generator=generator),
        "SinkhornCoupler(float64)": lambda: SinkhornCoupler()(x0.double(), x1.double(), generator=generator),
        "SinkhornCoupler.plan": lambda: SinkhornCoupler().plan(x0, x1),
        "UnbalancedCoupler": lambda: UnbalancedCoupler()(x0, x1, generator=generator),
        "PartialCoupler.plan": lambda: PartialCoupler().plan(x0, x1),
    }
    return [
        Case("plan-memory", entry, _with_memory(call), ("sinkhorn", "unbalanced", "partial"), (MemoryError,))
        for entry, call in calls.items()
    ]


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return [*_relaxed_cases(), *_sinkhorn_cases(), *_label_cases(), *_memory_cases()]
