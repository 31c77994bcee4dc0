"""Toy distributions for flow matching, drawn on the CPU from an explicit generator.

``8gaussians`` follows TorchCFM / Tong et al. (2023): centres on a circle of radius 5 and per-coordinate std
``0.1 ** 0.25`` (TorchCFM passes ``sqrt(0.1) * I`` as a covariance). ``moons`` is not TorchCFM's: both are mapped
by ``3 x - 1``, but TorchCFM's (torchdyn's ``generate_moons(n, noise=0.2)``) puts the angles on a ``linspace`` and
adds one uniform ``[0, 0.2)`` shift to both coordinates of a sample, where ours draws the angles uniformly and adds
Gaussian noise of std 0.2 to each coordinate: a wider distribution (every sample an independent draw).
Each function returns a float32 ``(n, d)`` tensor on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from otcfm._args import check_count

__all__ = ["checkerboard", "circles", "eight_gaussians", "gaussian", "mixture", "moons", "scurve", "spirals"]

Generator = torch.Generator | None


def _rand(n: int, g: Generator, *shape: int) -> Tensor:
    return torch.rand((n, *shape), generator=g)


def _randn(n: int, g: Generator, *shape: int) -> Tensor:
    return torch.randn((n, *shape), generator=g)


def gaussian(n: int, generator: Generator = None, dim: int = 2) -> Tensor:
    """Standard normal ``N(0, I_dim)``: ``(n, dim)``."""
    return _randn(n, generator, check_count(dim, "dim"))


def mixture(n: int, generator: Generator = None, dim: int = 16, components: int = 8, radius: float = 5.0) -> Tensor:
    """A Gaussian mixture in ``dim`` dimensions: ``components`` unit-variance Gaussians at distance ``radius``.

    The centres are fixed (drawn once from ``torch.Generator().manual_seed(0)``, independent of
    ``generator``), so every call samples the same distribution: ``(n, dim)``.
    """
    dim = check_count(dim, "dim")
    directions = torch.randn(components, dim, generator=torch.Generator().manual_seed(0))
    centres = radius * directions / directions.norm(dim=1, keepdim=True)
    k = torch.randint(components, (n,), generator=generator)
    return centres[k] + _randn(n, generator, dim)


def eight_gaussians(n: int, generator: Generator = None) -> Tensor:
    """Eight Gaussians with centres ``5 (cos k pi/4, sin k pi/4)``, std ``0.1 ** 0.25``: ``(n, 2)``."""
    k = torch.randint(8, (n,), generator=generator).to(torch.float32)
    centres = 5.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return centres + 0.1**0.25 * _randn(n, generator, 2)


def moons(n: int, generator: Generator = None, noise: float = 0.2) -> Tensor:
    """Two interleaved half circles with Gaussian ``noise``, mapped by ``3 x - 1``: ``(n, 2)``."""
    angle = math.pi * _rand(n, generator)
    lower = torch.rand(n, generator=generator) < 0.5
    upper_xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower_xy = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(lower[:, None], lower_xy, upper_xy) + noise * _randn(n, generator, 2)
    return 3.0 * x - 1.0


def checkerboard(n: int, generator: Generator = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 board over ``[-4, 4]^2`` (FFJORD's): ``(n, 2)``."""
    x = 4 * _rand(n, generator) - 2
    y = _rand(n, generator) - 2 * torch.randint(2, (n,), generator=generator).to(torch.float32)
    y = y + torch.floor(x) % 2
    return 2.0 * torch.stack([x, y], dim=1)


def spirals(n: int, generator: Generator = None) -> Tensor:
    """Two interleaved spirals (FFJORD's ``2spirals``): ``(n, 2)``."""
    r = torch.sqrt(_rand(n, generator)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    xy = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) + 0.5 * _rand(n, generator, 2)
    return sign[:, None] * xy / 3 + 0.1 * _randn(n, generator, 2)


def circles(n: int, generator: Generator = None, noise: float = 0.08) -> Tensor:
    """Two concentric circles of radii 3 and 1.5 with noise (scikit-learn's ``make_circles`` x 3): ``(n, 2)``."""
    angle = 2 * math.pi * _rand(n, generator)
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, 0.5)
    x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return 3.0 * (x + noise * _randn(n, generator, 2))


def scurve(n: int, generator: Generator = None, noise: float = 0.1) -> Tensor:
    """The S curve (scikit-learn's ``make_s_curve``) seen from its side, coordinates ``(x, z)``: ``(n, 2)``.

    ``u ~ U[-3 pi / 2, 3 pi / 2]``, ``x = sin u``, ``z = sign(u) (cos u - 1)``,
    then noise; the result spans about ``[-1, 1] x [-2, 2]``.
    """
    u = 3 * math.pi * (_rand(n, generator) - 0.5)
    xz = torch.stack([torch.sin(u), torch.sign(u) * (torch.cos(u) - 1)], dim=1)
    return xz + noise * _randn(n, generator, 2)
