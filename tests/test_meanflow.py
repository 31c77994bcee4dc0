"""The MeanFlow objective: its target against finite differences of the identity, r = t as flow matching, one-step
sampling, training through otcfm.train (resume bit for bit), and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import otcfm
from otcfm.meanflow import MeanFlow, is_flow_map


def fixed_times(value: float) -> object:
    def sampler(n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.full((n,), value, device=device, dtype=dtype)

    return sampler


def test_the_target_is_the_identity_by_finite_differences() -> None:
    """target = v + (t - r) du/dr, du/dr along (v, 1, 0); central differences at h = 1e-6 in float64 (their error is
    about 2e-7 here: h^2 times the third derivative of time features of frequency up to 2 pi 64)."""
    torch.manual_seed(0)
    model = otcfm.models.MLP(3, hidden=16, depth=2, flow_map=True).double()
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    r, t = (
        torch.tensor([0.0, 0.1, 0.2, 0.5, 0.7, 0.9], dtype=torch.float64),
        torch.full((6,), 0.95, dtype=torch.float64),
    )
    u, target = MeanFlow().regression(model, z, r, t, v)
    h = 1e-6
    with torch.no_grad():
        dudr = (model(z + h * v, r + h, t) - model(z - h * v, r - h, t)) / (2 * h)
        torch.testing.assert_close(u, model(z, r, t), rtol=0, atol=0)
    torch.testing.assert_close(target, v + (t - r)[:, None] * dudr, rtol=0, atol=1e-6)
    assert u.requires_grad and not target.requires_grad


def test_an_exact_flow_map_has_zero_loss() -> None:
    """For dz/dt = a z the average velocity is z (exp(a (t - r)) - 1) / (t - r): its MeanFlow residual is 0."""

    class Exact(nn.Module):
        flow_map = True

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
            gap = (t - r)[:, None]
            safe = torch.where(gap > 0, gap, torch.ones_like(gap))
            return torch.where(gap > 0, z * torch.expm1(self.a * gap) / safe, self.a * z)

    model = Exact()
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r, t = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    u, target = MeanFlow().regression(model, z, r, t, 0.7 * z)
    torch.testing.assert_close(u, target, rtol=1e-10, atol=1e-12)


def test_r_equal_t_is_the_flow_matching_loss() -> None:
    """With every pair at r = t and plain squared error, the loss is FlowMatcher's on v(x, t) = u(x, t, t)."""
    torch.manual_seed(0)
    flow_map = otcfm.models.MLP(2, hidden=16, depth=2, flow_map=True)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    mf = MeanFlow(coupler="paired", time_sampler=fixed_times(0.3), flow_map_fraction=0.0, adaptive_p=0.0)
    fm = otcfm.FlowMatcher(coupler="paired", time_sampler=fixed_times(0.3))
    ours = mf.loss(flow_map, x0, x1, torch.Generator().manual_seed(1))
    theirs = fm.loss(lambda x, t: flow_map(x, t, t), x0, x1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_one_step_sampling_is_z0_plus_u() -> None:
    torch.manual_seed(0)
    model = otcfm.models.MLP(2, hidden=16, depth=1, flow_map=True)
    z0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = z0 + model(z0, torch.zeros(8), torch.ones(8))
        two = z0 + 0.5 * model(z0, torch.zeros(8), torch.full((8,), 0.5))
        two = two + 0.5 * model(two, torch.full((8,), 0.5), torch.ones(8))
    torch.testing.assert_close(otcfm.integrate(model, z0, steps=1), one, rtol=0, atol=0)
    torch.testing.assert_close(otcfm.integrate(model, z0, steps=2), two, rtol=1e-6, atol=1e-7)
    assert otcfm.solve(model, z0, steps=3).nfe == 3
    with pytest.raises(ValueError, match="method: a flow map is stepped by its own map"):
        otcfm.integrate(model, z0, steps=2, method="rk4")


def test_train_meanflow_then_integrate_one_step(tmp_path: Path) -> None:
    settings = {"target": "moons", "objective": "meanflow", "hidden": 16, "depth": 1, "batch_size": 32}
    whole = otcfm.train(steps=6, out=tmp_path / "whole", progress=False, **settings)
    assert is_flow_map(whole.model) and whole.config.objective == "meanflow"
    x = otcfm.integrate(whole.model, torch.randn(10, 2), steps=1)
    assert x.shape == (10, 2) and torch.isfinite(x).all()
    otcfm.train(steps=3, out=tmp_path / "parts", progress=False, **settings)
    resumed = otcfm.train(steps=6, out=tmp_path / "parts", resume=True, progress=False, **settings)
    assert whole.losses == resumed.losses
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    loaded, config = otcfm.load_model(tmp_path / "whole")
    assert is_flow_map(loaded) and config is not None and config.objective == "meanflow"


def test_a_conditional_unet_flow_map_trains() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(32) % 2
    tiny = {"base_channels": 8, "channel_mult": [1, 2]}
    run = otcfm.train(
        target=(x, y), model="unet", model_options=tiny, objective="meanflow", steps=3, batch_size=8, progress=False
    )
    assert run.model.flow_map and run.model.null_label == 2
    out = otcfm.integrate(run.model, torch.randn(4, 1, 8, 8), steps=1, y=torch.tensor([0, 1, 0, 1]))
    assert out.shape == (4, 1, 8, 8)


def test_wrong_models_and_options_are_named() -> None:
    velocity = otcfm.models.MLP(2, hidden=8, depth=1)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"model: a flow map is called as model\(z, r, t\)"):
        MeanFlow(coupler="independent").loss(velocity, x, x)
    with pytest.raises(ValueError, match="model: objective='meanflow' trains a flow map"):
        otcfm.train(target="moons", objective="meanflow", model=velocity, steps=2, progress=False)
    with pytest.raises(ValueError, match="model: objective='flow_matching' trains a velocity"):
        otcfm.train(target="moons", model=otcfm.models.MLP(2, flow_map=True), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"flow_map_fraction: expected a number in \[0, 1\]"):
        MeanFlow(flow_map_fraction=1.5)
    with pytest.raises(ValueError, match="objective_options: .* are for objective='meanflow'"):
        otcfm.train(target="moons", objective_options={"adaptive_p": 0.5}, steps=2, progress=False)
    with pytest.raises(ValueError, match="objective: unknown value 'meanflows'"):
        otcfm.TrainConfig(objective="meanflows")
    with pytest.raises(ValueError, match="objective_options"):
        otcfm.train(target="moons", objective="meanflow", objective_options={"ratio": 0.5}, steps=2, progress=False)


def test_a_bad_time_sampler_is_named() -> None:
    def backwards(n: int, generator: object, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.full((n,), 1.5, device=device, dtype=dtype)

    flow_map = otcfm.models.MLP(2, hidden=8, depth=1, flow_map=True)
    with pytest.raises(ValueError, match=r"t.*\[0, 1\]"):
        MeanFlow(coupler="independent", time_sampler=backwards).loss(flow_map, torch.randn(4, 2), torch.randn(4, 2))
