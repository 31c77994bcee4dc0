r"""Probability paths: where a pair ``(x0, x1)`` sits at time ``t``, and how fast it moves.

A path maps ``(x0, x1, t, noise)`` to a :class:`PathSample` ``(x_t, u_t)``:
``x_t`` a point of the conditional path and ``u_t = d x_t / dt`` (for fixed
``noise``) the regression target of flow matching. Time runs from ``t = 0``
(source, ``x0``) to ``t = 1`` (target, ``x1``). Every path accepts any
pairing: the coupler decides the pairs, the path only interpolates.

Paths by name (:func:`get_path`): ``"linear"``, ``"gaussian"``,
``"diffusion"``, ``"cosine"``, ``"bridge"``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from otcfm._args import check_options, check_rate
from otcfm._checks import check_choice, check_finite, check_pair, check_time

__all__ = [
    "PATHS",
    "BridgePath",
    "CosinePath",
    "DiffusionPath",
    "GaussianPath",
    "LinearPath",
    "Path",
    "PathSample",
    "get_path",
]

_TINY = 1e-12  # floor of variances that vanish at an end point, to keep u_t finite


class PathSample(NamedTuple):
    """A point on a conditional path and its velocity.

    Attributes:
        x_t: ``(B, ...)`` position at time ``t``.
        u_t: ``(B, ...)`` conditional velocity ``d x_t / dt``.
    """

    x_t: Tensor
    u_t: Tensor


class Path(ABC):
    """Base class of probability paths.

    Subclasses implement :meth:`interpolate` on inputs whose ``t`` has been
    reshaped to ``(B, 1, ..., 1)``; calling the path validates and reshapes.
    :class:`~otcfm.FlowMatcher` calls :meth:`interpolate` itself, on inputs its
    coupler has checked and times it drew.
    """

    name: str = ""
    #: Whether the path adds Gaussian noise, so callers must pass ``noise``.
    needs_noise: bool = False
    #: Whether the path assumes a standard normal source ``x0``.
    gaussian_source: bool = False

    @property
    def entropic_epsilon(self) -> float | None:
        """The absolute epsilon of the entropic OT coupling this path is made for, or None (any coupling).

        :class:`~otcfm.FlowMatcher` gives ``coupler="sinkhorn"`` this epsilon (in cost units) and warns
        when a Sinkhorn instance uses another. Only :class:`BridgePath` has one: ``2 sigma^2``.
        """
        return None

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None = None) -> PathSample:
        """Evaluate the path.

        Args:
            x0: source samples, ``(B, ...)``.
            x1: target samples, ``(B, ...)``, paired with ``x0`` row by row.
            t: times in ``[0, 1]``, ``(B,)``.
            noise: standard normal, ``(B, ...)``; required when :attr:`needs_noise`.

        Returns:
            ``PathSample(x_t, u_t)``, each ``(B, ...)``.

        Raises:
            ValueError: shapes disagree, ``t`` outside ``[0, 1]``, missing noise.
        """
        x0, x1 = check_pair(x0, x1, same_batch=True)
        t = check_time(t, x0.shape[0])
        if self.needs_noise:
            if noise is None:
                raise ValueError(f"noise: the {self.name!r} path needs a standard normal tensor shaped like x0")
            if not isinstance(noise, Tensor) or noise.shape != x0.shape or noise.dtype != x0.dtype:
                got = f"{tuple(noise.shape)} {noise.dtype}" if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(f"noise: expected a tensor of shape {tuple(x0.shape)} and dtype {x0.dtype}, got {got}")
            check_finite(noise, "noise")
        t = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return self.interpolate(x0, x1, t, noise)

    @abstractmethod
    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        """Compute ``(x_t, u_t)`` with ``t`` of shape ``(B, 1, ..., 1)``."""

    def check_source(self, x0: Tensor) -> None:
        """Warn if ``x0`` is clearly not standard normal where the path assumes it.

        A cheap test on the batch's overall mean and standard deviation: it
        catches a wrong source (e.g. 8gaussians), not a subtly wrong one.
        :class:`~otcfm.FlowMatcher` runs it on its first batch only.
        """
        if not self.gaussian_source or x0.numel() < 32:
            return
        std, mean = (float(v) for v in torch.std_mean(x0))
        if abs(mean) > 0.5 or abs(std - 1.0) > 0.5:
            warnings.warn(
                f"x0: the {self.name!r} path assumes a standard normal source, but this batch has "
                f"mean {mean:.3g} and std {std:.3g}; use path='linear' for other sources",
                UserWarning,
                stacklevel=3,
            )


@dataclass(frozen=True)
class _ConstantNoisePath(Path):
    """A path with constant Gaussian noise ``sigma * eps`` added to ``x_t`` (none when ``sigma = 0``)."""

    sigma: float = 0.0

    def __post_init__(self) -> None:
        _check_nonneg(self.sigma, "sigma")

    @property
    def needs_noise(self) -> bool:  # type: ignore[override]
        return self.sigma > 0


@dataclass(frozen=True)
class LinearPath(_ConstantNoisePath):
    r"""Straight conditional path (CondOT; rectified flow when ``sigma = 0``).

    .. math::
        x_t = t x_1 + (1 - t) x_0 + \sigma \epsilon, \qquad u_t = x_1 - x_0.

    Args:
        sigma: constant noise level, ``>= 0``.
    """

    name = "linear"

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        x_t = torch.lerp(x0, x1, t)  # t x1 + (1 - t) x0 in one pass, exact at both ends
        if self.sigma > 0:
            x_t = x_t + self.sigma * noise
        return PathSample(x_t, x1 - x0)


@dataclass(frozen=True)
class GaussianPath(Path):
    r"""Lipman et al. (2023) OT Gaussian path; ``x0`` is the standard normal noise.

    .. math::
        \mu_t = t x_1,\quad \sigma_t = 1 - (1 - \sigma_{min}) t,\qquad
        x_t = \mu_t + \sigma_t x_0,\quad u_t = x_1 - (1 - \sigma_{min}) x_0.

    The source must be ``N(0, I)``; a clearly different batch triggers a warning.

    Args:
        sigma_min: width of the path at ``t = 1``, ``>= 0``.
    """

    sigma_min: float = 1e-4
    name = "gaussian"
    gaussian_source = True

    def __post_init__(self) -> None:
        _check_nonneg(self.sigma_min, "sigma_min")
        if self.sigma_min > 1:
            raise ValueError(f"sigma_min: expected a width in [0, 1] (the path's width at t = 1), got {self.sigma_min}")

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        shrink = 1.0 - self.sigma_min
        return PathSample(t * x1 + (1 - shrink * t) * x0, x1 - shrink * x0)


@dataclass(frozen=True)
class DiffusionPath(Path):
    r"""Lipman et al. (2023) variance-preserving diffusion path ("FM-Diffusion").

    With :math:`\beta(s) = \beta_{min} + s(\beta_{max} - \beta_{min})`,
    :math:`T(s) = \int_0^s \beta`, :math:`\alpha(s) = e^{-T(s)/2}` and
    :math:`a_t = \alpha(1 - t)`:

    .. math::
        x_t = a_t x_1 + \sqrt{1 - a_t^2}\, x_0,\qquad
        u_t = \tfrac12 \beta(1-t)\, a_t \Big(x_1 - \frac{a_t}{\sqrt{1 - a_t^2}} x_0\Big).

    ``x0`` is the standard normal noise. At ``t = 0``, ``a_0 = e^{-T(1)/2}``
    (about 0.0066 with the defaults), so ``x_0`` is noise up to that fraction
    of ``x1``; at ``t = 1`` the path reaches ``x1`` and ``u_t`` grows like
    ``(1 - t)^{-1/2}`` (the variance is floored at 1e-12 to stay finite).

    Args:
        beta_min: noise rate at the data end.
        beta_max: noise rate at the noise end.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "diffusion"
    gaussian_source = True

    def __post_init__(self) -> None:
        check_rate(self.beta_min, "beta_min")
        check_rate(self.beta_max, "beta_max")
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(
                f"beta_min, beta_max: expected 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}"
            )

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        s = 1 - t
        integral = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        a = torch.exp(-0.5 * integral)
        std = torch.sqrt((1 - a**2).clamp_min(_TINY))
        beta = self.beta_min + s * (self.beta_max - self.beta_min)
        x_t = a * x1 + std * x0
        u_t = 0.5 * beta * a * (x1 - (a / std) * x0)
        return PathSample(x_t, u_t)


@dataclass(frozen=True)
class CosinePath(_ConstantNoisePath):
    r"""Variance-preserving (trigonometric) interpolation, VP-CFM.

    .. math::
        x_t = \cos(\tfrac{\pi t}{2}) x_0 + \sin(\tfrac{\pi t}{2}) x_1 + \sigma\epsilon,\qquad
        u_t = \tfrac{\pi}{2}\big(\cos(\tfrac{\pi t}{2}) x_1 - \sin(\tfrac{\pi t}{2}) x_0\big).

    Args:
        sigma: constant noise level, ``>= 0``.
    """

    name = "cosine"

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        c, s = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        x_t = c * x0 + s * x1
        if self.sigma > 0:
            x_t = x_t + self.sigma * noise
        return PathSample(x_t, 0.5 * math.pi * (c * x1 - s * x0))


@dataclass(frozen=True)
class BridgePath(Path):
    r"""Brownian bridge between the pair: the Schroedinger-bridge path (SB-CFM).

    .. math::
        x_t = t x_1 + (1 - t) x_0 + \sigma\sqrt{t(1-t)}\,\epsilon,\qquad
        u_t = x_1 - x_0 + \frac{1 - 2t}{2\sqrt{t(1-t)}}\,\sigma\epsilon.

    ``u_t`` is the derivative of ``x_t`` for fixed ``epsilon``; it equals
    Tong et al.'s ``x1 - x0 + (1-2t)/(2t(1-t)) (x_t - mu_t)``. ``t(1-t)`` is
    floored at 1e-12 so ``u_t`` stays finite at the end points.

    Paired by entropic OT at the absolute ``epsilon = 2 sigma^2`` (squared
    Euclidean cost), the pairs are those of the static Schroedinger bridge
    between the batches for Brownian motion of diffusion ``sigma``, and this
    path its bridge (Tong et al. 2023, SB-CFM): :attr:`entropic_epsilon`.
    ``FlowMatcher.schrodinger_bridge(sigma)`` builds that pair of pieces.

    Args:
        sigma: diffusion level, ``> 0``.
    """

    sigma: float = 1.0
    name = "bridge"
    needs_noise = True

    def __post_init__(self) -> None:
        check_rate(self.sigma, "sigma")
        if not 0 < 2.0 * self.sigma * self.sigma < math.inf:
            raise ValueError(
                f"sigma: the bridge's epsilon 2 sigma^2 must be a positive float, got sigma = {self.sigma}"
            )

    @property
    def entropic_epsilon(self) -> float:
        """``2 sigma^2``: the Schroedinger bridge's entropic regularisation, in cost units."""
        return 2.0 * self.sigma**2

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None) -> PathSample:
        root = torch.sqrt((t * (1 - t)).clamp_min(_TINY))
        x_t = torch.lerp(x0, x1, t) + self.sigma * root * noise
        u_t = x1 - x0 + self.sigma * (1 - 2 * t) / (2 * root) * noise
        return PathSample(x_t, u_t)


def _check_nonneg(value: float, name: str) -> None:
    check_rate(value, name, allow_zero=True)


#: Registered paths by name, each with the keyword its ``sigma`` maps to (None: no sigma).
PATHS: dict[str, tuple[type[Path], str | None]] = {
    "linear": (LinearPath, "sigma"),
    "gaussian": (GaussianPath, "sigma_min"),
    "diffusion": (DiffusionPath, None),
    "cosine": (CosinePath, "sigma"),
    "bridge": (BridgePath, "sigma"),
}


def get_path(path: str | Path, sigma: float | None = None, **options: Any) -> Path:
    """Return a path from a registered name or pass an instance through (as :func:`otcfm.get_coupler`).

    Args:
        path: a name in :data:`PATHS` or a :class:`Path` instance.
        sigma: the path's noise parameter (``sigma`` of linear/cosine/bridge,
            ``sigma_min`` of gaussian); the path's default when None.
        **options: other keyword arguments of the named path's constructor
            (``get_path("diffusion", beta_max=20)``).

    Raises:
        ValueError: unknown name (lists the valid ones), ``sigma`` for a path
            without one, ``sigma`` or options together with an instance, invalid values.
        TypeError: neither a string nor a Path, or an unknown option (named, with the valid ones).
    """
    if isinstance(path, Path):
        if sigma is not None:
            raise ValueError("sigma: set it on the path instance, not beside it")
        if options:
            raise ValueError(f"path: options {sorted(options)} apply to a name, not to an instance")
        return path
    if not isinstance(path, str):
        raise TypeError(f"path: expected a name or a Path instance, got {type(path).__name__}")
    check_choice(path, PATHS, "path")
    cls, keyword = PATHS[path]
    if sigma is not None:
        if keyword is None:
            raise ValueError(f"sigma: the {path!r} path has no sigma parameter; leave sigma=None")
        if keyword in options:
            raise ValueError(f"sigma: given twice, as sigma and as the option {keyword!r}")
        options = {**options, keyword: sigma}
    return cls(**check_options(cls, options, "path"))
