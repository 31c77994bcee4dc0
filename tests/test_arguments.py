"""Flags, numbers, seeds and devices at the public entries, and what the run lock guards (each test fails on the
code before these checks: a flag read by truthiness, numpy scalars refused, a seed overflowing inside torch, a
meta tensor reaching ``.item()``, a lock taken after the semidiscrete fit)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pytest
import torch

import otcfm
from otcfm.cli import main
from otcfm.runlock import LOCK_NAME

QUICK = {"steps": 2, "batch_size": 8, "hidden": 8, "depth": 1, "progress": False}


def _data(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("value", ["False", "no", 1, 0, None])
def test_overwrite_that_is_not_a_bool_is_refused_and_the_run_stays(tmp_path: Path, value: object) -> None:
    otcfm.train(target=_data(), out=tmp_path, **QUICK)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TypeError, match="overwrite: expected True or False"):
        otcfm.train(target=_data(), out=tmp_path, overwrite=value, seed=1, **QUICK)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_other_flags_take_only_booleans(tmp_path: Path) -> None:
    otcfm.train(target=_data(), out=tmp_path, **QUICK)
    x = _data(8)
    with pytest.raises(TypeError, match="use_ema"):
        otcfm.load_model(tmp_path, use_ema="no")
    with pytest.raises(TypeError, match="progress"):
        otcfm.train(target=_data(), **{**QUICK, "progress": "no"})
    with pytest.raises(TypeError, match="return_trajectory"):
        otcfm.integrate(lambda x, t: x, x, 2, return_trajectory="no")
    with pytest.raises(TypeError, match="w2_squared"):
        otcfm.metrics.transport_cost_ratio(x, x, True)
    model, _ = otcfm.load_model(tmp_path, use_ema=np.bool_(False))  # numpy booleans are booleans
    assert isinstance(model, torch.nn.Module)


def test_numpy_scalars_are_numbers_and_are_recorded_as_python_numbers() -> None:
    config = otcfm.TrainConfig(
        steps=np.int64(3), lr=np.float32(1e-3), seed=np.int64(5), batch_size=np.int32(8), ema_decay=np.float64(0.5)
    )
    assert (config.steps, config.seed, config.batch_size) == (3, 5, 8)
    assert [type(v) for v in (config.steps, config.lr, config.seed, config.batch_size, config.ema_decay)] == [
        int,
        float,
        int,
        int,
        float,
    ]
    result = otcfm.train(target=_data(), **{**QUICK, "steps": np.int64(2), "lr": np.float32(1e-3)})
    assert len(result.losses) == 2 and type(result.config.steps) is int


@pytest.mark.parametrize("seed", [2**70, -1, 2**63])
def test_seeds_outside_the_generator_range_are_refused(seed: int) -> None:
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*63 - 1\]"):
        otcfm.TrainConfig(seed=seed)
    otcfm.TrainConfig(seed=2**63 - 1)  # the largest seed is taken


def test_seed_flag_out_of_range_names_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--seed", str(2**70), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "argument --seed: expected an integer in [0, 2**63 - 1]" in capsys.readouterr().err


def test_meta_tensors_and_device_are_refused_clearly() -> None:
    meta = torch.empty(8, 2, device="meta")
    with pytest.raises(ValueError, match="x0: a meta tensor has a shape but no values"):
        otcfm.integrate(lambda x, t: x, meta, 2)
    with pytest.raises(ValueError, match="x1: a meta tensor"):
        otcfm.get_coupler("exact")(_data(8), meta)
    with pytest.raises(ValueError, match="target: a meta tensor"):
        otcfm.train(target=torch.empty(64, 2, device="meta"), **QUICK)
    with pytest.raises(ValueError, match="device: 'meta' holds shapes without values"):
        otcfm.train(target=_data(), device="meta", **QUICK)
    with pytest.raises(ValueError, match="device: 'meta'"):
        otcfm.data.sample("moons", 4, device="meta")


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize("after", [0, 4])
def test_nan_drawn_by_a_sampler_is_blamed_on_it(side: str, after: int) -> None:
    """At the probe draws (``after=0``) or in a training step: the message names the argument, not the model
    (a NaN source made the model's first output NaN) nor the loss's ``x0`` / ``x1``."""
    calls = {"n": 0}

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        x = torch.randn(n, 2, generator=generator)
        return x * float("nan") if calls["n"] > after else x

    other = "target" if side == "source" else "source"
    with pytest.raises(ValueError, match=rf"^{side}: .*NaN or Inf"):
        otcfm.train(**{side: sampler, other: "moons"}, **{**QUICK, "steps": 4})


def test_the_run_lock_is_taken_before_a_semidiscrete_fit(tmp_path: Path) -> None:
    """A second writer of ``out`` is refused before it fits potentials or writes anything in ``out``."""
    with open(tmp_path / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds out
        handle.write("pid 1 on elsewhere")
        handle.flush()
        with pytest.raises(ValueError, match="out: .* is in use"):
            otcfm.train(target=_data(256), coupler="semidiscrete", out=tmp_path, **QUICK)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_an_existing_run_is_refused_before_a_semidiscrete_fit(tmp_path: Path) -> None:
    otcfm.train(target=_data(256), out=tmp_path, **QUICK)
    (tmp_path / "semidiscrete-fit.pt").write_bytes(b"another run's fit in progress")
    with pytest.raises(ValueError, match="already holds a run"):
        otcfm.train(target=_data(256), coupler="semidiscrete", out=tmp_path, **QUICK)
    assert (tmp_path / "semidiscrete-fit.pt").read_bytes() == b"another run's fit in progress"
