"""Blockwise (large-n) Sinkhorn: equal to the dense solver, any block size, warm starts, row-by-row draws."""

from __future__ import annotations

import pytest
import torch

from otcfm.couplers import sinkhorn_plan
from otcfm.couplers.blockwise import blockwise_sinkhorn, draw_partners
from otcfm.metrics import renormalised_entropy


def _clouds(n0: int, n1: int, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n0, d, generator=g, dtype=torch.float64), torch.randn(
        n1, d, generator=g, dtype=torch.float64
    ) + 1


def _plan(x0: torch.Tensor, x1: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.exp((f[:, None] + g[None, :] - torch.cdist(x0, x1) ** 2) / eps)


@pytest.mark.parametrize("budget", [2000, 2**28])  # two rows per block, and one block
@pytest.mark.parametrize("n0, n1, epsilon", [(40, 40, 0.05), (30, 50, 0.1), (40, 40, 0.02)])
def test_blockwise_equals_dense(budget: int, n0: int, n1: int, epsilon: float) -> None:
    """Same plan as the dense sinkhorn_plan at the same absolute epsilon: max deviation <= 1e-6 x max entry."""
    x0, x1 = _clouds(n0, n1)
    eps = epsilon * float((torch.cdist(x0, x1) ** 2).mean())
    result = blockwise_sinkhorn(x0, x1, eps, relative=False, tol=1e-10, max_iter=20000, memory_budget=budget)
    dense = sinkhorn_plan(torch.cdist(x0, x1) ** 2, eps, relative=False, tol=1e-10, max_iter=20000)
    assert result.converged and dense.converged
    plan = _plan(x0, x1, result.f, result.g, result.epsilon)
    assert (plan - dense.plan).abs().max() <= 1e-6 * dense.plan.max()
    assert torch.allclose(plan.sum(1), torch.full((n0,), 1.0 / n0, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("budget", [2000, 2**28])
def test_entropy_of_the_implicit_plan_equals_the_dense_metric(budget: int) -> None:
    """renormalised_entropy computed blockwise from the potentials equals the metric on the dense plan (1e-9)."""
    x0, x1 = _clouds(40, 30, seed=3)
    result = blockwise_sinkhorn(x0, x1, 0.05, tol=1e-10, max_iter=20000)
    dense = renormalised_entropy(_plan(x0, x1, result.f, result.g, result.epsilon))
    assert abs(result.renormalised_entropy(x0, x1, budget) - dense) <= 1e-9
    with pytest.raises(ValueError, match="x0, x1"):
        result.renormalised_entropy(x1, x0)


def test_warm_start_needs_fewer_iterations() -> None:
    x0, x1 = _clouds(200, 200, seed=1)
    cold = blockwise_sinkhorn(x0, x1, 0.05, tol=1e-8, max_iter=5000, anneal=False)
    warm = blockwise_sinkhorn(x0, x1, 0.05, tol=1e-8, max_iter=5000, potentials=(cold.f, cold.g))
    assert warm.converged and warm.iterations < cold.iterations / 5


def test_draws_follow_the_rows_of_the_plan() -> None:
    x0, x1 = _clouds(4, 6, seed=2)
    result = blockwise_sinkhorn(x0, x1, 0.5, tol=1e-10, max_iter=5000)
    plan = _plan(x0, x1, result.f, result.g, result.epsilon)
    rows = plan / plan.sum(1, keepdim=True)
    draws = torch.stack(
        [draw_partners(x0, x1, result.g, result.epsilon, torch.Generator().manual_seed(s), 64) for s in range(2000)]
    )
    for k in range(4):
        freq = torch.bincount(draws[:, k], minlength=6).double() / 2000
        assert (freq - rows[k]).abs().max() < 0.04  # 2000 draws: standard error <= 0.012


def test_bad_inputs() -> None:
    x0, x1 = _clouds(5, 5)
    with pytest.raises(ValueError, match="epsilon"):
        blockwise_sinkhorn(x0, x1, 0.0)
    with pytest.raises(ValueError, match="potentials"):
        blockwise_sinkhorn(x0, x1, 0.1, potentials=(torch.zeros(4), torch.zeros(5)))
    with pytest.raises(ValueError, match="x0: contains NaN"):
        blockwise_sinkhorn(x0 * float("nan"), x1, 0.1)


def test_sinkhorn_coupler_goes_blockwise_above_its_budget() -> None:
    from otcfm.couplers import SinkhornCoupler

    x0, x1 = _clouds(64, 64, seed=3)
    small = SinkhornCoupler(epsilon=0.1, memory_budget=1000)  # 64 x 64 x 8 bytes > 1000: blockwise
    i, j = small(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(64)) and j.shape == (64,)
    dense_cost = float(((x0 - x1[SinkhornCoupler(epsilon=0.1)(x0, x1).j]) ** 2).sum(1).mean())
    independent = float(((x0[:, None] - x1[None]) ** 2).sum(-1).mean())
    assert float(((x0 - x1[j]) ** 2).sum(1).mean()) < 0.8 * independent and dense_cost < 0.8 * independent
