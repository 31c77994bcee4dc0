"""benchmarks/images.py --quick: every stage runs (couplers, Reflow, distillation, conditional with guidance, the
loader's throughput) and the JSON and grid it writes hold every method; a second run resumes from the files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_images_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not os.environ.get("CI"):  # CI installs the 'images' extra with the tests and must not skip
        pytest.importorskip("mlxtend")
    bench = _load("images")
    argv = ["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "images.json")]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "images.json").read_text())
    methods = [*bench.COUPLED, "2-rectified", "distilled", "conditional"]
    assert list(record["rows"]) == methods and record["best"] in bench.COUPLED
    for method in methods:
        assert set(record["rows"][method]["fd"]) == {"1", "2"} and record["rows"][method]["train_seconds"] >= 0
    assert set(record["rows"]["conditional"]["accuracy"]) == {"0", "1", "2"}
    assert record["throughput"]["independent"] > 0 and record["throughput"]["exact_loader"] > 0
    assert (tmp_path / "quick" / "images.png").stat().st_size > 0
    assert "FD vs Euler steps" in printed and "classifier accuracy by guidance weight" in printed
    assert bench.main(argv) == 0  # resumed: every run and row is on disk
    assert json.loads((tmp_path / "images.json").read_text())["rows"] == record["rows"]
