"""Velocity models called as ``model(x, t)`` with ``x: (B, ...)`` and ``t: (B,)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from otcfm._args import check_count

__all__ = ["MLP", "TimeEmbedding", "model_spec", "rebuild_model"]


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
        if dim < 1:
            raise ValueError(f"dim: expected >= 1, got {dim}")
        self.dim = dim
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


#: Largest MLP a checkpoint may ask for (values, not bytes); a larger spec is refused before anything is allocated.
MAX_PARAMETERS = 2_000_000_000


def model_spec(model: nn.Module) -> dict[str, object]:
    """What a checkpoint records to rebuild ``model``: the MLP's constructor arguments, or the class of a user's
    model (``{"kind": "user", "class": "package.module.Net"}``), which :func:`rebuild_model` cannot rebuild."""
    spec = getattr(model, "spec", None)
    if isinstance(model, MLP) and isinstance(spec, dict):
        return dict(spec)
    cls = type(model)
    return {"kind": "user", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _expected_shapes(dim: int, hidden: int, depth: int, time_dim: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"time_embedding.freqs": ((time_dim - 1) // 2,)}
    width = dim + time_dim
    for k in range(depth + 1):
        out = hidden if k < depth else dim
        shapes[f"net.{2 * k}.weight"], shapes[f"net.{2 * k}.bias"] = (out, width), (out,)
        width = out
    return shapes


def rebuild_model(spec: dict[str, object], weights: dict[str, object] | None = None) -> MLP:
    """The MLP described by a :func:`model_spec`, freshly initialised (load the weights next).

    Args:
        spec: the checkpoint's model spec.
        weights: the state dict to be loaded; when given, its names and shapes are checked against the spec
            before anything is allocated, so a tampered or mismatched file fails at once.

    Raises:
        ValueError: a user model (rebuild it yourself and pass it as ``model=``), a spec outside sane limits, or
            weights that do not match the spec.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"model: expected a model spec dict, got {type(spec).__name__}")
    if spec.get("kind") != "mlp":
        raise ValueError(
            f"model: the checkpoint holds a user model of class {spec.get('class')!r}; build one the same way and "
            "pass it as model= (its weights are then loaded into it)"
        )
    dim, hidden, depth, time_dim = (spec.get(k) for k in ("dim", "hidden", "depth", "time_dim"))
    if not all(isinstance(v, int) and v >= 1 for v in (dim, hidden, depth, time_dim)):
        raise ValueError(f"model: invalid MLP spec {spec}")
    size = (dim + time_dim) * hidden + (depth - 1) * hidden * hidden + hidden * dim  # type: ignore[operator]
    if size > MAX_PARAMETERS:
        raise ValueError(f"model: the MLP spec {spec} asks for {size:,} parameters, more than {MAX_PARAMETERS:,}")
    if weights is not None:
        if not isinstance(weights, dict):
            raise ValueError(f"model: expected a state dict, got {type(weights).__name__}")
        if len(weights) != 2 * (depth + 1) + 1:  # type: ignore[operator]
            raise ValueError(f"model: the weights ({len(weights)} tensors) do not match the MLP spec {spec}")
        expected = _expected_shapes(dim, hidden, depth, time_dim)  # type: ignore[arg-type]
        found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in weights.items()}
        if found != expected:
            wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
            raise ValueError(f"model: the weights do not match the MLP spec {spec} (first mismatch: {wrong[0]})")
    activation = getattr(nn, str(spec.get("activation", "SiLU")), None)
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ValueError(f"model: unknown activation {spec.get('activation')!r} in the MLP spec")
    return MLP(dim, hidden=hidden, depth=depth, time_dim=time_dim, activation=activation)  # type: ignore[arg-type]
