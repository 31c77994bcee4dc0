"""The command line on image data: a UNet run on the digits, its FD table and sample grids, --class and --guidance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otcfm.cli import main

TRAIN = ["train", "--target", "digits", "--model", "unet", "--steps", "4", "--batch-size", "16", "--eval-n", "40"]


@pytest.fixture
def unet_run(
    tmp_path: Path, digits_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Path:
    """A 4-step conditional UNet run on the digits (labels taken by --model unet), with the cached classifier; what
    it printed is in ``printed.txt`` beside it."""
    monkeypatch.setenv("OTCFM_CACHE", str(digits_cache))
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), "--no-progress", "--model-option", "base_channels=8"]) == 0
    (tmp_path / "printed.txt").write_text(capsys.readouterr().out)
    return out


def test_train_on_images_writes_a_grid_and_an_fd_table(unet_run: Path) -> None:
    table = json.loads((unet_run / "fd.json").read_text())
    assert table["metric"] == "fd" and set(table["fd"]) == {"1", "2", "4", "8", "100"}
    assert table["n"] == 40 and table["reference_rows"] == 360 and table["reference"].startswith("held-out rows")
    assert set(table["accuracy"]) == {"0", "1", "2"}  # a conditional run: accuracy by guidance weight
    assert (unet_run / "samples.png").stat().st_size > 0 and not (unet_run / "w2.json").exists()
    printed = (unet_run.parent / "printed.txt").read_text()
    assert "40 samples against 360 held-out rows (the test split)" in printed
    assert "| Euler steps | FD | accuracy w=0 | accuracy w=1 | accuracy w=2 |" in printed


def test_sample_a_class_with_guidance_draws_a_grid(unet_run: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "x.pt", tmp_path / "x.png"
    argv = ["sample", "--checkpoint", str(unet_run), "--class", "3", "--guidance", "2", "--n", "8", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--png", str(png)]) == 0
    assert torch.load(out).shape == (8, 1, 8, 8) and png.stat().st_size > 0


def test_resume_of_a_unet_run_needs_no_model_option(unet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(unet_run), "--resume", "--steps", "6", "--no-progress", "--eval-n", "20"]) == 0
    assert "trained 2 steps (resumed at step 4)" in capsys.readouterr().out


def test_class_and_guidance_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plain"
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress", "--eval-n", "50"]) == 0
    capsys.readouterr()
    sample = ["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s.pt")]
    assert main([*sample, "--class", "1"]) == 2
    assert "--class: the run in" in capsys.readouterr().err
    assert main([*sample, "--guidance", "2"]) == 2
    assert "--guidance: needs --class" in capsys.readouterr().err


def test_distill_a_conditional_unet_teacher_keeps_its_classes(unet_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(unet_run), "--pairs", "16", "--solver-steps", "2", "--steps", "2"]
    argv += ["--batch-size", "8", "--guidance", "1.5", "--eval-n", "20", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "pairs" / "meta.json").read_text())
    assert (meta["classes"], meta["guidance"]) == (10, 1.5)
    table = json.loads((out / "fd.json").read_text())
    assert set(table["accuracy"]) == {"0", "1", "2"} and (out / "samples.png").stat().st_size > 0


def test_a_failed_start_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert main(["train", "--steps", "2", "--coupler-option", "nonsense=1", "--out", str(out), "--no-progress"]) == 2
    assert "--coupler-option" in capsys.readouterr().err and not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["train", "--steps", "2", "--coupler-option", "nonsense=1", "--out", str(kept), "--no-progress"]) == 2
    assert kept.is_dir()  # a folder the user made stays
