"""benchmarks/images.py --quick: every stage runs (couplers, Reflow, distillation, conditional with guidance, the
loader's throughput) and the JSON and grid it writes hold every method; a second run resumes from the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from benchmark_module import load_benchmark

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset


def test_images_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not os.environ.get("CI"):  # CI installs the 'images' extra with the tests and must not skip
        pytest.importorskip("mlxtend")
    bench = load_benchmark("images")
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
