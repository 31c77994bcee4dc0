"""The UNet, its presets, the time-first adapter and the UNet's checkpoint spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import otcfm
from otcfm.models import UNET_PRESETS, UNet, model_spec, rebuild_model, time_first, unet


def _tiny(**options: object) -> UNet:
    """A small UNet with non-zero output layers (a fresh one returns 0), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(**{"channels": 1, "image_size": 8, "base_channels": 8, **options})
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.1)
    return model


def _inputs(model: UNet, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize(
    "options",
    [
        {"channels": 1, "image_size": 8},
        {"channels": 1, "image_size": 28, "attention_resolutions": (7,)},
        {"channels": 3, "image_size": 32, "channel_mult": (1, 2, 2, 2), "attention_resolutions": (16,)},
        {"channels": 2, "image_size": (8, 16), "channel_mult": (1, 2)},
    ],
)
@pytest.mark.parametrize("num_classes", [None, 4])
def test_output_shape(options: dict, num_classes: int | None) -> None:
    model = UNet(base_channels=8, num_classes=num_classes, **options)
    x, t = _inputs(model)
    assert model(x, t).shape == x.shape
    assert model(x, t[0]).shape == x.shape  # a 0-d t is broadcast
    if num_classes is not None:
        assert model(x, t, torch.tensor([0, 1, 4])).shape == x.shape


def test_fresh_model_outputs_zero() -> None:
    model = UNet(1, 8, base_channels=8, attention_resolutions=(4,))
    x, t = _inputs(model)
    assert torch.equal(model(x, t), torch.zeros_like(x))


def test_labels_and_null_label() -> None:
    model = _tiny(num_classes=3).eval()
    x, t = _inputs(model)
    y = torch.tensor([0, 2, 1])
    assert model.null_label == 3 and _tiny().null_label is None
    torch.testing.assert_close(model(x, t, y), model(x, t, y[:, None]))
    torch.testing.assert_close(model(x, t, y), model(x, t, y.int()))
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 3)))
    assert not torch.allclose(model(x, t, y), model(x, t))


def test_bad_inputs_name_the_argument() -> None:
    model = _tiny(num_classes=3)
    x, t = _inputs(model)
    with pytest.raises(ValueError, match=r"^y: expected labels in \[0, 3\]"):
        model(x, t, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"^y: expected labels in \[0, 3\]"):
        model(x, t, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"^y: expected shape \(3,\) or \(3, 1\)"):
        model(x, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="^y: expected an integer tensor"):
        model(x, t, torch.zeros(3))
    with pytest.raises(ValueError, match="^y: this UNet was built without num_classes"):
        _tiny()(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^x: expected shape \(N, 1, 8, 8\)"):
        model(torch.zeros(3, 1, 16, 16), t)
    with pytest.raises(ValueError, match=r"^t: expected shape \(3,\)"):
        model(x, t[:2])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"image_size": 30}, ValueError, "^image_size: 30x30 must be divisible by .* = 4"),
        ({"image_size": (8, 6)}, ValueError, "^image_size: 8x6"),
        ({"image_size": "28"}, TypeError, "^image_size"),
        ({"attention_resolutions": (3,)}, ValueError, "^attention_resolutions: the model never reaches resolution 3"),
        ({"base_channels": 6, "attention_resolutions": (8,)}, ValueError, "^num_heads: 4 heads do not divide"),
        ({"base_channels": 0}, ValueError, "^base_channels: expected a positive integer"),
        ({"num_res_blocks": 1.5}, ValueError, "^num_res_blocks: expected a positive integer"),
        ({"channel_mult": ()}, ValueError, "^channel_mult: expected at least one"),
        ({"channel_mult": (1, 0)}, ValueError, r"^channel_mult\[1\]"),
        ({"dropout": 1.0}, ValueError, r"^dropout: expected a number in \[0, 1\)"),
        ({"num_classes": 0}, ValueError, "^num_classes: expected an integer >= 1 or None, got 0"),
        ({"num_heads": True}, ValueError, "^num_heads: expected a positive integer"),
    ],
)
def test_bad_arguments_name_the_argument(options: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        UNet(**{"image_size": 8, "base_channels": 8, **options})


def test_spec_round_trip() -> None:
    model = _tiny(num_classes=2, attention_resolutions=(4,), image_size=(8, 16)).eval()
    spec = model_spec(model)
    assert spec["kind"] == "unet" and spec["image_size"] == [8, 16] and spec["attention_resolutions"] == [4]
    rebuilt = rebuild_model(spec, model.state_dict())
    assert isinstance(rebuilt, UNet)
    rebuilt.load_state_dict(model.state_dict())
    x, t = _inputs(model)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(rebuilt.eval()(x, t, y), model(x, t, y))


def test_rebuild_refuses_mismatches_and_oversized_specs() -> None:
    model = _tiny()
    spec, weights = model_spec(model), model.state_dict()
    with pytest.raises(ValueError, match="^model: the weights do not match the UNet spec"):
        rebuild_model({**spec, "base_channels": 16}, weights)
    with pytest.raises(ValueError, match=r"^model: the weights \(\d+ tensors\) do not match"):
        rebuild_model({**spec, "num_res_blocks": 2}, weights)
    with pytest.raises(ValueError, match="^model: invalid UNet spec .*dropout"):
        rebuild_model({**spec, "dropout": 2}, weights)
    with pytest.raises(ValueError, match="^model: invalid UNet spec .*unknown UNet argument"):
        rebuild_model({**spec, "width": 3}, weights)
    with pytest.raises(ValueError, match="more than 2,000,000,000 parameters"):
        rebuild_model({**spec, "base_channels": 100_000})
    with pytest.raises(ValueError, match="residual blocks, more than"):
        rebuild_model({**spec, "num_res_blocks": 10**9})


def test_model_spec_of_other_models() -> None:
    assert model_spec(otcfm.models.MLP(2, hidden=4, depth=1))["kind"] == "mlp"
    assert model_spec(time_first(nn.Linear(2, 2)))["kind"] == "user"


def _parameters(shape: tuple[int, int, int], preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in unet(shape, preset).parameters())


def test_presets() -> None:
    assert 30e6 <= _parameters((3, 32, 32), "cifar10") <= 40e6
    assert _parameters((1, 28, 28), "mnist") < 500_000
    assert _parameters((1, 8, 8), "digits") < 500_000
    model = unet((3, 32, 32), num_classes=10, base_channels=8)
    assert model.spec["channels"] == 3 and model.spec["image_size"] == 32 and model.null_label == 10
    assert model.spec["channel_mult"] == list(UNET_PRESETS["mnist"]["channel_mult"])


def test_unet_builder_errors() -> None:
    with pytest.raises(ValueError, match=r"^shape: the UNet takes images \(C, H, W\); got shape \(64,\)"):
        unet((64,))
    with pytest.raises(ValueError, match="^preset: unknown preset 'imagenet'; valid: 'mnist', 'cifar10'"):
        unet((1, 28, 28), "imagenet")
    with pytest.raises(TypeError, match="^options: unknown UNet option.*'width'.*valid: base_channels"):
        unet((1, 28, 28), width=3)
    with pytest.raises(TypeError, match="^channels: taken from shape"):
        unet((1, 28, 28), channels=3)


def test_time_first_wraps_and_trains() -> None:
    class TimeFirstNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, t: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return scale * self.linear(torch.cat([x, t[:, None]], dim=1))

    inner = TimeFirstNet()
    wrapped = time_first(inner)
    assert isinstance(wrapped, nn.Module) and set(wrapped.state_dict()) == {"model.linear.weight", "model.linear.bias"}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 2, generator=g), torch.rand(5, generator=g)
    torch.testing.assert_close(wrapped(x, t, scale=2.0), inner(t, x, 2.0))
    before = inner.linear.weight.detach().clone()
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped(x, t).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(inner.linear.weight, before)
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        time_first(lambda t, x: x)  # type: ignore[arg-type]


def test_unet_learns_flow_matching() -> None:
    """From its zero output, a fresh UNet's flow-matching loss falls in 30 Adam steps on 8x8 data."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_classes=2)
    fm = otcfm.FlowMatcher(coupler="independent")
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    rows = torch.linspace(-1, 1, 8)
    data = torch.stack([rows[:, None].expand(8, 8), rows[None, :].expand(8, 8)])[:, None]  # two "classes" of image
    losses = []
    for _ in range(30):
        y1 = torch.randint(2, (32,), generator=g)
        x1 = data[y1] + 0.05 * torch.randn(32, 1, 8, 8, generator=g)
        loss = fm.loss(model, torch.randn(32, 1, 8, 8, generator=g), x1, g, y1=y1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_the_output_depends_on_the_time_and_the_class() -> None:
    """Every zero-initialised convolution given weights, the output must change with t and with y: an embedding
    added before a normalisation with one channel per group would be erased (it was, with GroupNorm(16, 16))."""
    torch.manual_seed(0)
    model = otcfm.models.unet((1, 28, 28), preset="mnist", num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                module.weight.normal_(0, 0.05)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        early, late = model(x, torch.full((4,), 0.1)), model(x, torch.full((4,), 0.9))
        zero, seven = (
            model(x, torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long)),
            model(x, torch.full((4,), 0.5), torch.full((4,), 7)),
        )
    assert (early - late).abs().mean() > 1e-3 * early.abs().mean()
    assert (zero - seven).abs().mean() > 1e-3 * zero.abs().mean()
