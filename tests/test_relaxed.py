"""Unbalanced and partial OT couplers: plans against POT's, pairing, registry, errors."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

import otcfm
from otcfm.couplers import ConvergenceWarning, PartialCoupler, UnbalancedCoupler, partial_plan, unbalanced_plan
from otcfm.couplers.relaxed import unbalanced_fixed_point_error


def _cost(n0: int, n1: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n0, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(n1, 2, generator=g, dtype=torch.float64) + 1.0
    return torch.cdist(x0, x1) ** 2


@pytest.mark.parametrize("form", ["scaling", "log"])
@pytest.mark.parametrize("n0, n1", [(20, 20), (15, 25)])
@pytest.mark.parametrize("epsilon, reg_m", [(0.1, 1.0), (0.05, 0.5), (0.5, 10.0)])
def test_unbalanced_plan_equals_pot(
    monkeypatch: pytest.MonkeyPatch, form: str, n0: int, n1: int, epsilon: float, reg_m: float
) -> None:
    """Same fixed point as POT's sinkhorn_knopp_unbalanced (reg_type 'kl'): max deviation <= 1e-10 x max entry,
    in the scaling form (where the kernel is in range) and in the log form."""
    import otcfm.couplers.relaxed as relaxed

    monkeypatch.setattr(relaxed, "_SCALING_RANGE", 1e9 if form == "scaling" else 0.0)
    cost = _cost(n0, n1)
    a, b = np.full(n0, 1 / n0), np.full(n1, 1 / n1)
    expected = ot.unbalanced.sinkhorn_knopp_unbalanced(
        a, b, cost.numpy(), epsilon, reg_m, numItermax=10**5, stopThr=1e-12
    )
    got = unbalanced_plan(cost, epsilon, reg_m, tol=1e-12, max_iter=10**5)
    assert got.converged
    assert np.abs(got.plan.numpy() - expected).max() <= 1e-10 * expected.max()


@pytest.mark.parametrize("n0, n1", [(20, 20), (15, 25)])
@pytest.mark.parametrize("epsilon, mass", [(0.1, 0.5), (0.3, 0.8)])
def test_partial_plan_equals_pot(n0: int, n1: int, epsilon: float, mass: float) -> None:
    """Same iterates as POT's entropic_partial_wasserstein: max deviation <= 1e-9 x max entry, total mass exact."""
    cost = _cost(n0, n1, seed=1)
    a, b = np.full(n0, 1 / n0), np.full(n1, 1 / n1)
    expected = ot.partial.entropic_partial_wasserstein(a, b, cost.numpy(), epsilon, mass, numItermax=500)
    got = partial_plan(cost, epsilon, mass, tol=1e-300, max_iter=500)
    assert np.abs(got.plan.numpy() - expected).max() <= 1e-9 * expected.max()
    assert float(got.plan.sum()) == pytest.approx(mass, rel=1e-12)
    assert bool((got.plan.sum(1) <= torch.as_tensor(a) * (1 + 1e-3)).all())  # mid-iteration: rows near their cap


def test_relaxed_couplers_pair_and_drop_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    x0[0] = 40.0  # an outlier: partial OT leaves it out
    plan = PartialCoupler(mass=0.9).plan(x0, x1).plan
    assert float(plan[0].sum()) < 1e-6 * float(plan[1:].sum(1).mean())
    for name in ("unbalanced", "partial"):
        coupler = otcfm.get_coupler(name)
        i, j = coupler(x0, x1, generator=torch.Generator().manual_seed(1))
        assert i.shape == j.shape == (64,) and not coupler.sources_in_order
        again = coupler(x0, x1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(i, again.i) and torch.equal(j, again.j)
    loss = otcfm.FlowMatcher(coupler="unbalanced").loss(otcfm.models.MLP(2, hidden=8, depth=1), x0, x1, g)
    assert torch.isfinite(loss)


def test_relaxed_errors() -> None:
    with pytest.raises(ValueError, match="mass: expected a number in"):
        PartialCoupler(mass=1.5)
    with pytest.raises(ValueError, match="reg_m"):
        UnbalancedCoupler(reg_m=0)
    with pytest.raises(ValueError, match="epsilon"):
        UnbalancedCoupler(epsilon=-1)
    with pytest.raises(ValueError, match="cost: contains NaN"):
        unbalanced_plan(torch.full((2, 2), float("nan")), 0.1, 1.0)
    with pytest.raises(ValueError, match="mass"):
        partial_plan(_cost(3, 3), 0.1, 2.0)


def test_renormalised_entropy() -> None:
    n = 16
    assert otcfm.metrics.renormalised_entropy(torch.eye(n) / n) == pytest.approx(0.0, abs=1e-12)
    assert otcfm.metrics.renormalised_entropy(torch.full((n, n), 1.0 / n**2)) == pytest.approx(1.0)
    sharp = otcfm.couplers.sinkhorn_plan(_cost(n, n), 0.01).plan
    soft = otcfm.couplers.sinkhorn_plan(_cost(n, n), 1.0).plan
    assert 0 <= otcfm.metrics.renormalised_entropy(sharp) < otcfm.metrics.renormalised_entropy(soft) <= 1
    with pytest.raises(ValueError, match="plan"):
        otcfm.metrics.renormalised_entropy(-torch.eye(3))


def test_partial_log_form_equals_scaling_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log-domain Dykstra (used where the kernel could underflow) gives the scaling form's plan (1e-12)."""
    import otcfm.couplers.relaxed as relaxed

    cost = _cost(20, 30, seed=2)
    scaling = partial_plan(cost, 0.2, 0.7, tol=1e-300, max_iter=300)
    monkeypatch.setattr(relaxed, "_SCALING_RANGE", 0.0)
    logs = partial_plan(cost, 0.2, 0.7, tol=1e-300, max_iter=300)
    assert (scaling.plan - logs.plan).abs().max() <= 1e-12 * scaling.plan.max()
    tiny = partial_plan(cost, 1e-3, 0.7, max_iter=50)  # cost / epsilon spans thousands: only the log form is finite
    assert bool(torch.isfinite(tiny.plan).all()) and float(tiny.plan.sum()) == pytest.approx(0.7)


#: Relative epsilons (fractions of the mean cost) of the tiny-epsilon tests.
TINY = (1e-3, 1e-4, 1e-6)


def _pot_partial(cost: torch.Tensor, epsilon: float, mass: float) -> np.ndarray | None:
    """POT's float64 entropic partial plan, or None where its kernel exp(-C / epsilon) underflows (POT fails)."""
    if float(cost.max()) / epsilon > 700:
        return None
    n0, n1 = cost.shape
    a, b = np.full(n0, 1 / n0), np.full(n1, 1 / n1)
    return ot.partial.entropic_partial_wasserstein(a, b, cost.numpy(), epsilon, mass, numItermax=1000)


def test_partial_plan_at_tiny_epsilon_meets_its_constraints_or_says_it_does_not() -> None:
    """At 1e-3 ... 1e-6 of the mean cost, a converged partial plan has rows <= a and columns <= b to sqrt(tol)
    (relative) and mass m to 1e-12, and is POT's plan to 1e-6 of its largest entry where POT's kernel is finite;
    otherwise converged=False (the old log-domain path stood still with rows at 28.8x their bound and said True)."""
    cost = _cost(32, 32)
    mean, n, tol = float(cost.mean()), 32, 1e-9
    for relative in TINY:
        result = partial_plan(cost, relative * mean, 0.9, tol=tol)
        if not result.converged:
            assert result.error > tol or float((result.plan.sum(1) * n).max()) > 1 + tol**0.5
            continue
        assert float((result.plan.sum(1) * n).max()) <= 1 + tol**0.5
        assert float((result.plan.sum(0) * n).max()) <= 1 + tol**0.5
        assert float(result.plan.sum()) == pytest.approx(0.9, rel=1e-12)
        expected = _pot_partial(cost, relative * mean, 0.9)
        if expected is not None:
            assert np.abs(result.plan.numpy() - expected).max() <= 1e-6 * expected.max()


def test_partial_coupler_at_tiny_epsilon_warns() -> None:
    """PartialCoupler(epsilon=1e-4) (relative) cannot meet its bounds in max_iter: a ConvergenceWarning, and the
    plan says converged=False."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g) + 1
    coupler = PartialCoupler(epsilon=1e-4)
    assert not coupler.plan(x0, x1).converged
    with pytest.warns(ConvergenceWarning, match="partial OT did not converge"):
        coupler(x0, x1, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["scaling", "log"])
def test_unbalanced_plan_meets_its_fixed_point_conditions(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """A converged unbalanced plan satisfies P 1 = a exp(-f / rho), P^T 1 = b exp(-g / rho) to 2 tol + 1e-10
    (relative), in both forms; at 1e-3 ... 1e-6 of the mean cost it converges or says it did not; an epsilon
    float64 cannot resolve (1e-30, where the old solver stood still and said converged) is refused."""
    import otcfm.couplers.relaxed as relaxed

    monkeypatch.setattr(relaxed, "_SCALING_RANGE", 1e9 if form == "scaling" else 0.0)
    cost = _cost(20, 30, seed=3)
    mean, tol = float(cost.mean()), 1e-9
    a, b = torch.full((20,), 1 / 20, dtype=torch.float64), torch.full((30,), 1 / 30, dtype=torch.float64)
    result = unbalanced_plan(cost, 0.1 * mean, mean, tol=tol, max_iter=10**4)
    assert result.converged
    assert unbalanced_fixed_point_error(result.plan, result.f, result.g, mean, a, b) <= 2 * tol + 1e-10
    for relative in TINY:
        if form == "scaling" and float(cost.max()) / (relative * mean) > 600:
            continue  # the scaling form runs only where its kernel is in range
        tiny = unbalanced_plan(cost, relative * mean, mean, tol=tol)
        error = unbalanced_fixed_point_error(tiny.plan, tiny.f, tiny.g, mean, a, b)
        assert (not tiny.converged and tiny.error > tol) or error <= 2 * tol + 1e-10
    with pytest.raises(ValueError, match="epsilon: .* below 1e-07 of the mean cost"):
        unbalanced_plan(cost, 1e-30, 1.0)


def test_unbalanced_fixed_point_error_sees_a_wrong_plan() -> None:
    """Scaling a converged plan by 1.01 is a fixed-point error of log(1.01); the plan itself about 1e-9."""
    cost = _cost(10, 10)
    a = torch.full((10,), 0.1, dtype=torch.float64)
    result = unbalanced_plan(cost, 0.5, 1.0, tol=1e-10, max_iter=10**4)
    assert unbalanced_fixed_point_error(result.plan, result.f, result.g, 1.0, a, a) <= 1e-9
    wrong = unbalanced_fixed_point_error(result.plan * 1.01, result.f, result.g, 1.0, a, a)
    assert wrong == pytest.approx(np.log(1.01), rel=1e-3)


def test_relaxed_plans_estimate_their_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 64 MiB available, a 2048 x 2048 relaxed solve (32 and 80 bytes per entry) raises MemoryError naming
    the solve before it allocates; the plan functions likewise."""
    import otcfm._memory

    monkeypatch.setattr(otcfm._memory, "available_bytes", lambda: 2**26)
    x = torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MemoryError, match="unbalanced OT of a 2048x2048 batch"):
        UnbalancedCoupler()(x, x + 1)
    with pytest.raises(MemoryError, match="partial OT of a 2048x2048 batch"):
        PartialCoupler().plan(x, x + 1)
    with pytest.raises(MemoryError, match="partial OT"):
        partial_plan(_cost(2048, 2048), 0.1, 0.5)


def test_relaxed_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/relaxed.py times partial against exact and POT, and reports the plans' difference."""
    from benchmark_module import load_benchmark

    assert load_benchmark("relaxed").main(["--quick"]) == 0
    table = capsys.readouterr().out
    assert "| 2 | 32 |" in table and "| 64 | 32 |" in table
    difference = float(table.splitlines()[2].split("|")[-2])
    assert difference < 1e-4  # the same problem, solved to the tolerance of each
