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


@pytest.mark.parametrize(
    "scale, offset, dtype",
    [
        (100.0, 0.0, torch.float16),  # |x|^2 overflows float16: computed in float32
        (1e19, 0.0, torch.float32),  # |x|^2 overflows float32: computed in float64
        (1e-20, 0.0, torch.float32),  # |x|^2 underflows float32
        (1.0, 1e4, torch.float32),  # far from the origin: centred, else the cost loses its digits
        (1.0, 0.0, torch.bfloat16),
    ],
)
def test_clouds_beyond_their_dtype_pair_as_in_float64(scale: float, offset: float, dtype: torch.dtype) -> None:
    """Valid partners (the probe found index n1 for every row at float16 x 100), the float64 solve's epsilon and
    potentials (up to the constant they are defined up to; 1e-3 of the mean cost), and OT-like pairs."""
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(48, 2, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    x1 = (torch.randn(48, 2, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    low = blockwise_sinkhorn(x0, x1, 0.1, tol=1e-6, max_iter=5000, memory_budget=2000)
    high = blockwise_sinkhorn(x0.double(), x1.double(), 0.1, tol=1e-6, max_iter=5000, memory_budget=2000)
    assert low.converged and torch.isfinite(low.g).all()
    assert abs(low.epsilon - high.epsilon) <= 1e-3 * high.epsilon
    shift = (low.g.double() - high.g).mean()
    assert float((low.g.double() - high.g - shift).abs().max()) <= 1e-3 * high.epsilon / 0.1
    rows = [draw_partners(x0, x1, low.g, low.epsilon, torch.Generator().manual_seed(s), 2000) for s in range(3)]
    assert all(int(j.min()) >= 0 and int(j.max()) < 48 for j in rows)
    a, b = x0.double(), x1.double()
    independent = float(((a[:, None] - b[None]) ** 2).sum(-1).mean())
    assert all(float(((a - b[j]) ** 2).sum(1).mean()) < 0.5 * independent for j in rows)


def test_unrepresentable_clouds_and_overflowing_potentials_are_named() -> None:
    x0, x1 = _clouds(16, 16)
    with pytest.raises(ValueError, match="x0, x1: their squared distances .* overflow or underflow float64"):
        blockwise_sinkhorn(x0 * 1e200, x1 * 1e200, 0.1)
    with pytest.raises(ValueError, match="epsilon: .* too small for torch.float32"):
        blockwise_sinkhorn(x0.float(), x1.float(), 1e-44, relative=False, anneal=False, max_iter=3)


def test_inputs_that_require_grad_are_paired() -> None:
    from otcfm.couplers import SinkhornCoupler

    x0, x1 = _clouds(32, 32)
    j = SinkhornCoupler(memory_budget=1000)(x0.requires_grad_(), x1).j  # addmm(out=...) refuses autograd inputs
    assert j.shape == (32,)


@pytest.mark.parametrize(
    "scale, dtype",
    [
        (1e-30, torch.float32),  # float32 squares underflow to 0: the old path read "all points equal"
        (1e30, torch.float32),  # float32 squares overflow
        (1e-200, torch.float64),  # float64 squares underflow
        (1e150, torch.float64),  # float64 squares overflow
    ],
)
def test_coupler_pairs_at_extreme_scales_equal_the_dense_pairs(scale: float, dtype: torch.dtype) -> None:
    """SinkhornCoupler's blockwise path at any finite scale gives the dense path's pairs on the clouds at scale 1
    (same generator; at least 90% equal: the two solves stop at different iterates, measured 100%)."""
    from otcfm.couplers import SinkhornCoupler

    x0, x1 = _clouds(64, 64, d=2, seed=4)
    blockwise = SinkhornCoupler(epsilon=0.05, memory_budget=4096)
    j = blockwise((x0 * scale).to(dtype), (x1 * scale).to(dtype), generator=torch.Generator().manual_seed(1)).j
    dense = SinkhornCoupler(epsilon=0.05)(x0, x1, generator=torch.Generator().manual_seed(1)).j
    assert float((j == dense).double().mean()) >= 0.9


def test_underflowing_float32_squares_are_solved_in_float64() -> None:
    """blockwise_sinkhorn on float32 clouds at 1e-30 (every float32 square is 0) gives the float64 solve's epsilon
    (relative to the true mean cost, not read as an absolute epsilon of a zero cost) and potentials (1e-9)."""
    x0, x1 = _clouds(40, 40, seed=6)
    low = blockwise_sinkhorn((x0 * 1e-30).float(), (x1 * 1e-30).float(), 0.05, tol=1e-9, max_iter=5000)
    high = blockwise_sinkhorn((x0 * 1e-30).float().double(), (x1 * 1e-30).float().double(), 0.05, tol=1e-9)
    assert low.converged and high.converged
    assert low.epsilon == pytest.approx(high.epsilon, rel=1e-12) and high.epsilon > 0
    assert float((low.g - high.g).abs().max()) <= 1e-9 * high.epsilon
