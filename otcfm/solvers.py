r"""ODE solvers for a velocity model: ``dx/dt = v(x, t)`` from ``t0`` to ``t1``.

Fixed-step methods are written here and count network evaluations (NFE):
``"euler"`` (1 per step, order 1), ``"midpoint"`` and ``"heun"`` (2, order 2),
``"rk4"`` (4, order 4). ``"dopri5"`` is adaptive (Dormand-Prince 5(4)) through
the optional torchdyn integration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from otcfm._checks import check_batch, check_choice
from otcfm.torchdyn_adapter import TorchdynField, load_neural_ode

__all__ = ["FIXED_STEP_METHODS", "METHODS", "Solution", "integrate", "solve"]

Field = Callable[[Tensor, Tensor], Tensor]  # f(t_scalar, x) -> dx/dt
Method = Literal["euler", "midpoint", "heun", "rk4", "dopri5"]


def _euler(f: Field, t: Tensor, x: Tensor, h: Tensor) -> Tensor:
    return x + h * f(t, x)


def _midpoint(f: Field, t: Tensor, x: Tensor, h: Tensor) -> Tensor:
    return x + h * f(t + h / 2, x + (h / 2) * f(t, x))


def _heun(f: Field, t: Tensor, x: Tensor, h: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + (h / 2) * (k1 + k2)


def _rk4(f: Field, t: Tensor, x: Tensor, h: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h / 2, x + (h / 2) * k1)
    k3 = f(t + h / 2, x + (h / 2) * k2)
    k4 = f(t + h, x + h * k3)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


#: Fixed-step methods: name -> (step function, evaluations per step).
FIXED_STEP_METHODS: dict[str, tuple[Callable[[Field, Tensor, Tensor, Tensor], Tensor], int]] = {
    "euler": (_euler, 1),
    "midpoint": (_midpoint, 2),
    "heun": (_heun, 2),
    "rk4": (_rk4, 4),
}
METHODS = (*FIXED_STEP_METHODS, "dopri5")


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solve`.

    Attributes:
        x: ``(B, ...)`` state at ``t1``.
        t: ``(steps + 1,)`` output times from ``t0`` to ``t1``.
        trajectory: ``(steps + 1, B, ...)`` states at ``t``, or None if not requested.
        nfe: number of network evaluations made.
    """

    x: Tensor
    t: Tensor
    trajectory: Tensor | None
    nfe: int


def solve(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    steps: int = 100,
    method: Method = "euler",
    *,
    t_span: tuple[float, float] = (0.0, 1.0),
    return_trajectory: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    grad: bool = False,
) -> Solution:
    """Integrate ``dx/dt = model(x, t)`` from ``x0`` at ``t_span[0]`` to ``t_span[1]``.

    Args:
        model: velocity field ``model(x: (B, ...), t: (B,)) -> (B, ...)``.
        x0: initial state, ``(B, ...)``.
        steps: fixed-step methods take ``steps`` equal steps; for ``"dopri5"``
            it is the number of output intervals (the solver picks its own steps).
        method: ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` or ``"dopri5"``.
        t_span: start and end time; ``(1, 0)`` integrates backwards.
        return_trajectory: keep the states at every output time.
        atol, rtol: tolerances of ``"dopri5"``.
        grad: track gradients (off by default: sampling runs under ``no_grad``).

    Returns:
        a :class:`Solution` with the final state, output times, optional trajectory and NFE.

    Raises:
        ValueError: unknown method (lists the valid ones), ``steps < 1``, bad ``x0``.
        ImportError: ``"dopri5"`` without torchdyn installed.
    """
    check_choice(method, METHODS, "method")
    check_batch(x0, "x0")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    times = torch.linspace(float(t_span[0]), float(t_span[1]), steps + 1, dtype=x0.dtype, device=x0.device)
    with torch.set_grad_enabled(grad):
        if method == "dopri5":
            return _solve_adaptive(model, x0, times, return_trajectory, atol, rtol)
        return _solve_fixed(model, x0, times, method, return_trajectory)


def _solve_fixed(
    model: Callable[[Tensor, Tensor], Tensor], x: Tensor, times: Tensor, method: str, keep: bool
) -> Solution:
    step, evaluations = FIXED_STEP_METHODS[method]
    batch = x.shape[0]

    def field(t: Tensor, state: Tensor) -> Tensor:
        return model(state, t.expand(batch))

    states = [x] if keep else []
    for k in range(len(times) - 1):
        x = step(field, times[k], x, times[k + 1] - times[k])
        if keep:
            states.append(x)
    trajectory = torch.stack(states) if keep else None
    return Solution(x, times, trajectory, evaluations * (len(times) - 1))


def _solve_adaptive(
    model: Callable[[Tensor, Tensor], Tensor], x: Tensor, times: Tensor, keep: bool, atol: float, rtol: float
) -> Solution:
    neural_ode = load_neural_ode()
    field = TorchdynField(model)
    node = neural_ode(field, solver="dopri5", atol=atol, rtol=rtol, sensitivity="autograd", return_t_eval=False)
    trajectory = node(x, times)
    return Solution(trajectory[-1], times, trajectory if keep else None, field.nfe)


def integrate(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    steps: int = 100,
    method: Method = "euler",
    *,
    t_span: tuple[float, float] = (0.0, 1.0),
    return_trajectory: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    grad: bool = False,
) -> Tensor:
    """Integrate a velocity model; the tensor-returning form of :func:`solve`.

    Args and Raises: as :func:`solve`.

    Returns:
        ``(B, ...)`` final state, or the ``(steps + 1, B, ...)`` trajectory
        when ``return_trajectory=True``. Use :func:`solve` for the NFE.
    """
    solution = solve(
        model, x0, steps, method, t_span=t_span, return_trajectory=return_trajectory, atol=atol, rtol=rtol, grad=grad
    )
    return solution.trajectory if return_trajectory else solution.x
