"""The semidiscrete coupler: pairing by fitted potentials, its fit, persistence, labels and errors."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import otcfm
from otcfm.couplers import ConvergenceWarning, SemidiscreteCoupler, SemidiscreteFit
from otcfm.couplers.semidiscrete import noise_floor
from otcfm.couplers.shards import SemidiscreteShard


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
            "unit": 1.0,
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
    data = data.clone()
    data[3, 1] = float("inf")  # a new tensor is verified again
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_scale_benchmark_quick(tmp_path: Path) -> None:
    from benchmark_module import load_benchmark

    scale = load_benchmark("scale")
    assert scale.main(["--quick", "--tasks", "mixture", "--out", str(tmp_path)]) == 0
    results = tmp_path / "quick-tuned" / "results.jsonl"  # one directory per training recipe
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    measured = {r["coupler"]: r for r in rows if r["coupler"].endswith(":measured")}
    assert set(measured) == {c + ":measured" for c in scale.COUPLERS}
    assert measured["exact-256:measured"]["target_variance"] < measured["independent:measured"]["target_variance"]
    assert set(measured["semidiscrete:measured"]["quality"]) == {"1", "2", "4", "100"}
    assert scale.main(["--quick", "--tasks", "mixture", "--out", str(tmp_path)]) == 0  # resumes: nothing appended
    assert len(results.read_text().splitlines()) == len(rows)


# ---------------------------------------------------------------------------------------------- input scales

#: Input scales whose float32 squares under- or overflow.
SCALES = [1e-30, 1e-20, 1e20, 1e30]
#: How far (relative to the largest term of a row's scores) a partner's float64 score may lie below the row's best:
#: the float32 rounding of the scores.
ARGMIN_TOLERANCE = 1e-4


def _is_argmin(x0: torch.Tensor, data: torch.Tensor, coupler: SemidiscreteCoupler, j: torch.Tensor) -> bool:
    """Whether ``j`` is ``argmin_k ||x - y_k||^2 - g_k`` in float64 on the problem rescaled by the coupler's unit
    (``x / u``, ``y / u``, ``g / u^2``), up to :data:`ARGMIN_TOLERANCE`: the row's ``|x|^2`` is left out (common to
    the row), the scores are ``2 x.y_k - |y_k|^2 + g_k``."""
    u = coupler.unit
    x, y, g = x0.double() / u, data.double() / u, coupler.potentials / u**2
    assert g.dtype == torch.float64 and bool(torch.isfinite(g).all())
    cross, square = 2 * x @ y.T, (y * y).sum(1)
    scores = cross - square[None] + g[None]
    scale = cross.abs().amax(1) + (square + g.abs()).amax()
    chosen = scores.gather(1, j[:, None])[:, 0]
    return bool(((scores.amax(1) - chosen) <= ARGMIN_TOLERANCE * scale).all())


def _scaled_fit(
    source_scale: float, data_scale: float, dtype: torch.dtype = torch.float32
) -> tuple[SemidiscreteCoupler, SemidiscreteFit, torch.Tensor]:
    data = (torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * data_scale).to(dtype)

    def source(n: int, generator: torch.Generator | None) -> torch.Tensor:
        return (torch.randn(n, 2, generator=generator, dtype=torch.float64) * source_scale).to(dtype)

    coupler = SemidiscreteCoupler()
    report = coupler.fit(
        source, data, steps=150, batch_size=256, generator=torch.Generator().manual_seed(1), progress=False
    )
    return coupler, report, data


@pytest.mark.parametrize("scale", SCALES)
def test_fit_and_pairing_at_extreme_scales_match_the_unit_problem(scale: float) -> None:
    """Source and data at 1e-30 ... 1e30 (float32 squares under- or overflow): finite potentials, partners the
    float64 argmin of the rescaled problem, an assignment error as low as at scale 1 (0.169 with these seeds)."""
    _, at_one, _ = _scaled_fit(1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        coupler, report, data = _scaled_fit(scale, scale)
    assert coupler.unit != 1.0 and report.assignment_error < 2 * report.noise_floor
    assert report.assignment_error == pytest.approx(at_one.assignment_error, abs=0.05)
    assert math.isfinite(report.dual) and report.dual == pytest.approx(at_one.dual * scale**2, rel=0.05)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * scale
    assert _is_argmin(x0, data, coupler, coupler(x0, data).j)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("side", ["source", "data"])
def test_one_sided_extreme_scale_warns_and_pairs_by_the_argmin(side: str, scale: float) -> None:
    """Source and data 1e30 apart in scale: the float32 potentials cannot resolve the coupling; the fit says so
    (ConvergenceWarning) and pairing is still the argmin of the potentials it has."""
    with pytest.warns(ConvergenceWarning, match="noise floor"):
        coupler, _, data = _scaled_fit(scale if side == "source" else 1.0, scale if side == "data" else 1.0)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * (scale if side == "source" else 1.0)
    assert _is_argmin(x0, data, coupler, coupler(x0, data).j)


@pytest.mark.parametrize("fitted", [1e-30, 1.0, 1e30])
def test_batches_far_from_the_fitted_scale_pair_by_the_argmin(fitted: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        coupler, _, data = _scaled_fit(fitted, fitted)
    for scale in (1e-30, 1.0, 1e30):
        x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3)) * scale
        assert _is_argmin(x0, data, coupler, coupler(x0, data).j), scale


def test_magnitudes_no_unit_holds_are_refused() -> None:
    """float64 data whose costs (or their inverses) float64 cannot hold, or float32 subnormals, are refused naming
    the target."""
    for source, target in ((1.0, 1e300), (1e-300, 1e-300)):
        with pytest.raises(ValueError, match=r"target: magnitudes up to .* cannot be scored in torch.float64"):
            _scaled_fit(source, target, torch.float64)
    with pytest.raises(ValueError, match=r"target: .* torch.float32 .* or pass float64 data"):
        _scaled_fit(1e-42, 1e-40)


def test_extreme_scale_potentials_roundtrip_and_shard() -> None:
    """Potentials in float64 cost units (about 1e60 here) with their unit: saved, loaded, sharded, they pair alike."""
    coupler, _, data = _scaled_fit(1e30, 1e30)
    state = coupler.state_dict()
    assert state["unit"] == coupler.unit and state["potentials"].dtype == torch.float64
    assert float(coupler.potentials.abs().max()) > 1e50
    loaded = SemidiscreteCoupler().load_state_dict(state, data)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(4)) * 1e30
    j = coupler(x0, data).j
    assert torch.equal(loaded(x0, data).j, j)
    assert torch.equal(SemidiscreteShard.from_coupler(coupler, data).pair(x0)[0], j)
    with pytest.raises(ValueError, match="unit: at unit=1"):  # cost-unit potentials of 1e60 overflow float32 scores
        SemidiscreteShard(data, coupler.potentials, 0)
    with pytest.raises(ValueError, match="state: expected a power of two as the unit"):
        SemidiscreteCoupler().load_state_dict({**state, "unit": 3.0})


# --------------------------------------------------------------------------------- classes, NaN, convergence


def test_a_source_class_absent_from_the_data_is_an_error() -> None:
    data, labels = _data(30), torch.arange(30) % 3
    coupler = SemidiscreteCoupler()
    coupler.fit("gaussian", data, steps=20, batch_size=64, y1=labels, generator=torch.Generator().manual_seed(0),
                eval_samples=300, progress=False)  # fmt: skip
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"y0: classes \[5\] have no point in the dataset"):
        coupler(x0, data, y0=torch.tensor([0, 1, 5, 2]), y1=labels)
    with pytest.raises(ValueError, match=r"y0: classes \[-1, 7\]"):
        coupler(x0, data, y0=torch.tensor([7, -1, 7, 0]))
    assert torch.equal(labels[coupler(x0, data, y0=torch.tensor([2, 1, 0, 2])).j], torch.tensor([2, 1, 0, 2]))


def _nan_from(call: int) -> object:
    """A sampler whose draws hold a NaN from its ``call``-th call on (``as_source`` draws 3 times to probe it)."""
    calls = {"n": 0}

    def draw(n: int, generator: torch.Generator | None) -> torch.Tensor:
        calls["n"] += 1
        x = torch.randn(n, 2, generator=generator)
        if calls["n"] >= call:
            x[n - 1, 0] = float("nan")
        return x

    return draw


@pytest.mark.parametrize("call", [4, 5, 9])
def test_nan_from_the_source_is_an_error(call: int) -> None:
    """The fit's first draw (the probe), its first step, a later step: each draw is checked, not only a probe."""
    with pytest.raises(ValueError, match="source: contains NaN or Inf"):
        SemidiscreteCoupler().fit(_nan_from(call), _data(20), steps=10, batch_size=32, progress=False)


@pytest.mark.parametrize("call", [4, 6])
def test_evaluate_refuses_a_sampler_that_draws_nan(call: int) -> None:
    data = _data(20)
    coupler, _ = _fitted(data, steps=20)
    with pytest.raises(ValueError, match="source: contains NaN or Inf"):
        coupler.evaluate(_nan_from(call), data, 3000, torch.Generator().manual_seed(0))


def test_a_fit_far_from_its_noise_floor_warns() -> None:
    """Two clusters 200 apart: the affine warm start sends the source between them, and one step cannot fix it; a
    converged fit does not warn."""
    g = torch.Generator().manual_seed(7)
    data = torch.cat([torch.randn(20, 2, generator=g) + torch.tensor([-40.0, 200.0]), torch.randn(20, 2, generator=g)])
    with pytest.warns(ConvergenceWarning, match=r"assignment error 0\.\d+ after 1 steps, .* noise floor"):
        report = SemidiscreteCoupler().fit("gaussian", data, steps=1, batch_size=64, progress=False)
    assert report.assignment_error > 3 * report.noise_floor
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, report = _fitted(_data(200), steps=300)
    assert report.assignment_error < 2 * report.noise_floor
