r"""FlowMatcher: the one object a training loop holds (coupler -> path -> loss).

.. math::
    \mathcal{L}(\theta) = \mathbb{E}_{(x_0, x_1) \sim \pi,\ t,\ \epsilon}
        \big\| v_\theta(x_t, t) - u_t(x_t \mid x_0, x_1) \big\|^2

where ``pi`` is the minibatch coupling chosen by the coupler, ``t`` comes
from the time sampler and ``(x_t, u_t)`` from the probability path.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from otcfm import _checks, _random
from otcfm.couplers import Coupler, get_coupler
from otcfm.guidance import null_label_of
from otcfm.paths import BridgePath, Path, get_path
from otcfm.timesteps import TimeSampler, get_time_sampler

__all__ = ["BridgeEpsilonWarning", "FlowBatch", "FlowMatcher"]


class BridgeEpsilonWarning(UserWarning):
    """An entropic coupler's epsilon is not the one its path is made for (the Schroedinger bridge's ``2 sigma^2``)."""


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
        coupler: a coupler name (``"independent"``, ``"exact"``, ``"hungarian"``, ``"sinkhorn"``,
            ``"paired"``) or instance.
        path: a path name (``"linear"``, ``"gaussian"``, ``"diffusion"``,
            ``"cosine"``, ``"bridge"``) or instance.
        sigma: the path's noise parameter; the path's default when None.
        time_sampler: ``"uniform"``, ``"logit_normal"``, ``"u_shaped"`` or a callable
            ``(n, generator, device, dtype) -> (n,)`` (whose draws are then checked).

    The Schroedinger bridge: a path that is made for entropic OT at a given
    epsilon declares it (:attr:`otcfm.paths.Path.entropic_epsilon`; the
    ``"bridge"`` path of diffusion ``sigma``: ``2 sigma^2``, in cost units).
    With such a path, ``coupler="sinkhorn"`` means Sinkhorn at exactly that
    absolute epsilon, so ``FlowMatcher(coupler="sinkhorn", path="bridge",
    sigma=s)`` is SB-CFM, as is :meth:`schrodinger_bridge`; a Sinkhorn
    instance at another epsilon (or a relative one) is used as given, with a
    :class:`BridgeEpsilonWarning`.

    Validation: each step checks its inputs once, in the coupler's public
    call (see :mod:`otcfm._checks` for how that avoids GPU synchronisation);
    a path that assumes a standard normal source looks at the first batch.

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
        epsilon = self.path.entropic_epsilon
        if coupler == "sinkhorn" and epsilon is not None:
            coupler = get_coupler("sinkhorn", epsilon=epsilon, relative=False)
        self.coupler = get_coupler(coupler)
        self.time_sampler = get_time_sampler(time_sampler)
        self._check_source = self.path.gaussian_source  # on the first batch only
        self._needs_noise = self.path.needs_noise  # paths are frozen: read once, not per step
        if epsilon is not None:
            _warn_on_other_epsilon(self.coupler, self.path, epsilon)

    @classmethod
    def schrodinger_bridge(
        cls, sigma: float = 1.0, time_sampler: str | TimeSampler = "uniform", **sinkhorn_options: Any
    ) -> FlowMatcher:
        r"""SB-CFM (Tong et al. 2023): the Brownian bridge of diffusion ``sigma`` with Sinkhorn at ``2 sigma^2``.

        Entropic OT with the squared Euclidean cost at the absolute
        ``epsilon = 2 sigma^2`` pairs the batches as the static Schroedinger
        bridge of Brownian motion ``sigma W`` does, and
        :class:`~otcfm.paths.BridgePath` interpolates each pair by that
        motion's bridge. The same as ``FlowMatcher(coupler="sinkhorn",
        path="bridge", sigma=sigma)``.

        Args:
            sigma: diffusion level, ``> 0``.
            time_sampler: as in :class:`FlowMatcher`.
            **sinkhorn_options: other options of :class:`~otcfm.couplers.SinkhornCoupler`
                (``tol``, ``max_iter``, ``label_weight``, ...); not ``epsilon`` or ``relative``.

        Raises:
            ValueError: ``sigma <= 0``.
            TypeError: ``epsilon`` or ``relative`` among the options.
        """
        path = BridgePath(sigma)
        for fixed in ("epsilon", "relative"):
            if fixed in sinkhorn_options:
                raise TypeError(f"{fixed}: the Schroedinger bridge fixes it (absolute epsilon = 2 sigma^2)")
        coupler = get_coupler("sinkhorn", epsilon=path.entropic_epsilon, relative=False, **sinkhorn_options)
        return cls(coupler=coupler, path=path, time_sampler=time_sampler)

    def paired(self) -> FlowMatcher:
        """This flow matcher's path and time sampler on pairs kept as given (``coupler="paired"``): for batches
        that are coupled already (OT pools, a global coupling, Reflow's pairs)."""
        kept = self.__dict__.get("_paired")
        if kept is None:
            kept = self.__dict__["_paired"] = FlowMatcher(
                coupler="paired", path=self.path, time_sampler=self.time_sampler
            )
        return kept

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
            ValueError: mismatched sample shapes, empty batches, NaN/Inf (on CUDA NaN/Inf are not read on the
                host: they reach ``x_t`` and ``u_t``, see :mod:`otcfm._checks`).
        """
        return FlowBatch(*self._batch(x0, x1, generator, y0, y1, True))

    def _batch(
        self,
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None,
        y0: Tensor | None,
        y1: Tensor | None,
        finite: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(t, x_t, u_t, i, j)``; ``finite``: whether the coupler scans ``x0`` and ``x1`` for NaN/Inf."""
        x0, x1, i, j = self._couple(x0, x1, generator, y0, y1, finite)
        t = self.time_sampler(x0.shape[0], generator, x0.device, x0.dtype)
        x_t, u_t = self._interpolate(x0, x1, t, generator)
        return t, x_t, u_t, i, j

    def _couple(
        self,
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None,
        y0: Tensor | None,
        y1: Tensor | None,
        finite: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x0[i], x1[j], i, j)``: the pairs of the coupler (whose call is the one check of the inputs); a path
        that assumes a standard normal source looks at the first batch."""
        coupler = self.coupler
        i, j = coupler(x0, x1, y0=y0, y1=y1, generator=generator, finite=finite)
        if self._check_source:
            self._check_source = False
            self.path.check_source(x0)
        if not coupler.sources_in_order:
            x0 = x0.index_select(0, i)
        if not coupler.targets_in_order:
            x1 = x1.index_select(0, j)
        return x0, x1, i, j

    def _interpolate(
        self, x0: Tensor, x1: Tensor, t: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``(x_t, u_t)`` of the paired ``x0``, ``x1: (B, ...)`` at ``t: (B,)`` (the path's noise drawn here)."""
        shape, device, dtype = x0.shape, x0.device, x0.dtype
        noise = _random.randn(tuple(shape), generator, device, dtype) if self._needs_noise else None
        shaped = t if t.dtype == dtype else t.to(dtype)
        # (B, 1, ..., 1); view(-1, 1), the common case, spelled out (cheaper than a tuple argument)
        shaped = shaped.view(-1, 1) if len(shape) == 2 else shaped.reshape((-1,) + (1,) * (len(shape) - 1))
        return self.path.interpolate(x0, x1, shaped, noise)

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
        """Flow-matching loss: mean squared error of ``model(x_t, t)`` against ``u_t``.

        On the CPU, ``x0`` and ``x1`` are not scanned for NaN/Inf up front: the loss is NaN/Inf when
        a sample the step uses is, and reading it costs nothing there, so they are scanned (and
        named in the error) only then. On CUDA the scans are queued (see :mod:`otcfm._checks`).

        Args:
            model: velocity field called as ``model(x: (B, ...), t: (B,)) -> (B, ...)``;
                with target labels, as ``model(x, t, y)`` where ``y = y1[j]`` are the pairs' labels.
            x0: source batch, ``(B0, ...)``.
            x1: target batch, ``(B1, ...)``.
            generator: randomness of the coupling, ``t`` and noise.
            y0, y1: optional labels or conditions (see :meth:`batch`); integer labels ``(B, 1)`` count as ``(B,)``.
            label_dropout: for classifier-free guidance (:mod:`otcfm.guidance`): the fraction of pairs whose
                label the model sees as ``null_label`` ("no class"), drawn from ``generator`` for each pair; the
                coupling still pairs within the true labels.
            null_label: the "no class" label; default the model's ``null_label`` attribute
                (:class:`otcfm.models.UNet` has one).

        Returns:
            scalar tensor (mean over batch and dimensions).

        Raises:
            ValueError: as :meth:`batch` (NaN/Inf in the samples the step uses), a model output of the
                wrong shape, or a model that fails on ``x0`` and ``x1`` of another dtype than its parameters
                (a float64 batch for a float32 model; the message names both dtypes).
        """
        read_loss = isinstance(x0, Tensor) and _checks.host_reads_free(x0)
        y0, y1 = _flat_labels(y0), _flat_labels(y1)
        dropped = _dropout_labels(model, y1, label_dropout, null_label)
        t, x_t, u_t, _, j = self._batch(x0, x1, generator, y0, y1, not read_loss)
        y = _labels_seen(y1, j, dropped, generator)
        try:
            v = model(x_t, t) if y is None else model(x_t, t, y)
        except Exception:  # nothing to pay on the good path; named only where the dtypes or the signature differ
            _checks.explain_dtype(model, x_t, "x0 and x1")
            _checks.explain_time_first(model, x_t, t, y)
            raise
        if isinstance(v, Tensor) and v.shape != u_t.shape:
            _checks.explain_time_first(model, x_t, t, y)
        if not isinstance(v, Tensor) or v.shape != u_t.shape or not v.is_floating_point():
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise (ValueError if isinstance(v, Tensor) else TypeError)(
                f"model: expected a floating-point output of shape {tuple(u_t.shape)}, got {got}"
            )
        loss = F.mse_loss(v, u_t)
        message = "model: the loss is NaN or Inf with finite x0 and x1: the model returned NaN/Inf, or values overflow"
        if read_loss and not math.isfinite(loss.item()):  # on CUDA the engine reads the losses in batches
            _checks.check_pair(x0, x1)  # names x0 or x1 if the NaN/Inf came from them
            raise ValueError(message)
        return loss

    def __repr__(self) -> str:
        return f"FlowMatcher(coupler={self.coupler!r}, path={self.path!r}, time_sampler={self.time_sampler!r})"


def _flat_labels(y: Tensor | None) -> Tensor | None:
    """Integer labels ``(B, 1)`` as ``(B,)``; anything else as given (the coupler checks it)."""
    if isinstance(y, Tensor) and y.ndim == 2 and y.shape[1] == 1 and not y.is_floating_point():
        return y.reshape(-1)
    return y


def _labels_seen(
    y1: Tensor | None, j: Tensor, dropped: tuple[float, Tensor] | None, generator: torch.Generator | None
) -> Tensor | None:
    """The labels the model sees: the pairs' ``y1[j]``, each replaced by the null label with probability
    ``dropped[0]`` (drawn from ``generator``; :func:`_dropout_labels`)."""
    y = None if y1 is None else y1[j]
    if dropped is not None and y is not None:
        keep = _random.rand((y.shape[0],), generator, y.device, torch.float32) >= dropped[0]
        y = torch.where(keep, y, dropped[1])
    return y


def _dropout_labels(
    model: Callable[..., Tensor], y1: Tensor | None, rate: float, null_label: int | None
) -> tuple[float, Tensor] | None:
    """``(rate, null label as a tensor)`` when labels are dropped, None when ``rate`` is 0."""
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_dropout: expected a number in [0, 1], got {rate!r}")
    if rate == 0.0:
        return None
    if y1 is None or y1.is_floating_point():
        raise ValueError("label_dropout: drops integer class labels y1; none were given")
    null = null_label_of(model, null_label)
    if null is None:
        raise ValueError(
            "null_label: label_dropout replaces labels by a 'no class' label; pass null_label= or give the model a "
            "null_label attribute (otcfm.models.UNet(num_classes=K) has null_label = K)"
        )
    return float(rate), torch.tensor(null, dtype=y1.dtype, device=y1.device)


def _warn_on_other_epsilon(coupler: Coupler, path: Path, epsilon: float) -> None:
    """Warn when an entropic coupler regularises at another epsilon than the one ``path`` is made for."""
    entropic = coupler.entropic_epsilon()
    if entropic is None:
        return
    value, relative = entropic
    if not relative and math.isclose(value, epsilon, rel_tol=1e-9):
        return
    given = f"epsilon={value:g} relative to the mean cost" if relative else f"the absolute epsilon {value:g}"
    warnings.warn(
        f"coupler: {coupler!r} regularises at {given}, but the path {path!r} is the Schroedinger "
        f"bridge only with the absolute epsilon 2 sigma^2 = {epsilon:g}; use FlowMatcher.schrodinger_bridge(sigma), "
        f"coupler='sinkhorn', or SinkhornCoupler(epsilon={epsilon:g}, relative=False), or silence "
        "otcfm.flow.BridgeEpsilonWarning if the other epsilon is meant",
        BridgeEpsilonWarning,
        stacklevel=3,
    )
