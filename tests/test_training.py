"""Training loop: resume after an interruption reproduces an uninterrupted run exactly."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm import checkpoint
from otcfm.training import TrainConfig, load_model, train

SMALL = TrainConfig(steps=12, batch_size=32, hidden=16, depth=2, checkpoint_every=5, ema_decay=0.9, seed=3)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_run(a: otcfm.TrainResult, b: otcfm.TrainResult) -> None:
    assert a.losses == b.losses
    for key, value in _params(a.model).items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert a.ema is not None and b.ema is not None
    for key, value in _params(a.ema).items():
        assert torch.equal(value, b.ema.state_dict()[key]), key


def _interrupt_at(step: int):
    def callback(k: int, loss: float) -> None:
        if k == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("stop", [5, 7])
def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    """Ctrl-C after step `stop` (at and between periodic checkpoints); resume gives identical parameters."""
    full = train(SMALL, out=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, out=tmp_path / "cut", progress=False, callback=_interrupt_at(stop))
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["step"] == stop
    resumed = train(SMALL, out=tmp_path / "cut", progress=False, resume=True)
    _assert_same_run(full, resumed)


class _Flaky(torch.nn.Module):
    """Wraps a model; raises KeyboardInterrupt on its n-th forward call (mid-step)."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model(x, t)


def test_interrupt_in_the_middle_of_a_step(tmp_path: Path) -> None:
    """A step cut before its update leaves no trace: the saved state is the previous step's."""
    from otcfm.training import build_model

    full = train(SMALL, model=_Flaky(build_model(SMALL), None), out=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, model=_Flaky(build_model(SMALL), 9), out=tmp_path / "cut", progress=False)
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 8
    resumed = train(SMALL, model=_Flaky(build_model(SMALL), None), out=tmp_path / "cut", progress=False, resume=True)
    _assert_same_run(full, resumed)


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    train(SMALL, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="coupler: checkpoint 'exact' vs now 'independent'"):
        train(SMALL, out=tmp_path, progress=False, resume=True, coupler="independent")
    with pytest.raises(ValueError, match="steps"):
        train(SMALL, out=tmp_path, progress=False, resume=True, steps=4)


def test_resume_can_extend_a_finished_run(tmp_path: Path) -> None:
    longer = train(SMALL, progress=False, steps=15)
    train(SMALL, out=tmp_path, progress=False)
    extended = train(SMALL, out=tmp_path, progress=False, resume=True, steps=15)
    _assert_same_run(longer, extended)


def test_load_model_matches_the_trained_one(tmp_path: Path) -> None:
    result = train(SMALL, out=tmp_path, progress=False)
    model, config = load_model(tmp_path)
    assert config == result.config == dataclasses.replace(SMALL, source="8gaussians")
    x, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(model(x, t), result.sampling_model(x, t))
    raw, _ = load_model(tmp_path / "checkpoint.pt", use_ema=False)
    torch.testing.assert_close(raw(x, t), result.model(x, t))


def test_same_seed_same_run_and_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a = train(SMALL, progress=False, steps=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = train(SMALL, progress=False, steps=3)
    assert a.losses == b.losses


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="resume: needs out"):
        train(SMALL, resume=True, progress=False)
    with pytest.raises(ValueError, match="coupler"):
        train(SMALL, coupler="nope", progress=False)


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    checkpoint.atomic_save({"a": 1}, target)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # torch.save cannot pickle a local lambda
        checkpoint.atomic_save({"a": lambda: None}, target)  # lambdas cannot be pickled
    assert checkpoint.load(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_exact_coupling_beats_independent_at_few_steps() -> None:
    """The library's reason to exist, at a small budget: 1- and 2-step W2 clearly lower with exact OT."""
    config = TrainConfig(steps=600, batch_size=128, hidden=64, depth=2, lr=3e-3, seed=0)
    g = torch.Generator().manual_seed(99)
    x0, ref = otcfm.data.sample("8gaussians", 1000, g), otcfm.data.sample("moons", 1000, g)
    w2 = {}
    for coupler in ("exact", "independent"):
        model = train(config, coupler=coupler, progress=False).model
        w2[coupler] = otcfm.metrics.w2_by_steps(model, x0, ref, steps=(1, 2))
    assert w2["exact"][1] < 0.5 * w2["independent"][1]
    assert w2["exact"][2] < 0.7 * w2["independent"][2]
