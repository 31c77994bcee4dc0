r"""Exact log-likelihood of a flow by the instantaneous change of variables (CNF).

For ``dx/dt = v(x, t)`` carrying a source density ``p_0`` at ``t = 0`` to ``p_1`` at ``t = 1``:

.. math::
    \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot v(x_t, t)\, dt,

computed by integrating ``x`` and the divergence integral backwards from the data ``x_1`` at ``t = 1`` to
``x_0`` at ``t = 0``. The divergence is exact (one backward pass per dimension; for small dimension) or
Hutchinson's unbiased estimate ``E[eps^T (dv/dx) eps]`` with Rademacher or Gaussian probes drawn once per
sample from an explicit generator (Grathwohl et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_count, check_generator
from otcfm._checks import check_batch, check_choice
from otcfm.solvers import FIXED_STEP_METHODS, check_output, first_call

__all__ = ["LogLikelihood", "likelihood", "standard_normal_log_prob"]


@dataclass(frozen=True)
class LogLikelihood:
    """Result of :func:`likelihood`.

    Attributes:
        log_prob: ``(N,)`` log-density of each sample under the flow (nats).
        x0: ``(N, ...)`` the samples mapped back to the source.
        nfe: network evaluations (each counts one forward pass; the divergence's backward passes are extra).
    """

    log_prob: Tensor
    x0: Tensor
    nfe: int


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` per sample of ``x: (N, ...)``: ``(N,)``."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def likelihood(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    steps: int = 100,
    method: Literal["euler", "midpoint", "heun", "rk4"] = "rk4",
    divergence: Literal["exact", "hutchinson"] = "exact",
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    source_log_prob: Callable[[Tensor], Tensor] = standard_normal_log_prob,
    generator: torch.Generator | None = None,
) -> LogLikelihood:
    """Log-density of data ``x: (N, ...)`` under the flow of ``model`` from a source of known density.

    Args:
        model: velocity field ``model(x, t)`` (``t = 0`` source, ``t = 1`` data).
        x: ``(N, ...)`` data points.
        steps: fixed solver steps from ``t = 1`` back to ``t = 0``.
        method: ``"euler"``, ``"midpoint"``, ``"heun"`` or ``"rk4"``.
        divergence: ``"exact"`` (d backward passes per evaluation) or ``"hutchinson"`` (one).
        probe: Hutchinson probe distribution.
        source_log_prob: ``log p_0`` per sample; standard normal by default.
        generator: draws the Hutchinson probes.

    Returns:
        :class:`LogLikelihood` with per-sample log-density and NFE.

    Raises:
        ValueError: unknown method / divergence / probe, bad ``x`` or ``steps``.
    """
    check_batch(x, "x")
    check_choice(method, FIXED_STEP_METHODS, "method")
    check_choice(divergence, ("exact", "hutchinson"), "divergence")
    check_choice(probe, ("rademacher", "gaussian"), "probe")
    check_count(steps, "steps")
    check_generator(generator)
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    if not callable(source_log_prob):
        raise TypeError(
            f"source_log_prob: expected a callable log p0(x0) -> (B,), got {type(source_log_prob).__name__}"
        )
    n, shape = x.shape[0], x.shape[1:]
    d = math.prod(shape)
    eps = None
    if divergence == "hutchinson":
        eps = _random.randn((n, d), generator, x.device, x.dtype)
        if probe == "rademacher":
            eps = torch.sign(eps)
    calls = 0

    def field(t: Tensor, state: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        with torch.enable_grad():
            y = state[:, :d].detach().requires_grad_(True)
            if calls == 1:  # the first evaluation only: errors name the samples' shape, no per-step cost
                v = check_output(first_call(model, y.reshape(n, *shape), t.expand(n)), x)
            else:
                v = model(y.reshape(n, *shape), t.expand(n))
            v = v.reshape(n, d)
            if not v.requires_grad:  # a field that does not depend on x has zero divergence
                div = torch.zeros(n, dtype=x.dtype, device=x.device)
            elif eps is not None:
                (vjp,) = torch.autograd.grad(v, y, grad_outputs=eps, allow_unused=True)
                div = (vjp * eps).sum(1) if vjp is not None else torch.zeros(n, dtype=x.dtype, device=x.device)
            else:
                div = torch.zeros(n, dtype=x.dtype, device=x.device)
                for i in range(d):
                    (row,) = torch.autograd.grad(v[:, i].sum(), y, retain_graph=i < d - 1, allow_unused=True)
                    if row is not None:
                        div = div + row[:, i]
        return torch.cat([v.detach(), div.detach()[:, None]], dim=1)

    step, _ = FIXED_STEP_METHODS[method]
    state = torch.cat([x.reshape(n, d), torch.zeros(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for k in range(steps):
            state = step(field, times[k], state, times[k + 1] - times[k])
    x0 = state[:, :d].reshape(n, *shape)
    # state[:, d] = int_1^0 div dt = -int_0^1 div dt
    prior = source_log_prob(x0)
    if not isinstance(prior, Tensor) or prior.shape != (n,):
        got = tuple(prior.shape) if isinstance(prior, Tensor) else type(prior).__name__
        raise ValueError(f"source_log_prob: expected a tensor of shape ({n},), one log-density per sample, got {got}")
    log_prob = prior + state[:, d]
    if not bool(torch.isfinite(log_prob).all()):
        raise ValueError("model: the log-likelihood is NaN or Inf (the model returned NaN/Inf or the flow diverged)")
    return LogLikelihood(log_prob, x0, calls)
