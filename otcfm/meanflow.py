r"""Flow maps trained with MeanFlow (Geng et al. 2025), on any coupler and path: one network evaluation per jump.

A flow-map model ``u(z, r, t)`` predicts the average velocity of the flow over ``[r, t]`` from the point ``z`` it
has at time ``r`` (``r <= t``; ``t = 0`` source, ``t = 1`` data, as everywhere in otcfm), so that the flow carries
``z`` to ``z + (t - r) u(z, r, t)``; a one-step sample is ``x_1 = x_0 + u(x_0, 0, 1)``. Differentiating
``(t - r) u(z_r, r, t) = z_t - z_r`` in ``r`` along the flow (:math:`\dot z_r = v(z_r, r)`) gives the MeanFlow
identity in this time convention:

.. math::
    u(z_r, r, t) = v(z_r, r) + (t - r) \frac{d}{dr} u(z_r, r, t), \qquad
    \frac{d}{dr} u = v \cdot \nabla_z u + \partial_r u

The loss regresses ``u_theta(z_r, r, t)`` on the right-hand side, with the conditional velocity of a coupled pair
for ``v`` (the path's ``u_t`` at ``r``, as flow matching does) and the total derivative from one Jacobian-vector
product (``torch.func.jvp`` with tangents ``(v, 1, 0)``; no second backward pass), under a stop-gradient:

.. math::
    \mathcal{L} = \mathbb{E}\, w \,\big\| u_\theta(z_r, r, t)
        - \mathrm{sg}\big(v + (t - r)\, \tfrac{d}{dr} u_\theta\big) \big\|^2,
    \qquad w = \mathrm{sg}\big((\|\Delta\|^2 + c)^{-p}\big)

(adaptive weighting of the squared error ``||Delta||^2`` of each sample, as in the paper; ``p = 0`` is plain L2).
Where ``r = t`` the target is ``v`` and the loss is flow matching's. Times: ``(r, t)`` are the sorted pair of two
draws of a time sampler, and a fraction ``1 - flow_map_fraction`` of the pairs gets ``r = t`` (the paper's default
keeps 25% with ``r != t``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from otcfm import _random
from otcfm.couplers import Coupler
from otcfm.flow import FlowMatcher, _dropout_labels, _flat_labels, _labels_seen
from otcfm.models.adapters import wrapped_attribute
from otcfm.paths import Path
from otcfm.timesteps import TimeSampler

__all__ = ["MeanFlow", "is_flow_map"]


def is_flow_map(model: object) -> bool:
    """Whether ``model`` is a flow map ``u(z, r, t)`` (its ``flow_map`` attribute, looked up through wrappers that
    hold the model: :func:`otcfm.models.adapters.wrapped_attribute`)."""
    return wrapped_attribute(model, "flow_map", lambda v: isinstance(v, bool)) is True


class MeanFlow:
    """The MeanFlow objective for a flow-map model ``model(z, r, t)`` (``model(z, r, t, y)`` with labels).

    Args:
        coupler, path, sigma, time_sampler: as :class:`otcfm.FlowMatcher` (the pairs and the conditional path whose
            velocity stands for ``v``; ``time_sampler`` draws both times).
        flow_map_fraction: the fraction of pairs with ``r < t``; the others get ``r = t`` (flow matching).
        adaptive_p, adaptive_c: the adaptive weight ``(||Delta||^2 + c)^-p`` (``p = 0``: plain mean squared error).

    Example:
        >>> mf = MeanFlow(coupler="exact")
        >>> loss = mf.loss(model, x0, x1, generator)  # doctest: +SKIP
    """

    def __init__(
        self,
        coupler: str | Coupler = "exact",
        path: str | Path = "linear",
        sigma: float | None = None,
        time_sampler: str | TimeSampler = "uniform",
        flow_map_fraction: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
    ) -> None:
        self.flow_matcher = FlowMatcher(coupler=coupler, path=path, sigma=sigma, time_sampler=time_sampler)
        for name, value, low, high in (
            ("flow_map_fraction", flow_map_fraction, 0.0, 1.0),
            ("adaptive_p", adaptive_p, 0.0, math.inf),
            ("adaptive_c", adaptive_c, 0.0, math.inf),
        ):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
        if adaptive_p > 0 and adaptive_c <= 0:
            raise ValueError(f"adaptive_c: expected a number > 0 with adaptive_p > 0, got {adaptive_c!r}")
        self.flow_map_fraction, self.adaptive_p, self.adaptive_c = (
            float(flow_map_fraction),
            float(adaptive_p),
            float(adaptive_c),
        )

    @property
    def coupler(self) -> Coupler:
        """The coupler that pairs the batches."""
        return self.flow_matcher.coupler

    def paired(self) -> MeanFlow:
        """This objective on pairs kept as given (batches coupled already: pools, Reflow's pairs)."""
        kept = self.__dict__.get("_paired")
        if kept is None:
            kept = MeanFlow.__new__(MeanFlow)
            kept.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_paired"})
            kept.flow_matcher = self.flow_matcher.paired()
            self.__dict__["_paired"] = kept
        return kept

    def times(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> tuple:
        """``(r, t)``, each ``(n,)``: the sorted pair of two draws, ``r = t`` for a fraction of them."""
        sampler = self.flow_matcher.time_sampler
        a, b = sampler(n, generator, device, dtype), sampler(n, generator, device, dtype)
        r, t = torch.minimum(a, b), torch.maximum(a, b)
        same = _random.rand((n,), generator, device, dtype) >= self.flow_map_fraction
        return torch.where(same, t, r), t

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None = None,
        *,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
        label_dropout: float = 0.0,
        null_label: int | None = None,
    ) -> Tensor:
        """The MeanFlow loss of ``model`` on the coupled batch ``x0: (B0, ...)``, ``x1: (B1, ...)`` (scalar).

        Args:
            model: a flow map called as ``model(z, r, t)`` (``model(z, r, t, y)`` with labels) ->
                ``(B, ...)``.
            x0, x1, generator, y0, y1, label_dropout, null_label: as :meth:`otcfm.FlowMatcher.loss`.

        Raises:
            ValueError: as :meth:`otcfm.FlowMatcher.batch`; a model that fails when called as
                ``model(z, r, t)`` or returns another shape (named ``model``).
        """
        y0, y1 = _flat_labels(y0), _flat_labels(y1)
        dropped = _dropout_labels(model, y1, label_dropout, null_label)
        fm = self.flow_matcher
        x0, x1, _, j = fm._couple(x0, x1, generator, y0, y1, True)
        shape = x0.shape
        r, t = self.times(shape[0], generator, x0.device, x0.dtype)
        z, v = fm._interpolate(x0, x1, r, generator)
        y = _labels_seen(y1, j, dropped, generator)
        u, target = self.regression(model, z, r, t, v, y)
        error = (u - target).pow(2).reshape(shape[0], -1).sum(1)
        if self.adaptive_p > 0:
            error = error / (error.detach() + self.adaptive_c).pow(self.adaptive_p)
        return error.mean() / math.prod(shape[1:])

    def regression(
        self, model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, v: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(u, target)``: the model's ``u(z, r, t)`` (with the graph to its parameters) and the MeanFlow target
        ``v + (t - r) du/dr`` (detached), ``du/dr = v . grad_z u + d_r u`` from one ``torch.func.jvp``.

        Args:
            model: the flow map.
            z: ``(B, ...)`` points at times ``r``; ``r``, ``t``: ``(B,)``, ``r <= t``; ``v``: ``(B, ...)`` the
                velocity at ``(z, r)``; ``y``: labels ``(B,)`` or None.
        """

        def field(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
            return model(z_, r_, t_) if y is None else model(z_, r_, t_, y)

        try:
            u, dudr = torch.func.jvp(field, (z, r, t), (v, torch.ones_like(r), torch.zeros_like(t)))
        except Exception as error:
            if isinstance(error, ValueError) and str(error).startswith("model:"):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"model: a flow map is called as model(z, r, t){' with labels y' if y is not None else ''} on "
                f"samples of shape {tuple(z.shape)} ({first}); build it with flow_map=True (MLP, UNet)"
            ) from error
        if not isinstance(u, Tensor) or u.shape != v.shape:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"model: expected an output of shape {tuple(v.shape)}, got {got}")
        gap = (t - r).reshape((-1,) + (1,) * (v.ndim - 1))
        return u, (v + gap * dudr).detach()

    def __repr__(self) -> str:
        return (
            f"MeanFlow(coupler={self.coupler!r}, path={self.flow_matcher.path!r}, "
            f"time_sampler={self.flow_matcher.time_sampler!r}, flow_map_fraction={self.flow_map_fraction}, "
            f"adaptive_p={self.adaptive_p}, adaptive_c={self.adaptive_c})"
        )
