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
    """Wraps a model; raises KeyboardInterrupt on its n-th forward call in training mode (mid-step; train's probe
    of the model before the first step runs in eval mode)."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
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
    resolved = dataclasses.replace(SMALL, source="8gaussians", conditional=False, label_dropout=0.0)
    assert config == result.config == resolved
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
    train(SMALL, progress=False, steps=3, target=lambda n, g: torch.randn(n, 2))  # probed with the global state
    assert torch.equal(state, torch.random.get_rng_state())


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


def test_cosine_learning_rate_values() -> None:
    """lr at the first step, lr / 2 half-way, decreasing to near 0; constant is lr throughout."""
    from otcfm.engine import learning_rate

    rates = [learning_rate(2e-3, "cosine", k, 100) for k in range(100)]
    assert rates[0] == 2e-3 and rates[50] == pytest.approx(1e-3, rel=1e-12)
    assert all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True)) and 0 < rates[-1] < 1e-6
    assert {learning_rate(2e-3, "constant", k, 100) for k in range(100)} == {2e-3}
    with pytest.raises(ValueError, match="lr_schedule: unknown value 'step'"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_schedule: unknown value 'linear'"):
        learning_rate(1e-3, "linear", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step, steps"):
        learning_rate(1e-3, "cosine", 0, 0)


def test_cosine_schedule_sets_the_rate_of_each_step() -> None:
    """Adam on a loss of constant gradient moves each weight by about the step's rate (|m / sqrt(v)| = 1).

    Tolerance: Adam's eps (1e-8) against a unit gradient, relative 1e-6.
    """
    from otcfm.engine import Schedule, fit, learning_rate

    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    seen: list[float] = []
    schedule = Schedule(steps=8, lr=0.1, lr_schedule="cosine", checkpoint_every=8)
    fit(
        net,
        lambda n, step, g: n.weight.sum(),
        schedule,
        run={},
        progress=False,
        callback=lambda step, loss: seen.append(float(net.weight.detach())),
    )
    moves = [-(b - a) for a, b in zip([0.0, *seen[:-1]], seen, strict=True)]
    assert moves == pytest.approx([learning_rate(0.1, "cosine", k, 8) for k in range(8)], rel=1e-6)


def test_resume_with_cosine_schedule_equals_uninterrupted(tmp_path: Path) -> None:
    """The rate is a function of the step: an interrupted cosine run resumes bit for bit; its length is fixed."""
    config = dataclasses.replace(SMALL, lr_schedule="cosine", lr=1e-2)
    full = train(config, out=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, out=tmp_path / "cut", progress=False, callback=_interrupt_at(7))
    resumed = train(config, out=tmp_path / "cut", progress=False, resume=True)
    _assert_same_run(full, resumed)
    assert full.losses != train(SMALL, progress=False, lr=1e-2).losses  # the schedule changes the run
    with pytest.raises(ValueError, match="steps: checkpoint 12 vs now 15 under lr_schedule 'cosine'"):
        train(config, out=tmp_path / "full", progress=False, resume=True, steps=15)


def test_engine_keeps_the_schedule_on_resume(tmp_path: Path) -> None:
    """fit() itself refuses another lr_schedule, and another steps under cosine, whatever its caller records in
    ``run``."""
    from otcfm.engine import Schedule, fit

    def run(schedule: Schedule, out: Path, resume: bool = True) -> None:
        net = torch.nn.Linear(2, 1)
        fit(net, lambda n, step, g: n(torch.ones(1, 2)).sum(), schedule, run={}, out=out, resume=resume,
            progress=False)  # fmt: skip

    run(Schedule(steps=4, checkpoint_every=2), tmp_path / "constant", resume=False)
    with pytest.raises(ValueError, match="lr_schedule: checkpoint 'constant' vs now 'cosine'"):
        run(Schedule(steps=8, lr_schedule="cosine"), tmp_path / "constant")
    run(Schedule(steps=6), tmp_path / "constant")  # a constant rate may be extended
    run(Schedule(steps=4, lr_schedule="cosine"), tmp_path / "cosine", resume=False)
    with pytest.raises(ValueError, match="steps: checkpoint 4 vs now 6 under lr_schedule 'cosine'"):
        run(Schedule(steps=6, lr_schedule="cosine"), tmp_path / "cosine")


def test_diverged_weights_never_replace_a_checkpoint(tmp_path: Path) -> None:
    """A step with a finite loss whose gradient is Inf leaves NaN weights (Adam's Inf / Inf); the checkpoint of that
    step was written before, and the step's own loss hid it. Now the run stops and the last good checkpoint stays."""
    from otcfm.engine import Schedule, fit

    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 1.0)

    def loss(n: torch.nn.Module, step: int, g: torch.Generator) -> torch.Tensor:
        w = n.weight.sum()
        return w.abs().sqrt() if step == 2 else w.detach().abs() + 0.5 * w  # sqrt'(0) = Inf at step 2

    def zero_after_two(step: int, value: float) -> None:
        if step == 2:
            with torch.no_grad():
                net.weight.zero_()

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"model: the weights hold NaN/Inf after step 3 \('weight'\).*keeps step 2"):
        fit(net, loss, Schedule(steps=5, checkpoint_every=1), run={}, out=out, progress=False, callback=zero_after_two)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2
    assert bool(torch.isnan(net.weight).all())  # the failure is real: the step left NaN weights
    model, _ = load_model(out, model=torch.nn.Linear(1, 1, bias=False))
    assert bool(torch.isfinite(model.weight).all())
    state = checkpoint.load(out / "checkpoint.pt")  # a checkpoint with NaN weights, as older versions wrote them
    state["model"]["weight"].fill_(float("nan"))
    checkpoint.atomic_save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds NaN/Inf weights \\('weight'\\); the run it comes from diverged"):
        load_model(out, model=torch.nn.Linear(1, 1, bias=False))
    with pytest.raises(ValueError, match="resume: .* holds NaN/Inf weights \\(model entry 'weight'\\)"):
        fit(torch.nn.Linear(1, 1, bias=False), loss, Schedule(steps=5), run={}, out=out, resume=True, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    """Was torch's raw AssertionError ('Torch not compiled with CUDA enabled') after the data were loaded."""
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but"):
        train(TrainConfig(steps=1), device="cuda", progress=False)
    from otcfm.cli import main

    assert main(["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "run")]) == 2


def test_settings_that_were_silently_ignored_or_unchecked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume and overwrite: choose one"):
        train(SMALL, out=tmp_path, resume=True, overwrite=True, progress=False)  # resumed silently
    with pytest.raises(ValueError, match="model_options: .* the built-in MLP takes hidden and depth"):
        train(dataclasses.replace(SMALL, model_options={"width": 32}), progress=False)  # ignored
    with pytest.raises(TypeError, match="global_coupling: expected True or False"):
        dataclasses.replace(SMALL, global_coupling="no")  # a truthy string


def test_reflow_settings_checked_up_front() -> None:
    from otcfm import reflow

    with pytest.raises(ValueError, match="rounds: expected a positive integer"):
        reflow.rectify(otcfm.models.MLP(2), "8gaussians", rounds=0)  # returned []
    with pytest.raises(ValueError, match=r"x0 and x1: expected pairs of the same shape, got \(5, 2\) and \(10, 2\)"):
        reflow.PairSet(torch.zeros(5, 2), torch.zeros(10, 2))  # drew x1[:5] only


def test_python_dash_m_otcfm_is_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "otcfm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("otcfm ")


def test_numpy_option_values_make_a_loadable_checkpoint(tmp_path: Path) -> None:
    """np.float64 passed the JSON check but made a checkpoint that torch's weights-only load refused."""
    import numpy as np

    train(SMALL, coupler="sinkhorn", coupler_options={"epsilon": np.float64(0.2)}, out=tmp_path, progress=False)
    _, config = load_model(tmp_path)
    assert config.coupler_options == {"epsilon": 0.2} and type(config.coupler_options["epsilon"]) is float


class _Dropped(torch.nn.Module):
    """An MLP with Dropout, whose masks come from torch's global generator, not from otcfm's."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = otcfm.models.MLP(2, hidden=16, depth=2)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.drop(self.net(x, t))


def test_a_model_with_dropout_resumes_bit_exactly(tmp_path: Path) -> None:
    """A resumed Dropout model drew other masks; torch's global generator is now seeded per step from the run's
    seed, so the caller's global state, here other before the resume, does not matter."""
    torch.manual_seed(11)
    full = train(SMALL, model=_Dropped(), progress=False)

    def stop(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    torch.manual_seed(11)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, model=_Dropped(), out=tmp_path, callback=stop, progress=False)
    torch.manual_seed(999)  # another process, another global state
    resumed = train(SMALL, model=_Dropped(), out=tmp_path, resume=True, progress=False)
    assert resumed.start_step == 7
    _assert_same_run(full, resumed)


def test_a_dropout_run_follows_its_seed_and_leaves_the_global_state(tmp_path: Path) -> None:
    """Two runs of one seed drew other Dropout masks when torch's global state differed; the caller's state was
    consumed by the run. The engine now seeds the global generator from the run's seed and gives it back."""
    runs = []
    for caller_seed in (5, 6):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        runs.append(train(SMALL, model=_Dropped(), progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    _assert_same_run(runs[0], runs[1])


def test_model_options_beside_a_built_model_are_refused() -> None:
    """They were recorded but never used, and a rebuild from the record built another model."""
    with pytest.raises(ValueError, match=r"model_options: .* the model given \(_Dropped\) is already built"):
        train(SMALL, model=_Dropped(), model_options={"width": 4}, progress=False)


def test_resume_with_a_model_built_otherwise_names_the_cause(tmp_path: Path) -> None:
    """The same class with other sizes raised torch's RuntimeError from load_state_dict."""

    class Sized(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = otcfm.models.MLP(2, hidden=width, depth=1)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x, t)

    train(SMALL, model=Sized(8), out=tmp_path, progress=False)
    longer = dataclasses.replace(SMALL, steps=SMALL.steps + 2)
    with pytest.raises(ValueError, match=r"resume: the weights in .* do not fit the model \(built with other"):
        train(longer, model=Sized(16), out=tmp_path, resume=True, progress=False)
