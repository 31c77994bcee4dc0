"""Solvers: convergence order on a linear ODE with known solution, exact NFE, torchdyn adapter."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from otcfm.solvers import FIXED_STEP_METHODS, METHODS, integrate, solve
from otcfm.torchdyn_adapter import TorchdynField

ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
# Error bound at 16 steps on the rotation below: shrinks with the method's order.
TOL_16 = {"euler": 0.2, "midpoint": 1e-2, "heun": 1e-2, "rk4": 1e-5}


class Rotation(torch.nn.Module):
    """dx/dt = A x with A = [[-0.5, -2], [2, -0.5]]; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.tensor([[-0.5, -2.0], [2.0, -0.5]], dtype=torch.float64)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return x @ self.a.T

    def exact(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        return x0 @ torch.linalg.matrix_exp(self.a * t).T


X0 = torch.tensor([[1.0, 0.0], [0.3, -2.0], [-1.0, 1.0]], dtype=torch.float64)


def _error(method: str, steps: int) -> float:
    field = Rotation()
    x = integrate(field, X0, steps, method)
    return float((x - field.exact(X0, 1.0)).abs().max())


@pytest.mark.parametrize("method", sorted(FIXED_STEP_METHODS))
def test_fixed_step_convergence_order(method: str) -> None:
    """Halving the step divides the error by about 2^order (observed order within 0.3)."""
    observed = math.log2(_error(method, 32) / _error(method, 64))
    assert abs(observed - ORDER[method]) < 0.3
    assert _error(method, 16) < TOL_16[method]


@pytest.mark.parametrize("method", sorted(FIXED_STEP_METHODS))
def test_nfe_is_exact(method: str) -> None:
    field = Rotation()
    solution = solve(field, X0, steps=7, method=method)
    assert solution.nfe == field.calls == 7 * FIXED_STEP_METHODS[method][1]


def test_time_argument_reaches_the_model() -> None:
    """dx/dt = t: Euler sums the left end points, (N-1)/(2N); midpoint and rk4 are exact (0.5)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t[:, None].expand_as(x)

    x0 = torch.zeros(2, 1, dtype=torch.float64)
    assert float(integrate(model, x0, 4, "euler")[0]) == pytest.approx(3 / 8, abs=1e-12)
    for method in ("midpoint", "heun", "rk4"):
        assert float(integrate(model, x0, 4, method)[0]) == pytest.approx(0.5, abs=1e-12)


def test_trajectory_shape_and_ends() -> None:
    traj = integrate(Rotation(), X0, 5, "heun", return_trajectory=True)
    assert traj.shape == (6, 3, 2)
    torch.testing.assert_close(traj[0], X0)
    torch.testing.assert_close(traj[-1], integrate(Rotation(), X0, 5, "heun"))


def test_backward_integration_returns_to_the_start() -> None:
    forward = integrate(Rotation(), X0, 64, "rk4")
    back = integrate(Rotation(), forward, 64, "rk4", t_span=(1.0, 0.0))
    torch.testing.assert_close(back, X0, rtol=0, atol=1e-7)


def test_no_grad_by_default() -> None:
    model = torch.nn.Linear(2, 2)
    x = integrate(lambda x, t: model(x), torch.randn(4, 2), 3)
    assert not x.requires_grad
    assert integrate(lambda x, t: model(x), torch.randn(4, 2), 3, grad=True).requires_grad


def test_image_shaped_state() -> None:
    x = integrate(lambda x, t: -x, torch.ones(2, 1, 3, 3), 10, "rk4")
    assert x.shape == (2, 1, 3, 3)
    torch.testing.assert_close(x, torch.full_like(x, math.exp(-1)), rtol=1e-5, atol=0)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="method: unknown value 'rk45'.*'dopri5'.*'euler'"):
        integrate(Rotation(), X0, 4, "rk45")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        integrate(Rotation(), X0, 0)
    with pytest.raises(ValueError, match="x0: contains NaN"):
        integrate(Rotation(), X0 * float("nan"), 2)


def _require_torchdyn() -> None:
    """Skip without torchdyn on a developer machine; CI (CI=true) installs it and must not skip."""
    try:
        import torchdyn.core  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("torchdyn is not installed (pip install 'otcfm[torchdyn]')")


def test_dopri5_through_torchdyn() -> None:
    _require_torchdyn()
    field = Rotation()
    solution = solve(field, X0, steps=4, method="dopri5", atol=1e-8, rtol=1e-8, return_trajectory=True)
    torch.testing.assert_close(solution.x, field.exact(X0, 1.0), rtol=0, atol=1e-6)
    assert solution.trajectory is not None and solution.trajectory.shape == (5, 3, 2)
    torch.testing.assert_close(solution.trajectory[2], field.exact(X0, 0.5), rtol=0, atol=1e-6)
    assert solution.nfe == field.calls > 0


def test_dopri5_of_a_plain_function_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """torchdyn prints a notice for a field without parameters; a plain function is a valid model here."""
    _require_torchdyn()
    solution = solve(lambda x, t: -x, X0, steps=2, method="dopri5", atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(solution.x, X0 * math.exp(-1.0), rtol=0, atol=1e-6)
    assert capsys.readouterr().out == ""


def test_dopri5_stops_where_it_cannot_progress() -> None:
    """The probe's hangs: a NaN model and a flow that blows up in finite time (dx/dt = x^2 from 2, at t = 0.5)
    made dopri5 shrink its steps without end; now a NaN time raises at once and the budget bounds the rest."""
    _require_torchdyn()
    with pytest.raises(ValueError, match="model: the adaptive solver's time became NaN"):
        solve(lambda x, t: x * float("nan"), X0, steps=2, method="dopri5")
    with pytest.raises(ValueError, match=r"max_nfe: the adaptive solver made 300 model evaluations and reached only"):
        solve(lambda x, t: x**2, X0.abs() + 2, steps=2, method="dopri5", max_nfe=300)
    with pytest.raises(ValueError, match="max_nfe: expected a positive integer"):
        solve(Rotation(), X0, steps=2, method="dopri5", max_nfe=0)


def test_adapter_inside_users_own_torchdyn_code() -> None:
    _require_torchdyn()
    from torchdyn.core import NeuralODE

    field = Rotation()
    node = NeuralODE(TorchdynField(field), solver="rk4", return_t_eval=False)
    trajectory = node(X0, torch.linspace(0, 1, 33, dtype=torch.float64))
    torch.testing.assert_close(trajectory[-1], field.exact(X0, 1.0), rtol=0, atol=1e-6)


def test_missing_torchdyn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchdyn", None)
    monkeypatch.setitem(sys.modules, "torchdyn.core", None)
    with pytest.raises(ImportError, match=r"otcfm\[torchdyn\]"):
        integrate(Rotation(), X0, 2, "dopri5")


def test_methods_list() -> None:
    assert set(METHODS) == {"euler", "midpoint", "heun", "rk4", "dopri5"}


def test_a_model_for_other_samples_is_named() -> None:
    """integrate(MLP(3), 2-D x0) was torch's 'mat1 and mat2 shapes cannot be multiplied'."""
    import otcfm

    with pytest.raises(ValueError, match=r"model: calling it as model\(x, t\) on samples of shape \(3, 2\) failed"):
        solve(otcfm.models.MLP(3), torch.randn(3, 2), steps=2)
