"""benchmarks/onestep.py in its quick mode: every method gives a record with the fields the JSON promises, a rerun
resumes from the finished methods, and nothing under docs/ is touched without --docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_module import load_benchmark

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset

pytest.importorskip("sklearn")


def test_onestep_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onestep = load_benchmark("onestep")
    records = tmp_path / "records.json"
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path / "runs"), "--json", str(records)]
    assert onestep.main(argv) == 0
    rows = json.loads(records.read_text())
    methods = {r["method"] for r in rows}
    assert methods == {
        *(f"{c} {stage}" for c in onestep.TEACHERS for stage in ("teacher", "2-RF", "distilled")),
        *(f"meanflow {c}" for c in onestep.FLOW_MAPS),
    }
    for row in rows:
        assert row["fd_1"] > 0 and row["train_seconds"] >= 0 and row["network_evals"] >= 0
        assert (row["fd_2"] is None) == row["method"].endswith("distilled")
    by = {r["method"]: r for r in rows}
    # each stage adds its cost to the stages before it; a MeanFlow step counts 3 evaluations per sample
    assert by["exact teacher"]["network_evals"] < by["exact 2-RF"]["network_evals"]
    assert by["exact 2-RF"]["network_evals"] < by["exact distilled"]["network_evals"]
    assert by["meanflow exact"]["network_evals"] == 3 * onestep.BATCH * 8
    assert by["exact 2-RF"]["pair_steps"] in onestep.PAIR_STEPS
    assert len(by["meanflow exact"]["curve"]) == 4
    assert (tmp_path / "runs" / "quick" / "onestep.png").is_file()
    capsys.readouterr()
    assert onestep.main(argv) == 0  # resumed: every method was finished
    assert "seed 0:" not in capsys.readouterr().out
