r"""What a coupling costs the regression: target variance and gradient variance.

Target variance, the irreducible part of the CFM loss (no model can remove it):

.. math::
    V = \mathbb{E}_{t, z, x_t} \| u_t(x_t \mid z) - u_t(x_t) \|^2,\qquad
    u_t(x) = \mathbb{E}[u_t(x_t \mid z) \mid x_t = x].

Gradient variance of the loss for a frozen model and batch size ``B``:
``trVar = mean_b ||g_b - mean(g)||^2`` over minibatch gradients ``g_b``, and the
noise scale ``trVar / ||mean(g)||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from otcfm._args import check_count, check_generator, check_rate
from otcfm._checks import check_batch, named_as_data
from otcfm.data import Sampler, check_sampler, draw
from otcfm.flow import FlowMatcher
from otcfm.paths import LinearPath

__all__ = [
    "GradientVariance",
    "TargetVariance",
    "coupled_pairs",
    "gaussian_target_variance",
    "gradient_variance",
    "target_variance",
    "target_variance_of_pairs",
]

DEFAULT_TIMES = tuple((k + 0.5) / 10 for k in range(10))  # midpoints: the mean over them approximates the integral


@dataclass(frozen=True)
class GradientVariance:
    """Minibatch gradient statistics of a frozen model.

    Attributes:
        trace: ``mean_b ||g_b - mean(g)||^2`` (the trace of the gradient covariance).
        noise_scale: ``trace / ||mean(g)||^2``.
        mean_sq_norm: ``||mean(g)||^2``.
        n_batches: minibatches drawn.
        batch_size: their size.
    """

    trace: float
    noise_scale: float
    mean_sq_norm: float
    n_batches: int
    batch_size: int


def gradient_variance(
    fm: FlowMatcher,
    model: nn.Module,
    source: Sampler,
    target: Sampler,
    batch_size: int,
    n_batches: int = 32,
    generator: torch.Generator | None = None,
) -> GradientVariance:
    """Trace of the covariance of minibatch loss gradients (``fm.loss``) of a frozen ``model``.

    Each of ``n_batches`` minibatches draws ``batch_size`` fresh source and
    target samples, couples them with ``fm``'s coupler, and takes the gradient
    of ``fm.loss`` with respect to all parameters that require one. The model
    is not updated; its ``.grad`` fields are restored afterwards.

    Args:
        fm: the flow matcher (coupler, path, time sampler).
        model: velocity field with parameters.
        source, target: dataset names or samplers ``f(n, generator)``.
        batch_size: samples per side and minibatch.
        n_batches: minibatches, ``>= 2``.
        generator: randomness of data, coupling, times and noise.

    Returns:
        :class:`GradientVariance`.
    """
    check_count(batch_size, "batch_size")
    check_count(n_batches, "n_batches", minimum=2)
    check_generator(generator)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameters that require gradients")
    saved = [p.grad for p in params]
    grads = []
    try:
        for _ in range(n_batches):
            x0, x1 = draw(source, batch_size, generator), draw(target, batch_size, generator)
            device = params[0].device
            try:
                loss = fm.loss(model, x0.to(device), x1.to(device), generator)
            except ValueError as error:  # the loss names x0 / x1: the caller passed source / target
                raise named_as_data(error, f"a batch of {batch_size} drawn") from error
            flat = torch.autograd.grad(loss, params)
            grads.append(torch.cat([g.reshape(-1) for g in flat]).to(torch.float64))
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    trace = float(((stacked - mean) ** 2).sum(1).mean())
    mean_sq = float((mean**2).sum())
    return GradientVariance(trace, trace / mean_sq if mean_sq > 0 else math.inf, mean_sq, n_batches, batch_size)


@dataclass(frozen=True)
class TargetVariance:
    """Target variance resolved over time.

    Attributes:
        total: mean of ``per_time`` over the time grid (the integral over ``t`` for a uniform grid).
        times: the times evaluated.
        per_time: ``V_t`` at each time.
        bandwidth: kernel bandwidth used (0 for the closed form).
    """

    total: float
    times: tuple[float, ...]
    per_time: tuple[float, ...]
    bandwidth: float


def coupled_pairs(
    fm: FlowMatcher, source: Sampler, target: Sampler, batch_size: int, n: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """At least ``n`` pairs ``(x0, x1)`` from ``fm``'s coupler on minibatches of ``batch_size`` (float64, flat)."""
    x0s, x1s, count = [], [], 0
    while count < n:
        x0, x1 = draw(source, batch_size, generator), draw(target, batch_size, generator)
        try:
            i, j = fm.coupler(x0, x1, generator=generator)
        except ValueError as error:  # the coupler names x0 / x1: the caller passed source / target
            raise named_as_data(error, f"a batch of {batch_size} drawn") from error
        x0s.append(x0[i].reshape(len(i), -1))
        x1s.append(x1[j].reshape(len(j), -1))
        count += len(i)
    return torch.cat(x0s)[:n].to(torch.float64), torch.cat(x1s)[:n].to(torch.float64)


def _check_times(times: Sequence[float], below_one: bool) -> tuple[float, ...]:
    """A non-empty sequence of times in ``[0, 1]`` (``[0, 1)`` when ``below_one``), as floats."""
    interval = "[0, 1)" if below_one else "[0, 1]"
    try:
        values = tuple(float(t) for t in times)
    except (TypeError, ValueError) as error:
        raise TypeError(f"times: expected a non-empty sequence of numbers in {interval}, got {times!r}") from error
    if not values or not all(0 <= t < 1 or (t == 1 and not below_one) for t in values):
        raise ValueError(f"times: expected a non-empty sequence of numbers in {interval}, got {times!r}")
    return values


def _posterior_mean(x: Tensor, centres: Tensor, values: Tensor, width: float) -> Tensor:
    """``sum_k w_k values_k`` with ``w_k ∝ exp(-||x - centres_k||^2 / (2 width^2))``, in chunks of rows."""
    out = []
    for start in range(0, x.shape[0], 1024):
        chunk = x[start : start + 1024]
        sq = (chunk * chunk).sum(1, keepdim=True) + (centres * centres).sum(1)[None] - 2 * chunk @ centres.T
        out.append(torch.softmax(-sq.clamp_min(0) / (2 * width**2), dim=1) @ values)
    return torch.cat(out)


def target_variance(
    fm: FlowMatcher,
    source: Sampler,
    target: Sampler,
    batch_size: int,
    times: Sequence[float] = DEFAULT_TIMES,
    n_pool: int = 4096,
    n_eval: int = 1024,
    bandwidths: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> TargetVariance:
    r"""Estimate the target variance ``V`` of ``fm``'s coupling (linear path) from coupled minibatches.

    A pool of ``n_pool`` pairs and, separately, ``n_eval`` evaluation pairs are
    drawn from the coupling (``fm.coupler`` on minibatches of ``batch_size``).
    At each ``t`` the marginal velocity at an evaluation point is the
    posterior mean over the pool: Gaussian weights of width
    ``sqrt(sigma^2 + h^2)`` around the pool's path points ``t x1 + (1-t) x0``
    (``sigma``: the path's noise; exact for the pool's distribution when
    ``h = 0`` and ``sigma > 0``). Since the true marginal velocity minimises
    the squared error among all functions of ``x_t``, and the evaluation pairs
    are not in the pool, every bandwidth gives an upper bound of ``V`` up to
    Monte Carlo error; the smallest over ``bandwidths`` is reported.

    Args:
        fm: flow matcher with a ``"linear"`` path.
        source, target: dataset names or samplers ``f(n, generator)``.
        batch_size: minibatch size of the coupling.
        times: times of the grid.
        n_pool: pairs the marginal velocity is estimated from.
        n_eval: pairs it is evaluated on.
        bandwidths: kernel widths ``h`` tried; by default Scott's rule
            ``std * n_pool^(-1/(d+4))`` times 0.25, 0.5 and 1.
        generator: randomness.

    Returns:
        :class:`TargetVariance`.
    """
    if not isinstance(fm.path, LinearPath):
        raise ValueError(f"fm: target_variance supports the 'linear' path, got {fm.path!r}")
    check_count(batch_size, "batch_size")
    check_count(n_pool, "n_pool", minimum=2)
    check_count(n_eval, "n_eval")
    check_generator(generator)
    _check_times(times, below_one=False)
    check_sampler(source, "source")
    check_sampler(target, "target")
    pool0, pool1 = coupled_pairs(fm, source, target, batch_size, n_pool, generator)
    eval0, eval1 = coupled_pairs(fm, source, target, batch_size, n_eval, generator)
    return target_variance_of_pairs((pool0, pool1), (eval0, eval1), fm.path.sigma, times, bandwidths, generator)


def target_variance_of_pairs(
    pool: tuple[Tensor, Tensor],
    evaluation: tuple[Tensor, Tensor],
    sigma: float = 0.0,
    times: Sequence[float] = DEFAULT_TIMES,
    bandwidths: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> TargetVariance:
    """:func:`target_variance` from pairs of a coupling drawn by the caller (e.g. a semidiscrete coupling).

    Args:
        pool: ``(x0, x1)``, each ``(n_pool, D)``: the pairs the marginal velocity is estimated from.
        evaluation: ``(x0, x1)``, each ``(n_eval, D)``: independent pairs it is evaluated on.
        sigma: the linear path's noise.
        times, bandwidths, generator: as in :func:`target_variance`.
    """
    for name, pairs in (("pool", pool), ("evaluation", evaluation)):
        if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
            raise TypeError(f"{name}: expected a pair (x0, x1) of tensors, got {type(pairs).__name__}")
        for side, x in zip(("x0", "x1"), pairs, strict=True):
            check_batch(x, f"{name} {side}")  # any floating dtypes: both are taken in float64
    check_rate(sigma, "sigma", allow_zero=True)
    times = _check_times(times, below_one=False)
    if bandwidths is not None:
        try:
            bandwidths = [float(h) for h in bandwidths]  # a list, an array or a tensor of numbers
        except (TypeError, ValueError) as error:
            raise TypeError(f"bandwidths: expected a sequence of numbers, got {bandwidths!r}") from error
        if not bandwidths or not all(math.isfinite(h) and h >= 0 for h in bandwidths):
            raise ValueError(f"bandwidths: expected a non-empty list of finite numbers >= 0, got {bandwidths!r}")
    check_generator(generator)
    pool0, pool1 = (x.reshape(x.shape[0], -1).to(torch.float64) for x in pool)
    eval0, eval1 = (x.reshape(x.shape[0], -1).to(torch.float64) for x in evaluation)
    if pool0.shape != pool1.shape or eval0.shape != eval1.shape or pool0.shape[1] != eval0.shape[1]:
        raise ValueError("pool, evaluation: expected pairs (x0, x1) of equal shapes (n, D) with one D")
    if pool0.shape[0] < 2:
        raise ValueError("pool: expected at least 2 pairs")
    d = pool0.shape[1]
    if bandwidths is None:
        scale = float(torch.cat([pool0, pool1]).std())
        bandwidths = [f * scale * pool0.shape[0] ** (-1.0 / (d + 4)) for f in (0.25, 0.5, 1.0)]
    noise = torch.randn(eval0.shape, generator=generator, dtype=torch.float64) if sigma > 0 else None
    best: tuple[float, tuple[float, ...], float] | None = None
    for h in bandwidths:
        width = math.sqrt(sigma**2 + h**2)
        if width <= 0:
            raise ValueError("bandwidths: a zero bandwidth needs a path with sigma > 0")
        values = []
        for t in times:
            centres = t * pool1 + (1 - t) * pool0
            x = t * eval1 + (1 - t) * eval0 + (sigma * noise if noise is not None else 0.0)
            marginal = _posterior_mean(x, centres, pool1 - pool0, width)
            values.append(float(((eval1 - eval0 - marginal) ** 2).sum(1).mean()))
        total = sum(values) / len(values)
        if best is None or total < best[0]:
            best = (total, tuple(values), h)
    return TargetVariance(best[0], tuple(float(t) for t in times), best[1], best[2])


def gaussian_target_variance(
    points: Tensor,
    times: Sequence[float] = DEFAULT_TIMES,
    n_eval: int = 4096,
    generator: torch.Generator | None = None,
) -> TargetVariance:
    r"""Closed-form reference: independent coupling of ``N(0, I)`` with a finite target sample, ``sigma = 0``.

    With ``x = t y + (1 - t) x_0``, ``x_0 ~ N(0, I)`` and ``y`` uniform on
    ``points``, the marginal velocity is the posterior mean

    .. math::
        u_t(x) = \sum_m w_m(x) \frac{y_m - x}{1 - t},\qquad
        w_m(x) \propto \exp\Big(-\frac{\|x - t y_m\|^2}{2 (1 - t)^2}\Big),

    and ``V_t = E ||(y - x)/(1-t) - u_t(x)||^2`` is estimated by Monte Carlo over ``n_eval`` draws only.

    Args:
        points: ``(m, ...)`` target sample.
        times: times in ``[0, 1)``.
        n_eval: Monte Carlo draws per time.
        generator: randomness.

    Returns:
        :class:`TargetVariance` with ``bandwidth = 0``.
    """
    check_batch(points, "points")
    check_count(n_eval, "n_eval")
    check_generator(generator)
    times = _check_times(times, below_one=True)
    y = points.reshape(points.shape[0], -1).to(torch.float64)
    values = []
    for t in times:
        k = torch.randint(y.shape[0], (n_eval,), generator=generator)
        x0 = torch.randn((n_eval, y.shape[1]), generator=generator, dtype=torch.float64)
        x = t * y[k] + (1 - t) * x0
        weights_mean = _posterior_mean(x, t * y, y, 1 - t)  # sum_m w_m y_m
        marginal = (weights_mean - x) / (1 - t)
        values.append(float(((y[k] - x0 - marginal) ** 2).sum(1).mean()))
    return TargetVariance(sum(values) / len(values), tuple(float(t) for t in times), tuple(values), 0.0)
