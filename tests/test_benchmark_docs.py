"""What the benchmark scripts write: only their output directory unless ``--docs`` asks for the docs; and
figures laid out so that titles and tick labels stay inside the image."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

from otcfm.plotting import plot_flow

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# tiny, but not --quick: the settings that used to write docs/benchmarks.md and docs/figures/ by default
CROSSING = ["--couplers", "independent", "exact", "--batch-sizes", "16", "--train-steps", "5", "--eval-n", "64"]


def _docs_snapshot() -> dict[str, tuple[int, bytes]]:
    """Modification time and bytes of every file under docs/ (docs/benchmarks.md and docs/figures/ included)."""
    return {
        str(path.relative_to(ROOT)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted((ROOT / "docs").rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("crossing", CROSSING),  # the path that wrote a section and copied a figure
        ("exact2d", ["--quick"]),  # wrote its section even with --quick
    ],
)
def test_benchmarks_leave_the_docs_alone_without_docs(
    script: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # default output directories (runs/...) land here
    before = _docs_snapshot()
    assert before, "docs/ holds files to compare"
    assert load_benchmark(script).main([*argv, "--out", str(tmp_path / "out")] if script == "crossing" else argv) == 0
    assert _docs_snapshot() == before
    assert "written to" not in capsys.readouterr().out


def test_docs_writes_the_section_and_its_figure_beside_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _docs_snapshot()
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nkept\n")
    argv = [*CROSSING, "--out", str(tmp_path / "out"), "--docs", str(docs)]
    assert load_benchmark("crossing").main(argv) == 0
    assert f"written to {docs}" in capsys.readouterr().out
    text = docs.read_text()
    assert "kept" in text and "<!-- crossing:start -->" in text and "<!-- crossing:end -->" in text
    command = "Command: `python benchmarks/crossing.py --couplers independent exact --batch-sizes 16"
    assert command in text and "--docs" not in text
    assert (tmp_path / "docs" / "figures" / "segments.png").read_bytes() == (
        tmp_path / "out" / "segments.png"
    ).read_bytes()
    assert _docs_snapshot() == before  # a PATH elsewhere leaves the repository's docs alone


def test_docs_options() -> None:
    common = load_benchmark("_common")
    parser = argparse.ArgumentParser()
    common.add_docs_options(parser)
    assert parser.parse_args([]).docs is None
    assert parser.parse_args(["--no-write"]).docs is None  # old command lines still parse
    assert parser.parse_args(["--docs"]).docs == common.DOCS == ROOT / "docs" / "benchmarks.md"
    assert parser.parse_args(["--docs", "other.md"]).docs == Path("other.md")
    with pytest.raises(SystemExit):
        parser.parse_args(["--docs", "--no-write"])
    argv = ["--docs", "--tasks", "a->b", "--resume", "--docs=x.md", "--no-write", "--seeds", "3", "--docs", "y.md"]
    assert common.rerun_command("/x/variance.py", argv) == "python benchmarks/variance.py --tasks 'a->b' --seeds 3"


def test_save_figure_crops_to_everything_drawn(tmp_path: Path) -> None:
    """Text below the canvas (as bottom tick labels pushed out by a suptitle) ends up in the image, not cut off."""
    common = load_benchmark("_common")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    fig.suptitle("a title")
    ax.plot([0, 1], [0, 1])
    fig.text(0.5, -0.2, "below the canvas", ha="center")
    image = plt.imread(common.save_figure(fig, tmp_path / "figure.png", dpi=50))
    assert image.shape[0] > 3 * 50  # taller than the 3-inch canvas: the text below it was kept
    assert (image[-20:, :, :3] < 0.5).any()  # and it is drawn near the bottom edge


@pytest.mark.parametrize(("states", "label"), [(2, "trajectories (1 step)"), (5, "trajectories (4 steps)")])
def test_plot_flow_names_the_steps(states: int, label: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = []
    close = plt.close
    monkeypatch.setattr(plt, "close", closed.append)  # keep the figure to read its titles
    g = torch.Generator().manual_seed(0)
    path = plot_flow(torch.randn(states, 50, 2, generator=g), torch.randn(60, 2, generator=g), tmp_path / "f.png", "t")
    (fig,) = closed
    assert fig.axes[0].get_title() == label and fig.get_suptitle() == "t"
    close(fig)
    assert plt.imread(path).shape[0] > 100


def test_plot_flow_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="T >= 2"):
        plot_flow(torch.zeros(1, 5, 2), torch.zeros(5, 2), tmp_path / "f.png")
    with pytest.raises(ValueError, match="at least 2 coordinates"):
        plot_flow(torch.zeros(3, 5, 1), torch.zeros(5, 1), tmp_path / "f.png")
    with pytest.raises(ValueError, match="target"):
        plot_flow(torch.zeros(3, 5, 2), torch.zeros(5, 3), tmp_path / "f.png")
