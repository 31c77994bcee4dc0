"""A multilayer-perceptron velocity field for flattened samples, with sinusoidal time features."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from otcfm._args import check_count

__all__ = ["MLP", "TimeEmbedding"]


class TimeEmbedding(nn.Module):
    r"""Sinusoidal features of ``t``: ``[t, sin(2 pi f_k t), cos(2 pi f_k t)]``.

    Frequencies ``f_k`` are log-spaced from 1 to ``max_frequency``.

    Args:
        dim: number of features, odd (``t`` itself plus ``(dim - 1) / 2`` pairs) or even
            (one frequency fewer).
        max_frequency: highest frequency ``f_k``.
    """

    def __init__(self, dim: int = 33, max_frequency: float = 64.0) -> None:
        super().__init__()
        self.dim = check_count(dim, "dim")
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_frequency), (dim - 1) // 2))

    def forward(self, t: Tensor) -> Tensor:
        """``t: (B,)`` -> ``(B, dim)``."""
        angles = 2 * math.pi * t[:, None] * self.freqs.to(t.dtype)
        features = [t[:, None], torch.sin(angles), torch.cos(angles)]
        if self.dim % 2 == 0:
            features.append(torch.zeros_like(t)[:, None])
        return torch.cat(features, dim=1)


class MLP(nn.Module):
    """A multilayer perceptron velocity field ``v(x, t)`` for flattened samples.

    Input of any shape ``(B, ...)`` with ``prod(...) == dim`` is flattened,
    concatenated with a time embedding, mapped through ``depth`` hidden
    layers of width ``hidden``, and reshaped back to ``(B, ...)``.

    Args:
        dim: number of features of one sample (``C*H*W`` for images).
        hidden: width of the hidden layers.
        depth: number of hidden layers, ``>= 1``.
        time_dim: size of the time embedding.
        activation: activation module class.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 33,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("time_dim", time_dim)):
            check_count(value, name)
        self.dim = dim
        self.spec = {
            "kind": "mlp",
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "time_dim": time_dim,
            "activation": activation.__name__,
        }
        self.time_embedding = TimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity at ``x: (B, ...)``, ``t: (B,)`` (a 0-d ``t`` is broadcast) -> ``(B, ...)``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} features per sample, got shape {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
        h = torch.cat([flat, self.time_embedding(t.to(flat.dtype))], dim=1)
        return self.net(h).reshape(x.shape)
