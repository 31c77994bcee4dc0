"""One validation per training step, no host reads on the queued (CUDA) path, the Schroedinger-bridge preset,
and the training-step benchmark in its quick mode."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

import otcfm
import otcfm._checks as checks
import otcfm.couplers.base as coupler_base
import otcfm.couplers.plan as coupler_plan
import otcfm.couplers.sinkhorn as coupler_sinkhorn
import otcfm.paths as paths
import otcfm.timesteps as timesteps
from otcfm.couplers import COUPLERS, ExactCoupler, SinkhornCoupler
from otcfm.flow import BridgeEpsilonWarning
from otcfm.paths import PATHS, BridgePath
from otcfm.timesteps import CheckedSampler, Uniform, get_time_sampler


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), otcfm.data.sample("moons", n, g)


def _model(dim: int = 2) -> Callable[..., torch.Tensor]:
    layer = torch.nn.Linear(dim + 1, dim)

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return layer(torch.cat([x, t[:, None]], dim=1))

    return model


class CheckLog:
    """Counts the calls of the check functions, by function and by the tensor they were given.

    ``check_finite`` scans through ``all_finite`` on the CPU, so a scan of a tensor there counts under both names.
    """

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()
        self.seen: list[object] = []  # kept alive, so that no two tensors share an id

    def count(self, name: str, tensor: object) -> None:
        self.seen.append(tensor)
        self.calls[name, id(tensor)] += 1

    def most(self, name: str) -> int:
        """The largest number of calls of ``name`` on one tensor."""
        return max((n for (f, _), n in self.calls.items() if f == name), default=0)

    def of(self, name: str, tensor: object) -> int:
        return self.calls[name, id(tensor)]

    def total(self, name: str) -> int:
        return sum(n for (f, _), n in self.calls.items() if f == name)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Iterator[CheckLog]:
    """Wrap every check function, wherever a module imported it by name, with a counter."""
    record = CheckLog()
    originals = {
        "check_pair": checks.check_pair,
        "check_batch": checks.check_batch,
        "check_finite": checks.check_finite,
        "all_finite": checks.all_finite,
        "total_of": checks.total_of,
        "check_time": checks.check_time,
        "check_labels": coupler_base.check_labels,
    }

    def counted(name: str) -> Callable[..., object]:
        original = originals[name]

        def wrapper(*args: object, **kwargs: object) -> object:
            record.count(name, args[0])
            if name == "check_pair":
                record.count(name, args[1])
            return original(*args, **kwargs)

        return wrapper

    for module in (checks, coupler_base, coupler_plan, coupler_sinkhorn, paths, timesteps):
        for name in originals:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted(name))
    yield record


@pytest.mark.parametrize("coupler", sorted(COUPLERS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_validation_per_step(ready, log: CheckLog, coupler: str, path: str) -> None:
    """fm.loss checks x0 and x1 once (the coupler's call), scans each for NaN/Inf at most once, never the path's."""
    x0, x1 = _data()
    fm = otcfm.FlowMatcher(coupler=ready(coupler, x1) if coupler == "semidiscrete" else coupler, path=path)
    fm.loss(_model(), x0, x1, torch.Generator().manual_seed(0))  # the first batch: the source check runs once
    log.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcfm.couplers.ConvergenceWarning)
        loss = fm.loss(_model(), x0, x1, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    for x in (x0, x1):
        assert log.of("check_pair", x) == 1  # the coupler's public call, and no second copy
        assert log.of("all_finite", x) == 0  # on the CPU the loss is read instead (one scalar)
    assert log.most("all_finite") <= 1  # an OT coupler's cost matrix, Sinkhorn's plan: each once
    assert log.total("check_time") == 0  # the time sampler is one of ours: its draws need no check


def test_batch_scans_inputs_once_and_labels_once(log: CheckLog) -> None:
    """FlowMatcher.batch (no loss to read) scans each input once; floating conditions once each."""
    x0, x1 = _data()
    y0, y1 = torch.rand(16, 3), torch.rand(16, 3)
    fm = otcfm.FlowMatcher(coupler="independent", path="bridge", sigma=0.3)
    fm.batch(x0, x1, torch.Generator().manual_seed(0), y0=y0, y1=y1)
    for x in (x0, x1, y0, y1):
        assert log.of("check_finite", x) == log.of("all_finite", x) == 1
    assert log.of("check_labels", y0) == log.of("check_labels", y1) == 1
    assert log.total("check_time") == 0


def test_exact_coupler_scans_only_its_cost(log: CheckLog) -> None:
    x0, x1 = _data()
    otcfm.FlowMatcher(coupler="exact").batch(x0, x1)
    assert log.of("check_finite", x0) == log.of("check_finite", x1) == 0
    assert log.total("total_of") == 1  # the cost matrix, which is finite only if both batches are
    assert log.total("all_finite") == 0


def test_a_users_time_sampler_is_checked_once(log: CheckLog) -> None:
    x0, x1 = _data()
    fm = otcfm.FlowMatcher(coupler="independent", time_sampler=lambda n, g, device, dtype: torch.full((n,), 0.5))
    fm.loss(_model(), x0, x1)
    assert log.total("check_time") == 1


def test_loss_names_the_input_with_nan_and_then_the_model() -> None:
    x0, x1 = _data()
    fm = otcfm.FlowMatcher(coupler="independent")
    bad = x1.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="x1: contains NaN or Inf"):
        fm.loss(_model(), x0, bad)
    with pytest.raises(ValueError, match="x0: contains NaN or Inf"):
        fm.batch(bad, x1)
    with pytest.raises(ValueError, match="model: the loss is NaN or Inf with finite x0 and x1"):
        fm.loss(lambda x, t: x * float("nan"), x0, x1)  # no silent NaN loss
    with pytest.raises(ValueError, match="x0: contains NaN or Inf"):
        otcfm.get_coupler("independent")(bad, x1)
    otcfm.get_coupler("independent")(bad, x1, finite=False)  # a caller that finds NaN/Inf later


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the checks as on CUDA: no host reads of values in a step; faults reach the loss as NaN."""
    monkeypatch.setattr(checks, "value_checks_queued", lambda x: True)
    monkeypatch.setattr(checks, "host_reads_free", lambda x: False)


@pytest.mark.usefixtures("queued")
@pytest.mark.parametrize("coupler", ["independent", "paired"])
@pytest.mark.parametrize("path", ["linear", "bridge"])
def test_queued_step_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch, coupler: str, path: str) -> None:
    """On the queued path a step makes no bool()/item()/float() of a tensor: no device-to-host synchronisation."""
    x0, x1 = _data()
    fm = otcfm.FlowMatcher(coupler=coupler, path=path, sigma=0.2 if path == "bridge" else None)
    model = _model()

    def refuse(*args: object) -> object:
        raise AssertionError("a host read of a tensor in the training step")

    for method in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    fm.loss(model, x0, x1, torch.Generator().manual_seed(0)).backward()
    custom = otcfm.FlowMatcher(coupler=coupler, time_sampler=lambda n, g, device, dtype: torch.full((n,), 0.25))
    custom.loss(model, x0, x1)


@pytest.mark.usefixtures("queued")
def test_queued_faults_reach_the_loss_and_stop_the_engine() -> None:
    """Without host reads, NaN data and times outside [0, 1] make the loss NaN; the engine, reading the losses back
    in batches, stops at that step."""
    x0, x1 = _data()
    fm = otcfm.FlowMatcher(coupler="independent")
    assert not torch.isfinite(fm.loss(_model(), x0 / 0, x1))
    late = otcfm.FlowMatcher(coupler="independent", time_sampler=lambda n, g, d, dt: torch.full((n,), 2.0))
    assert torch.isnan(late.loss(_model(), x0, x1))
    assert torch.isnan(checks.check_time(torch.tensor([0.5, 1.5]), 2)[1])
    with pytest.raises(ValueError, match="at step 1"):
        otcfm.train(target="moons", steps=3, batch_size=16, time_sampler=late.time_sampler, progress=False)


def test_all_finite_is_exact() -> None:
    assert checks.all_finite(torch.full((8, 2), 3e38))  # the sum overflows, the entries are finite
    assert checks.all_finite(torch.full((100_000, 1), 1.0, dtype=torch.float16))
    assert not checks.all_finite(torch.tensor([[1.0, float("nan")]]))
    assert not checks.all_finite(torch.tensor([[float("inf")], [-float("inf")]]))
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 1\], got min nan"):
        checks.check_time(torch.tensor([0.5, float("nan")]), 2)


def test_user_time_samplers_are_wrapped_and_checked() -> None:
    assert isinstance(get_time_sampler("uniform"), Uniform) and get_time_sampler(Uniform()) == Uniform()
    wrapped = get_time_sampler(lambda n, g, device, dtype: torch.rand(n))
    assert isinstance(wrapped, CheckedSampler) and get_time_sampler(wrapped) is wrapped
    x0, x1 = _data()
    outside = otcfm.FlowMatcher(coupler="independent", time_sampler=lambda n, g, device, dtype: torch.full((n,), 1.5))
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 1\], got min 1.5"):
        outside.loss(_model(), x0, x1)
    short = otcfm.FlowMatcher(coupler="independent", time_sampler=lambda n, g, device, dtype: torch.rand(n - 1))
    with pytest.raises(ValueError, match=r"t: expected shape \(16,\)"):
        short.batch(x0, x1)


def test_gaussian_source_is_checked_on_the_first_batch() -> None:
    x0 = otcfm.data.sample("8gaussians", 64, torch.Generator().manual_seed(0))
    fm = otcfm.FlowMatcher(coupler="independent", path="gaussian")
    with pytest.warns(UserWarning, match="standard normal source"):
        fm.batch(x0, x0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.batch(x0, x0)  # later batches are not looked at (two host reads per step on a GPU)


def test_help_lists_every_time_sampler() -> None:
    doc = otcfm.FlowMatcher.__doc__ or ""
    for name in timesteps.TIME_SAMPLERS:
        assert f'"{name}"' in doc, name


# -- The Schroedinger bridge -------------------------------------------------------------------------------


def test_schrodinger_bridge_preset() -> None:
    fm = otcfm.FlowMatcher.schrodinger_bridge(0.5, max_iter=321)
    assert fm.path == BridgePath(0.5)
    assert isinstance(fm.coupler, SinkhornCoupler) and fm.coupler.max_iter == 321
    assert fm.coupler.entropic_epsilon() == (pytest.approx(0.5), False)
    named = otcfm.FlowMatcher(coupler="sinkhorn", path="bridge", sigma=0.5)  # the string keeps its meaning
    assert named.coupler.entropic_epsilon() == fm.coupler.entropic_epsilon()
    with pytest.raises(TypeError, match="epsilon"):
        otcfm.FlowMatcher.schrodinger_bridge(0.5, epsilon=0.1)
    with pytest.raises(ValueError, match="sigma"):
        otcfm.FlowMatcher.schrodinger_bridge(0.0)


def test_paths_and_couplers_declare_their_epsilon() -> None:
    assert BridgePath(0.3).entropic_epsilon == pytest.approx(0.18)
    for name in PATHS:
        if name != "bridge":
            assert otcfm.get_path(name).entropic_epsilon is None
    for name in COUPLERS:
        if name != "sinkhorn":
            assert otcfm.get_coupler(name).entropic_epsilon() is None
    assert SinkhornCoupler(epsilon=0.2).entropic_epsilon() == (0.2, True)


@pytest.mark.parametrize(
    "coupler",
    [SinkhornCoupler(epsilon=0.1, relative=False), SinkhornCoupler(epsilon=0.5)],  # other value; relative
    ids=["absolute", "relative"],
)
def test_bridge_warns_on_another_epsilon(coupler: SinkhornCoupler) -> None:
    assert issubclass(BridgeEpsilonWarning, UserWarning)
    with pytest.warns(BridgeEpsilonWarning, match=r"2 sigma\^2 = 0.5"):
        fm = otcfm.FlowMatcher(coupler=coupler, path="bridge", sigma=0.5)
    assert fm.coupler is coupler  # used as given


def test_bridge_is_quiet_where_nothing_disagrees() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        otcfm.FlowMatcher(coupler=SinkhornCoupler(epsilon=0.5, relative=False), path="bridge", sigma=0.5)
        otcfm.FlowMatcher(coupler=SinkhornCoupler(epsilon=0.05), path="linear")
        otcfm.FlowMatcher(coupler=ExactCoupler(), path="bridge", sigma=0.5)
        otcfm.FlowMatcher(coupler="independent", path="bridge", sigma=0.5)


# -- The benchmark ------------------------------------------------------------------------------------------


def test_step_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load_benchmark("step")
    assert module.main(["--quick"]) == 0
    printed = capsys.readouterr().out
    for task in ("2-D", "d=64", "d=784"):
        for pairing in ("independent", "paired", "exact"):
            assert f"| {task} | {pairing} |" in printed
    if not module.PEERS:
        assert "torchcfm is not importable" in printed
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    assert module.main(["--quick", "--tasks", "2-D", "--pairings", "independent", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "kept" in text and "<!-- step:start -->" in text and "python benchmarks/step.py --quick" in text


def _pair_faults() -> list[tuple[str, object, object, bool, type, str]]:
    """``(label, x0, x1, same_batch, error, message)``: one fault each, of every condition check_pair tests."""
    ok = torch.zeros(4, 3)
    return [
        ("x0 not a tensor", [[0.0]], ok, False, TypeError, "x0: expected a torch.Tensor"),
        ("x1 not a tensor", ok, None, False, TypeError, "x1: expected a torch.Tensor"),
        ("x0 integer", torch.zeros(4, 3, dtype=torch.long), ok, False, TypeError, "x0: expected a floating-point"),
        ("x1 integer", ok, torch.zeros(4, 3, dtype=torch.long), False, TypeError, "x1: expected a floating-point"),
        ("x0 1-D", torch.zeros(4), ok, False, ValueError, "x0: expected shape .* at least 2 dimensions"),
        ("x1 1-D", ok, torch.zeros(4), False, ValueError, "x1: expected shape .* at least 2 dimensions"),
        ("x0 empty", torch.zeros(0, 3), ok, False, ValueError, "x0: expected a non-empty batch"),
        ("x1 empty", ok, torch.zeros(0, 3), False, ValueError, "x1: expected a non-empty batch"),
        ("sample shapes", ok, torch.zeros(4, 2), False, ValueError, "expected the same sample shape"),
        ("batch sizes", ok, torch.zeros(5, 3), True, ValueError, "expected the same batch size, got 4 and 5"),
        ("meta device", ok, torch.zeros(4, 3, device="meta"), False, ValueError, "x1: a meta tensor has a shape"),
        ("dtypes", ok, ok.double(), False, ValueError, "expected the same dtype, got torch.float32 and torch.float64"),
    ]


@pytest.mark.parametrize("fault", _pair_faults(), ids=lambda fault: fault[0])
def test_check_pair_names_each_fault(fault: tuple[str, object, object, bool, type, str]) -> None:
    """check_pair tests all its conditions at once; whichever fails, the error names it."""
    _, x0, x1, same_batch, error, message = fault
    with pytest.raises(error, match=message):
        checks.check_pair(x0, x1, same_batch=same_batch, finite=False)


def test_check_pair_passes_valid_pairs() -> None:
    """Different batch sizes are fine unless ``same_batch``; images and half precision too; both come back as given."""
    x0, x1 = torch.zeros(4, 3), torch.ones(6, 3)
    assert checks.check_pair(x0, x1) == (x0, x1)
    images = torch.zeros(2, 1, 8, 8, dtype=torch.bfloat16)
    assert checks.check_pair(images, images.clone(), same_batch=True)[0] is images
