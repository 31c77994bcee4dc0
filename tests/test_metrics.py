"""Coupling metrics on cases with known answers: swap fraction, crossings, straightness, variances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import otcfm
from otcfm.couplers import ExactCoupler, IndependentCoupler
from otcfm.metrics import (
    crossing_rate,
    flow_statistics,
    gaussian_target_variance,
    gradient_variance,
    path_energy,
    straightness,
    swap_fraction,
    target_variance,
)


def _pairs(coupler: otcfm.couplers.Coupler, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0, x1 = otcfm.data.sample("8gaussians", n, g).double(), otcfm.data.sample("moons", n, g).double()
    i, j = coupler(x0, x1, generator=g)
    return x0[i], x1[j]


def test_swap_fraction_is_zero_for_exact_and_about_half_for_independent() -> None:
    assert swap_fraction(*_pairs(ExactCoupler(), 256)) == 0.0
    assert swap_fraction(*_pairs(IndependentCoupler(), 512)) == pytest.approx(0.5, abs=0.03)


def test_swap_fraction_in_high_dimension() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(128, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(128, 3, 4, 4, generator=g)
    i, j = ExactCoupler()(x0, x1.double())
    assert swap_fraction(x0[i], x1.double()[j]) == 0.0


def test_crossing_rate_known_cases() -> None:
    cross = (torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # an X
    parallel = (torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert crossing_rate(*cross) == 1.0 and crossing_rate(*parallel) == 0.0
    exact, independent = crossing_rate(*_pairs(ExactCoupler(), 300)), crossing_rate(*_pairs(IndependentCoupler(), 300))
    assert independent > 0.1 and exact < 0.1 * independent  # squared-cost OT segments may cross, but rarely
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        crossing_rate(torch.zeros(3, 3), torch.zeros(3, 3))


def test_crossing_rate_counts_each_pair_once() -> None:
    """Three segments through one point (not at end points): 3 crossing pairs of 3."""
    x0 = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]])
    x1 = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0]])
    assert crossing_rate(x0, x1) == 1.0


def test_straightness_and_path_energy_of_known_fields() -> None:
    """Constant velocity c: straight (S = 0), PE = |c|^2. Rotation: curved, S > 0."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([3.0, -4.0], dtype=torch.float64)
    constant = lambda x, t: c.expand_as(x)  # noqa: E731
    assert straightness(constant, x0, 20) == pytest.approx(0.0, abs=1e-20)
    assert path_energy(constant, x0, 20) == pytest.approx(25.0, rel=1e-12)
    stats = flow_statistics(constant, x0, 20, reference=x0 + c)
    assert stats.npe == pytest.approx(0.0, abs=1e-9)  # W2^2(x0, x0 + c) = |c|^2 = PE
    rotation = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], dim=1)  # noqa: E731
    assert straightness(rotation, x0, 50) > 0.1


def test_gradient_variance_of_a_constant_model_matches_theory() -> None:
    """v = theta (constant): the gradient is (2/d)(theta - mean_B(x1 - x0)), so trVar = 4 (1 + s^2) / (d B)
    for x0 ~ N(0, I), x1 ~ N(m, s^2 I) independent (times (n-1)/n for the sample mean). Tolerance 15%."""
    d, b, s = 2, 16, 2.0

    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(d))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.theta.expand_as(x)

    def target(n: int, g: torch.Generator) -> torch.Tensor:
        return 1.0 + s * torch.randn(n, d, generator=g)

    fm = otcfm.FlowMatcher(coupler="independent")
    result = gradient_variance(fm, Constant(), "gaussian", target, b, 400, torch.Generator().manual_seed(0))
    expected = 4 * (1 + s**2) / (d * b) * (399 / 400)
    assert result.trace == pytest.approx(expected, rel=0.15)
    assert result.noise_scale == pytest.approx(result.trace / result.mean_sq_norm)


def test_gradient_variance_leaves_the_model_alone() -> None:
    model = otcfm.models.MLP(2, hidden=8, depth=1)
    before = [p.detach().clone() for p in model.parameters()]
    gradient_variance(otcfm.FlowMatcher(coupler="exact"), model, "gaussian", "moons", 8, 3)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="n_batches"):
        gradient_variance(otcfm.FlowMatcher(), model, "gaussian", "moons", 8, 1)


@pytest.mark.slow
def test_target_variance_estimator_against_the_closed_form() -> None:
    """Independent coupling, N(0, I) source, 64 target points: the estimator is an upper bound within 10%."""
    g = torch.Generator().manual_seed(0)
    points = otcfm.data.sample("8gaussians", 64, g)

    def target(n: int, gen: torch.Generator) -> torch.Tensor:
        return points[torch.randint(64, (n,), generator=gen)]

    times = (0.2, 0.5, 0.8)
    exact = gaussian_target_variance(points, times, n_eval=20000, generator=g)
    fm = otcfm.FlowMatcher(coupler="independent")
    estimate = target_variance(fm, "gaussian", target, 256, times, n_pool=8192, n_eval=4096, generator=g)
    assert exact.total <= estimate.total * 1.02  # upper bound, up to Monte Carlo error
    assert estimate.total == pytest.approx(exact.total, rel=0.10)


def test_exact_coupling_lowers_target_variance() -> None:
    g = torch.Generator().manual_seed(0)
    common = {"batch_size": 128, "times": (0.5,), "n_pool": 1024, "n_eval": 256, "generator": g}
    independent = target_variance(otcfm.FlowMatcher(coupler="independent"), "8gaussians", "moons", **common)
    exact = target_variance(otcfm.FlowMatcher(coupler="exact"), "8gaussians", "moons", **common)
    assert exact.total < 0.2 * independent.total
    with pytest.raises(ValueError, match="linear"):
        target_variance(otcfm.FlowMatcher(path="cosine"), "gaussian", "moons", 8, n_pool=8, n_eval=8)


@pytest.mark.parametrize("scale", [1e-300, 1e-100, 1e160, 1e300])
def test_sign_metrics_do_not_depend_on_the_scale(scale: float) -> None:
    """Both are sign tests of products: they were 0.0 from 1e160 (overflow) and below 1e-100 (underflow)."""
    from otcfm.metrics import crossing_rate, swap_fraction

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 2, generator=g, dtype=torch.float64), torch.randn(100, 2, generator=g, dtype=torch.float64)
    assert swap_fraction(a * scale, b * scale) == swap_fraction(a, b) > 0.3
    assert crossing_rate(a * scale, b * scale) == crossing_rate(a, b) > 0.1


def test_variance_metrics_check_their_inputs() -> None:
    """NaN pools gave NaN, t = 2 and sigma = -1 were used, empty times divided by zero."""
    from otcfm.metrics import gaussian_target_variance, target_variance_of_pairs

    g = torch.Generator().manual_seed(0)
    pairs = (torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g))
    nan = (pairs[0] * float("nan"), pairs[1])
    with pytest.raises(ValueError, match="pool x0: contains NaN"):
        target_variance_of_pairs(nan, pairs)
    with pytest.raises(ValueError, match=r"times: expected a non-empty sequence of numbers in \[0, 1\]"):
        target_variance_of_pairs(pairs, pairs, times=[2.0])
    with pytest.raises(ValueError, match="times"):
        target_variance_of_pairs(pairs, pairs, times=[])
    with pytest.raises(ValueError, match="sigma: expected a finite number >= 0"):
        target_variance_of_pairs(pairs, pairs, sigma=-1.0)
    with pytest.raises(ValueError, match="bandwidths: expected a non-empty list"):
        target_variance_of_pairs(pairs, pairs, bandwidths=[-0.5])
    with pytest.raises(ValueError, match="points: contains NaN"):
        gaussian_target_variance(nan[0])
    with pytest.raises(ValueError, match=r"times: .* in \[0, 1\)"):
        gaussian_target_variance(pairs[1], times=[1.0])
    with pytest.raises(ValueError, match="n_eval: expected a positive integer"):
        gaussian_target_variance(pairs[1], n_eval=0)
    assert target_variance_of_pairs(pairs, pairs, times=[0.5]).total >= 0
    mixed = (pairs[0].double(), pairs[1])  # both are taken in float64: mixed dtypes stay accepted
    for widths in (np.array([0.1, 0.3]), torch.tensor([0.1, 0.3]), [np.float32(0.1)]):
        assert target_variance_of_pairs(mixed, pairs, times=[0.5], bandwidths=widths).total >= 0


def test_npe_against_the_source_itself_and_a_tensor_w2_squared() -> None:
    """W2 = 0 raised ZeroDivisionError; w2_squared as a 0-d tensor (metrics.w2(...) ** 2 is a float, a user's
    own computation often a tensor) was refused."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    still = otcfm.metrics.flow_statistics(lambda x, t: torch.zeros_like(x), x0, steps=2, reference=x0)
    moving = otcfm.metrics.flow_statistics(lambda x, t: torch.ones_like(x), x0, steps=2, reference=x0)
    assert still.npe == 0.0 and moving.npe == float("inf")
    ratio = otcfm.metrics.transport_cost_ratio(x0, x0 + 1.0, torch.tensor(2.0, dtype=torch.float64))
    assert ratio == pytest.approx(1.0, rel=1e-6)  # mean squared pair distance 2 (float32 x0 + 1) over W2^2 2
