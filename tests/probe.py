"""The probe: every public entry point called with bad input, each case expecting a clear error.

A case is a call that must raise ``ValueError`` or ``TypeError`` (``FileNotFoundError`` for missing files) whose
message names the argument the caller wrote (``x1``, ``source``, ``--eval-n``). :func:`classify` sorts the outcome
of a call into ``clear`` (that), ``unclear`` (another exception, or a message that does not name the argument),
``silent`` (no error at all: a wrong result handed back) or ``missing`` (the entry point does not exist in this
version). A case whose call may also succeed (a plan at a tiny epsilon: right, or flagged as not converged) has an
``expect`` predicate: a call that returns a result it accepts is ``clear`` too. ``tests/test_probe.py`` asserts
that every case is clear; ``python tests/probe.py`` prints the counts by class, also against an older checkout
(``PYTHONPATH=old/checkout python tests/probe.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import otcfm
import otcfm.distributed
import otcfm.loader
import otcfm.reflow

ACCEPTED = (ValueError, TypeError)


@dataclass(frozen=True)
class Case:
    """One bad call.

    Attributes:
        group: the class of bad input (``"nan"``, ``"shape"``, ``"model"``, ``"cli"``, ...).
        entry: the entry point, for the report.
        call: makes the call.
        names: the argument names; the message must name one of them.
        errors: the accepted exception types.
        expect: where a successful call can be right, accepts its result (``True``: right, or honestly flagged).
    """

    group: str
    entry: str
    call: Callable[[], Any]
    names: tuple[str, ...]
    errors: tuple[type[BaseException], ...] = ACCEPTED
    detail: str = ""
    expect: Callable[[Any], bool] | None = None

    @property
    def id(self) -> str:
        return f"{self.group}:{self.entry}:{'/'.join(self.names)}{':' + self.detail if self.detail else ''}"


class CLIResult(Exception):
    """Raised by a CLI case: the exit code and what was printed on stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(stderr)
        self.code, self.stderr = code, stderr


def classify(case: Case) -> str:
    """``clear``, ``unclear``, ``silent`` or ``missing`` (see the module docstring)."""
    try:
        result = case.call()
    except AttributeError as error:
        if "has no attribute" in str(error) and "otcfm" in str(error):
            return "missing"
        return "unclear"
    except CLIResult as result:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        named = any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", result.stderr) for n in case.names)
        ok = result.code == 2 and len(lines) == 1 and lines[0].startswith("otcfm") and named
        return "clear" if ok else ("silent" if result.code == 0 else "unclear")
    except case.errors as error:
        message = str(error)
        named = any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", message) for n in case.names)
        return "clear" if named else "unclear"
    except Exception:  # noqa: BLE001 - any other exception is what the probe counts as unclear
        return "unclear"
    return "clear" if case.expect is not None and case.expect(result) else "silent"


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _x(n: int = 8, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _with(value: float) -> torch.Tensor:
    x = _x()
    x[3, 1] = value
    return x


#: Bad tensors for an argument expecting a batch ``(B, d)`` of floats, by class.
BAD_BATCHES: dict[str, Callable[[], Any]] = {
    "nan": lambda: _with(float("nan")),
    "inf": lambda: _with(float("inf")),
    "empty": lambda: torch.zeros(0, 2),
    "no-batch-dim": lambda: torch.zeros(2),
    "int-dtype": lambda: torch.ones(8, 2, dtype=torch.int64),
    "bool-dtype": lambda: torch.ones(8, 2, dtype=torch.bool),
    "list": lambda: [[0.0, 1.0]] * 8,
    "none": lambda: None,
    "numpy": lambda: np.zeros((8, 2)),
    "feature-shape": lambda: _x(8, 3),
    "float64-beside-float32": lambda: _x().double(),
}


class Model(torch.nn.Module):
    """A model ``model(x, t)`` that misbehaves in a chosen way."""

    def __init__(self, kind: str = "good") -> None:
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: Any) -> Any:
        flat = x.reshape(x.shape[0], -1)
        v = self.linear(torch.cat([flat[:, :2], t.reshape(-1, 1).to(flat.dtype)], dim=1)).reshape(x.shape[0], 2)
        if self.kind == "none":
            return None
        if self.kind == "shape":
            return v[:, :1]
        if self.kind == "batch":
            return v[:1].expand(x.shape[0] + 1, 2)
        if self.kind == "nan":
            return v * float("nan")
        if self.kind == "inf":
            return v + float("inf")
        if self.kind == "int":
            return v.round().long()
        if self.kind == "tuple":
            return (v, v)
        return v


BAD_MODELS = ("none", "shape", "batch", "nan", "inf", "int", "tuple")


def _good() -> torch.nn.Module:
    return Model("good")


# ---------------------------------------------------------------------------------------------------------------
# case tables


def _pair_entries() -> dict[str, tuple[Callable[[Any, Any], Any], tuple[str, str]]]:
    """Entry points taking a source and a target batch, with the names of those arguments."""
    g = torch.Generator().manual_seed(0)
    entries: dict[str, tuple[Callable[[Any, Any], Any], tuple[str, str]]] = {}
    for name in ("independent", "exact", "hungarian", "sinkhorn", "paired"):
        coupler = otcfm.get_coupler(name)
        entries[f"couplers.{name}"] = (lambda a, b, c=coupler: c(a, b, generator=g), ("x0", "x1"))
    for name in ("independent", "exact", "sinkhorn"):
        fm = otcfm.FlowMatcher(coupler=name)
        entries[f"FlowMatcher({name}).loss"] = (lambda a, b, f=fm: f.loss(_good(), a, b, g), ("x0", "x1"))
    fm = otcfm.FlowMatcher()
    entries["FlowMatcher.batch"] = (lambda a, b: fm.batch(a, b, g), ("x0", "x1"))
    entries["metrics.w2"] = (lambda a, b: otcfm.metrics.w2(a, b), ("x", "y"))
    entries["metrics.crossing_rate"] = (lambda a, b: otcfm.metrics.crossing_rate(a, b), ("x0", "x1"))
    entries["metrics.swap_fraction"] = (lambda a, b: otcfm.metrics.swap_fraction(a, b), ("x0", "x1"))
    entries["metrics.frechet_distance"] = (lambda a, b: otcfm.metrics.frechet_distance(a, b), ("a", "b"))
    entries["distributed.global_pairs"] = (
        lambda a, b: otcfm.distributed.global_pairs("exact", a, b, generator=g),
        ("x0", "x1"),
    )
    entries["couplers.squared_euclidean_cost"] = (
        lambda a, b: otcfm.couplers.squared_euclidean_cost(a, b),
        ("x0", "x1"),
    )
    for name in ("linear", "gaussian", "diffusion", "cosine", "bridge"):
        path = otcfm.get_path(name)
        entries[f"paths.{name}"] = (
            lambda a, b, p=path: p(a, b, torch.full((8,), 0.5), torch.zeros(8, 2)),
            ("x0", "x1"),
        )
    return entries


def batch_cases() -> list[Case]:
    """Every bad batch class on each side of every two-batch entry point."""
    cases = []
    for entry, (call, (first, second)) in _pair_entries().items():
        for group, make in BAD_BATCHES.items():
            cases.append(
                Case(
                    group,
                    entry,
                    lambda c=call, m=make: c(m(), _x(seed=1)),
                    (first,)
                    if group not in ("feature-shape", "float64-beside-float32")
                    else (first, f"{first} and {second}"),
                )
            )
            cases.append(
                Case(
                    group,
                    entry,
                    lambda c=call, m=make: c(_x(seed=1), m()),
                    (second,)
                    if group not in ("feature-shape", "float64-beside-float32")
                    else (second, f"{first} and {second}"),
                )
            )
    return cases


def label_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    x = _x()
    bad_labels: dict[str, Callable[[], Any]] = {
        "labels-length": lambda: torch.zeros(5, dtype=torch.int64),
        "labels-nan": lambda: torch.full((8,), float("nan")),
        "labels-3d": lambda: torch.zeros(8, 1, 1),
        "labels-list": lambda: [0] * 8,
    }
    cases = []
    for name in ("exact", "sinkhorn", "hungarian"):
        coupler = otcfm.get_coupler(name)
        for group, make in bad_labels.items():
            cases.append(
                Case(group, f"couplers.{name}", lambda c=coupler, m=make: c(x, x, y1=m(), generator=g), ("y1",))
            )
            cases.append(
                Case(group, f"couplers.{name}", lambda c=coupler, m=make: c(x, x, y0=m(), generator=g), ("y0",))
            )
    fm = otcfm.FlowMatcher()
    for group, make in bad_labels.items():
        cases.append(Case(group, "FlowMatcher.loss", lambda m=make: fm.loss(_good(), x, x, g, y1=m()), ("y1",)))
    return cases


def generator_cases() -> list[Case]:
    x = _x()
    bad = {"generator-int": 0, "generator-str": "seed", "generator-numpy": np.random.default_rng(0)}
    calls: dict[str, Callable[[Any], Any]] = {
        "couplers.independent": lambda g: otcfm.get_coupler("independent")(x, x, generator=g),
        "couplers.exact": lambda g: otcfm.get_coupler("exact")(x, x, generator=g),
        "FlowMatcher.loss": lambda g: otcfm.FlowMatcher().loss(_good(), x, x, g),
        "data.sample": lambda g: otcfm.data.sample("moons", 4, g),
        "likelihood": lambda g: otcfm.likelihood(_good(), x, steps=2, divergence="hutchinson", generator=g),
        "metrics.gradient_variance": lambda g: otcfm.metrics.gradient_variance(
            otcfm.FlowMatcher(), _good(), "gaussian", "moons", 8, 2, g
        ),
    }
    return [
        Case(group, entry, lambda c=call, v=value: c(v), ("generator",))
        for entry, call in calls.items()
        for group, value in bad.items()
    ]


def model_cases() -> list[Case]:
    """Models returning None, the wrong shape or batch, NaN, Inf, integers or a tuple."""
    x, g = _x(), torch.Generator().manual_seed(0)
    calls: dict[str, Callable[[torch.nn.Module], Any]] = {
        "FlowMatcher.loss": lambda m: otcfm.FlowMatcher(coupler="independent").loss(m, x, _x(seed=2), g),
        "integrate": lambda m: otcfm.integrate(m, x, steps=2),
        "solve": lambda m: otcfm.solve(m, x, steps=2, method="rk4"),
        "likelihood": lambda m: otcfm.likelihood(m, x, steps=2),
        "metrics.w2_by_steps": lambda m: otcfm.metrics.w2_by_steps(m, x, x, steps=(1,)),
        "metrics.flow_statistics": lambda m: otcfm.metrics.flow_statistics(m, x, steps=2),
        "reflow.generate_pairs": lambda m: otcfm.reflow.generate_pairs(m, "8gaussians", 4, steps=1, progress=False),
        "reflow.distill": lambda m: otcfm.reflow.distill(
            m, lambda n, gen: (_x(n), _x(n, seed=3)), 2, 4, progress=False
        ),
        "reflow.train_on_pairs": lambda m: otcfm.reflow.train_on_pairs(
            lambda n, gen: (_x(n), _x(n, seed=3)), m, 2, 4, progress=False
        ),
        "train": lambda m: otcfm.train(model=m, steps=2, batch_size=4, progress=False),
    }
    return [
        Case("model", entry, lambda c=call, k=kind: c(Model(k)), ("model", "teacher"))
        for entry, call in calls.items()
        for kind in BAD_MODELS
    ]


def count_cases() -> list[Case]:
    """Counts that must be positive integers, rates that must be finite and positive, time spans."""
    x = _x()
    cases = []
    for value in (0, -1, 1.5, True, "3", None):
        group = "count"
        cases += [
            Case(group, "integrate", lambda v=value: otcfm.integrate(_good(), x, steps=v), ("steps",)),
            Case(group, "solve", lambda v=value: otcfm.solve(_good(), x, steps=v), ("steps",)),
            Case(group, "likelihood", lambda v=value: otcfm.likelihood(_good(), x, steps=v), ("steps",)),
            Case(group, "data.sample", lambda v=value: otcfm.data.sample("moons", v), ("n",)),
            Case(group, "metrics.straightness", lambda v=value: otcfm.metrics.straightness(_good(), x, v), ("steps",)),
            Case(
                group,
                "reflow.generate_pairs",
                lambda v=value: otcfm.reflow.generate_pairs(_good(), "8gaussians", v, steps=1, progress=False),
                ("n",),
            ),
            Case(
                group,
                "reflow.train_on_pairs",
                lambda v=value: otcfm.reflow.train_on_pairs(
                    lambda n, gen: (_x(n), _x(n)), _good(), steps=v, progress=False
                ),
                ("steps",),
            ),
            Case(
                group,
                "reflow.distill",
                lambda v=value: otcfm.reflow.distill(
                    _good(), lambda n, gen: (_x(n), _x(n)), steps=2, batch_size=v, progress=False
                ),
                ("batch_size",),
            ),
            Case(group, "TrainConfig", lambda v=value: otcfm.TrainConfig(steps=v), ("steps",)),
            Case(group, "TrainConfig", lambda v=value: otcfm.TrainConfig(batch_size=v), ("batch_size",)),
            Case(group, "models.MLP", lambda v=value: otcfm.models.MLP(v), ("dim",)),
            Case(
                group,
                "loader.coupled_loader",
                lambda v=value: otcfm.loader.coupled_loader("gaussian", "moons", batch_size=v),
                ("batch_size",),
            ),
            Case(
                group,
                "metrics.target_variance",
                lambda v=value: otcfm.metrics.target_variance(otcfm.FlowMatcher(), "gaussian", "moons", v),
                ("batch_size",),
            ),
        ]
    for value in (0.0, -1.0, float("inf"), float("nan"), "0.1"):
        group = "rate"
        cases += [
            Case(group, "TrainConfig", lambda v=value: otcfm.TrainConfig(lr=v), ("lr",)),
            Case(
                group,
                "reflow.train_on_pairs",
                lambda v=value: otcfm.reflow.train_on_pairs(
                    lambda n, gen: (_x(n), _x(n)), _good(), steps=2, lr=v, progress=False
                ),
                ("lr",),
            ),
            Case(
                group,
                "reflow.distill",
                lambda v=value: otcfm.reflow.distill(
                    _good(), lambda n, gen: (_x(n), _x(n)), steps=2, lr=v, progress=False
                ),
                ("lr",),
            ),
            Case(
                group,
                "couplers.SinkhornCoupler",
                lambda v=value: otcfm.couplers.SinkhornCoupler(epsilon=v),
                ("epsilon",),
            ),
            Case(group, "couplers.SinkhornCoupler", lambda v=value: otcfm.couplers.SinkhornCoupler(tol=v), ("tol",)),
            Case(group, "TrainConfig", lambda v=value: otcfm.TrainConfig(grad_clip=v), ("grad_clip",)),
        ]
    for value in (-0.5, float("nan"), float("inf")):
        cases += [
            Case("rate", "paths.linear", lambda v=value: otcfm.get_path("linear", v), ("sigma",)),
            Case("rate", "paths.bridge", lambda v=value: otcfm.get_path("bridge", v), ("sigma",)),
            Case("rate", "TrainConfig", lambda v=value: otcfm.TrainConfig(ema_decay=v), ("ema_decay",)),
        ]
    for span in ((0.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0), (0.0,), "01", None):
        cases += [
            Case("time-span", "integrate", lambda s=span: otcfm.integrate(_good(), x, 2, t_span=s), ("t_span",)),
            Case("time-span", "solve", lambda s=span: otcfm.solve(_good(), x, 2, t_span=s), ("t_span",)),
        ]
    for t in (
        torch.full((8,), 1.5),
        torch.full((8,), -0.1),
        torch.full((8,), float("nan")),
        torch.zeros(7),
        torch.zeros(8, 1),
        [0.5] * 8,
    ):
        for name in ("linear", "diffusion", "bridge"):
            path = otcfm.get_path(name)
            cases.append(Case("time", f"paths.{name}", lambda p=path, v=t: p(x, x, v, torch.zeros(8, 2)), ("t",)))
    return cases


def option_cases() -> list[Case]:
    """Unknown names and options: the message names the argument (and lists the valid values)."""
    x = _x()
    return [
        Case("name", "FlowMatcher", lambda: otcfm.FlowMatcher(coupler="optimal"), ("coupler",)),
        Case("name", "FlowMatcher", lambda: otcfm.FlowMatcher(path="ot"), ("path",)),
        Case("name", "FlowMatcher", lambda: otcfm.FlowMatcher(time_sampler="beta"), ("time_sampler",)),
        Case("name", "FlowMatcher", lambda: otcfm.FlowMatcher(coupler=3), ("coupler",)),
        Case("name", "FlowMatcher", lambda: otcfm.FlowMatcher(path=None), ("path",)),
        Case("name", "get_coupler", lambda: otcfm.get_coupler("exact", epsilon=0.1), ("epsilon", "coupler")),
        Case("name", "ExactCoupler", lambda: otcfm.couplers.ExactCoupler(solver="simplex"), ("solver",)),
        Case("name", "ExactCoupler", lambda: otcfm.couplers.ExactCoupler(num_iter_max=0), ("num_iter_max",)),
        Case("name", "ExactCoupler", lambda: otcfm.couplers.ExactCoupler(label_weight=-1.0), ("label_weight",)),
        Case("name", "integrate", lambda: otcfm.integrate(_good(), x, 2, method="rk5"), ("method",)),
        Case("name", "likelihood", lambda: otcfm.likelihood(_good(), x, 2, divergence="trace"), ("divergence",)),
        Case("name", "likelihood", lambda: otcfm.likelihood(_good(), x, 2, probe="uniform"), ("probe",)),
        Case("name", "likelihood", lambda: otcfm.likelihood(_good(), x, 2, method="dopri5"), ("method",)),
        Case("name", "data.sample", lambda: otcfm.data.sample("gauss", 4), ("name",)),
        Case("name", "data.sample", lambda: otcfm.data.sample("mixture", 4, dim=0), ("dim",)),
        Case("name", "data.draw", lambda: otcfm.data.draw(3, 4), ("sampler",)),
        Case("name", "train", lambda: otcfm.train(source="gauss", steps=1, progress=False), ("source",)),
        Case("name", "train", lambda: otcfm.train(target="moon", steps=1, progress=False), ("target",)),
        Case("name", "train", lambda: otcfm.train(coupler="optimal", steps=1, progress=False), ("coupler",)),
        Case("name", "train", lambda: otcfm.train(path="ot", steps=1, progress=False), ("path",)),
        Case("name", "train", lambda: otcfm.train(time_sampler="beta", steps=1, progress=False), ("time_sampler",)),
        Case("name", "train", lambda: otcfm.train(precision="fp16", steps=1, progress=False), ("precision",)),
        Case("name", "train", lambda: otcfm.train(device="tpu", steps=1, progress=False), ("device",)),
        Case(
            "name",
            "reflow.distill",
            lambda: otcfm.reflow.distill(_good(), lambda n, g: (_x(n), _x(n)), 1, loss="l1", progress=False),
            ("loss",),
        ),
        Case(
            "name",
            "reflow.generate_pairs",
            lambda: otcfm.reflow.generate_pairs(_good(), "gauss", 4, steps=1, progress=False),
            ("source",),
        ),
        Case(
            "name",
            "reflow.generate_pairs",
            lambda: otcfm.reflow.generate_pairs(_good(), "8gaussians", 4, steps=1, method="rk5", progress=False),
            ("method",),
        ),
        Case(
            "name",
            "loader.coupled_loader",
            lambda: otcfm.loader.coupled_loader("gaussian", "moons", "optimal"),
            ("coupler",),
        ),
        Case("name", "timesteps", lambda: otcfm.timesteps.LogitNormal(std=0.0), ("std",)),
        Case("name", "timesteps", lambda: otcfm.timesteps.UShaped(a=-1.0), ("a",)),
        Case(
            "name", "sinkhorn_plan", lambda: otcfm.couplers.sinkhorn_plan(torch.rand(4, 4), epsilon=-1.0), ("epsilon",)
        ),
        Case("name", "sinkhorn_plan", lambda: otcfm.couplers.sinkhorn_plan(torch.rand(4), epsilon=0.1), ("cost",)),
        Case("name", "exact_plan", lambda: otcfm.couplers.exact_plan(np.full((3, 3), np.nan)), ("cost",)),
        Case("name", "exact_plan", lambda: otcfm.couplers.exact_plan(np.ones((3, 3)), a=np.ones(2)), ("a",)),
        Case("name", "linear_assignment", lambda: otcfm.couplers.linear_assignment(np.ones(3)), ("cost",)),
        Case(
            "name", "pairs_from_plan", lambda: otcfm.couplers.pairs_from_plan(-torch.ones(3, 3), None, "cpu"), ("plan",)
        ),
        Case("name", "data.load_digits", lambda: otcfm.data.load_digits("val"), ("split",)),
    ]


def file_cases(directory: Path) -> list[Case]:
    """Missing, empty and foreign files and directories."""
    text = directory / "text.pt"
    text.write_text("not a checkpoint")
    empty = directory / "empty.pt"
    empty.write_bytes(b"")
    tensor = directory / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    npy_1d = directory / "one.npy"
    np.save(npy_1d, np.zeros(5))
    npy_obj = directory / "obj.npy"
    np.save(npy_obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    missing = directory / "missing"
    not_found = (FileNotFoundError, ValueError)
    return [
        Case("file", "load_model", lambda: otcfm.load_model(missing), ("checkpoint",), not_found),
        Case("file", "load_model", lambda: otcfm.load_model(directory), ("checkpoint",), not_found),
        Case("file", "load_model", lambda: otcfm.load_model(text), ("checkpoint",)),
        Case("file", "load_model", lambda: otcfm.load_model(empty), ("checkpoint",)),
        Case("file", "load_model", lambda: otcfm.load_model(tensor), ("checkpoint",)),
        Case("file", "checkpoint.load", lambda: otcfm.checkpoint.load(text), ("checkpoint",)),
        Case("file", "reflow.load_pairs", lambda: otcfm.reflow.load_pairs(missing), ("path",), not_found),
        Case(
            "file",
            "train",
            lambda: otcfm.train(target=str(missing) + ".npy", steps=1, progress=False),
            ("target",),
            not_found,
        ),
        Case("file", "train", lambda: otcfm.train(target=str(npy_1d), steps=1, progress=False), ("target",)),
        Case("file", "train", lambda: otcfm.train(target=str(npy_obj), steps=1, progress=False), ("target",)),
        Case("file", "train", lambda: otcfm.train(target=str(text), steps=1, progress=False), ("target",)),
        Case("file", "train", lambda: otcfm.train(resume=True, steps=1, progress=False), ("resume",)),
        Case("file", "train", lambda: otcfm.train(out="", steps=1, progress=False), ("out",)),
    ]


def _cli(argv: list[str]) -> None:
    from otcfm.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    raise CLIResult(code, stderr.getvalue())


def cli_cases(directory: Path) -> list[Case]:
    """Command lines with a user error: one line on stderr naming the option, exit code 2."""
    out = str(directory / "cli-run")  # a finished run (made by the caller): the teacher and checkpoint
    text = directory / "cli-text.pt"
    text.write_text("hello")
    quick = ["--no-progress", "--overwrite", "--out", str(directory / "cli-train")]
    bad: list[tuple[list[str], tuple[str, ...]]] = [
        (["train", "--steps", "0", *quick], ("--steps",)),
        (["train", "--steps", "-3", *quick], ("--steps",)),
        (["train", "--steps", "x", *quick], ("--steps",)),
        (["train", "--batch-size", "0", *quick], ("--batch-size",)),
        (["train", "--lr", "0", *quick], ("--lr",)),
        (["train", "--lr", "inf", *quick], ("--lr",)),
        (["train", "--lr", "nan", *quick], ("--lr",)),
        (["train", "--hidden", "0", *quick], ("--hidden",)),
        (["train", "--depth", "-1", *quick], ("--depth",)),
        (["train", "--eval-n", "0", *quick], ("--eval-n",)),
        (["train", "--eval-draws", "0", *quick], ("--eval-draws",)),
        (["train", "--checkpoint-every", "0", *quick], ("--checkpoint-every",)),
        (["train", "--grad-clip", "0", *quick], ("--grad-clip",)),
        (["train", "--ema-decay", "1.5", "--steps", "1", *quick], ("ema_decay", "--ema-decay")),
        (["train", "--coupler", "optimal", *quick], ("--coupler",)),
        (["train", "--path", "ot", *quick], ("--path",)),
        (["train", "--time-sampler", "beta", *quick], ("--time-sampler",)),
        (["train", "--precision", "fp16", *quick], ("--precision",)),
        (["train", "--source", "gauss", "--steps", "1", *quick], ("source", "--source")),
        (["train", "--target", "moon", "--steps", "1", *quick], ("target", "--target")),
        (["train", "--target", str(directory / "nope.npy"), "--steps", "1", *quick], ("target", "--target")),
        (["train", "--target", str(text), "--steps", "1", *quick], ("target", "--target")),
        (["train", "--dim", "0", *quick], ("--dim",)),
        (["train", "--dim", "3", "--steps", "1", *quick], ("--dim",)),
        (["train", "--coupler-option", "epsilon", *quick], ("--coupler-option",)),
        (
            ["train", "--coupler", "sinkhorn", "--coupler-option", "eps=0.1", "--steps", "1", *quick],
            ("coupler_options", "--coupler-option"),
        ),
        (["train", "--path-option", "beta=1", "--steps", "1", *quick], ("path_options", "--path-option")),
        (["train", "--sigma", "-1", "--steps", "1", *quick], ("sigma", "--sigma")),
        (["train", "--device", "tpu", "--steps", "1", *quick], ("device", "--device")),
        (["train", "--model", "nomodule:make", "--steps", "1", *quick], ("model", "--model")),
        (["train", "--resume", "--steps", "1", *quick], ("--resume",)),
        (["train", "--out", "", "--no-progress"], ("--out",)),
        (["train", "--out", str(text), "--no-progress"], ("--out",)),
        (["train", "--bogus", *quick], ("--bogus",)),
        (["sample", "--checkpoint", str(directory / "none"), "--out", str(directory / "x.pt")], ("--checkpoint",)),
        (["sample", "--checkpoint", str(text), "--out", str(directory / "x.pt")], ("--checkpoint",)),
        (["sample", "--checkpoint", out, "--n", "0", "--out", str(directory / "x.pt")], ("--n",)),
        (["sample", "--checkpoint", out, "--steps", "0", "--out", str(directory / "x.pt")], ("--steps",)),
        (["sample", "--checkpoint", out, "--method", "rk5", "--out", str(directory / "x.pt")], ("--method",)),
        (["sample", "--checkpoint", out, "--out", str(directory)], ("--out",)),
        (["sample", "--checkpoint", out], ("--out",)),
        (["reflow", "--teacher", str(directory / "none"), "--out", str(directory / "rf")], ("--teacher",)),
        (["reflow", "--teacher", out, "--pairs", "0", "--out", str(directory / "rf")], ("--pairs",)),
        (["reflow", "--teacher", out, "--solver-steps", "0", "--out", str(directory / "rf")], ("--solver-steps",)),
        (["reflow", "--teacher", out, "--train-steps", "0", "--out", str(directory / "rf")], ("--train-steps",)),
        (["reflow", "--teacher", out, "--method", "x", "--out", str(directory / "rf")], ("--method",)),
        (["distill", "--teacher", out, "--loss", "l1", "--out", str(directory / "rf")], ("--loss",)),
        (["distill", "--teacher", out, "--out", ""], ("--out",)),
        (["distill", "--out", str(directory / "rf")], ("--teacher",)),
        (["nothing"], ("command",)),
        ([], ("command",)),
    ]
    return [Case("cli", argv[0] if argv else "otcfm", lambda a=argv: _cli(a), names) for argv, names in bad]


def review_cases(directory: Path) -> list[Case]:
    """What a second probe and a new user's walkthrough found (2026-11-25): yes/no options given as text, unknown
    options, settings that draw NaN, a model that does not fit the data, misplaced files, solver hangs."""
    from otcfm.couplers.blockwise import blockwise_sinkhorn
    from otcfm.couplers.cost import condition_cost
    from otcfm.paths import BridgePath, DiffusionPath, GaussianPath, LinearPath
    from otcfm.timesteps import LogitNormal, UShaped

    x, g = _x(), torch.Generator().manual_seed(0)
    coupler = otcfm.get_coupler
    a_file = directory / "a-file"
    a_file.parent.mkdir(parents=True, exist_ok=True)
    a_file.write_text("not a directory")

    def nan_flow(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return y * float("nan")

    quick = {"steps": 1, "progress": False}
    return [
        Case("flag", "SinkhornCoupler", lambda: coupler("sinkhorn", relative="False"), ("relative",)),
        Case("flag", "SinkhornCoupler", lambda: coupler("sinkhorn", anneal="bogus"), ("anneal",)),
        Case("flag", "ExactCoupler", lambda: coupler("exact", replace="False"), ("replace",)),
        Case("flag", "UnbalancedCoupler", lambda: coupler("unbalanced", relative="no"), ("relative",)),
        Case("flag", "SemidiscreteCoupler", lambda: coupler("semidiscrete", relative="yes"), ("relative",)),
        Case("flag", "TrainConfig", lambda: otcfm.TrainConfig(global_coupling="no"), ("global_coupling",)),
        Case("flag", "train", lambda: otcfm.train(resume=True, overwrite=True, **quick), ("resume", "overwrite")),
        Case("option", "get_coupler", lambda: coupler("exact", bogus=1), ("bogus", "coupler")),
        Case("option", "data.sample", lambda: otcfm.data.sample("moons", 4, foo=1), ("foo",)),
        Case("option", "data.sample", lambda: otcfm.data.sample("moons", 4, noise=float("nan")), ("noise",)),
        Case("option", "data.sample", lambda: otcfm.data.sample("moons", 4, dtype=torch.int64), ("dtype",)),
        Case("option", "data.sample", lambda: otcfm.data.sample("moons", 4, device="bogus"), ("device",)),
        Case("option", "train", lambda: otcfm.train(model_options={"width": 3}, **quick), ("model_options",)),
        Case("option", "sinkhorn_plan", lambda: otcfm.couplers.sinkhorn_plan(np.ones((3, 3)), 0.1), ("cost",)),
        Case("range", "LogitNormal", lambda: LogitNormal(mean=float("nan")), ("mean",)),
        Case("range", "UShaped", lambda: UShaped(a=1000.0), ("a",)),
        Case("range", "DiffusionPath", lambda: DiffusionPath(0.1, float("inf")), ("beta_max",)),
        Case("range", "BridgePath", lambda: BridgePath(1e200), ("sigma",)),
        Case("range", "GaussianPath", lambda: GaussianPath(sigma_min=2.0), ("sigma_min",)),
        Case("range", "LinearPath", lambda: LinearPath(0.1)(x, x, torch.rand(8), x.double()), ("noise",)),
        Case("range", "reflow.rectify", lambda: otcfm.reflow.rectify(_good(), "8gaussians", rounds=0), ("rounds",)),
        Case("range", "reflow.PairSet", lambda: otcfm.reflow.PairSet(_x(5), _x(10)), ("x0", "x1")),
        Case(
            "range",
            "blockwise_sinkhorn",
            lambda: blockwise_sinkhorn(x.double() * 1e200, x.double() * 1e200, 0.1),
            ("x0", "x1"),
        ),
        Case(
            "range",
            "target_variance_of_pairs",
            lambda: otcfm.metrics.target_variance_of_pairs((x, x), (x, x), times=[2.0]),
            ("times",),
        ),
        Case(
            "range",
            "condition_cost",
            lambda: condition_cost(torch.rand(4, 4), torch.zeros(1).long(), torch.arange(4), None, g),
            ("y0",),
        ),
        Case(
            "range",
            "likelihood",
            lambda: otcfm.likelihood(_good(), x, 2, source_log_prob=lambda z: z.sum(1, keepdim=True)),
            ("source_log_prob",),
        ),
        Case("model-fit", "integrate", lambda: otcfm.integrate(otcfm.models.MLP(3), x, 2), ("model",)),
        Case("model-fit", "train", lambda: otcfm.train(model=otcfm.models.MLP(3), **quick), ("model",)),
        Case("model-fit", "train", lambda: otcfm.train(model=torch.nn.Identity(), **quick), ("model",)),
        Case("model-fit", "train", lambda: otcfm.train(callback=5, **quick), ("callback",)),
        Case("model-fit", "integrate", lambda: otcfm.integrate(nan_flow, x, 2, "dopri5"), ("model",)),
        Case("file", "train", lambda: otcfm.train(out=a_file, **quick), ("out",)),
        Case("file", "load_model", lambda: otcfm.load_model(5), ("path",)),
        Case(
            "file",
            "loader.coupled_loader",
            lambda: otcfm.loader.coupled_loader("bogus", "moons", "exact", 8, num_workers=1),
            ("source",),
        ),
        Case(
            "file",
            "reflow.train_on_pairs",
            lambda: otcfm.reflow.train_on_pairs(x, _good(), steps=1, progress=False),
            ("pairs",),
        ),
    ]


#: Modules of further case classes, each with ``cases(directory) -> list[Case]``: plans and their constraints,
#: the semidiscrete coupler, flags and numbers, pair sets and messages.
CASE_MODULES = ("probe_plans", "probe_semidiscrete", "probe_flags", "probe_pairs")


def all_cases(directory: Path) -> list[Case]:
    """Every case, each with a unique id (repeated ids get ``#k`` in table order); files are made in ``directory``."""
    import importlib

    extra = [case for module in CASE_MODULES for case in importlib.import_module(module).cases(directory)]
    cases = [
        *batch_cases(),
        *label_cases(),
        *generator_cases(),
        *model_cases(),
        *count_cases(),
        *option_cases(),
        *file_cases(directory),
        *cli_cases(directory),
        *review_cases(directory),
        *extra,
    ]
    seen: Counter = Counter()
    unique = []
    for case in cases:
        seen[case.id] += 1
        unique.append(dataclasses.replace(case, detail=f"#{seen[case.id]}") if seen[case.id] > 1 else case)
    return unique


def report(cases: list[Case]) -> dict[str, Counter]:
    """Outcome counts by group."""
    table: dict[str, Counter] = {}
    for case in cases:
        table.setdefault(case.group, Counter())[classify(case)] += 1
    return table


if __name__ == "__main__":
    sys.modules.setdefault("probe", sys.modules[__name__])  # the case modules' `from probe import ...` is this one
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = all_cases(Path(tmp))
        # a small finished run for the CLI cases that need a teacher or a checkpoint
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            otcfm.train(
                otcfm.TrainConfig(steps=2, batch_size=8, hidden=8, depth=1), out=Path(tmp) / "cli-run", progress=False
            )
        table = report(cases)
        total: Counter = Counter()
        print(f"otcfm {otcfm.__version__} from {Path(otcfm.__file__).parent}: {len(cases)} cases")
        print("| class | cases | clear | unclear | silent | missing |")
        print("|---|---:|---:|---:|---:|---:|")
        for group, counts in table.items():
            total.update(counts)
            print(
                f"| {group} | {sum(counts.values())} | {counts['clear']} | {counts['unclear']} | "
                f"{counts['silent']} | {counts['missing']} |"
            )
        print(
            f"| all | {sum(total.values())} | {total['clear']} | {total['unclear']} | {total['silent']} | "
            f"{total['missing']} |"
        )
        if "-v" in sys.argv:
            for case in cases:
                outcome = classify(case)
                if outcome != "clear":
                    print(outcome, case.id)
