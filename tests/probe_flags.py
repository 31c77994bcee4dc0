"""Flags and numbers: booleans taken only as True / False, numpy scalars where Python numbers are accepted,
seeds in the generator's range, meta tensors and devices; the command line naming its flags, and ``train``
naming the data the user passed (``source``, ``target``) rather than the loss's ``x0`` / ``x1``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from probe import Case, CLIResult, Model, _cli, _x

import otcfm
import otcfm.reflow

TOO_BIG = 2**70
QUICK: dict[str, Any] = {"steps": 1, "batch_size": 8, "hidden": 8, "depth": 1, "progress": False}


def _plain(config: otcfm.TrainConfig) -> bool:
    """The config holds plain Python values only (what a checkpoint records): numpy scalars were converted."""
    values = [getattr(config, f) for f in ("steps", "batch_size", "lr", "seed", "ema_decay", "checkpoint_every")]
    return all(type(v) in (int, float) for v in values) and json.loads(json.dumps(values)) == values


def _accepted(result: Any) -> bool:
    return True


def _intact(run: Path, before: bytes) -> Callable[[], None]:
    """``train(overwrite=<not a bool>)`` on a finished run; the call must raise, and the run must be unchanged."""

    def call(value: Any) -> None:
        try:
            otcfm.train(out=run, overwrite=value, seed=1, **QUICK)
        finally:
            if (run / "checkpoint.pt").read_bytes() != before:
                raise AssertionError("the run in out was replaced")  # unclear: the probe counts it as a fault

    return call  # type: ignore[return-value]


def flag_cases(directory: Path) -> list[Case]:
    run = directory / "flag-run"
    otcfm.train(out=run, **QUICK)  # a named target: the command line can draw from it again
    before = (run / "checkpoint.pt").read_bytes()
    replace = _intact(run, before)
    x = _x()
    cases = [Case("flag", "train", lambda v=v: replace(v), ("overwrite",)) for v in ("False", "no", 1, 0.0, None)]
    cases += [
        Case("flag", "train", lambda v=v: otcfm.train(out=run, resume=v, **QUICK), ("resume",)) for v in ("True", 1)
    ]
    cases += [
        Case("flag", "train", lambda: otcfm.train(target=_x(64), **{**QUICK, "progress": "no"}), ("progress",)),
        Case("flag", "load_model", lambda: otcfm.load_model(run, use_ema="no"), ("use_ema",)),
        Case("flag", "load_model", lambda: otcfm.load_model(run, use_ema=0), ("use_ema",)),
        Case("flag", "transport_cost_ratio", lambda: otcfm.metrics.transport_cost_ratio(x, x, True), ("w2_squared",)),
        Case(
            "flag", "integrate", lambda: otcfm.integrate(Model(), x, 2, return_trajectory="no"), ("return_trajectory",)
        ),
        Case("flag", "solve", lambda: otcfm.solve(Model(), x, 2, return_trajectory=1), ("return_trajectory",)),
        Case(
            "flag",
            "reflow.generate_pairs",
            lambda: otcfm.reflow.generate_pairs(Model(), "8gaussians", 4, steps=1, progress="False"),
            ("progress",),
        ),
        Case(
            "flag",
            "reflow.train_on_pairs",
            lambda: otcfm.reflow.train_on_pairs(lambda n, g: (_x(n), _x(n)), Model(), 1, 4, progress="no"),
            ("progress",),
        ),
    ]
    return cases


def number_cases() -> list[Case]:
    """numpy integers and floats are valid numbers (and are recorded as Python numbers): any error is a fault."""
    i, f = np.int64, np.float32
    pairs = lambda n, g: (_x(n), _x(n, seed=3))  # noqa: E731
    return [
        Case(
            "numpy-number", "TrainConfig", lambda: otcfm.TrainConfig(steps=i(3)), ("steps",), expect=_plain, errors=()
        ),
        Case("numpy-number", "TrainConfig", lambda: otcfm.TrainConfig(lr=f(1e-3)), ("lr",), expect=_plain, errors=()),
        Case("numpy-number", "TrainConfig", lambda: otcfm.TrainConfig(seed=i(5)), ("seed",), expect=_plain, errors=()),
        Case(
            "numpy-number",
            "TrainConfig",
            lambda: otcfm.TrainConfig(batch_size=i(8)),
            ("batch_size",),
            expect=_plain,
            errors=(),
        ),
        Case(
            "numpy-number",
            "TrainConfig",
            lambda: otcfm.TrainConfig(ema_decay=f(0.5)),
            ("ema_decay",),
            expect=_plain,
            errors=(),
        ),
        Case(
            "numpy-number",
            "TrainConfig",
            lambda: otcfm.TrainConfig(checkpoint_every=i(7), hidden=i(4), depth=i(1)),
            ("checkpoint_every",),
            expect=_plain,
            errors=(),
        ),
        Case(
            "numpy-number",
            "train",
            lambda: otcfm.train(target=_x(64), **{**QUICK, "steps": i(1), "lr": f(1e-3), "seed": i(2)}).config,
            ("steps",),
            expect=_plain,
            errors=(),
        ),
        Case(
            "numpy-number",
            "reflow.train_on_pairs",
            lambda: otcfm.reflow.train_on_pairs(pairs, Model(), i(1), i(4), lr=f(1e-3), seed=i(1), progress=False),
            ("steps",),
            expect=_accepted,
            errors=(),
        ),
        Case(
            "numpy-number",
            "reflow.distill",
            lambda: otcfm.reflow.distill(Model(), pairs, i(1), i(4), lr=f(1e-3), progress=False),
            ("steps",),
            expect=_accepted,
            errors=(),
        ),
        Case(
            "numpy-number",
            "reflow.generate_pairs",
            lambda: otcfm.reflow.generate_pairs(Model(), "8gaussians", i(4), steps=i(1), seed=i(3), progress=False),
            ("n",),
            expect=_accepted,
            errors=(),
        ),
        Case(
            "numpy-number",
            "integrate",
            lambda: otcfm.integrate(Model(), _x(), i(2)),
            ("steps",),
            expect=_accepted,
            errors=(),
        ),
        Case(
            "numpy-number",
            "couplers.sinkhorn",
            lambda: otcfm.couplers.SinkhornCoupler(epsilon=f(0.1))(_x(), _x(seed=1), generator=None),
            ("epsilon",),
            expect=_accepted,
            errors=(),
        ),
    ]


def seed_cases() -> list[Case]:
    """Seeds outside a generator's range, negative or not integers: an error naming ``seed``."""
    pairs = lambda n, g: (_x(n), _x(n, seed=3))  # noqa: E731
    cases = []
    for value in (TOO_BIG, -1, 1.5, "3", True):
        cases += [
            Case("seed", "TrainConfig", lambda v=value: otcfm.TrainConfig(seed=v), ("seed",)),
            Case("seed", "train", lambda v=value: otcfm.train(target=_x(64), **{**QUICK, "seed": v}), ("seed",)),
            Case(
                "seed",
                "reflow.generate_pairs",
                lambda v=value: otcfm.reflow.generate_pairs(Model(), "8gaussians", 4, steps=1, seed=v, progress=False),
                ("seed",),
            ),
            Case(
                "seed",
                "reflow.train_on_pairs",
                lambda v=value: otcfm.reflow.train_on_pairs(pairs, Model(), 1, 4, seed=v, progress=False),
                ("seed",),
            ),
            Case(
                "seed",
                "reflow.distill",
                lambda v=value: otcfm.reflow.distill(Model(), pairs, 1, 4, seed=v, progress=False),
                ("seed",),
            ),
        ]
    return cases


def meta_cases() -> list[Case]:
    """Meta tensors (shapes without values) and ``device="meta"``."""

    def meta(n: int = 8) -> torch.Tensor:
        return torch.empty(n, 2, device="meta")

    g = torch.Generator().manual_seed(0)
    return [
        Case("meta", "integrate", lambda: otcfm.integrate(Model(), meta(), 2), ("x0",)),
        Case("meta", "solve", lambda: otcfm.solve(Model(), meta(), 2), ("x0",)),
        Case("meta", "couplers.exact", lambda: otcfm.get_coupler("exact")(meta(), _x()), ("x0",)),
        Case("meta", "couplers.sinkhorn", lambda: otcfm.get_coupler("sinkhorn")(_x(), meta()), ("x1",)),
        Case(
            "meta",
            "couplers.independent",
            lambda: otcfm.get_coupler("independent")(meta(), meta(), generator=g),
            ("x0",),
        ),
        Case("meta", "FlowMatcher.loss", lambda: otcfm.FlowMatcher().loss(Model(), meta(), _x(), g), ("x0",)),
        Case("meta", "metrics.w2", lambda: otcfm.metrics.w2(meta(), _x()), ("x",)),
        Case("meta", "train", lambda: otcfm.train(target=meta(64), **QUICK), ("target",)),
        Case("meta", "train", lambda: otcfm.train(target=_x(64), device="meta", **QUICK), ("device",)),
        Case("meta", "data.sample", lambda: otcfm.data.sample("moons", 4, device="meta"), ("device",)),
    ]


def data_name_cases() -> list[Case]:
    """``train`` blames the data the user passed (``source``, ``target``), never the loss's ``x0`` / ``x1`` or
    the model, for NaN drawn at once or after a few steps."""

    def later(fault: float, start: int) -> Callable[[int, torch.Generator], torch.Tensor]:
        calls = {"n": 0}

        def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
            calls["n"] += 1
            x = torch.randn(n, 2, generator=generator)
            return x * fault if calls["n"] > start else x

        return sampler

    nan, inf = float("nan"), float("inf")
    fm = otcfm.FlowMatcher()
    cases = [
        Case(
            "data-name",
            "metrics.target_variance",
            lambda k=start: otcfm.metrics.target_variance(fm, later(nan, k), "moons", 16),
            ("source",),
        )
        for start in (0, 2)
    ]
    cases += [
        Case(
            "data-name",
            "metrics.gradient_variance",
            lambda k=start: otcfm.metrics.gradient_variance(fm, Model(), "gaussian", later(inf, k), 8, 3),
            ("target",),
        )
        for start in (0, 2)
    ]
    for side in ("source", "target"):
        for fault in (nan, inf):
            for start in (0, 3):
                cases.append(
                    Case(
                        "data-name",
                        "train",
                        lambda s=side, f=fault, k=start: otcfm.train(
                            **{s: later(f, k), "source" if s == "target" else "target": "moons"},
                            **{**QUICK, "steps": 4},
                        ),
                        (side,),
                    )
                )
    return cases


def cli_flag_cases(directory: Path) -> list[Case]:
    """Values argparse accepts but the run refuses: the one-line error names the flag, never the Python field."""
    run = directory / "flag-run"
    quick = ["--no-progress", "--overwrite", "--out", str(directory / "cli-flags"), "--steps", "1"]
    quick += ["--batch-size", "8", "--hidden", "8", "--depth", "1", "--eval-n", "16", "--eval-draws", "1"]
    rf = ["--teacher", str(run), "--out", str(directory / "cli-flags-rf"), "--pairs", "8", "--solver-steps", "1"]
    rf += ["--steps", "1", "--batch-size", "4", "--no-progress", "--overwrite"]
    bad: list[tuple[list[str], str]] = [
        (["train", "--ema-decay", "1.5", *quick], "--ema-decay"),
        (["train", "--ema-decay", "-0.1", *quick], "--ema-decay"),
        (["train", "--ema-decay", "nan", *quick], "--ema-decay"),
        (["train", "--seed", "-1", *quick], "--seed"),
        (["train", "--seed", str(TOO_BIG), *quick], "--seed"),
        (["train", "--sigma", "-1", *quick], "--sigma"),
        (["train", "--sigma", "nan", *quick], "--sigma"),
        (["train", "--coupler", "sinkhorn", "--coupler-option", "epsilon=-1", *quick], "--coupler-option"),
        (["train", "--coupler-option", "bogus=1", *quick], "--coupler-option"),
        (["train", "--path", "diffusion", "--path-option", "beta_max=-1", *quick], "--path-option"),
        (
            ["train", "--time-sampler", "logit_normal", "--time-sampler-option", "std=0", *quick],
            "--time-sampler-option",
        ),
        (["train", "--model-option", "width=3", *quick], "--model-option"),
        (["train", "--source", "gauss", *quick], "--source"),
        (["train", "--target", "moon", *quick], "--target"),
        (["train", "--device", "tpu", *quick], "--device"),
        (["train", "--device", "meta", *quick], "--device"),
        (["reflow", *rf, "--seed", "-1"], "--seed"),
        (["reflow", *rf, "--seed", str(TOO_BIG)], "--seed"),
        (["reflow", *rf, "--ema-decay", "2"], "--ema-decay"),
        (["distill", *rf, "--ema-decay", "nan"], "--ema-decay"),
        (["reflow", *rf, "--device", "tpu"], "--device"),
        (["sample", "--checkpoint", str(run), "--out", str(directory / "s.pt"), "--seed", "-1"], "--seed"),
        (["sample", "--checkpoint", str(run), "--out", str(directory / "s.pt"), "--seed", str(TOO_BIG)], "--seed"),
        (["sample", "--checkpoint", str(run), "--out", str(directory / "s.pt"), "--model", "nope:f"], "--model"),
    ]
    return [Case("cli-flag", argv[0], lambda a=argv: _cli(a), (flag,)) for argv, flag in bad]


def tensor_run_cases(directory: Path) -> list[Case]:
    """A run trained in Python on a tensor: ``otcfm sample`` needs only its source, a named distribution here, and
    must work (exit 0); ``reflow`` / ``distill`` evaluate against the target, and refuse clearly, naming it."""
    run = directory / "tensor-run"
    otcfm.train(target=_x(64), out=run, **QUICK)

    def works(argv: list[str]) -> Callable[[], bool]:
        def call() -> bool:
            try:
                _cli(argv)
            except CLIResult as result:
                if result.code != 0:
                    raise
            finally:
                shutil.rmtree(directory / "tensor-out", ignore_errors=True)
            return True

        return call

    rf = ["--out", str(directory / "tensor-out"), "--pairs", "8", "--solver-steps", "1", "--steps", "1"]
    rf += ["--batch-size", "4", "--no-progress", "--eval-n", "16", "--eval-draws", "1"]
    argvs = [
        ["sample", "--checkpoint", str(run), "--out", str(directory / "tensor-out" / "s.pt")],
        ["reflow", "--teacher", str(run), *rf],
        ["distill", "--teacher", str(run), *rf],
    ]
    return [
        Case("tensor-run", argv[0], works(argv), ("--checkpoint", "--teacher"), errors=(), expect=_accepted)
        for argv in argvs
    ]


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    return [
        *flag_cases(directory),
        *number_cases(),
        *seed_cases(),
        *meta_cases(),
        *data_name_cases(),
        *cli_flag_cases(directory),
        *tensor_run_cases(directory),
    ]
