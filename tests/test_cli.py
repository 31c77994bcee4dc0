"""The otcfm command line and the import-time contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm.cli import main

SMALL = [
    "--steps",
    "30",
    "--batch-size",
    "32",
    "--hidden",
    "16",
    "--depth",
    "1",
    "--eval-n",
    "200",
    "--eval-draws",
    "2",
    "--no-progress",
]
SMALL_FOR_FACTORY = [option for k, option in enumerate(SMALL) if not 4 <= k < 8]  # no --hidden/--depth: MLP only


def test_train_then_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--coupler", "independent", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for steps in (1, 2, 4, 8, 100):
        assert f"\n| {steps} | " in printed
    assert "n=200 held-out samples, mean +- std over 2 draws" in printed
    assert {"checkpoint.pt", "samples.png", "w2.json"} <= {p.name for p in out.iterdir()}
    table = json.loads((out / "w2.json").read_text())
    assert set(table["w2"]) == {"1", "2", "4", "8", "100"} and table["n"] == 200 and table["draws"] == 2
    assert all(v["mean"] > 0 and v["std"] >= 0 for v in table["w2"].values())

    samples = tmp_path / "x.pt"
    png = tmp_path / "x.png"
    args = ["sample", "--checkpoint", str(out), "--n", "64", "--steps", "3", "--out", str(samples), "--png", str(png)]
    capsys.readouterr()
    assert main(args) == 0
    assert torch.load(samples).shape == (64, 2) and png.stat().st_size > 0
    assert "(euler, 3 steps, 3 network evaluations)" in capsys.readouterr().out
    pytest.importorskip("torchdyn")  # dopri5 chooses its steps: the message names output times and the NFE
    assert main([*args[:-2], "--method", "dopri5"]) == 0
    said = capsys.readouterr().out
    assert "(dopri5, 3 output times, " in said and " steps" not in said


def test_train_resume_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path), *SMALL]) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", *SMALL, "--coupler", "independent"]) == 2
    assert "another config" in capsys.readouterr().err


def test_lr_schedule_option_reaches_the_run(tmp_path: Path) -> None:
    from otcfm import checkpoint

    assert main(["train", "--out", str(tmp_path), "--lr-schedule", "cosine", *SMALL]) == 0
    assert checkpoint.load(tmp_path / "checkpoint.pt")["config"]["lr_schedule"] == "cosine"
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr-schedule", "linear"])
    assert info.value.code == 2


def test_bad_arguments_exit_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--coupler", "optimal"])
    assert info.value.code == 2
    assert main(["sample", "--checkpoint", "/nonexistent/run", "--out", "x.pt"]) == 2


def test_import_stays_light() -> None:
    """`import otcfm` loads neither POT, scipy, matplotlib nor torchdyn; otcfm.reflow / loader / distributed load
    on first access, and still without them."""
    heavy = "sorted(m for m in ('ot', 'scipy', 'matplotlib', 'torchdyn') if m in sys.modules)"
    code = (
        f"import sys, otcfm; print({heavy}); "
        "print(callable(otcfm.reflow.generate_pairs), callable(otcfm.loader.coupled_loader), "
        f"callable(otcfm.distributed.world)); print({heavy})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["[]", "True True True", "[]"]
    import otcfm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        otcfm.nope  # noqa: B018


def test_top_level_help_does_not_import_torch() -> None:
    """``import otcfm`` and ``otcfm --help`` / ``--version`` load no torch (the help answers at once); a subcommand's
    help builds its options."""
    code = (
        "import sys, contextlib, io, otcfm; from otcfm.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], ['--version'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit as exit: codes.append(exit.code)\n"
        "print(codes, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "[0, 0, 2] False"


def test_public_names_resolve_to_their_objects() -> None:
    """Every name of ``otcfm.__all__`` loads on access; ``otcfm.likelihood`` stays the function also when the
    submodule of that name was imported first."""
    code = (
        "import otcfm, otcfm.likelihood, inspect; from otcfm.likelihood import likelihood\n"
        "print(otcfm.likelihood is likelihood, all(getattr(otcfm, n) is not None for n in otcfm.__all__))\n"
        "print(sorted(otcfm.__all__) == sorted(otcfm._HOMES), inspect.ismodule(otcfm.reflow))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["True True", "True True"]


def test_help_shows_every_default_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "reflow", "distill", "sample"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert options, text
        for line in text.split("\n  --")[1:]:
            option = line.split()[0]
            if option not in (
                "help",
                "resume",
                "overwrite",
                "no-progress",
                "global-coupling",
                "teacher",
                "out",
                "checkpoint",
            ):
                assert "(default:" in line, f"{command} --{option} shows no default"
            assert line.count("(default:") <= 1, f"{command} --{option} shows its default twice"
        for meaningless in ("(default: None)", "(default: [])", "(default: False)"):
            assert meaningless not in text, f"{command} --help shows {meaningless}"
        seed = next(line for line in text.split("\n  --")[1:] if line.startswith("seed"))
        assert "(default: 0)" in seed, "a default of 0 is shown too"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("otcfm 0.")


def test_cli_options_reach_the_run(tmp_path: Path) -> None:
    args = ["train", "--coupler", "sinkhorn", "--coupler-option", "epsilon=0.2", "--time-sampler", "logit_normal"]
    args += ["--time-sampler-option", "std=0.5", "--out", str(tmp_path), *SMALL]
    assert main(args) == 0
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert config["coupler_options"] == {"epsilon": 0.2} and config["time_sampler_options"] == {"std": 0.5}
    with pytest.raises(SystemExit) as info:  # argparse: usage and a one-line error
        main(["train", "--coupler-option", "epsilon", "--out", str(tmp_path / "x"), *SMALL])
    assert info.value.code == 2
    assert main(["train", "--out", "", *SMALL]) == 2
    assert main(["train", "--dim", "3", "--out", str(tmp_path / "y"), *SMALL]) == 2


@pytest.mark.parametrize(
    "text, value",
    [("relative=False", False), ("replace=TRUE", True), ("label_weight=None", None), ("epsilon=0.5", 0.5)],
)
def test_option_words_in_any_case(text: str, value: object) -> None:
    """``False`` typed as on a Python line is the boolean, not the (truthy) string 'False'."""
    from otcfm.cli.options import _key_value

    assert _key_value(text) == (text.partition("=")[0], value)


def test_resume_takes_the_runs_settings(tmp_path: Path) -> None:
    """`otcfm train --out DIR --resume --steps N` continues DIR as it was started (it listed six mismatches)."""
    run = ["train", "--coupler", "sinkhorn", "--coupler-option", "epsilon=0.2", "--lr", "0.003", "--out", str(tmp_path)]
    assert main(run + SMALL) == 0
    evaluation = ["--eval-n", "200", "--eval-draws", "2", "--no-progress"]  # not settings of the run
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "32", *evaluation]) == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    config = state["config"]
    assert (config["coupler"], config["coupler_options"], config["lr"]) == ("sinkhorn", {"epsilon": 0.2}, 0.003)
    assert (config["batch_size"], config["hidden"], config["depth"], state["step"]) == (32, 16, 1, 32)
    assert main(["train", "--out", str(tmp_path), "--resume", "--coupler", "exact", *evaluation]) == 2  # changed


def test_hints_for_two_common_slips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reflow", "--teacher", str(tmp_path), "--out", str(tmp_path / "r"), "--train-steps", "3"]) == 2
    said = capsys.readouterr().err  # the old spelling still works, with a note; every command says --steps
    assert "--train-steps is now spelled --steps, as in otcfm train" in said and "--teacher" in said
    assert main(["train", "--model", "no_such_module_here:make", "--out", str(tmp_path / "m"), *SMALL_FOR_FACTORY]) == 2
    assert "add it to PYTHONPATH (the otcfm command does not look in the current folder" in capsys.readouterr().err


def test_resume_with_dim(tmp_path: Path) -> None:
    """--dim on resume applied to the default source/target, not the run's: 'source_options: {'dim': 3} vs {}'."""
    evaluation = ["--eval-n", "200", "--eval-draws", "2", "--no-progress"]
    first = ["train", "--source", "gaussian", "--target", "mixture", "--dim", "3", "--out", str(tmp_path), *SMALL]
    assert main(first) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "32", *evaluation]) == 0
    again = ["--target", "mixture", "--dim", "3", "--steps", "34"]
    assert main(["train", "--out", str(tmp_path), "--resume", *again, *evaluation]) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--dim", "3", "--steps", "36", *evaluation]) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 36


def test_sample_to_npy_writes_numpy(tmp_path: Path) -> None:
    import numpy as np

    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 0
    out = tmp_path / "s.npy"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--n", "16", "--steps", "2", "--out", str(out)]) == 0
    assert np.load(out).shape == (16, 2)  # was torch's format under a .npy name


def test_resume_without_a_run_says_it_starts_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A restarted job's command line starts the run the first time; it did so without a word."""
    assert main(["train", "--out", str(tmp_path / "new"), "--resume", *SMALL]) == 0
    assert "--resume: no run in" in capsys.readouterr().err


def test_interrupt_says_whether_anything_was_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted before its first checkpoint, a run said its finished work was saved; --resume then trained
    the default datasets."""
    import otcfm.cli.sample
    import otcfm.cli.train

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(otcfm.cli.train, "train", stopped)
    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 130
    assert "interrupted before anything was saved" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 0
    monkeypatch.setattr(otcfm.cli.train, "train", stopped)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", *SMALL]) == 130
    assert "finished work (steps, pairs, a semidiscrete fit) is saved" in capsys.readouterr().err


def test_resume_of_a_factory_run_takes_its_model_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume took every setting but the factory's options ('model_options: checkpoint {...} vs now {}')."""
    (tmp_path / "walk_factory.py").write_text(
        "import otcfm\n\ndef make(width=8):\n    return otcfm.models.MLP(2, hidden=width, depth=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    evaluation = ["--eval-n", "200", "--eval-draws", "2", "--no-progress"]
    first = ["train", "--model", "walk_factory:make", "--model-option", "width=4", "--out", out]
    assert main(first + SMALL_FOR_FACTORY) == 0
    assert main(["train", "--out", out, "--resume", "--steps", "32", *evaluation]) == 2
    said = capsys.readouterr().err
    assert "--resume: the run in" in said and "walk_factory:make, which is neither an nn.Module class" in said
    assert main(["train", "--out", out, "--resume", "--model", "walk_factory:make", "--steps", "32", *evaluation]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["model_options"] == {"width": 4}
    assert main(["train", "--model", "walk_factory:make", "--hidden", "64", "--out", str(tmp_path / "h")]) == 2
    assert "--hidden: sets the built-in MLP; --model walk_factory:make builds the model" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--out", str(tmp_path / "m"), *SMALL]) == 0  # --hidden: the MLP's


def test_a_recorded_factory_that_declares_a_model_is_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory annotated to return an nn.Module (or an nn.Module class) is rebuilt from the checkpoint's record
    by --resume, sample, reflow and distill without --model; each says which factory it used."""
    (tmp_path / "declared_factory.py").write_text(
        "import torch\nimport otcfm\n\n\ndef make(width: int = 8) -> torch.nn.Module:\n"
        "    return otcfm.models.MLP(2, hidden=width, depth=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out, quiet = tmp_path / "run", ["--eval-n", "200", "--eval-draws", "2", "--no-progress"]
    start = ["train", "--model", "declared_factory:make", "--model-option", "width=4", "--out", str(out)]
    assert main(start + SMALL_FOR_FACTORY) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "32", *quiet]) == 0
    assert "using --model declared_factory:make, recorded by the run in" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(out), "--n", "5", "--out", str(tmp_path / "s.pt")]) == 0
    assert torch.load(tmp_path / "s.pt", weights_only=True).shape == (5, 2)
    small = ["--pairs", "64", "--steps", "2", "--batch-size", "16", "--eval-n", "100", "--no-progress"]
    assert main(["reflow", "--teacher", str(out), "--out", str(tmp_path / "r"), *small]) == 0
    assert main(["distill", "--teacher", str(tmp_path / "r"), "--out", str(tmp_path / "d"), *small]) == 0
    assert "using --model declared_factory:make, recorded by" in capsys.readouterr().err


def test_cli_resume_of_a_run_made_with_a_model_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    otcfm.train(model=otcfm.models.MLP(2, hidden=8, depth=1), target="moons", steps=3, out=tmp_path, progress=False)
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "5", "--no-progress"]) == 2
    assert "made in Python with a model object (otcfm.models.mlp.MLP); resume it there" in capsys.readouterr().err


def test_a_missing_teacher_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reflow", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "otcfm: error: --teacher: no file at" in capsys.readouterr().err


def test_an_interrupted_sample_says_what_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import otcfm.cli.sample
    import otcfm.cli.train
    import otcfm.plotting

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 0
    sample = ["sample", "--checkpoint", str(tmp_path / "run"), "--n", "8", "--steps", "2"]
    sample += ["--out", str(tmp_path / "x.pt")]
    monkeypatch.setattr(otcfm.cli.sample, "solve", stopped)
    assert main(sample) == 130
    assert "otcfm: interrupted; no samples written" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(otcfm.plotting, "plot_flow", stopped)  # after the samples file, during the figure
    assert main([*sample, "--png", str(tmp_path / "x.png")]) == 130
    assert "samples written to --out, no figure" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(otcfm.cli.sample, "solve", stopped)  # x.pt is the earlier run's file: it was not written now
    assert main(sample) == 130
    assert "otcfm: interrupted; no samples written" in capsys.readouterr().err


def test_messages_name_the_flag_not_the_python_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Values argparse takes but the run refuses: the one-line error starts with the option the user typed."""
    quick = ["--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    cases = [
        (["--coupler", "sinkhorn", "--coupler-option", "epsilon=-1"], "otcfm: error: --coupler-option: "),
        (["--time-sampler", "logit_normal", "--time-sampler-option", "std=0"], "otcfm: error: --time-sampler-option"),
        (["--sigma", "-1"], "otcfm: error: --sigma: "),
        (["--target", "moon"], "otcfm: error: --target: unknown dataset 'moon'"),
        (["--device", "meta"], "otcfm: error: --device: 'meta'"),
    ]
    for extra, message in cases:
        assert main(["train", *extra, *quick]) == 2
        assert message in capsys.readouterr().err, extra


def test_sample_a_run_trained_on_a_tensor_in_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its target cannot be drawn again, but sampling needs only the (named) source; --png and reflow, which need
    the target, refuse clearly; a --model given is used, never ignored."""
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    otcfm.train(target=data, out=tmp_path / "run", steps=2, batch_size=8, hidden=8, depth=1, progress=False)
    out = tmp_path / "samples.pt"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--n", "5", "--steps", "2"]) == 0
    assert torch.load(out).shape == (5, 3)
    capsys.readouterr()
    png = ["--png", str(tmp_path / "s.png")]
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(out), *png]) == 2
    assert "--png: the run's target, tensor(64, 3), was given in Python" in capsys.readouterr().err
    assert main(["reflow", "--teacher", str(tmp_path / "run"), "--out", str(tmp_path / "rf")]) == 2
    assert "--teacher: its target, tensor(64, 3), was given in Python" in capsys.readouterr().err
    assert not (tmp_path / "rf").exists()
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--model", "nope:f"]) == 2
    assert capsys.readouterr().err.startswith("otcfm: error: --model nope:f: ")


def test_options_default_to_the_run_configuration() -> None:
    """Each option that sets a field of TrainConfig (train) or of RunOptions / train_on_pairs (reflow, distill)
    defaults to that field's default: the command line builds its options from the configuration."""
    import dataclasses
    import inspect

    from otcfm.cli.options import parser
    from otcfm.reflow import RunOptions, train_on_pairs

    given = vars(parser().parse_args(["train"]))  # every option at its default
    named_otherwise = {"model", "conditional"}  # --model None means mlp, --conditional auto means None
    fields = [f.name for f in dataclasses.fields(otcfm.TrainConfig) if f.name in set(given) - named_otherwise]
    assert len(fields) >= 20
    for name in fields:
        assert given[name] == getattr(otcfm.TrainConfig(), name), name
    signature = inspect.signature(train_on_pairs).parameters
    pair_defaults = {
        f.name: f.default for f in dataclasses.fields(RunOptions) if f.name not in ("device", "record", "callback")
    }
    pair_defaults.update({name: signature[name].default for name in ("steps", "batch_size", "lr", "seed")})
    for command in ("reflow", "distill"):
        given = vars(parser().parse_args([command, "--teacher", "t", "--out", "o"]))
        assert {name: given[name] for name in pair_defaults if name != "out"} == {
            name: default for name, default in pair_defaults.items() if name != "out"
        }, command
