r"""ODE solvers for a velocity model: ``dx/dt = v(x, t)`` from ``t0`` to ``t1``.

Fixed-step methods are written here and count network evaluations (NFE):
``"euler"`` (1 per step, order 1), ``"midpoint"`` and ``"heun"`` (2, order 2),
``"rk4"`` (4, order 4). ``"dopri5"`` is adaptive (Dormand-Prince 5(4)) through
the optional torchdyn integration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from otcfm._args import check_count, check_flag, check_rate
from otcfm._checks import check_batch, check_choice, explain_time_first
from otcfm.guidance import class_labels, guided_field
from otcfm.meanflow import is_flow_map
from otcfm.torchdyn_adapter import TorchdynField, load_neural_ode

__all__ = ["FIXED_STEP_METHODS", "METHODS", "Solution", "check_output", "check_velocity", "integrate", "solve"]

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
#: Default budget of model evaluations of ``"dopri5"`` (a smooth learned flow takes tens to hundreds).
MAX_NFE = 100_000


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
    max_nfe: int = MAX_NFE,
    y: Tensor | int | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
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
        max_nfe: budget of model evaluations of ``"dopri5"``, whose steps shrink without end where the flow
            blows up or the model returns NaN/Inf.
        y: class labels of a conditional model, ``(B,)`` or ``(B, 1)`` integers or one int for all; the model
            is then called ``model(x, t, y)``.
        guidance: classifier-free guidance weight ``w``: ``v(x, t, null) + w (v(x, t, y) - v(x, t, null))``
            in one batched call per evaluation (1: plain conditional, 0: unconditional; see
            :mod:`otcfm.guidance`).
        null_label: the unconditional branch's label; default the model's ``null_label`` attribute, else the
            model is called without labels.

    A flow map (a model with ``flow_map = True``, :mod:`otcfm.meanflow`) is stepped by its own map,
    ``z <- z + (t_{k+1} - t_k) u(z, t_k, t_{k+1})``, with ``method="euler"``: ``steps=1`` is its one-step sample.

    Returns:
        a :class:`Solution` with the final state, output times, optional trajectory and NFE.

    Raises:
        ValueError: unknown method (lists the valid ones), ``steps < 1``, bad ``x0``, a model that fails on
            ``x0``'s shape; ``"dopri5"`` whose time becomes NaN (a NaN model) or that needs more than ``max_nfe``
            evaluations.
        ImportError: ``"dopri5"`` without torchdyn installed.
    """
    check_choice(method, METHODS, "method")
    check_batch(x0, "x0")
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    check_count(steps, "steps")
    _check_span(t_span)
    check_rate(atol, "atol")
    check_rate(rtol, "rtol")
    check_count(max_nfe, "max_nfe")
    check_flag(return_trajectory, "return_trajectory")
    check_flag(grad, "grad")
    flow_map = is_flow_map(model)
    if flow_map and method != "euler":
        raise ValueError(
            f"method: a flow map is stepped by its own map, z <- z + (t - r) u(z, r, t); use 'euler', got {method!r}"
        )
    if flow_map and guidance != 1.0:
        raise ValueError(f"guidance: {guidance!r}: guidance of a flow map is not supported; use guidance=1")
    if not flow_map:
        model = guided_field(model, y, guidance, null_label, x0.shape[0], x0.device)
    times = torch.linspace(float(t_span[0]), float(t_span[1]), steps + 1, dtype=x0.dtype, device=x0.device)
    with torch.set_grad_enabled(grad):
        if flow_map:
            labels = None if y is None else class_labels(y, x0.shape[0], x0.device)
            solution = _solve_flow_map(model, x0, times, return_trajectory, labels)
        elif method == "dopri5":
            solution = _solve_adaptive(model, x0, times, return_trajectory, atol, rtol, max_nfe)
        else:
            solution = _solve_fixed(model, x0, times, method, return_trajectory)
    if not bool(torch.isfinite(solution.x).all()):  # one check per solve, not per step
        raise ValueError("model: the solution contains NaN or Inf (the model returned NaN/Inf or the flow diverged)")
    return solution


def _check_span(t_span: object) -> None:
    if (
        not isinstance(t_span, (tuple, list))
        or len(t_span) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in t_span)
        or t_span[0] == t_span[1]
    ):
        raise ValueError(f"t_span: expected two different finite times (t0, t1), got {t_span!r}")


def check_velocity(model: Callable[..., Tensor], x: Tensor, argument: str = "model", y: Tensor | None = None) -> Tensor:
    """Evaluate ``model(x, t=0)`` (``model(x, t=0, y)`` with labels) once and check its output: a floating tensor
    of ``x``'s shape, finite.

    For entry points that do long work with a model (training, pair generation), so a model that does not fit
    the data fails before the work starts. A module is evaluated in eval mode (no batch-norm statistics are
    updated), then each submodule is put back in its mode.

    Raises:
        TypeError: the model is not callable or returns something else than a floating tensor.
        ValueError: the call fails (e.g. the model expects samples of another shape), an output of another
            shape, or NaN/Inf.
    """
    if not callable(model):
        raise TypeError(f"{argument}: expected a callable model(x, t), got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            v = first_call(model, x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device), argument, y)
    finally:
        for module, mode in modes:
            module.training = mode
    check_output(v, x, argument)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{argument}: returned NaN or Inf")
    return v


def first_call(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, argument: str = "model", y: Tensor | None = None
) -> Tensor:
    """``model(x, t)`` (``model(x, t, y)`` with labels), where an exception (e.g. a model made for samples of
    another shape, or one that takes the time first) becomes a ``ValueError`` naming ``argument`` and the shape of
    ``x``; for a model's first call in a long run."""
    try:
        v = model(x, t) if y is None else model(x, t, y)
    except Exception as error:
        explain_time_first(model, x, t, y, argument)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        call = f"{argument}(x, t)" if y is None else f"{argument}(x, t, y)"
        raise ValueError(
            f"{argument}: calling it as {call} on samples of shape {tuple(x.shape)} failed ({first}); "
            f"does it take samples of this shape and dtype ({x.dtype})?"
        ) from error
    if isinstance(v, Tensor) and v.shape != x.shape:
        explain_time_first(model, x, t, y, argument)
    return v


def check_output(v: object, x: Tensor, argument: str = "model") -> Tensor:
    """Check that a model's output ``v`` is a floating tensor of the shape of its input ``x``."""
    if not isinstance(v, Tensor):
        raise TypeError(
            f"{argument}: expected model(x, t) to return a tensor of shape {tuple(x.shape)}, got {type(v).__name__}"
        )
    if v.shape != x.shape:
        raise ValueError(f"{argument}: expected output of shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point output, got dtype {v.dtype}")
    return v


def _solve_fixed(
    model: Callable[[Tensor, Tensor], Tensor], x: Tensor, times: Tensor, method: str, keep: bool
) -> Solution:
    step, evaluations = FIXED_STEP_METHODS[method]
    batch = x.shape[0]

    checked = False

    def field(t: Tensor, state: Tensor) -> Tensor:
        nonlocal checked
        if checked:
            return model(state, t.expand(batch))
        v = check_output(first_call(model, state, t.expand(batch)), state)  # the first evaluation only
        checked = True
        return v

    states = [x] if keep else []
    for k in range(len(times) - 1):
        x = step(field, times[k], x, times[k + 1] - times[k])
        if keep:
            states.append(x)
    trajectory = torch.stack(states) if keep else None
    return Solution(x, times, trajectory, evaluations * (len(times) - 1))


def _solve_flow_map(
    model: Callable[..., Tensor], x: Tensor, times: Tensor, keep: bool, labels: Tensor | None
) -> Solution:
    """``z <- z + (t_{k+1} - t_k) u(z, t_k, t_{k+1})`` for a flow map (:mod:`otcfm.meanflow`): one evaluation per
    step, exact for a perfect map whatever the number of steps."""
    batch = x.shape[0]
    states = [x] if keep else []
    for k in range(len(times) - 1):
        r, t = times[k].expand(batch), times[k + 1].expand(batch)
        u = model(x, r, t) if labels is None else model(x, r, t, labels)
        if k == 0:
            check_output(u, x)
        x = x + (times[k + 1] - times[k]) * u
        if keep:
            states.append(x)
    return Solution(x, times, torch.stack(states) if keep else None, len(times) - 1)


def _solve_adaptive(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    times: Tensor,
    keep: bool,
    atol: float,
    rtol: float,
    max_nfe: int,
) -> Solution:
    neural_ode = load_neural_ode()
    field = TorchdynField(model, max_nfe)
    # torchdyn prints a notice for a field without parameters (a plain function) and gives it a dummy one;
    # handing it that placeholder keeps the output quiet and changes nothing else
    placeholder = () if any(True for _ in field.parameters()) else (nn.Parameter(torch.zeros(1, device=x.device)),)
    node = neural_ode(
        field,
        solver="dopri5",
        atol=atol,
        rtol=rtol,
        sensitivity="autograd",
        return_t_eval=False,
        optimizable_params=placeholder,
    )
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
    max_nfe: int = MAX_NFE,
    y: Tensor | int | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
) -> Tensor:
    """Integrate a velocity model; the tensor-returning form of :func:`solve`.

    Args and Raises: as :func:`solve`.

    Returns:
        ``(B, ...)`` final state, or the ``(steps + 1, B, ...)`` trajectory
        when ``return_trajectory=True``. Use :func:`solve` for the NFE.
    """
    solution = solve(
        model,
        x0,
        steps,
        method,
        t_span=t_span,
        return_trajectory=return_trajectory,
        atol=atol,
        rtol=rtol,
        grad=grad,
        max_nfe=max_nfe,
        y=y,
        guidance=guidance,
        null_label=null_label,
    )
    return solution.trajectory if return_trajectory else solution.x
