"""Log-likelihood by the change of variables, against affine flows with closed-form densities."""

from __future__ import annotations

import math

import pytest
import torch

import otcfm
from otcfm.likelihood import likelihood, standard_normal_log_prob

A = torch.tensor([[0.3, -0.8], [0.5, -0.2]], dtype=torch.float64)  # not symmetric: off-diagonal terms matter


def linear_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x @ A.T + torch.tensor([1.0, -2.0], dtype=torch.float64)


def closed_form(x1: torch.Tensor) -> torch.Tensor:
    """x1 = M x0 + c, M = expm(A), c = A^-1 (M - I) b; x0 ~ N(0, I)  =>  log p1(x1) = log N(M^-1 (x1 - c)) - tr A."""
    m = torch.linalg.matrix_exp(A)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    c = torch.linalg.solve(A, (m - torch.eye(2, dtype=torch.float64)) @ b)
    x0 = torch.linalg.solve(m, (x1 - c).T).T
    return standard_normal_log_prob(x0) - torch.trace(A)


def test_exact_divergence_matches_the_closed_form() -> None:
    """rk4, 50 steps: per-sample log-density within 1e-8 of the closed form."""
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    result = likelihood(linear_field, x1, steps=50, method="rk4")
    torch.testing.assert_close(result.log_prob, closed_form(x1), rtol=0, atol=1e-8)
    assert result.nfe == 50 * 4


def test_hutchinson_is_unbiased() -> None:
    """Mean over 4000 samples of the Hutchinson error within 0.02 nats (Rademacher and Gaussian probes)."""
    x1 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = closed_form(x1)
    for probe in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(2)
        result = likelihood(linear_field, x1, steps=20, divergence="hutchinson", probe=probe, generator=g)
        assert float((result.log_prob - exact).mean()) == pytest.approx(0.0, abs=0.02)
        assert float((result.log_prob - exact).abs().max()) > 1e-3  # it is an estimate, not the exact value


def test_identity_flow_gives_the_source_density() -> None:
    x = torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(3))
    result = likelihood(lambda y, t: torch.zeros_like(y), x, steps=2)
    torch.testing.assert_close(result.log_prob, standard_normal_log_prob(x))
    assert float(standard_normal_log_prob(torch.zeros(1, 2))[0]) == pytest.approx(-math.log(2 * math.pi))


def test_trained_model_and_errors() -> None:
    model = otcfm.models.MLP(2, hidden=16, depth=1)
    x = otcfm.data.sample("moons", 8)
    assert torch.isfinite(otcfm.likelihood(model, x, steps=3).log_prob).all()
    with pytest.raises(ValueError, match="divergence"):
        likelihood(model, x, divergence="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        likelihood(model, x, method="dopri5")  # type: ignore[arg-type]


def test_a_source_density_of_the_wrong_shape_is_refused() -> None:
    """A density keeping its dimension, (B, 1), broadcast against (B,) into a (B, B) 'log_prob' without a word."""
    x = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"source_log_prob: expected a tensor of shape \(8,\).*got \(8, 1\)"):
        likelihood(linear_field, x, steps=2, source_log_prob=lambda z: -0.5 * (z**2).sum(1, keepdim=True))
    with pytest.raises(TypeError, match="source_log_prob: expected a callable"):
        likelihood(linear_field, x, steps=2, source_log_prob=5)


def test_a_model_for_other_samples_is_named_with_their_shape() -> None:
    """It failed inside the model with a raw IndexError; solve and integrate already said what was wrong."""
    model = otcfm.models.MLP(4, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"model: calling it as model\(x, t\) on samples of shape \(3, 256\) failed"):
        likelihood(model, torch.randn(3, 256), steps=2)
