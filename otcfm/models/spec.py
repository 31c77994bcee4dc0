"""What a checkpoint records of its model (:func:`model_spec`) and how the model is rebuilt (:func:`rebuild_model`).

A spec is a dict of plain values: ``{"kind": "mlp", ...}`` and ``{"kind": "unet", ...}`` hold the constructor's
arguments; any other model is ``{"kind": "user", "class": "package.module.Net"}``, which the user rebuilds.
A spec read from a file is untrusted: its size is bounded and its weights' names and shapes are checked before
anything real is allocated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from otcfm.models.mlp import MLP
from otcfm.models.unet import UNet, check_unet_options

__all__ = ["MAX_PARAMETERS", "MAX_UNET_BLOCKS", "model_spec", "rebuild_model"]

#: Largest model a checkpoint may ask for (values, not bytes); a larger spec is refused before anything is allocated.
MAX_PARAMETERS = 2_000_000_000

#: Most residual blocks a UNet spec may ask for (bounds the time spent building it, even on the meta device).
MAX_UNET_BLOCKS = 1_000


def model_spec(model: nn.Module) -> dict[str, object]:
    """What a checkpoint records to rebuild ``model``: the constructor arguments of an :class:`MLP` or
    :class:`UNet`, or the class of a user's model (``{"kind": "user", "class": "package.module.Net"}``), which
    :func:`rebuild_model` cannot rebuild."""
    spec = getattr(model, "spec", None)
    if isinstance(model, (MLP, UNet)) and isinstance(spec, dict):
        return copy.deepcopy(spec)
    cls = type(model)
    return {"kind": "user", "class": f"{cls.__module__}.{cls.__qualname__}"}


def rebuild_model(spec: dict[str, object], weights: dict[str, object] | None = None) -> nn.Module:
    """The :class:`MLP` or :class:`UNet` described by a :func:`model_spec`, freshly initialised (load the weights
    next).

    Args:
        spec: the checkpoint's model spec.
        weights: the state dict to be loaded; when given, its names and shapes are checked against the spec
            before anything real is allocated, so a tampered or mismatched file fails at once.

    Raises:
        ValueError: a user model (rebuild it yourself and pass it as ``model=``), a spec outside sane limits
            (more than :data:`MAX_PARAMETERS` parameters), or weights that do not match the spec.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"model: expected a model spec dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "mlp":
        return _rebuild_mlp(spec, weights)
    if kind == "unet":
        return _rebuild_unet(spec, weights)
    raise ValueError(
        f"model: the checkpoint holds a user model of class {spec.get('class')!r}; build one the same way and "
        "pass it as model= (its weights are then loaded into it)"
    )


def _check_weights(
    weights: object,
    count: int,
    shapes: Callable[[], dict[str, tuple[int, ...]]],
    spec: dict[str, object],
    noun: str,
) -> None:
    """``weights`` must be a state dict of ``count`` tensors with exactly the names and shapes ``shapes()`` lists
    (called only once the count matches, so a spec asking for millions of layers costs nothing)."""
    if not isinstance(weights, dict):
        raise ValueError(f"model: expected a state dict, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"model: the weights ({len(weights)} tensors) do not match the {noun} spec {spec}")
    expected = shapes()
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in weights.items()}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise ValueError(f"model: the weights do not match the {noun} spec {spec} (first mismatch: {wrong[0]})")


def _mlp_shapes(dim: int, hidden: int, depth: int, time_dim: int, times: int = 1) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"time_embedding.freqs": ((time_dim - 1) // 2,)}
    width = dim + times * time_dim
    for k in range(depth + 1):
        out = hidden if k < depth else dim
        shapes[f"net.{2 * k}.weight"], shapes[f"net.{2 * k}.bias"] = (out, width), (out,)
        width = out
    return shapes


def _rebuild_mlp(spec: dict[str, object], weights: dict[str, object] | None) -> MLP:
    dim, hidden, depth, time_dim = (spec.get(k) for k in ("dim", "hidden", "depth", "time_dim"))
    flow_map = spec.get("flow_map", False)
    if not all(isinstance(v, int) and v >= 1 for v in (dim, hidden, depth, time_dim)) or not isinstance(flow_map, bool):
        raise ValueError(f"model: invalid MLP spec {spec}")
    times = 2 if flow_map else 1
    size = (dim + times * time_dim) * hidden + (depth - 1) * hidden * hidden + hidden * dim  # type: ignore[operator]
    if size > MAX_PARAMETERS:
        raise ValueError(f"model: the MLP spec {spec} asks for {size:,} parameters, more than {MAX_PARAMETERS:,}")
    if weights is not None:
        count = 2 * (depth + 1) + 1  # type: ignore[operator]
        _check_weights(weights, count, lambda: _mlp_shapes(dim, hidden, depth, time_dim, times), spec, "MLP")  # type: ignore[arg-type]
    activation = getattr(nn, str(spec.get("activation", "SiLU")), None)
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ValueError(f"model: unknown activation {spec.get('activation')!r} in the MLP spec")
    return MLP(dim, hidden=hidden, depth=depth, time_dim=time_dim, activation=activation, flow_map=flow_map)  # type: ignore[arg-type]


def _rebuild_unet(spec: dict[str, object], weights: dict[str, object] | None) -> UNet:
    try:
        options = check_unet_options({k: v for k, v in spec.items() if k != "kind"})
    except (TypeError, ValueError) as error:
        raise ValueError(f"model: invalid UNet spec {spec} ({error})") from error
    # Cheap bounds first: building a huge spec even on the meta device would take long.
    mult, blocks, base = options["channel_mult"], options["num_res_blocks"], options["base_channels"]
    count = len(mult) * (2 * blocks + 1) + 2
    if count > MAX_UNET_BLOCKS:
        raise ValueError(
            f"model: the UNet spec {spec} asks for {count:,} residual blocks, more than {MAX_UNET_BLOCKS:,}"
        )
    emb = 4 * base
    least = (
        sum((2 * blocks + 1) * 9 * (base * m) ** 2 for m in mult)  # the last convolution of every residual block
        + 18 * options["channels"] * base * mult[0]  # input and output convolutions
        + (options["num_classes"] or 0) * emb
    )
    if least > MAX_PARAMETERS:
        raise ValueError(f"model: the UNet spec {spec} asks for more than {MAX_PARAMETERS:,} parameters")
    with torch.device("meta"):
        skeleton = UNet(**options)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"model: the UNet spec {spec} asks for {size:,} parameters, more than {MAX_PARAMETERS:,}")
    if weights is not None:
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        _check_weights(weights, len(expected), lambda: expected, spec, "UNet")
    return UNet(**options)
