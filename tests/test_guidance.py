"""Classifier-free guidance in the samplers, labels of shape (B,) and (B, 1), label dropout in the loss."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import otcfm
from otcfm.guidance import class_labels, guided_field, null_label_of


class Known(nn.Module):
    """v(x, t, y) = c[y] (a constant velocity per class), v(x, t, null) = c[null]; counts its calls and rows."""

    def __init__(self, classes: int = 3, dim: int = 2) -> None:
        super().__init__()
        self.null_label = classes
        self.c = nn.Parameter(torch.arange((classes + 1) * dim, dtype=torch.float32).reshape(classes + 1, dim))
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), self.null_label) if y is None else y
        return self.c[y].expand_as(x) + 0 * x


@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 3.5, -0.5])
def test_guidance_equals_the_formula(w: float) -> None:
    """One Euler step of length 1 moves x0 by v_null + w (v_y - v_null) exactly (float32, exact integers)."""
    model = Known()
    x0 = torch.zeros(4, 2)
    y = torch.tensor([0, 1, 2, 1])
    x1 = otcfm.integrate(model, x0, steps=1, y=y, guidance=w)
    with torch.no_grad():
        expected = model.c[3] + w * (model.c[y] - model.c[3])
    torch.testing.assert_close(x1, expected, rtol=0, atol=1e-6)


def test_guidance_is_one_batched_call_per_step() -> None:
    model = Known()
    otcfm.integrate(model, torch.zeros(5, 2), steps=3, y=torch.zeros(5, dtype=torch.long), guidance=2.0)
    assert model.calls == [10, 10, 10]  # [x; x] with [y; null], one forward per evaluation
    model.calls.clear()
    otcfm.integrate(model, torch.zeros(5, 2), steps=3, y=1)  # w = 1: the conditional branch only
    assert model.calls == [5, 5, 5]


def test_labels_of_shape_b1_equal_b() -> None:
    model = Known()
    y = torch.tensor([2, 0, 1])
    a = otcfm.integrate(model, torch.zeros(3, 2), steps=2, y=y, guidance=1.5)
    b = otcfm.integrate(model, torch.zeros(3, 2), steps=2, y=y[:, None], guidance=1.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(class_labels(y[:, None], 3, torch.device("cpu")), y)


def test_unconditional_branch_without_a_null_label_calls_model_without_labels() -> None:
    seen: list[object] = []

    def field(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        seen.append(None if y is None else y.tolist())
        return torch.ones_like(x) * (0.0 if y is None else 1.0)

    x = otcfm.integrate(field, torch.zeros(2, 2), steps=1, y=torch.tensor([0, 1]), guidance=3.0)
    torch.testing.assert_close(x, torch.full((2, 2), 3.0))  # 0 + 3 (1 - 0)
    assert None in seen and [0, 1] in seen


def test_null_label_argument_wins_and_is_found_through_wrappers() -> None:
    model = Known()
    assert null_label_of(model, None) == 3
    assert null_label_of(otcfm.models.time_first(nn.Identity()), None) is None
    assert null_label_of(otcfm.models.time_first(model), None) == 3
    wrapper = nn.Module()
    wrapper.module = model  # as DDP holds it
    assert null_label_of(wrapper, None) == 3
    assert null_label_of(model, 1) == 1
    x = otcfm.integrate(model, torch.zeros(1, 2), steps=1, y=0, guidance=0.0, null_label=1)
    torch.testing.assert_close(x, model.c[1][None].detach())


def test_bad_guidance_and_labels_are_named() -> None:
    model = Known()
    x0 = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="guidance: 2 needs class labels y"):
        otcfm.integrate(model, x0, steps=1, guidance=2.0)
    with pytest.raises(ValueError, match="guidance: expected a finite number"):
        otcfm.integrate(model, x0, steps=1, y=0, guidance=float("nan"))
    with pytest.raises(TypeError, match="y: expected integer class labels"):
        otcfm.integrate(model, x0, steps=1, y=torch.zeros(2))
    with pytest.raises(ValueError, match=r"y: expected integer class labels of shape \(2,\)"):
        otcfm.integrate(model, x0, steps=1, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="y: expected class indices >= 0"):
        otcfm.integrate(model, x0, steps=1, y=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="null_label: expected a class index"):
        guided_field(model, 0, 2.0, -1, 2, torch.device("cpu"))


def test_solve_counts_one_evaluation_per_guided_step() -> None:
    solution = otcfm.solve(Known(), torch.zeros(3, 2), steps=4, method="heun", y=1, guidance=2.0)
    assert solution.nfe == 8


class Recorder(nn.Module):
    """A conditional model that records the labels it is given."""

    null_label = 9

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.seen.append(y.clone())
        return self.lin(x)


def test_label_dropout_replaces_a_fraction_by_the_null_label_and_keeps_the_pairing() -> None:
    """About `rate` of the labels the model sees are null (binomial: 4 sigma of 4096 draws at 0.25 is 0.027);
    the pairing is the one without dropout (the coupler sees the true labels)."""
    fm = otcfm.FlowMatcher(coupler="exact")
    x0, x1 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0)), torch.randn(4096, 2)
    y1 = torch.randint(3, (4096,), generator=torch.Generator().manual_seed(1))
    model = Recorder()
    batch = fm.batch(x0[:64], x1[:64], torch.Generator().manual_seed(2), y1=y1[:64])
    fm.loss(model, x0[:64], x1[:64], torch.Generator().manual_seed(2), y1=y1[:64], label_dropout=0.5)
    seen = model.seen[-1]
    kept = seen != 9
    assert torch.equal(seen[kept], y1[:64][batch.j][kept])
    model.seen.clear()
    fm.loss(model, x0, x1, torch.Generator().manual_seed(3), y1=y1, label_dropout=0.25)
    fraction = float((model.seen[-1] == 9).float().mean())
    assert abs(fraction - 0.25) < 0.027


def test_label_dropout_needs_labels_and_a_null_label() -> None:
    fm = otcfm.FlowMatcher(coupler="independent")
    x = torch.randn(8, 2)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="label_dropout: drops integer class labels y1; none were given"):
        fm.loss(Recorder(), x, x, label_dropout=0.1)
    plain = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="null_label: label_dropout replaces labels"):
        fm.loss(lambda x, t, y: plain(x), x, x, y1=y, label_dropout=0.1)
    with pytest.raises(ValueError, match=r"label_dropout: expected a number in \[0, 1\]"):
        fm.loss(Recorder(), x, x, y1=y, label_dropout=1.5)


def test_loss_takes_labels_of_shape_b1() -> None:
    fm = otcfm.FlowMatcher(coupler="exact")
    x0, x1 = torch.randn(16, 2), torch.randn(16, 2)
    y = torch.randint(3, (16,), generator=torch.Generator().manual_seed(0))
    model = Recorder()
    a = fm.loss(model, x0, x1, torch.Generator().manual_seed(1), y1=y)
    b = fm.loss(model, x0, x1, torch.Generator().manual_seed(1), y1=y[:, None])
    assert torch.equal(a, b) and model.seen[-1].shape == (16,)


def test_time_first_model_is_detected_in_the_loss() -> None:
    class TimeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            return self.lin(torch.cat([x, t[:, None]], 1))

    fm = otcfm.FlowMatcher(coupler="independent")
    with pytest.raises(ValueError, match=r"model: it takes the time first, model\(t, x\).*time_first"):
        fm.loss(TimeFirst(), torch.randn(4, 2), torch.randn(4, 2))
    loss = fm.loss(otcfm.models.time_first(TimeFirst()), torch.randn(4, 2), torch.randn(4, 2))
    assert loss.ndim == 0
