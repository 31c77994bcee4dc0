r"""A compact UNet velocity field for images, in the style of DDPM / ADM (Ho et al. 2020; Dhariwal & Nichol 2021).

Called as ``model(x, t)`` or ``model(x, t, y)`` with ``x: (N, C, H, W)``, ``t: (N,)`` in ``[0, 1]`` and class labels
``y: (N,)``; returns a velocity of the shape of ``x``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otcfm._args import check_count

__all__ = ["UNET_PRESETS", "UNet", "check_unet_options", "unet"]

#: Named sizes for :func:`unet`; ``channels`` and ``image_size`` come from the sample shape.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # 1x28x28 on a few CPU cores: 28 -> 14 -> 7, no attention.
    "mnist": {"base_channels": 16, "channel_mult": (1, 1, 2), "num_res_blocks": 1},
    # TorchCFM's CIFAR-10 example: 3x32x32, attention at 16x16.
    "cifar10": {
        "base_channels": 128,
        "channel_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attention_resolutions": (16,),
        "num_heads": 4,
        "dropout": 0.1,
    },
    # scikit-learn's 1x8x8 digits: 8 -> 4.
    "digits": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1},
}

_DEFAULTS: dict[str, Any] = {
    "channels": 1,
    "image_size": 28,
    "base_channels": 32,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (),
    "dropout": 0.0,
    "num_classes": None,
    "num_heads": 4,
    "flow_map": False,
}


def _count_tuple(value: Any, name: str, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a tuple of positive integers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name}: expected at least one positive integer, got {value!r}")
    return tuple(check_count(v, f"{name}[{i}]") for i, v in enumerate(value))


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        side = check_count(value, "image_size")
        return side, side
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2:
        height, width = _count_tuple(value, "image_size")
        return height, width
    raise TypeError(f"image_size: expected a positive integer or a pair (H, W), got {value!r}")


def check_unet_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`UNet` constructor's arguments, defaults filled in, checked and normalised (tuples of ints).

    Raises:
        TypeError: an unknown argument or a value of the wrong type.
        ValueError: a value out of range: a count below 1, ``dropout`` outside ``[0, 1)``, an ``image_size`` not
            divisible by ``2 ** (len(channel_mult) - 1)``, an attention resolution the model never reaches, or
            attention channels not divisible by ``num_heads``.
    """
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown UNet argument(s) {', '.join(map(repr, unknown))}; valid: {', '.join(_DEFAULTS)}")
    o = {**_DEFAULTS, **options}
    checked: dict[str, Any] = {
        "channels": check_count(o["channels"], "channels"),
        "image_size": _image_size(o["image_size"]),
        "base_channels": check_count(o["base_channels"], "base_channels"),
        "channel_mult": _count_tuple(o["channel_mult"], "channel_mult"),
        "num_res_blocks": check_count(o["num_res_blocks"], "num_res_blocks"),
        "attention_resolutions": _count_tuple(o["attention_resolutions"], "attention_resolutions", allow_empty=True),
        "num_heads": check_count(o["num_heads"], "num_heads"),
    }
    if not isinstance(o["flow_map"], bool):
        raise TypeError(f"flow_map: expected True or False, got {o['flow_map']!r}")
    checked["flow_map"] = o["flow_map"]
    dropout = o["dropout"]
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    checked["dropout"] = float(dropout)
    num_classes = o["num_classes"]
    if num_classes is not None and (
        not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ValueError(f"num_classes: expected an integer >= 1 or None, got {num_classes!r}")
    checked["num_classes"] = None if num_classes is None else int(num_classes)

    height, width = checked["image_size"]
    factor = 2 ** (len(checked["channel_mult"]) - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"image_size: {height}x{width} must be divisible by 2 ** (len(channel_mult) - 1) = {factor} "
            f"for {len(checked['channel_mult'])} levels; use fewer levels or pad the images"
        )
    reached = [min(height, width) // 2**level for level in range(len(checked["channel_mult"]))]
    for resolution in checked["attention_resolutions"]:
        if resolution not in reached:
            raise ValueError(
                f"attention_resolutions: the model never reaches resolution {resolution}; its levels are at "
                f"{', '.join(map(str, reached))} pixels"
            )
    heads = checked["num_heads"]
    for level, mult in enumerate(checked["channel_mult"]):
        attended = reached[level] in checked["attention_resolutions"]
        middle = level == len(reached) - 1 and checked["attention_resolutions"]
        width_here = checked["base_channels"] * mult
        if (attended or middle) and width_here % heads:
            raise ValueError(
                f"num_heads: {heads} heads do not divide the {width_here} channels of the attention at level "
                f"{level} (base_channels * channel_mult[{level}])"
            )
    return checked


def _groups(channels: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides ``channels`` into groups of at least 4 channels (1 group
    below 8 channels): a group of one channel would be instance normalisation, which erases each channel's mean."""
    return next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 4), 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


def _zeroed(module: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def timestep_features(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    r"""Sinusoidal features of ``s = 1000 t`` as in DDPM: ``[cos(s f_k), sin(s f_k)]``, ``f_k = P^{-k / (dim/2)}``.

    Args:
        t: ``(N,)`` times in ``[0, 1]``.
        dim: number of features (an odd ``dim`` gets a zero column last).
        max_period: ``P``, the longest period in units of ``s``.

    Returns:
        ``(N, dim)`` float32 features.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=t.device))
    angles = 1000.0 * t.to(torch.float32)[:, None] * freqs
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(features, (0, 1)) if dim % 2 else features


class ResBlock(nn.Module):
    r"""``h = conv(SiLU(GN(x)))``, ``out = skip(x) + conv_0(drop(SiLU(GN(h) (1 + s) + b)))`` with ``(s, b) = W e``
    (ADM's scale-shift norm: the embedding acts after the normalisation, which would remove a shift added before
    it); ``conv_0`` starts at zero.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of the output.
        emb_dim: size of the (already SiLU-activated) embedding ``e``.
        dropout: dropout rate before the last convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: (N, in_channels, H, W)``, ``emb: (N, emb_dim)`` -> ``(N, out_channels, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class Attention(nn.Module):
    r"""Self-attention over the pixels: ``x + P softmax(Q K^T / sqrt(d)) V`` of ``GN(x)``, ``heads`` heads.

    ``P`` (the output projection) starts at zero, so a fresh block is the identity.

    Args:
        channels: channels of ``x``, divisible by ``heads``.
        heads: number of attention heads, each of ``channels / heads`` dimensions.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zeroed(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (N, C, H, W)`` -> ``(N, C, H, W)``."""
        n, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (N, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(n, c, height, width))


class _Block(nn.Module):
    """A residual block, followed by self-attention where the level has it."""

    def __init__(self, res: ResBlock, attention: Attention | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return h if self.attention is None else self.attention(h)


class _Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """The blocks at one resolution, then the change of resolution (none at the last level)."""

    def __init__(self, blocks: list[_Block], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    r"""A UNet velocity field ``v(x, t, y)`` for images ``x: (N, C, H, W)``.

    ``levels = len(channel_mult)`` resolutions, ``image_size / 2^l`` at level ``l`` with ``base_channels *
    channel_mult[l]`` channels; ``num_res_blocks`` residual blocks per level in the encoder, one more in the
    decoder (which takes the encoder's outputs through skip connections), a middle of residual, attention,
    residual blocks (no attention when ``attention_resolutions`` is empty). Downsampling by a strided 3x3
    convolution, upsampling by nearest neighbour and a 3x3 convolution. Time enters as sinusoidal features of
    ``1000 t`` mapped by an MLP to ``emb = 4 * base_channels`` features, plus a class embedding when
    ``num_classes`` is set. The last convolution of each residual block, each attention projection and the output
    convolution start at zero, so a fresh model returns 0.

    Args:
        channels: ``C``, channels of the images.
        image_size: ``H == W``, or a pair ``(H, W)``; divisible by ``2 ** (levels - 1)``.
        base_channels: channels of the first level.
        channel_mult: channel multipliers, one per level.
        num_res_blocks: residual blocks per level (encoder).
        attention_resolutions: resolutions in pixels (the shorter side of a level's feature map) after whose
            residual blocks a self-attention block follows, e.g. ``(16,)`` at 32x32.
        dropout: dropout rate in the residual blocks, in ``[0, 1)``.
        num_classes: ``K`` for class-conditional models: labels ``0..K-1`` and ``K``, "no class"
            (:attr:`null_label`); None for an unconditional model.
        num_heads: attention heads; divides the channels of each level with attention.

    Attributes:
        sample_shape: ``(C, H, W)``, the shape of one sample.
        null_label: ``K``, the label standing for "no class" (None when unconditional).
        spec: the constructor's arguments as plain JSON values, with ``"kind": "unet"``.

    Raises:
        TypeError / ValueError: an argument out of range, named (see :func:`check_unet_options`).
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int | tuple[int, int] = 28,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        num_classes: int | None = None,
        num_heads: int = 4,
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        o = check_unet_options(
            {
                "flow_map": flow_map,
                "channels": channels,
                "image_size": image_size,
                "base_channels": base_channels,
                "channel_mult": channel_mult,
                "num_res_blocks": num_res_blocks,
                "attention_resolutions": attention_resolutions,
                "dropout": dropout,
                "num_classes": num_classes,
                "num_heads": num_heads,
            }
        )
        height, width = o["image_size"]
        self.spec: dict[str, Any] = {
            "kind": "unet",
            **{k: o[k] for k in _DEFAULTS},
            "image_size": height if height == width else [height, width],
            "channel_mult": list(o["channel_mult"]),
            "attention_resolutions": list(o["attention_resolutions"]),
        }
        self.sample_shape = (o["channels"], height, width)
        self.null_label: int | None = o["num_classes"]
        base, mult, blocks, heads = o["base_channels"], o["channel_mult"], o["num_res_blocks"], o["num_heads"]
        emb_dim = 4 * base
        self.base_channels = base

        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        #: a flow map u(z, r, t) (otcfm.meanflow): the interval's length t - r gets an embedding of its own
        self.flow_map: bool = o["flow_map"]
        self.gap_mlp = (
            nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if self.flow_map else None
        )
        self.class_embedding = None if o["num_classes"] is None else nn.Embedding(o["num_classes"] + 1, emb_dim)

        def block(c_in: int, c_out: int, level: int) -> _Block:
            attend = min(height, width) // 2**level in o["attention_resolutions"]
            return _Block(ResBlock(c_in, c_out, emb_dim, o["dropout"]), Attention(c_out, heads) if attend else None)

        ch = base * mult[0]
        self.input_conv = nn.Conv2d(o["channels"], ch, 3, padding=1)
        skips = [ch]
        encoder = []
        for level, m in enumerate(mult):
            level_blocks = []
            for _ in range(blocks):
                level_blocks.append(block(ch, base * m, level))
                ch = base * m
                skips.append(ch)
            last = level == len(mult) - 1
            encoder.append(_Level(level_blocks, None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
            if not last:
                skips.append(ch)
        self.encoder = nn.ModuleList(encoder)

        attention = Attention(ch, heads) if o["attention_resolutions"] else None
        self.middle = _Block(ResBlock(ch, ch, emb_dim, o["dropout"]), attention)
        self.middle_out = ResBlock(ch, ch, emb_dim, o["dropout"])

        decoder = []
        for level in reversed(range(len(mult))):
            level_blocks = []
            for _ in range(blocks + 1):
                level_blocks.append(block(ch + skips.pop(), base * mult[level], level))
                ch = base * mult[level]
            decoder.append(_Level(level_blocks, _Upsample(ch) if level else None))
        self.decoder = nn.ModuleList(decoder)

        self.out_norm = _norm(ch)
        self.out_conv = _zeroed(nn.Conv2d(ch, o["channels"], 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, *times_and_labels: Tensor | None, y: Tensor | None = None) -> Tensor:
        """Velocity at ``x: (N, C, H, W)``, ``t: (N,)`` (a 0-d ``t`` is broadcast), labels ``y: (N,)`` or ``(N, 1)``
        (None on a conditional model: :attr:`null_label` for every row) -> ``(N, C, H, W)``: called
        ``model(x, t)`` or ``model(x, t, y)``; a flow map (``flow_map=True``) is called ``model(z, r, t)`` or
        ``model(z, r, t, y)`` and gives the average velocity over ``[r, t]``.

        Raises:
            ValueError: ``x`` not of shape ``(N, C, H, W)``, ``t`` not of shape ``(N,)``, ``y`` given to an
                unconditional model, of another shape, or (on the CPU) with labels outside ``[0, K]``.
            TypeError: ``y`` not an integer tensor.
        """
        r = None
        rest = list(times_and_labels)
        if self.flow_map:
            if not rest:
                raise ValueError("t: a flow map is called as model(z, r, t) (r, then t); got one time")
            r, t = t, rest.pop(0)
        if len(rest) > 1 or (rest and y is not None):
            raise TypeError(f"y: expected at most one label tensor, got {len(rest) + (y is not None)}")
        y = rest[0] if rest else y
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x: expected shape (N, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t: expected shape ({n},), got {tuple(t.shape)}")
        if y is not None and self.class_embedding is None:
            raise ValueError("y: this UNet was built without num_classes")
        emb = self.time_mlp(timestep_features(t, self.base_channels).to(self.time_mlp[0].weight.dtype))
        if self.gap_mlp is not None and r is not None:
            r = r.expand(n) if r.ndim == 0 else r
            if r.shape != (n,):
                raise ValueError(f"r: expected shape ({n},), got {tuple(r.shape)}")
            emb = emb + self.gap_mlp(timestep_features(t - r, self.base_channels).to(emb.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(self._labels(y, n, x.device))
        emb = F.silu(emb)

        h = self.input_conv(x)
        skips = [h]
        for level in self.encoder:
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.middle_out(self.middle(h, emb), emb)
        for level in self.decoder:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)
        return self.out_conv(F.silu(self.out_norm(h)))

    def _labels(self, y: Tensor | None, n: int, device: torch.device) -> Tensor:
        """``y`` as ``(N,)`` indices into the class embedding; checked against ``[0, K]`` on the CPU only."""
        k = self.null_label
        if y is None:
            return torch.full((n,), k, dtype=torch.long, device=device)  # type: ignore[arg-type]
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            found = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(f"y: expected an integer tensor of class labels, got {found}")
        if y.shape not in ((n,), (n, 1)):
            raise ValueError(f"y: expected shape ({n},) or ({n}, 1), got {tuple(y.shape)}")
        y = y.reshape(n)
        if y.dtype not in (torch.int32, torch.int64):
            y = y.long()
        if y.device.type == "cpu" and n:  # a host read is free here; on an accelerator it would stall every step
            low, high = (int(v) for v in y.aminmax())
            if low < 0 or high > k:  # type: ignore[operator]
                raise ValueError(f"y: expected labels in [0, {k}] ({k} = no class), got min {low}, max {high}")
        return y


def unet(
    shape: tuple[int, int, int], preset: str | None = None, num_classes: int | None = None, **options: Any
) -> UNet:
    """A :class:`UNet` for samples of ``shape = (C, H, W)``: the preset's options (default ``"mnist"``), with
    ``channels`` and ``image_size`` from ``shape``, overridden by ``options``.

    Example: ``unet((3, 32, 32), "cifar10", num_classes=10)``.

    Raises:
        ValueError: ``shape`` not ``(C, H, W)``, an unknown preset (the valid ones are listed), or a UNet argument
            out of range.
        TypeError: an unknown option (the valid ones are listed), or ``channels`` / ``image_size`` in ``options``.
    """
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) != 3
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape)
    ):
        found = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)) else shape
        raise ValueError(f"shape: the UNet takes images (C, H, W); got shape {found!r}")
    name = "mnist" if preset is None else preset
    if not isinstance(name, str) or name not in UNET_PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; valid: {', '.join(map(repr, UNET_PRESETS))}")
    fixed = sorted({"channels", "image_size"} & set(options))
    if fixed:
        raise TypeError(f"{fixed[0]}: taken from shape={tuple(shape)}; pass the shape instead")
    valid = [k for k in _DEFAULTS if k not in ("channels", "image_size", "num_classes")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"options: unknown UNet option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    channels, height, width = (int(v) for v in shape)
    return UNet(
        **{
            **UNET_PRESETS[name],
            **options,
            "channels": channels,
            "image_size": height if height == width else (height, width),
            "num_classes": num_classes,
        }
    )
