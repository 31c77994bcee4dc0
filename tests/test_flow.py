"""FlowMatcher, time samplers and the MLP."""

from __future__ import annotations

import pytest
import torch

import otcfm
from otcfm.couplers import COUPLERS
from otcfm.models import MLP
from otcfm.paths import PATHS
from otcfm.timesteps import LogitNormal, get_time_sampler


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return otcfm.data.sample("gaussian", n, g), otcfm.data.sample("moons", n, g)


def test_issue_example_runs_and_learns() -> None:
    """The README's loop, shortened: the loss falls and integrate + w2 return finite values."""
    fm = otcfm.FlowMatcher(coupler="exact", path="linear", sigma=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(dim=2, hidden=32, depth=2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(150):
        loss = fm.loss(model, otcfm.data.sample("8gaussians", 128, g), otcfm.data.sample("moons", 128, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:5]) / 5
    x = otcfm.integrate(model, otcfm.data.sample("8gaussians", 300, g), steps=4, method="euler")
    assert x.shape == (300, 2) and 0 < otcfm.metrics.w2(x, otcfm.data.sample("moons", 300, g)) < 10


@pytest.mark.parametrize("coupler", sorted(COUPLERS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_loss_is_a_finite_scalar_with_gradients(ready, coupler: str, path: str) -> None:
    x0, x1 = _data()
    model = MLP(2, hidden=16, depth=1)
    coupler = ready(coupler, x1) if coupler == "semidiscrete" else coupler  # the name: bridge presets apply
    loss = otcfm.FlowMatcher(coupler=coupler, path=path).loss(model, x0, x1, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_same_generator_seed_same_loss() -> None:
    x0, x1 = _data()
    model = MLP(2, hidden=16, depth=1)
    fm = otcfm.FlowMatcher(coupler="independent", path="bridge", sigma=0.5)
    a = fm.loss(model, x0, x1, torch.Generator().manual_seed(5))
    b = fm.loss(model, x0, x1, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_batch_pairs_follow_the_coupling() -> None:
    """x_t and u_t come from the path applied to x0[i], x1[j] at the batch's t."""
    x0, x1 = _data(16)
    fm = otcfm.FlowMatcher(coupler="exact", path="linear")
    batch = fm.batch(x0, x1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.u_t, x1[batch.j] - x0[batch.i])
    t = batch.t[:, None]
    torch.testing.assert_close(batch.x_t, t * x1[batch.j] + (1 - t) * x0[batch.i])


@pytest.mark.parametrize("coupler", sorted(COUPLERS))
def test_image_shaped_batches(ready, coupler: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 1, 4, 4, generator=g), torch.rand(8, 1, 4, 4, generator=g)
    model = MLP(dim=16, hidden=16, depth=1)
    loss = otcfm.FlowMatcher(coupler=ready(coupler, x1), path="linear", sigma=0.1).loss(model, x0, x1, g)
    assert torch.isfinite(loss)
    assert otcfm.integrate(model, x0, 2).shape == (8, 1, 4, 4)


def test_bad_inputs() -> None:
    fm = otcfm.FlowMatcher(coupler="independent")
    model = MLP(2, hidden=8, depth=1)
    x0, x1 = _data(8)
    with pytest.raises(ValueError, match="same sample shape"):
        fm.loss(model, x0, torch.randn(8, 3))
    with pytest.raises(ValueError, match="x1: expected a non-empty batch"):
        fm.loss(model, x0, x1[:0])
    with pytest.raises(ValueError, match="x0: contains NaN or Inf"):
        fm.loss(model, x0 / 0, x1)
    with pytest.raises(ValueError, match="model: expected a floating-point output of shape"):
        fm.loss(lambda x, t: x[:, :1], x0, x1)


def test_gaussian_path_warns_on_a_non_gaussian_source() -> None:
    x0 = otcfm.data.sample("8gaussians", 64, torch.Generator().manual_seed(0))
    fm = otcfm.FlowMatcher(coupler="independent", path="gaussian")
    with pytest.warns(UserWarning, match="standard normal source"):
        fm.batch(x0, x0)


def test_time_samplers() -> None:
    g = torch.Generator().manual_seed(0)
    for name in ("uniform", "logit_normal"):
        t = get_time_sampler(name)(4000, g, torch.device("cpu"), torch.float32)
        assert t.shape == (4000,) and bool(((t >= 0) & (t <= 1)).all())
        assert abs(float(t.mean()) - 0.5) < 0.02
    t = LogitNormal(mean=1.0)(4000, g, torch.device("cpu"), torch.float32)
    assert float(t.median()) == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)
    with pytest.raises(ValueError, match="'logit_normal', 'u_shaped', 'uniform'"):
        get_time_sampler("beta")
    with pytest.raises(ValueError, match="std"):
        LogitNormal(std=0.0)


def test_mlp_shapes_and_errors() -> None:
    model = MLP(dim=12, hidden=8, depth=2)
    assert model(torch.randn(5, 3, 2, 2), torch.rand(5)).shape == (5, 3, 2, 2)
    assert model(torch.randn(5, 12), torch.tensor(0.5)).shape == (5, 12)
    with pytest.raises(ValueError, match="x: expected 12 features"):
        model(torch.randn(5, 11), torch.rand(5))
    with pytest.raises(ValueError, match=r"t: expected shape \(5,\)"):
        model(torch.randn(5, 12), torch.rand(4))
    with pytest.raises(ValueError, match="depth"):
        MLP(dim=2, depth=0)


def test_public_names() -> None:
    for name in otcfm.__all__:
        assert hasattr(otcfm, name), name


def test_a_batch_of_another_dtype_than_the_model_is_named() -> None:
    """torch said 'mat1 and mat2 must have the same dtype'; now the error names x0 and x1 and both dtypes."""
    x0, x1 = _data(8)
    fm, g = otcfm.FlowMatcher(coupler="independent"), torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(dim=2, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"^x0 and x1: torch.float64 samples for a model whose parameters are "):
        fm.loss(model, x0.double(), x1.double(), g)
    with pytest.raises(ValueError, match=r"^x0 and x1: torch.float32 samples for a model whose parameters are "):
        fm.loss(model.double(), x0, x1, g)
    assert fm.loss(model, x0.double(), x1.double(), g).dtype == torch.float64  # a float64 model takes them

    def failing(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a failure of its own, dtypes alike
        raise RuntimeError("the model's own failure")

    with pytest.raises(RuntimeError, match="the model's own failure"):
        fm.loss(failing, x0, x1, g)
