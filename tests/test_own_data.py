"""A user's own data and model through the one training engine: otcfm.train, the CLI, resume, Reflow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import otcfm
from otcfm import checkpoint
from otcfm.cli import main
from otcfm.data.sources import as_source

QUICK = {"steps": 12, "batch_size": 32, "checkpoint_every": 5, "seed": 1}


class Net(torch.nn.Module):
    """A user's velocity model: x (B, 5), t (B,) -> (B, 5)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 5))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, t[:, None]], dim=1))


def _net(seed: int = 0) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()


@pytest.fixture(scope="module")
def npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 samples of a 5-dimensional two-cluster distribution, as a user's .npy file."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 5)) + 3 * rng.choice([-1.0, 1.0], size=(500, 1))
    path = tmp_path_factory.mktemp("data") / "data.npy"
    np.save(path, data)
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_own_model_and_npy_file_resume_bit_exact(npy: Path, tmp_path: Path) -> None:
    full = otcfm.train(model=_net(), target=str(npy), out=tmp_path / "full", progress=False, **QUICK)
    assert full.config.source == "gaussian" and full.config.target == str(npy)  # auto: a Gaussian of the data's shape
    assert full.config.model == f"object:{Net.__module__}.Net"

    def stop(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        otcfm.train(model=_net(), target=npy, out=tmp_path / "cut", progress=False, callback=stop, **QUICK)
    resumed = otcfm.train(model=Net(), target=npy, out=tmp_path / "cut", resume=True, progress=False, **QUICK)
    assert resumed.start_step == 7 and resumed.losses == full.losses and _same(resumed.model, full.model)

    model, config = otcfm.load_model(tmp_path / "cut", model=Net())
    assert _same(model, full.model) and config == full.config
    with pytest.raises(ValueError, match=f"user model of class '{Net.__module__}.Net'"):
        otcfm.load_model(tmp_path / "cut")
    with pytest.raises(ValueError, match="do not fit the model"):
        otcfm.load_model(tmp_path / "cut", model=Net(width=8))
    # the same rows under another name are the same data; other rows are refused on resume
    other = tmp_path / "other.npy"
    np.save(other, np.load(npy)[::-1].copy())
    with pytest.raises(ValueError, match="target_fingerprint"):
        otcfm.train(model=Net(), target=str(other), out=tmp_path / "cut", resume=True, progress=False, **QUICK)


def test_cli_on_a_file_resume_reflow_distill(npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--batch-size", "32", "--hidden", "16", "--depth", "1", "--no-progress", "--eval-n", "100"]
    small += ["--eval-draws", "1", "--checkpoint-every", "4"]
    run, longer = str(tmp_path / "run"), str(tmp_path / "longer")
    assert main(["train", "--target", str(npy), "--steps", "10", "--out", longer, *small]) == 0
    said = capsys.readouterr().out  # the W2 table's reference: rows of the file, not held-out data; one draw
    expected = "n=100 reference samples drawn with replacement from the 500 training rows, mean +- std over 1 draw\n"
    assert expected in said
    assert main(["train", "--target", str(npy), "--steps", "6", "--out", run, *small]) == 0
    assert main(["train", "--target", str(npy), "--steps", "6", "--out", run, *small]) == 2  # refused: a run
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--target", str(npy), "--steps", "10", "--out", run, "--resume", *small]) == 0
    assert "trained 4 steps (resumed at step 6)" in capsys.readouterr().out
    a, b = checkpoint.load(Path(run) / "checkpoint.pt"), checkpoint.load(Path(longer) / "checkpoint.pt")
    assert a["losses"] == b["losses"] and all(torch.equal(a["model"][k], v) for k, v in b["model"].items())

    common = ["--teacher", run, "--pairs", "64", "--solver-steps", "2", "--train-steps", "3", *small[6:]]
    for command, schedule in (("reflow", "constant"), ("distill", "cosine")):
        out = tmp_path / command
        assert main([command, *common, "--lr-schedule", schedule, "--out", str(out)]) == 0
        assert checkpoint.load(out / "checkpoint.pt")["run"]["lr_schedule"] == schedule
        model, config = otcfm.load_model(out)
        assert model(torch.zeros(3, 5), torch.zeros(3)).shape == (3, 5) and config.target == str(npy)
    assert "one-step generator distilled from a coupler=exact flow" in capsys.readouterr().out
    again = ["distill", "--teacher", str(tmp_path / "reflow"), *common[2:], "--out", str(tmp_path / "from-reflow")]
    assert main(again) == 0  # the title names the teacher: a rectified flow, not the first stage
    assert "distilled from a rectified flow whose first stage had coupler=exact" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "distill"), "--n", "8", "--out", str(tmp_path / "x.pt")]) == 0
    assert torch.load(tmp_path / "x.pt").shape == (8, 5)


@pytest.mark.parametrize(
    ("target", "extra", "shape"),
    [("mixture", ["--dim", "32"], (32,)), ("digits", [], (1, 8, 8))],
)
def test_cli_high_dimensional_targets_train_and_sample(
    tmp_path: Path,
    target: str,
    extra: list[str],
    shape: tuple[int, ...],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if target == "digits":  # image data: the FD table, in the features of the session's digits classifier
        monkeypatch.setenv("OTCFM_CACHE", str(request.getfixturevalue("digits_cache")))
    out = tmp_path / target
    args = ["train", "--target", target, *extra, "--steps", "3", "--batch-size", "16", "--hidden", "16"]
    assert main([*args, "--eval-n", "50", "--eval-draws", "1", "--no-progress", "--out", str(out)]) == 0
    samples = tmp_path / "x.pt"
    assert main(["sample", "--checkpoint", str(out), "--n", "5", "--steps", "2", "--out", str(samples)]) == 0
    assert torch.load(samples).shape == (5, *shape)


class _Pairs(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self.data[k], 0


def test_every_kind_of_data_draws_the_same_rows() -> None:
    """A tensor, an array, a TensorDataset and a Dataset of (x, label) items are the same source."""
    data = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    draws = []
    for kind in (data, data.numpy(), TensorDataset(data), _Pairs(data)):
        source = as_source(kind, "target")
        assert source.shape == (3,)
        draws.append(source(7, torch.Generator().manual_seed(5)))
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    images = as_source(torch.zeros(4, 1, 8, 8), "target")
    assert images.shape == (1, 8, 8) and as_source("gaussian", "source", like=images)(2).shape == (2, 1, 8, 8)


def _shifted(n: int, generator: torch.Generator | None, device: object, dtype: object, shift: float = 0.0) -> object:
    return torch.rand(n, generator=generator) * 0.5 + shift


def test_run_records_hold_no_memory_address() -> None:
    """A run compares these records on resume, in another process, where every address differs."""
    from functools import partial

    from otcfm._describe import describe

    class Holder:
        def draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
            return torch.rand(n, generator=generator)

    for obj in (partial(_shifted, shift=0.1), Holder().draw, Holder(), _shifted):
        assert " at 0x" not in describe(obj), describe(obj)
    assert describe(partial(_shifted, shift=0.1)) == "functools.partial(<function _shifted>, shift=0.1)"
    assert describe(Holder()) == f"object:{__name__}.test_run_records_hold_no_memory_address.<locals>.Holder"


def test_sampler_function_options_and_instances() -> None:
    def sampler(n: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(n, 3, generator=generator) + 5

    coupler = otcfm.couplers.SinkhornCoupler(epsilon=0.2)
    result = otcfm.train(target=sampler, coupler=coupler, steps=3, batch_size=16, hidden=8, progress=False)
    assert result.config.target.startswith("callable:") and result.config.coupler == repr(coupler)
    options = otcfm.train(
        target="mixture",
        target_options={"dim": 4},
        coupler="sinkhorn",
        coupler_options={"epsilon": 0.2},
        time_sampler="logit_normal",
        time_sampler_options={"std": 0.5},
        steps=2,
        batch_size=8,
        hidden=8,
        progress=False,
        grad_clip=1.0,
    )
    assert options.config.source == "gaussian" and options.model.dim == 4


def test_model_factory_by_name(tmp_path: Path) -> None:
    """``model="package.module:factory"`` is built from its options; load_model rebuilds an MLP from its spec."""
    config = otcfm.TrainConfig(model="otcfm.models:MLP", model_options={"dim": 2, "hidden": 8, "depth": 1}, steps=2)
    result = otcfm.train(config, batch_size=8, out=tmp_path, progress=False)
    model, _ = otcfm.load_model(tmp_path)
    assert _same(model, result.model) and model.spec["hidden"] == 8
    with pytest.raises(ValueError, match="model: cannot import"):
        otcfm.train(config, model="otcfm.models:Nope", progress=False)


def test_bf16_autocast_trains() -> None:
    result = otcfm.train(steps=3, batch_size=16, hidden=8, precision="bf16", progress=False)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert next(result.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"source": "gauss"}, ValueError, "source: unknown dataset 'gauss'"),
        ({"target": torch.tensor([[1.0, float("nan")]])}, ValueError, "target: contains NaN"),
        ({"target": torch.zeros(10)}, ValueError, r"target: expected shape \(N, \.\.\.\)"),
        ({"target": torch.zeros(0, 2)}, ValueError, "target: expected at least one sample"),
        ({"target": "missing.npy"}, FileNotFoundError, "target: no file"),
        ({"target": torch.zeros(5, 2), "target_options": {"dim": 2}}, ValueError, "apply to a dataset name"),
        ({"source": "moons", "target": torch.zeros(5, 3)}, ValueError, "source and target: expected the same"),
        ({"target": "mixture", "target_options": {"size": 2}}, ValueError, "invalid options"),
        ({"coupler_options": {"epsilon": 0.1}}, ValueError, "coupler_options: invalid options"),
        ({"lr": float("inf")}, ValueError, "lr: expected a finite number"),
        ({"grad_clip": 0.0}, ValueError, "grad_clip"),
        ({"precision": "fp16"}, ValueError, "precision: unknown value 'fp16'"),
        ({"model": 3}, TypeError, "model: expected an nn.Module"),
        ({"stepz": 3}, TypeError, "valid settings are the fields of TrainConfig"),
        ({"target": object()}, TypeError, "target: expected a dataset name"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        otcfm.train(steps=1, batch_size=4, hidden=4, progress=False, **kwargs)


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    config = otcfm.TrainConfig(steps=2, batch_size=8, hidden=8)
    first = otcfm.train(config, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        otcfm.train(config, out=tmp_path, progress=False)
    again = otcfm.train(dataclasses.replace(config, seed=5), out=tmp_path, overwrite=True, progress=False)
    assert again.losses != first.losses and checkpoint.load(tmp_path / "checkpoint.pt")["run"]["seed"] == 5


def test_auto_source_is_noise_for_own_2d_data() -> None:
    """'auto' gives 8gaussians only to the built-in 2-D toys; a user's 2-D data get a standard Gaussian."""
    from otcfm.training import TrainConfig, _data

    own = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * 0.1 + 4
    source, _ = _data(TrainConfig(), {"target": own})
    assert source.spec == "gaussian" and source.shape == (2,)
    source, _ = _data(TrainConfig(target="moons"), {})
    assert source.spec == "8gaussians"


def test_a_model_that_does_not_fit_the_data_fails_before_training(npy: Path) -> None:
    """Was torch's 'mat1 and mat2 shapes cannot be multiplied' from inside the first step."""
    net = otcfm.models.MLP(3)  # takes 3 features, the data have 5
    with pytest.raises(ValueError, match=r"model: calling it as model\(x, t\) on samples of shape \(2, 5\) failed"):
        otcfm.train(model=net, target=str(npy), progress=False, **QUICK)
    with pytest.raises(ValueError, match="model: it has no parameters"):
        otcfm.train(model=torch.nn.Identity(), target=str(npy), progress=False, **QUICK)
    with pytest.raises(TypeError, match="callback: expected a function"):
        otcfm.train(target=str(npy), callback=5, progress=False, **QUICK)


def test_the_probe_leaves_batch_norm_statistics_and_modes_alone() -> None:
    from otcfm.solvers import check_velocity

    class Norm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.frozen = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2).eval()

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.frozen(self.norm(x))

    net = Norm()
    check_velocity(net, torch.randn(4, 2) + 5)
    assert torch.equal(net.norm.running_mean, torch.zeros(2)) and net.norm.training and not net.frozen.training


def test_a_data_file_is_recorded_absolute(npy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run found its file only from the directory it was started in (otcfm sample/reflow elsewhere failed)."""
    monkeypatch.chdir(npy.parent)
    run = otcfm.train(target="data.npy", out=tmp_path / "run", progress=False, **QUICK)
    assert Path(run.config.target).is_absolute() and Path(run.config.target).samefile(npy)
    monkeypatch.chdir(tmp_path)
    _, config = otcfm.load_model(tmp_path / "run")
    assert config.target == run.config.target  # readable from here


def test_resume_with_source_auto_keeps_the_recorded_source(tmp_path: Path) -> None:
    """A run of 2-D data started with a named source resumes with source='auto' (the default)."""
    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) + 4
    short = dict(QUICK, steps=QUICK["steps"] - 2)
    otcfm.train(target=data, source="8gaussians", out=tmp_path, progress=False, **short)
    resumed = otcfm.train(target=data, out=tmp_path, resume=True, progress=False, **QUICK)  # source: 'auto'
    assert resumed.config.source == "8gaussians" and resumed.start_step == short["steps"]


def test_the_probe_runs_as_the_steps_do_under_bf16() -> None:
    """A bf16 model with precision='bf16' trained before the probe existed; the probe refused it (float32 input)."""
    model = otcfm.models.MLP(2, hidden=16, depth=1).to(torch.bfloat16)
    result = otcfm.train(target="moons", model=model, precision="bf16", progress=False, **QUICK)
    assert len(result.losses) == QUICK["steps"]


def test_an_interrupted_semidiscrete_fit_resumes(tmp_path: Path) -> None:
    """Ctrl-C during train's semidiscrete fit lost all of it (and the CLI said the finished work was saved)."""
    data = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + 2
    calls = {"n": 0, "stop": None}

    def noise(n: int, generator: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return torch.randn(n, 2, generator=generator)

    settings = dict(
        QUICK, target=data, source=noise, coupler="semidiscrete", progress=False,
        coupler_options={"fit_steps": 250, "fit_batch_size": 64},
    )  # fmt: skip
    full = otcfm.train(out=tmp_path / "full", **settings)
    calls.update(n=0, stop=160)  # the fit checkpoints every 100 steps
    with pytest.raises(KeyboardInterrupt):
        otcfm.train(out=tmp_path / "cut", **settings)
    assert (tmp_path / "cut" / "semidiscrete-fit.pt").is_file()
    calls.update(n=0, stop=None)
    resumed = otcfm.train(out=tmp_path / "cut", resume=True, **settings)
    assert calls["n"] < 250  # the fit went on from its checkpoint
    assert _same(full.model, resumed.model)


def test_mistakes_with_own_data_and_factories_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third walkthrough's raw errors: each now names the argument and what was expected."""
    import numpy as np

    torch.save(np.zeros((10, 2)), tmp_path / "array.pt")
    with pytest.raises(ValueError, match=r"target: .* \(it holds objects other than tensors .*\); a .pt file holds"):
        otcfm.train(target=str(tmp_path / "array.pt"), steps=2, progress=False)
    with pytest.raises(TypeError, match=r"target: the sampler raised TypeError when called as f\(n, generator\)"):
        otcfm.train(target=lambda n: torch.randn(n, 2), steps=2, progress=False)
    (tmp_path / "walk_models.py").write_text(
        "import torch\n\nclass Fixed(torch.nn.Module):\n    def __init__(self, ch=4):\n        super().__init__()\n\n"
        "def plain():\n    return Fixed()\n\ndef passing(**options):\n    return Fixed(**options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="model_options: unknown option 'ch' of plain; it takes no options"):
        otcfm.train(model="walk_models:plain", model_options={"ch": 8}, steps=2, progress=False)
    with pytest.raises(TypeError, match=r"model: walk_models:passing\(\*\*\{'width': 8\}\) raised TypeError"):
        otcfm.train(model="walk_models:passing", model_options={"width": 8}, steps=2, progress=False)
    with pytest.raises(TypeError, match=r"model: torch:zeros\(\*\*\{\}\) raised TypeError"):
        otcfm.train(model="torch:zeros", steps=2, progress=False)


class _Augmented(_Pairs):
    """Items that come out otherwise at every read (random augmentation)."""

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self.data[k] + torch.randn(self.data.shape[1:]), 0


def test_a_dataset_or_sampler_with_other_content_is_refused_on_resume(tmp_path: Path) -> None:
    """A Dataset was fingerprinted by its class and length, a sampler by its name: other content resumed."""
    quick = {"steps": 6, "batch_size": 16, "hidden": 8, "depth": 1, "checkpoint_every": 3, "progress": False}
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    otcfm.train(target=_Pairs(data), out=tmp_path / "d", **quick)
    with pytest.raises(ValueError, match="target_fingerprint"):
        otcfm.train(target=_Pairs(data + 1), out=tmp_path / "d", resume=True, **{**quick, "steps": 8})
    assert otcfm.train(target=_Pairs(data.clone()), out=tmp_path / "d", resume=True, **{**quick, "steps": 8}).losses

    def sampler(n: int, g: torch.Generator | None) -> torch.Tensor:
        return torch.randn(n, 3, generator=g) + shift

    shift = 0.0
    otcfm.train(target=sampler, out=tmp_path / "s", **quick)
    shift = 5.0
    with pytest.raises(ValueError, match="target_fingerprint"):
        otcfm.train(target=sampler, out=tmp_path / "s", resume=True, **{**quick, "steps": 8})
    # content that changes from read to read keeps the name alone
    assert as_source(_Augmented(data), "target").fingerprint == "dataset:_Augmented[64]"
    assert as_source(_Pairs(data), "target").fingerprint.startswith("dataset:_Pairs[64]:sampled=")


def test_options_beside_an_instance_and_label_weight_are_refused() -> None:
    """They were recorded as applied and not used (a Sinkhorn instance at 0.1 recorded epsilon 0.5)."""
    quick = {"steps": 2, "batch_size": 16, "hidden": 8, "depth": 1, "progress": False}
    sinkhorn = otcfm.couplers.SinkhornCoupler(epsilon=0.1)
    with pytest.raises(ValueError, match=r"coupler_options: \{'epsilon': 0.5\} are for a coupler given by name"):
        otcfm.train(coupler=sinkhorn, coupler_options={"epsilon": 0.5}, **quick)
    with pytest.raises(ValueError, match="path_options: .* set them on the path instance"):
        otcfm.train(path=otcfm.paths.LinearPath(0.1), path_options={"sigma": 0.3}, **quick)
    with pytest.raises(ValueError, match="time_sampler_options: .* set them on the time_sampler instance"):
        otcfm.train(time_sampler=otcfm.timesteps.LogitNormal(), time_sampler_options={"mean": -1.0}, **quick)
    with pytest.raises(ValueError, match="coupler_options: label_weight weighs labels, which only a class-condit"):
        otcfm.train(coupler="exact", coupler_options={"label_weight": 1.0}, **quick)
    labelled = {"target": "digits", "model": "unet", "model_options": {"preset": "digits"}}
    run = otcfm.train(coupler="exact", coupler_options={"label_weight": 1.0}, **labelled, **quick)
    assert run.config.conditional  # a conditional run passes labels to the coupler: label_weight is used


def test_a_time_sampler_function_is_recorded_without_its_address(tmp_path: Path) -> None:
    """Its default repr held a memory address, so a resume in another process was always refused."""

    def late(n: int, g: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.rand(n, generator=g, device=device, dtype=dtype).sqrt()

    result = otcfm.train(time_sampler=late, steps=2, batch_size=16, hidden=8, depth=1, progress=False)
    assert result.config.time_sampler.startswith("callable:") and "0x" not in result.config.time_sampler


class _Ragged(_Pairs):
    """Item 1 (or every odd one) is shorter."""

    def __init__(self, data: torch.Tensor, every_odd: bool) -> None:
        super().__init__(data)
        self.every_odd = every_odd

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        short = k % 2 == 1 if self.every_odd else k == 1
        return self.data[k, : 3 - short], 0


def test_dataset_items_of_other_shapes_or_scalars_are_named() -> None:
    """torch.stack raised 'stack expects each tensor to be equal size' before the intended message."""
    with pytest.raises(ValueError, match=r"target: dataset items of different shapes, \(3,\) and \(2,\)"):
        as_source(_Ragged(torch.randn(64, 3), every_odd=True), "target")  # seen among the fingerprint's items
    source = as_source(_Ragged(torch.randn(64, 3), every_odd=False), "target")  # item 1 is not among them
    with pytest.raises(ValueError, match=r"target: dataset items of different shapes, \(3,\) and \(2,\)"):
        source(512, torch.Generator().manual_seed(0))  # draws item 1 (seeded)
    with pytest.raises(ValueError, match="target: dataset items are scalars"):
        as_source(_Pairs(torch.randn(64)), "target")
