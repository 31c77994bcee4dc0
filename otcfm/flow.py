r"""FlowMatcher: the one object a training loop holds (coupler -> path -> loss).

.. math::
    \mathcal{L}(\theta) = \mathbb{E}_{(x_0, x_1) \sim \pi,\ t,\ \epsilon}
        \big\| v_\theta(x_t, t) - u_t(x_t \mid x_0, x_1) \big\|^2

where ``pi`` is the minibatch coupling chosen by the coupler, ``t`` comes
from the time sampler and ``(x_t, u_t)`` from the probability path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from otcfm import _random
from otcfm._checks import check_pair
from otcfm.couplers import Coupler, SinkhornCoupler, get_coupler
from otcfm.couplers.base import check_labels
from otcfm.paths import BridgePath, Path, get_path
from otcfm.timesteps import TimeSampler, get_time_sampler

__all__ = ["FlowBatch", "FlowMatcher"]


class FlowBatch(NamedTuple):
    """One flow-matching training batch.

    Attributes:
        t: ``(B,)`` times.
        x_t: ``(B, ...)`` points on the conditional paths.
        u_t: ``(B, ...)`` regression targets.
        i: ``(B,)`` indices of the source samples used (``x0[i]``).
        j: ``(B,)`` indices of their target partners (``x1[j]``); labels follow as ``y[j]``.
    """

    t: Tensor
    x_t: Tensor
    u_t: Tensor
    i: Tensor
    j: Tensor


class FlowMatcher:
    """Conditional flow matching with a pluggable coupler, path and time sampler.

    Args:
        coupler: a coupler name (``"independent"``, ``"exact"``, ...) or instance.
        path: a path name (``"linear"``, ``"gaussian"``, ``"diffusion"``,
            ``"cosine"``, ``"bridge"``) or instance.
        sigma: the path's noise parameter; the path's default when None.
        time_sampler: ``"uniform"``, ``"logit_normal"`` or a callable
            ``(n, generator, device, dtype) -> (n,)``.

    Example:
        >>> fm = FlowMatcher(coupler="exact", path="linear", sigma=0.0)
        >>> loss = fm.loss(model, x0, x1)  # doctest: +SKIP
    """

    def __init__(
        self,
        coupler: str | Coupler = "exact",
        path: str | Path = "linear",
        sigma: float | None = None,
        time_sampler: str | TimeSampler = "uniform",
    ) -> None:
        self.path = get_path(path, sigma)
        if coupler == "sinkhorn" and isinstance(self.path, BridgePath):
            # The Schroedinger bridge with diffusion sigma couples by entropic OT at epsilon = 2 sigma^2.
            coupler = SinkhornCoupler(epsilon=2 * self.path.sigma**2, relative=False)
        self.coupler = get_coupler(coupler)
        self.time_sampler = get_time_sampler(time_sampler)

    def batch(
        self,
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None = None,
        *,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
    ) -> FlowBatch:
        """Couple ``x0: (B0, ...)`` with ``x1: (B1, ...)``, draw ``t`` and noise, evaluate the path.

        Args:
            x0, x1: source and target batches.
            generator: randomness of the coupling, ``t`` and noise.
            y0, y1: optional labels or conditions, ``(B0,)`` and ``(B1,)``, passed to the coupler
                (OT couplers then pair within labels); the target labels of the pairs are ``y1[batch.j]``.

        Returns:
            a :class:`FlowBatch` (one entry per pair).

        Raises:
            ValueError: mismatched sample shapes, empty batches, NaN/Inf.
        """
        x0, x1 = check_pair(x0, x1)
        y0, y1 = check_labels(y0, x0.shape[0], "y0"), check_labels(y1, x1.shape[0], "y1")
        self.path.check_source(x0)
        i, j = self.coupler.pair(x0, x1, y0, y1, generator)  # inputs validated once, here
        x0, x1 = x0[i], x1[j]
        t = self.time_sampler(x0.shape[0], generator, x0.device, x0.dtype)
        noise = _random.randn(tuple(x0.shape), generator, x0.device, x0.dtype) if self.path.needs_noise else None
        x_t, u_t = self.path(x0, x1, t, noise)
        return FlowBatch(t, x_t, u_t, i, j)

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None = None,
        *,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching loss: mean squared error of ``model(x_t, t)`` against ``u_t``.

        Args:
            model: velocity field called as ``model(x: (B, ...), t: (B,)) -> (B, ...)``;
                with target labels, as ``model(x, t, y)`` where ``y = y1[j]`` are the pairs' labels.
            x0: source batch, ``(B0, ...)``.
            x1: target batch, ``(B1, ...)``.
            generator: randomness of the coupling, ``t`` and noise.
            y0, y1: optional labels or conditions (see :meth:`batch`).

        Returns:
            scalar tensor (mean over batch and dimensions).
        """
        batch = self.batch(x0, x1, generator, y0=y0, y1=y1)
        v = model(batch.x_t, batch.t) if y1 is None else model(batch.x_t, batch.t, y1[batch.j])
        if v.shape != batch.u_t.shape:
            raise ValueError(f"model: expected output of shape {tuple(batch.u_t.shape)}, got {tuple(v.shape)}")
        return torch.mean((v - batch.u_t) ** 2)

    def __repr__(self) -> str:
        return f"FlowMatcher(coupler={self.coupler!r}, path={self.path!r}, time_sampler={self.time_sampler!r})"
