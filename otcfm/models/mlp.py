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
        flow_map: a flow map ``u(z, r, t)`` (:mod:`otcfm.meanflow`), called ``model(z, r, t)``: the embeddings of
            ``t`` and of ``t - r`` are concatenated to the input.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 33,
        activation: type[nn.Module] = nn.SiLU,
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(flow_map, bool):
            raise TypeError(f"flow_map: expected True or False, got {flow_map!r}")
        self.flow_map = flow_map
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
            **({"flow_map": True} if flow_map else {}),
        }
        self.time_embedding = TimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim * (2 if flow_map else 1)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, t_end: Tensor | None = None) -> Tensor:
        """Velocity at ``x: (B, ...)``, ``t: (B,)`` (a 0-d ``t`` is broadcast) -> ``(B, ...)``; a flow map is called
        ``model(z, r, t)`` (``t`` here is ``r``, ``t_end`` is ``t``) and gives the average velocity over ``[r, t]``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} features per sample, got shape {tuple(x.shape)}")
        if (t_end is None) == self.flow_map:
            expected = "model(z, r, t)" if self.flow_map else "model(x, t)"
            raise TypeError(f"t: this MLP is called as {expected}")
        times = [t] if t_end is None else [t_end, t_end - t]
        features = [flat]
        for time in times:
            time = time.expand(x.shape[0]) if time.ndim == 0 else time
            if time.shape != (x.shape[0],):
                raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(time.shape)}")
            features.append(self.time_embedding(time.to(flat.dtype)))
        return self.net(torch.cat(features, dim=1)).reshape(x.shape)
