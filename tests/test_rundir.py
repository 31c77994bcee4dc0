"""RunDirectory: a resume reads its checkpoint once, wherever it needs it (settings, potentials, training state)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm import checkpoint as ckpt
from otcfm.cli import main
from otcfm.rundir import CHECKPOINT_NAME, RunDirectory


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The checkpoint files :func:`otcfm.checkpoint.load` reads while the test runs."""
    seen: list[Path] = []
    load = ckpt.load

    def counting(path: str | os.PathLike, what: str = "checkpoint") -> dict:
        if Path(path).name == CHECKPOINT_NAME:
            seen.append(Path(path))
        return load(path, what)

    monkeypatch.setattr(ckpt, "load", counting)
    return seen


def test_saved_is_read_once_while_the_file_is_unchanged(tmp_path: Path, reads: list[Path]) -> None:
    out = RunDirectory(tmp_path / "run")
    assert out.saved() is None and reads == []  # no checkpoint: nothing read
    ckpt.atomic_save({"step": 3, "x": torch.ones(2)}, out.checkpoint_path)
    assert out.saved()["step"] == 3 and out.saved()["step"] == 3
    assert len(reads) == 1
    ckpt.atomic_save({"step": 4}, out.checkpoint_path)  # a new file (atomic rename): read again, never stale
    assert out.saved()["step"] == 4 and len(reads) == 2
    out.release()
    assert out.saved()["step"] == 4 and len(reads) == 3
    assert os.fspath(out) == str(tmp_path / "run") and Path(out) == tmp_path / "run"
    assert RunDirectory.of(out) is out and RunDirectory.of(None) is None
    assert RunDirectory.of(tmp_path).path == tmp_path


def test_bad_paths_are_named() -> None:
    with pytest.raises(TypeError, match="out: expected a directory path, got int"):
        RunDirectory(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out: expected a directory, got ''"):
        RunDirectory("")


def test_a_python_resume_reads_the_checkpoint_once(tmp_path: Path, reads: list[Path]) -> None:
    """``source="auto"`` (the recorded source), the semidiscrete potentials and the engine share one read."""
    data = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    settings = dict(
        target=data,
        coupler="semidiscrete",
        batch_size=32,
        hidden=16,
        depth=1,
        coupler_options={"fit_steps": 20, "fit_batch_size": 64},
        progress=False,
    )
    otcfm.train(steps=4, out=tmp_path, **settings)
    assert reads == []
    resumed = otcfm.train(steps=6, out=tmp_path, resume=True, **settings)
    assert len(resumed.losses) == 6 and reads == [tmp_path / CHECKPOINT_NAME]


def test_command_line_resumes_and_samples_read_a_checkpoint_once(tmp_path: Path, reads: list[Path]) -> None:
    small = ["--batch-size", "32", "--hidden", "16", "--depth", "1", "--eval-n", "100", "--eval-draws", "1"]
    assert main(["train", "--coupler", "independent", "--out", str(tmp_path), "--steps", "4", *small]) == 0
    assert reads == []
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "6", *small[-4:], "--no-progress"]) == 0
    assert reads == [tmp_path / CHECKPOINT_NAME]  # the settings it takes, then the engine's state
    assert ckpt.load(tmp_path / CHECKPOINT_NAME)["step"] == 6
    reads.clear()
    sample = ["sample", "--checkpoint", str(tmp_path), "--n", "8", "--steps", "2", "--out", str(tmp_path / "x.pt")]
    assert main(sample) == 0
    assert reads == [tmp_path / CHECKPOINT_NAME]  # the run's settings and its weights: one read
    student = tmp_path / "reflow"
    pairs = ["reflow", "--teacher", str(tmp_path), "--out", str(student), "--pairs", "64", "--solver-steps", "2"]
    assert main([*pairs, "--steps", "2", *small[:2], *small[-4:], "--no-progress"]) == 0
    reads.clear()
    assert main([*pairs, "--steps", "3", *small[:2], *small[-4:], "--no-progress", "--resume"]) == 0
    assert sorted(reads) == [tmp_path / CHECKPOINT_NAME, student / CHECKPOINT_NAME]  # the teacher's, the student's
