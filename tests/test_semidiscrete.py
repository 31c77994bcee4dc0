"""The semidiscrete coupler: pairing by fitted potentials, its fit, persistence, labels and errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import otcfm
from otcfm.couplers import SemidiscreteCoupler, SemidiscreteFit
from otcfm.couplers.semidiscrete import noise_floor


def _data(n: int, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2.0 + 1.0


def _fitted(data: torch.Tensor, steps: int = 200, **options: object) -> tuple[SemidiscreteCoupler, SemidiscreteFit]:
    coupler = SemidiscreteCoupler(**options)  # type: ignore[arg-type]
    report = coupler.fit(
        "gaussian", data, steps=steps, batch_size=256, generator=torch.Generator().manual_seed(1), progress=False
    )
    return coupler, report


@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), b=st.integers(1, 12), budget=st.integers(8, 4096))
def test_pairing_is_the_brute_force_argmin(seed: int, n: int, b: int, budget: int) -> None:
    """j = argmin_k ||x0 - x1_k||^2 - g_k for any potentials, whatever the chunking (memory budget)."""
    g = torch.Generator().manual_seed(seed)
    data, x0 = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(b, 3, generator=g, dtype=torch.float64)
    coupler = SemidiscreteCoupler(memory_budget=budget)
    coupler.load_state_dict(
        {
            "kind": "otcfm.semidiscrete-potentials",
            "potentials": torch.randn(n, generator=g, dtype=torch.float64),
            "fingerprint": otcfm.couplers.semidiscrete.fingerprint(data),
            "labels": None,
            "mean_cost": 1.0,
            "epsilon": 0.0,
            "relative": True,
            "steps": 0,
        }
    )
    i, j = coupler(x0, data)
    expected = ((x0[:, None] - data[None]) ** 2).sum(-1).sub(coupler.potentials[None]).argmin(1)
    assert torch.equal(i, torch.arange(b)) and torch.equal(j, expected)


def test_discrete_source_reproduces_the_exact_assignment() -> None:
    """Source = the N points themselves (uniform): converged potentials at epsilon 0 give ot.emd's matching."""
    n = 64
    x0, data = _data(n, seed=2), _data(n, seed=3)
    coupler = SemidiscreteCoupler()
    coupler.fit(
        x0,
        data,
        steps=3000,
        batch_size=256,
        generator=torch.Generator().manual_seed(0),
        eval_samples=100 * n,
        progress=False,
    )
    _, j = coupler(x0, data)
    plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), ot.dist(x0.double().numpy(), data.double().numpy()))
    agree = float((torch.as_tensor(plan.argmax(1)) == j).double().mean())
    assert agree >= 0.99, agree


def test_fit_converges_on_a_continuous_source() -> None:
    data = _data(200)
    _, report = _fitted(data, steps=300)
    assert report.steps == 300 and report.eval_samples == 2000
    assert report.noise_floor == pytest.approx(noise_floor(2000, 200))
    assert report.assignment_error < 2 * report.noise_floor  # nearest neighbour (g = 0) is far worse
    nearest = otcfm.metrics.assignment_error(((torch.randn(2000, 2)[:, None] - data[None]) ** 2).sum(-1).argmin(1), 200)
    assert nearest > 3 * report.assignment_error
    assert 0 < report.dual < report.mean_cost  # the dual lower-bounds W2^2, which is below the mean cost


def test_fit_is_deterministic_and_resumes_bit_exact(tmp_path: Path) -> None:
    data = _data(100)
    first, _ = _fitted(data, steps=60)
    again, _ = _fitted(data, steps=60)
    assert torch.equal(first.potentials, again.potentials)

    calls = {"n": 0}

    def interrupted(n: int, g: torch.Generator | None) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 36:  # the mean-cost draw, then 35 steps: the checkpoint of step 30 is on disk
            raise KeyboardInterrupt
        return torch.randn(n, 2, generator=g)

    resumed = SemidiscreteCoupler()
    with pytest.raises(KeyboardInterrupt):
        resumed.fit(
            interrupted,
            data,
            steps=60,
            batch_size=256,
            generator=torch.Generator().manual_seed(1),
            checkpoint=tmp_path / "fit.pt",
            checkpoint_every=10,
            progress=False,
        )
    resumed.fit(
        lambda n, g: torch.randn(n, 2, generator=g),
        data,
        steps=60,
        batch_size=256,
        generator=torch.Generator().manual_seed(1),
        checkpoint=tmp_path / "fit.pt",
        checkpoint_every=10,
        progress=False,
    )
    reference = SemidiscreteCoupler()
    reference.fit(
        lambda n, g: torch.randn(n, 2, generator=g),
        data,
        steps=60,
        batch_size=256,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert torch.equal(resumed.potentials, reference.potentials)
    with pytest.raises(ValueError, match="not a fit of these potentials on this dataset"):
        SemidiscreteCoupler().fit(
            "gaussian", _data(100, seed=9), steps=60, checkpoint=tmp_path / "fit.pt", progress=False
        )


def test_potentials_refuse_another_dataset_and_roundtrip(tmp_path: Path) -> None:
    data = _data(50)
    coupler, _ = _fitted(data, steps=20)
    path = coupler.save(tmp_path / "potentials.pt")
    loaded = SemidiscreteCoupler.load(path, target=data)
    x0 = torch.randn(32, 2)
    assert torch.equal(loaded(x0, data).j, coupler(x0, data).j)
    other = data.clone()
    other[0, 0] += 1.0
    with pytest.raises(ValueError, match="x1: these potentials were fitted on another dataset"):
        coupler(x0, other)
    with pytest.raises(ValueError, match="another dataset"):
        SemidiscreteCoupler.load(path, target=other)
    with pytest.raises(ValueError, match="x1: expected the whole dataset of 50 points"):
        coupler(x0, data[:49])
    with pytest.raises(ValueError, match="epsilon: the potentials were fitted at epsilon=0.0"):
        SemidiscreteCoupler.load(path, epsilon=0.1)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="potentials.pt"):
        SemidiscreteCoupler.load(path)


def test_labels_pair_within_class() -> None:
    data, labels = _data(120), torch.arange(120) % 3
    coupler = SemidiscreteCoupler()
    report = coupler.fit(
        "gaussian",
        data,
        steps=200,
        batch_size=256,
        y1=labels,
        generator=torch.Generator().manual_seed(0),
        eval_samples=6000,
        progress=False,
    )
    assert report.assignment_error < 0.15
    y0 = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    _, j = coupler(torch.randn(64, 2), data, y0=y0, y1=labels)
    assert torch.equal(labels[j], y0)
    with pytest.raises(ValueError, match="y1: not the labels"):
        coupler(torch.randn(4, 2), data, y1=labels.roll(1))


def test_entropic_pairs_are_draws_and_fit_converges() -> None:
    data = _data(80)
    coupler, report = _fitted(data, steps=200, epsilon=0.05)
    assert report.assignment_error < 2.5 * report.noise_floor
    x0 = torch.randn(256, 2)
    a = coupler(x0, data, generator=torch.Generator().manual_seed(0)).j
    b = coupler(x0, data, generator=torch.Generator().manual_seed(1)).j
    assert not torch.equal(a, b)
    assert torch.equal(a, coupler(x0, data, generator=torch.Generator().manual_seed(0)).j)
    assert coupler.entropic_epsilon() == (0.05, True)


def test_online_mode_updates_the_potentials() -> None:
    data = _data(40)
    coupler, _ = _fitted(data, steps=20, online_lr=0.01)
    before = coupler.potentials.clone()
    coupler(torch.randn(64, 2), data)
    assert not torch.equal(before, coupler.potentials)


def test_flow_matcher_trains_on_the_whole_dataset() -> None:
    data = _data(100)
    coupler, _ = _fitted(data, steps=50)
    fm = otcfm.FlowMatcher(coupler=coupler)
    model = otcfm.models.MLP(2, hidden=16, depth=1)
    loss = fm.loss(model, torch.randn(32, 2), data, torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    assert otcfm.get_coupler("semidiscrete").name == "semidiscrete"


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="epsilon: expected a finite number >= 0"):
        SemidiscreteCoupler(epsilon=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        SemidiscreteCoupler(epsilon=float("nan"))
    with pytest.raises(ValueError, match="memory_budget"):
        SemidiscreteCoupler(memory_budget=0)
    coupler = SemidiscreteCoupler()
    with pytest.raises(ValueError, match="potentials: not fitted"):
        coupler(torch.randn(4, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="target: expected a non-empty batch"):
        coupler.fit("gaussian", torch.zeros(0, 2), progress=False)
    bad = _data(10)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="target: contains NaN or Inf"):
        coupler.fit("gaussian", bad, progress=False)
    with pytest.raises(ValueError, match="source: draws samples of shape"):
        coupler.fit(lambda n, g: torch.randn(n, 3), _data(10), progress=False)
    with pytest.raises(ValueError, match="steps"):
        coupler.fit("gaussian", _data(10), steps=0, progress=False)
    with pytest.raises(ValueError, match="y1: expected integer class labels"):
        coupler.fit("gaussian", _data(10), y1=torch.rand(10), progress=False)
    fitted, _ = _fitted(_data(10), steps=5)
    with pytest.raises(ValueError, match="same sample shape"):
        fitted(torch.randn(4, 3), _data(10))
    with pytest.raises(ValueError, match="y0: these potentials were fitted without labels"):
        fitted(torch.randn(4, 2), _data(10), y0=torch.zeros(4, dtype=torch.long))
    data = _data(10)
    fitted(torch.randn(4, 2), data)  # verified once: fingerprint and NaN/Inf scan
    with pytest.raises(ValueError, match="x0: contains NaN or Inf"):  # x0 is scanned on every call, before pairing
        fitted(torch.full((4, 2), float("nan")), data, y0=torch.zeros(4, dtype=torch.long))
    data[3, 1] = float("inf")  # an in-place change is seen (the tensor's version counter)
    with pytest.raises(ValueError, match="x1: contains NaN or Inf"):
        fitted(torch.randn(4, 2), data)
    restored = pickle.loads(pickle.dumps(fitted))  # picklable; verifies its dataset again
    assert torch.equal(restored.potentials, fitted.potentials)
    assert restored(torch.randn(4, 2), _data(10)).j.shape == (4,)
    online, _ = _fitted(_data(10), steps=5, online_lr=0.01)
    data = _data(10)
    online(torch.randn(4, 2), data)
    before = online.potentials.clone()
    with pytest.raises(ValueError, match="x0: contains NaN or Inf"):
        online(torch.full((4, 2), float("nan")), data)
    assert torch.equal(online.potentials, before)  # a rejected batch leaves the online potentials alone


def test_metrics() -> None:
    assert otcfm.metrics.assignment_error(torch.arange(10), 10) == 0.0
    assert otcfm.metrics.assignment_error(torch.zeros(10, dtype=torch.long), 10) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="partners"):
        otcfm.metrics.assignment_error(torch.tensor([0, 10]), 10)
    x = torch.randn(50, 2, dtype=torch.float64)
    assert otcfm.metrics.transport_cost_ratio(x, x + 1.0, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="w2_squared"):
        otcfm.metrics.transport_cost_ratio(x, x, 0.0)


@pytest.mark.parametrize("screen", [None, True])
def test_train_fits_then_trains_and_resumes_bit_exact(tmp_path: Path, screen: bool | None) -> None:
    """Also with the bfloat16 screen forced on (by default it is off for 300 points)."""
    data = _data(300, d=3)
    settings = dict(
        target=data,
        source="gaussian",
        coupler="semidiscrete",
        batch_size=32,
        hidden=16,
        depth=1,
        coupler_options={"fit_steps": 30, "fit_batch_size": 128, "screen": screen},
        progress=False,
    )
    whole = otcfm.train(steps=12, out=tmp_path / "whole", **settings)
    otcfm.train(steps=6, out=tmp_path / "split", **settings)
    resumed = otcfm.train(steps=12, out=tmp_path / "split", resume=True, **settings)
    assert resumed.losses == whole.losses
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value)
    saved = otcfm.checkpoint.load(tmp_path / "whole" / "checkpoint.pt")["semidiscrete"]
    assert saved["potentials"].shape == (300,) and saved["steps"] == 30
    with pytest.raises(ValueError, match="coupler: 'semidiscrete' pairs with a whole finite dataset"):
        otcfm.train(steps=2, target="moons", coupler="semidiscrete", progress=False)


def test_cli_trains_with_the_semidiscrete_coupler(tmp_path: Path) -> None:
    import subprocess
    import sys

    np.save(tmp_path / "data.npy", _data(200, d=4).numpy())
    command = [
        sys.executable,
        "-m",
        "otcfm.cli",
        "train",
        "--target",
        str(tmp_path / "data.npy"),
        "--coupler",
        "semidiscrete",
        "--coupler-option",
        "fit_steps=20",
        "--steps",
        "5",
        "--batch-size",
        "16",
        "--hidden",
        "16",
        "--depth",
        "1",
        "--eval-n",
        "20",
        "--eval-draws",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "semidiscrete" in otcfm.checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    from otcfm.cli import main

    reflow = [
        "reflow",
        "--teacher",
        str(tmp_path / "run"),
        "--pairs",
        "32",
        "--solver-steps",
        "2",
        "--train-steps",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
        "--out",
        str(tmp_path / "reflow"),
    ]
    assert main(reflow) == 0  # a semidiscrete teacher: its samples are the pairs, the 2-RF trains on them
    model, _ = otcfm.load_model(tmp_path / "reflow")
    assert model(torch.zeros(3, 4), torch.zeros(3)).shape == (3, 4)


def test_scale_benchmark_quick(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).parent.parent / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    assert scale.main(["--quick", "--tasks", "mixture", "--out", str(tmp_path)]) == 0
    results = tmp_path / "quick-tuned" / "results.jsonl"  # one directory per training recipe
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    measured = {r["coupler"]: r for r in rows if r["coupler"].endswith(":measured")}
    assert set(measured) == {c + ":measured" for c in scale.COUPLERS}
    assert measured["exact-256:measured"]["target_variance"] < measured["independent:measured"]["target_variance"]
    assert set(measured["semidiscrete:measured"]["quality"]) == {"1", "2", "4", "100"}
    assert scale.main(["--quick", "--tasks", "mixture", "--out", str(tmp_path)]) == 0  # resumes: nothing appended
    assert len(results.read_text().splitlines()) == len(rows)
