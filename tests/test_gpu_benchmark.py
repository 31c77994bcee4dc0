"""benchmarks/gpu.py: its CPU check (--device cpu --quick) writes a complete JSON, and its sync-debug part records
a synchronising phase and goes on (checked here with a stand-in for CUDA's debug mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

import otcfm

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset


def test_gpu_benchmark_quick_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    assert load_benchmark("gpu").main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # given back
    assert "throughput: independent:" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["status"] == "complete" and record["errors"] == {} and record["skipped"] == []
    assert record["device"]["type"] == "cpu" and record["device"]["torch"] == torch.__version__
    assert record["model"]["parameters"] > 0 and record["settings"]["quick"] is True
    methods = record["throughput"]
    names = ["independent", "exact (background loader)", "sinkhorn", "semidiscrete (N = 512)", "exact pools (32)"]
    assert list(methods) == names
    for entry in methods.values():
        assert entry["steps_per_s"] > 0 and len(entry["steps_per_s_windows"]) == 2
        assert entry["peak_memory_bytes"] is None  # CUDA only
    assert methods["exact pools (32)"]["windows_of_whole_pools"] is True
    assert methods["semidiscrete (N = 512)"]["fit"]["seconds"] > 0
    assert record["sync_debug"] == {c: {"status": "skipped (cpu)"} for c in ("independent", "sinkhorn")}
    training = record["training"]
    assert training["steps"] == 20 and training["window"] == 5
    assert training["first_mean_loss"] > 0 and isinstance(training["fell"], bool)
    assert record["wall_seconds"] > 0


def test_sync_check_records_the_phase_that_synchronises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase that raises under the debug mode is recorded; the step still finishes and the mode is set back."""
    gpu = load_benchmark("gpu")
    modes: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    loss = otcfm.FlowMatcher.loss

    def synchronising_loss(self: otcfm.FlowMatcher, *args: object, **kwargs: object) -> torch.Tensor:
        if modes and modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(otcfm.FlowMatcher, "loss", synchronising_loss)
    config = gpu.settings(torch.device("cpu"), True, 4, 60.0, 0)
    data = gpu.synthetic_images(16, 0)
    assert data.shape == (16, 3, 32, 32) and -1 <= data.min() and data.max() <= 1
    found = gpu.sync_check("independent", gpu.Trainer(config), gpu.Noise(gpu.SHAPE), gpu.Rows(data))
    assert found["status"] == "raised" and found["raised"] == ["loss"]
    assert list(found["phases"]) == ["data", "loss", "backward", "optimizer"]
    assert "synchronizing" in found["phases"]["loss"]["message"] and found["phases"]["loss"]["where"]
    assert modes == ["error", 0] * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_benchmark_without_cuda_says_how_to_run_on_the_cpu(tmp_path: Path) -> None:
    gpu = load_benchmark("gpu")
    for argv in (["--device", "cuda"], []):
        with pytest.raises(SystemExit, match="--device cpu --quick"):
            gpu.main([*argv, "--json", str(tmp_path / "gpu.json")])
    assert not (tmp_path / "gpu.json").exists()
