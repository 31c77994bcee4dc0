"""Unbalanced and partial OT couplers: plans against POT's, pairing, registry, errors."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

import otcfm
from otcfm.couplers import PartialCoupler, UnbalancedCoupler, partial_plan, unbalanced_plan


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
