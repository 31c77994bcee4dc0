"""Background coupling loader, and each benchmark script in its quick mode."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

import otcfm
from otcfm.couplers import ExactCoupler
from otcfm.loader import CoupledBatches, coupled_loader

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_coupled_batches_are_exact_ot_pairs() -> None:
    """Each batch is already optimally paired: re-coupling it exactly leaves it in place."""
    stream = iter(CoupledBatches("8gaussians", "moons", "exact", batch_size=32, seed=0))
    for _ in range(3):
        x0, x1 = next(stream)
        i, j = ExactCoupler(solver="emd")(x0.double(), x1.double())
        assert torch.equal(j[torch.argsort(i)], torch.arange(32))


def test_coupled_loader_with_a_worker_is_reproducible() -> None:
    first = list(itertools.islice(coupled_loader("gaussian", "moons", "exact", 16, seed=1, num_workers=1), 3))
    again = list(itertools.islice(coupled_loader("gaussian", "moons", "exact", 16, seed=1, num_workers=1), 3))
    for (a0, a1), (b0, b1) in zip(first, again, strict=True):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)


def test_stacked_hand_overs_keep_the_stream() -> None:
    """Handing batches over 3 at a time yields the same batches, in order, as one at a time."""
    stream = iter(CoupledBatches("gaussian", "moons", "exact", batch_size=8, seed=2))
    loader = coupled_loader("gaussian", "moons", "exact", 8, seed=2, num_workers=0, batches_per_transfer=3)
    for (x0, x1), (y0, y1) in zip(itertools.islice(loader, 7), stream, strict=False):
        assert torch.equal(x0, y0) and torch.equal(x1, y1)
    with pytest.raises(ValueError, match="batches_per_transfer"):
        coupled_loader("gaussian", "moons", batches_per_transfer=0)


def test_training_on_coupled_batches() -> None:
    model = otcfm.models.MLP(2, hidden=16, depth=1)
    fm = otcfm.FlowMatcher(coupler="paired")
    loader = coupled_loader(lambda n, g: torch.randn(n, 2, generator=g), "moons", "exact", 16, num_workers=0)
    for x0, x1 in itertools.islice(loader, 2):
        loss = fm.loss(model, x0, x1)
        loss.backward()
        assert torch.isfinite(loss)


def test_loader_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        CoupledBatches("gaussian", "moons", "exact", batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        coupled_loader("gaussian", "moons", num_workers=-1)
    with pytest.raises(ValueError, match="paired coupler needs equal batch sizes"):
        otcfm.get_coupler("paired")(torch.zeros(3, 2), torch.zeros(4, 2))


def test_couplers_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    assert load_benchmark("couplers").main(["--quick", "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert "otcfm exact (auto)" in printed and "steps/s" in printed
    text = docs.read_text()
    assert "kept" in text and "<!-- couplers:start -->" in text and "python benchmarks/couplers.py --quick" in text


def test_exact2d_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "benchmarks.md"
    assert load_benchmark("exact2d").main(["--quick", "--docs", str(docs)]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "| 64 |" in line]
    assert len(rows) == 14 and any("sparse column generation" in row[3] for row in rows)
    assert all(row[6].strip() == "0.00%" for row in rows)  # every method, the sparse one included, is exact
    assert "<!-- exact2d:start -->" in docs.read_text()


def test_variance_benchmark_quick_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load_benchmark("variance")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| 8gaussians->moons | exact | 32 |" in printed
    assert {"variance.json", "variance.csv", "variance.png"} <= {p.name for p in tmp_path.iterdir()}
    stamp = (tmp_path / "variance.json").read_text()
    assert module.main(["--quick", "--out", str(tmp_path), "--resume"]) == 0  # nothing left to compute
    assert (tmp_path / "variance.json").read_text() == stamp


def test_crossing_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("crossing").main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "swap fraction" in printed and "W2 @100" in printed
    assert (tmp_path / "segments.png").stat().st_size > 0


def test_reflow_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("reflow").main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "distilled one-step" in printed and "2-rectified" in printed
    assert (tmp_path / "reflow.json").is_file() and (tmp_path / "reflow.png").stat().st_size > 0


def test_distributed_benchmark_quick() -> None:
    """Run as a script: its spawned processes import the benchmark module by its file name."""
    import subprocess

    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "distributed.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 2 | global | 64 |" in done.stdout and "global, 2 ranks" in done.stdout


def test_table2d_benchmark_quick(tmp_path: Path) -> None:
    """Run as a script: its worker processes import the benchmark module by its file name."""
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "table2d.py"), "--quick", "--out", str(tmp_path), "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| OT-CFM |" in done.stdout and "NLL" in done.stdout
    rows = (tmp_path / "quick" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 11  # 6 methods on N->8gaussians, 5 on moons->8gaussians (FM needs a Gaussian source)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # resumes: nothing left to do
    assert again.returncode == 0 and "for 0 jobs this run" in again.stdout


def test_checkerboard_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("checkerboard").main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "diffusion path" in printed and "NLL" in printed
    assert (tmp_path / "quick" / "checkerboard.png").stat().st_size > 0


def test_digits_benchmark_quick(tmp_path: Path, digits_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("digits").main(["--quick", "--out", str(tmp_path), "--cache", str(digits_cache)]) == 0
    printed = capsys.readouterr().out
    assert "feature classifier: test accuracy" in printed and "| distilled |" in printed
    assert (tmp_path / "quick" / "digits.png").stat().st_size > 0


@pytest.mark.parametrize("part", ["pools", "sinkhorn"])
def test_scale_benchmark_large_coupling_parts_quick(tmp_path: Path, part: str) -> None:
    """scale.py --part pools / sinkhorn: every set-up measured (subprocesses included), a docs section, a resume."""
    import json

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    args = ["--quick", "--part", part, "--out", str(tmp_path), "--docs", str(docs)]
    assert load_benchmark("scale").main(args) == 0
    results = tmp_path / ("quick-tuned" if part == "pools" else "quick") / f"{part}.jsonl"  # a directory per recipe
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    text = docs.read_text()
    assert f"<!-- scale-{part}:start -->" in text and f"--part {part}" in text
    if part == "pools":
        measured = {r["coupler"]: r for r in rows if "cost_ratio" in r}
        assert set(measured) == set(load_benchmark("_pools").QUICK)
        assert measured["exact B=256"]["entropy"] == 0.0 and 0 < measured["sinkhorn 0.05 P=16384"]["entropy"] < 1
        assert set(measured["exact P=1024"]["quality"]) == {"1", "2", "4", "100"}
    else:
        ours = [r for r in rows if r["coupler"] == "otcfm"]
        assert len(ours) == 2 and ours[0]["error"] <= 1e-3 and ours[1]["iterations"] == 2
    assert load_benchmark("scale").main(args) == 0  # resumes: nothing appended
    assert len(results.read_text().splitlines()) == len(rows)


def test_bad_sources_are_named_before_any_worker_starts() -> None:
    """With workers they failed at the first batch, as 'Caught ValueError in DataLoader worker process 0'."""
    with pytest.raises(ValueError, match="source: unknown value 'bogus'"):
        coupled_loader("bogus", "moons", "exact", 8, num_workers=1)
    with pytest.raises(TypeError, match="source: expected a dataset name or a callable"):
        coupled_loader(5, "moons", "exact", 8, num_workers=1)
    with pytest.raises(ValueError, match="target: contains NaN or Inf"):
        coupled_loader("moons", lambda n, g: torch.full((n, 2), float("nan")), "exact", 8, num_workers=1)
    with pytest.raises(ValueError, match=r"source and target: expected samples of one shape, got \(3,\) and \(2,\)"):
        coupled_loader(lambda n, g: torch.randn(n, 3, generator=g), "moons", "exact", 8)


def test_the_semidiscrete_coupler_is_refused_up_front() -> None:
    """It was accepted and failed inside a worker ('potentials: not fitted'), whose death spoiled later loaders."""
    with pytest.raises(ValueError, match="coupler: 'semidiscrete' pairs each source sample with the whole dataset"):
        coupled_loader("8gaussians", "moons", "semidiscrete", 8, num_workers=1)
