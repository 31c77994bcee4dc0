"""Paths: end points, u_t = d x_t / dt (finite differences in float64), errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from otcfm.paths import PATHS, BridgePath, DiffusionPath, GaussianPath, LinearPath, get_path
from otcfm.timesteps import LogitNormal, UShaped

# (name, sigma) cases; sigma > 0 exercises the noise branches.
CASES = [
    ("linear", 0.0),
    ("linear", 0.3),
    ("gaussian", 1e-2),
    ("diffusion", None),
    ("cosine", 0.0),
    ("cosine", 0.2),
    ("bridge", 0.7),
]


def _inputs(seed: int, batch: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch, *shape), generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("name,sigma", CASES)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    dims=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    t=st.floats(0.02, 0.98),
)
def test_velocity_is_time_derivative(
    name: str, sigma: float | None, seed: int, batch: int, dims: list[int], t: float
) -> None:
    """u_t matches a central finite difference of x_t for fixed noise (h = 1e-6, float64, tol 1e-6)."""
    path = get_path(name, sigma)
    x0, x1, noise = _inputs(seed, batch, tuple(dims))
    h = 1e-6
    ts = torch.full((batch,), t, dtype=torch.float64)
    plus = path(x0, x1, ts + h, noise).x_t
    minus = path(x0, x1, ts - h, noise).x_t
    u = path(x0, x1, ts, noise).u_t
    torch.testing.assert_close(u, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-6)


def _ends(
    name: str, sigma: float | None, x0: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The path's documented values at t = 0 and t = 1."""
    if name in ("linear", "cosine"):
        return x0 + sigma * noise, x1 + sigma * noise
    if name == "gaussian":
        return x0, x1 + sigma * x0
    if name == "diffusion":
        p = DiffusionPath()
        a0 = math.exp(-0.5 * (p.beta_min + 0.5 * (p.beta_max - p.beta_min)))
        return a0 * x1 + math.sqrt(1 - a0**2) * x0, x1
    return x0, x1  # bridge: the noise vanishes at both ends


@pytest.mark.parametrize("name,sigma", CASES)
def test_end_points(name: str, sigma: float | None) -> None:
    """x_t equals the source end at t=0 and the target end at t=1 (up to the path's noise), tol 1e-5."""
    x0, x1, noise = _inputs(0, 6, (2, 3))
    path = get_path(name, sigma)
    start, end = _ends(name, sigma, x0, x1, noise)
    zeros, ones = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(path(x0, x1, zeros, noise).x_t, start, rtol=0, atol=1e-5)
    torch.testing.assert_close(path(x0, x1, ones, noise).x_t, end, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_velocity_finite_at_end_points(name: str) -> None:
    x0, x1, noise = _inputs(1, 3, (2,))
    for t in (0.0, 1.0):
        u = get_path(name)(x0, x1, torch.full((3,), t, dtype=torch.float64), noise).u_t
        assert torch.isfinite(u).all()


def test_gaussian_path_with_zero_sigma_is_the_linear_path() -> None:
    x0, x1, _ = _inputs(2, 5, (3,))
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    a, b = GaussianPath(sigma_min=0.0)(x0, x1, t), get_path("linear")(x0, x1, t)
    torch.testing.assert_close(a.x_t, b.x_t)
    torch.testing.assert_close(a.u_t, b.u_t)


def test_image_shaped_inputs_keep_their_shape() -> None:
    x0, x1, noise = _inputs(3, 4, (3, 5, 5))
    for name in PATHS:
        out = get_path(name)(x0, x1, torch.rand(4, dtype=torch.float64), noise)
        assert out.x_t.shape == out.u_t.shape == (4, 3, 5, 5)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_bridge_rejects_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        BridgePath(sigma=sigma)


def test_unknown_path_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'bridge'.*'linear'"):
        get_path("straight")


def test_sigma_for_a_path_without_one_is_refused() -> None:
    with pytest.raises(ValueError, match="diffusion"):
        get_path("diffusion", sigma=0.1)
    with pytest.raises(ValueError, match="sigma"):
        get_path(BridgePath(), sigma=0.1)


def test_negative_sigma_is_refused() -> None:
    with pytest.raises(ValueError, match="sigma"):
        get_path("linear", -0.1)


def test_time_outside_unit_interval_is_refused() -> None:
    x0, x1, _ = _inputs(4, 2, (2,))
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 1\]"):
        get_path("linear")(x0, x1, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_time_of_wrong_shape_is_refused() -> None:
    x0, x1, _ = _inputs(4, 2, (2,))
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        get_path("linear")(x0, x1, torch.rand(3, dtype=torch.float64))


def test_missing_noise_is_refused() -> None:
    x0, x1, _ = _inputs(5, 2, (2,))
    with pytest.raises(ValueError, match="noise"):
        get_path("bridge")(x0, x1, torch.rand(2, dtype=torch.float64))


def test_gaussian_source_warning_on_other_sources() -> None:
    x0 = 5 + torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="standard normal source"):
        GaussianPath().check_source(x0)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: DiffusionPath(0.1, float("inf")), ValueError, "beta_max: expected a finite number > 0"),
        (lambda: DiffusionPath("a", "b"), TypeError, "beta_min: expected a finite number"),
        (lambda: BridgePath(1e200), ValueError, "sigma: the bridge's epsilon 2 sigma"),
        (lambda: BridgePath(1e-200), ValueError, "sigma: the bridge's epsilon 2 sigma"),
        (lambda: GaussianPath(sigma_min=2.0), ValueError, r"sigma_min: expected a width in \[0, 1\]"),
        (lambda: LinearPath(sigma=True), TypeError, "sigma: expected a finite number"),
        (lambda: LogitNormal(mean=float("nan")), ValueError, "mean: expected a finite number"),
        (lambda: LogitNormal(std="1"), TypeError, "std: expected a finite number"),
        (lambda: UShaped(a=float("inf")), ValueError, "a: expected a finite number > 0"),
        (lambda: UShaped(a=1000.0), ValueError, "a: expected at most 700"),
    ],
)
def test_parameters_that_would_draw_nan_are_refused(make: object, error: type, message: str) -> None:
    """The probe's NaN/Inf times and targets (and raw OverflowError / '<' not supported) from these settings."""
    with pytest.raises(error, match=message):
        make()


def test_noise_is_checked_by_the_public_call() -> None:
    x0, x1, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    path = LinearPath(sigma=0.1)
    with pytest.raises(ValueError, match="noise: contains NaN"):
        path(x0, x1, t, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"noise: expected a tensor of shape \(4, 2\) and dtype torch.float32"):
        path(x0, x1, t, torch.randn(4, 2, dtype=torch.float64))  # silently made x_t float64


def test_getters_take_a_name_and_its_options_alike() -> None:
    """get_coupler, get_path and get_time_sampler take (name_or_instance, **options); options beside an instance
    and unknown options are named."""
    import otcfm
    from otcfm.timesteps import get_time_sampler

    assert get_path("diffusion", beta_max=10.0) == get_path(DiffusionPath(beta_max=10.0))
    assert get_path("linear", 0.1) == get_path("linear", sigma=0.1)
    assert get_time_sampler("logit_normal", mean=-0.4) == LogitNormal(mean=-0.4)
    assert otcfm.get_coupler("sinkhorn", epsilon=0.1).epsilon == 0.1
    with pytest.raises(TypeError, match="path: unknown option 'beta' of DiffusionPath"):
        get_path("diffusion", beta=1.0)
    with pytest.raises(ValueError, match=r"path: options \['sigma_min'\] apply to a name"):
        get_path(GaussianPath(), sigma_min=0.1)
    with pytest.raises(ValueError, match="sigma: given twice"):
        get_path("gaussian", 0.1, sigma_min=0.2)
    with pytest.raises(TypeError, match="time_sampler: unknown option 'loc' of LogitNormal"):
        get_time_sampler("logit_normal", loc=0.0)
    with pytest.raises(ValueError, match=r"time_sampler: options \['std'\] apply to a name"):
        get_time_sampler(LogitNormal(), std=2.0)
