"""Pair sets and messages: foreign chunks, pairs of mismatched shapes, sampler rows, dtype mismatches, 0-d
teacher tensors, and messages that name what the user passed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from probe import Case, Model
from torch import Tensor, nn

import otcfm
import otcfm.loader
import otcfm.reflow
from otcfm import checkpoint

#: ``teacher_fingerprint`` of :func:`_fixed_model` as otcfm computed it before 0-d tensors were handled: pair sets
#: written then record it, and still load and resume.
FIXED_FINGERPRINT = "29a18fb389235ce2"


def _x(n: int, d: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fixed_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).double())
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 7 + k)
    return model


class BatchNormTeacher(nn.Module):
    """A teacher with a BatchNorm layer (its ``num_batches_tracked`` is a 0-d buffer), left in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.norm(self.linear(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1)))


class ScalarBufferTeacher(Model):
    """The probe's good model with a 0-d float buffer (a learnt temperature, say)."""

    def __init__(self) -> None:
        super().__init__("good")
        self.register_buffer("scale", torch.tensor(1.5))


QUICK = {"steps": 1, "method": "euler", "batch_size": 4, "progress": False}


def _teacher() -> nn.Module:
    """The probe's good model with weights of its own seed: the same teacher at every call."""
    model, generator = Model("good"), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


def _pair_set(directory: Path, seed: int = 0, teacher: nn.Module | None = None, batch_size: int = 4) -> Path:
    """A fresh pair set of 8 pairs in ``directory`` (removed first: a case may run twice)."""
    shutil.rmtree(directory, ignore_errors=True)
    settings = {**QUICK, "batch_size": batch_size}
    otcfm.reflow.generate_pairs(teacher or _teacher(), "8gaussians", 8, out=directory, seed=seed, **settings)
    return directory


def _mixed(directory: Path, make_other: Callable[[Path], Path], chunk: str = "chunk-00001.pt") -> Path:
    """Pair set ``directory / 'a'`` with ``chunk`` replaced by the file of the same name from another set."""
    mine = _pair_set(directory / "a")
    other = make_other(directory / "b")
    shutil.copyfile(other / chunk, mine / chunk)
    return mine


def _moved(directory: Path) -> Path:
    """A pair set whose chunk 0 was copied over chunk 1 (same size): chunk 0's pairs twice."""
    mine = _pair_set(directory)
    shutil.copyfile(mine / "chunk-00000.pt", mine / "chunk-00001.pt")
    return mine


def _truncated(directory: Path) -> Path:
    mine = _pair_set(directory)
    chunk = mine / "chunk-00001.pt"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return mine


def _foreign_meta(directory: Path) -> Path:
    """A pair set whose meta.json was replaced by that of another seed's set (its chunks are not its pairs)."""
    mine = _pair_set(directory / "a")
    other = _pair_set(directory / "b", seed=1)
    shutil.copyfile(other / "meta.json", mine / "meta.json")
    return mine


def _legacy(directory: Path) -> Path:
    """A pair set as otcfm wrote it before chunks carried their set's identity: only x0 and x1 in each chunk."""
    mine = _pair_set(directory)
    meta = json.loads((mine / "meta.json").read_text())
    for key in ("set",):
        meta.pop(key, None)
    (mine / "meta.json").write_text(json.dumps(meta, indent=1))
    for chunk in sorted(mine.glob("chunk-*.pt")):
        part = checkpoint.load(chunk)
        checkpoint.atomic_save({"x0": part["x0"], "x1": part["x1"]}, chunk)
    return mine


def _generate_into(directory: Path) -> otcfm.reflow.PairSet:
    """Resume generation into a set with a foreign chunk: the same settings, so the chunk is found, not made."""
    return otcfm.reflow.generate_pairs(_teacher(), "8gaussians", 8, out=directory, seed=0, **QUICK)


def _source(rows: Callable[[int], int] = lambda n: n, d: int = 2, kind: str = "ok") -> Callable[..., Any]:
    """A sampler ``f(n, generator)`` returning ``rows(n)`` samples of ``d`` features, or something else (kind)."""

    def sample(n: int, generator: torch.Generator | None = None) -> Any:
        x = torch.randn(rows(n), d, generator=generator)
        if kind == "1d":
            return x[:, 0]
        if kind == "tuple":
            return (x, x)
        if kind == "int":
            return x.round().long()
        if kind == "nan":
            x[0, 0] = float("nan")
        return x

    return sample


def _pool(source: Callable[..., Any], target: Callable[..., Any] | str = "moons") -> tuple[Tensor, Tensor]:
    return otcfm.loader.PoolStream(source, target, "exact", pool_size=8, batch_size=4).batch(0)


def _loader(source: Callable[..., Any], target: Callable[..., Any] | str = "moons") -> tuple[Tensor, Tensor]:
    return next(iter(otcfm.loader.coupled_loader(source, target, "exact", batch_size=4, num_workers=0)))


def _drawer(x0: Any, x1: Any) -> Callable[[int, torch.Generator], tuple[Any, Any]]:
    """A pair source returning ``x0`` and ``x1`` as made for the batch size it is asked for."""

    def draw(n: int, generator: torch.Generator) -> tuple[Any, Any]:
        return x0(n), x1(n)

    return draw


def _train(pairs: Any, model: nn.Module | None = None) -> nn.Module:
    return otcfm.reflow.train_on_pairs(pairs, model or Model("good"), steps=1, batch_size=4, progress=False)


def _distill(pairs: Any, model: nn.Module | None = None) -> nn.Module:
    return otcfm.reflow.distill(model or Model("good"), pairs, steps=1, batch_size=4, progress=False)


def _nan(x: Tensor, value: float = float("nan")) -> Tensor:
    x = x.clone()
    x[1, 0] = value
    return x


def _is_pairs(result: Any, n: int = 8) -> bool:
    return (
        isinstance(result, otcfm.reflow.PairSet)
        and len(result) == n
        and bool(torch.isfinite(result.x0).all() and torch.isfinite(result.x1).all())
    )


def _fingerprint_unchanged_by_generation() -> bool:
    teacher = BatchNormTeacher()
    before = otcfm.reflow.teacher_fingerprint(teacher)
    otcfm.reflow.generate_pairs(teacher, "8gaussians", 8, **QUICK)
    return before == otcfm.reflow.teacher_fingerprint(teacher) and teacher.training


def _bn_resumes(directory: Path) -> bool:
    """A BatchNorm teacher's pair set, generated, then resumed with the same teacher: the same set, loaded."""
    shutil.rmtree(directory, ignore_errors=True)
    teacher = BatchNormTeacher()
    first = otcfm.reflow.generate_pairs(teacher, "8gaussians", 8, out=directory, **QUICK)
    again = otcfm.reflow.generate_pairs(teacher, "8gaussians", 8, out=directory, **QUICK)
    return _is_pairs(first) and torch.equal(first.x1, again.x1)


def _online(teacher: nn.Module) -> tuple[str, Tensor, Tensor]:
    pairs = otcfm.reflow.OnlinePairs(teacher, "8gaussians", steps=1, method="euler")
    return (repr(pairs), *pairs(4, torch.Generator().manual_seed(0)))


def _online_ok(result: tuple[str, Tensor, Tensor]) -> bool:
    text, x0, x1 = result
    return "OnlinePairs(teacher=" in text and x0.shape == x1.shape == (4, 2) and bool(torch.isfinite(x1).all())


def _loss(model: nn.Module, x0: Tensor, x1: Tensor, coupler: str = "independent") -> Tensor:
    return otcfm.FlowMatcher(coupler=coupler).loss(model, x0, x1, torch.Generator().manual_seed(0))


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    d = directory / "probe-pairs"
    load = otcfm.reflow.load_pairs
    f64, bf16 = torch.float64, torch.bfloat16
    out: list[Case] = [
        # -- chunks that are not this set's -----------------------------------------------------------------
        Case("chunk", "load_pairs", lambda: load(_mixed(d / "seed", lambda p: _pair_set(p, seed=1))), ("path",)),
        Case(
            "chunk",
            "load_pairs",
            lambda: load(_mixed(d / "teacher", lambda p: _pair_set(p, teacher=ScalarBufferTeacher()))),
            ("path",),
            detail="another teacher",
        ),
        Case("chunk", "load_pairs", lambda: load(_moved(d / "moved")), ("path",), detail="chunk 0 over chunk 1"),
        Case("chunk", "load_pairs", lambda: load(_truncated(d / "truncated")), ("path",), detail="truncated"),
        Case(
            "chunk",
            "load_pairs",
            lambda: load(_mixed(d / "size", lambda p: _pair_set(p, batch_size=2), "chunk-00000.pt")),
            ("path",),
            detail="other batch size",
        ),
        Case("chunk", "load_pairs", lambda: load(_foreign_meta(d / "meta")), ("path",), detail="foreign meta.json"),
        Case(
            "chunk",
            "generate_pairs",
            lambda: _generate_into(_mixed(d / "resume", lambda p: _pair_set(p, seed=1))),
            ("out",),
            detail="resume into a set with a foreign chunk",
        ),
        Case(
            "chunk",
            "load_pairs",
            lambda: load(_legacy(d / "legacy")),
            ("path",),
            detail="a set written before chunks carried an identity loads",
            expect=_is_pairs,
        ),
        Case(
            "chunk",
            "load_pairs",
            lambda: (_pair_set(d / "garbage") / "meta.json").write_text("{") and load(d / "garbage"),
            ("path",),
            detail="unreadable meta.json",
        ),
        # -- pairs of mismatched shapes, rows, dtypes or values ------------------------------------------------
        Case("pairs-shape", "train_on_pairs", lambda: _train((_x(8), _x(8, 1))), ("pairs",)),
        Case("pairs-shape", "distill", lambda: _distill((_x(8), _x(8, 1))), ("pairs",)),
        Case("pairs-shape", "train_on_pairs", lambda: _train((_x(8), _x(9))), ("pairs",), detail="(n+1, 2)"),
        Case("pairs-shape", "distill", lambda: _distill((_x(8), _x(9))), ("pairs",), detail="(n+1, 2)"),
        Case(
            "pairs-shape",
            "train_on_pairs",
            lambda: _train(_drawer(lambda n: _x(n), lambda n: _x(n, 1))),
            ("pairs",),
            detail="callable",
        ),
        Case(
            "pairs-shape",
            "distill",
            lambda: _distill(_drawer(lambda n: _x(n), lambda n: _x(n, 1))),
            ("pairs",),
            detail="callable",
        ),
        Case(
            "pairs-shape",
            "distill",
            lambda: _distill(_drawer(lambda n: _x(n + 1), lambda n: _x(n + 1))),
            ("pairs",),
            detail="callable, n+1 rows",
        ),
        Case(
            "pairs-shape",
            "train_on_pairs",
            lambda: _train(_drawer(lambda n: _x(n), lambda n: _x(n + 1))),
            ("pairs",),
            detail="callable, (n, 2) and (n+1, 2)",
        ),
        Case("pairs-shape", "distill", lambda: _distill(lambda n, g: _x(n)), ("pairs",), detail="one tensor"),
        Case(
            "pairs-shape",
            "train_on_pairs",
            lambda: _train((_x(8).long(), _x(8).long())),
            ("pairs",),
            detail="integers",
        ),
        Case(
            "pairs-shape",
            "distill",
            lambda: _distill((_x(8, dtype=f64), _x(8))),
            ("pairs",),
            detail="float64 beside float32",
        ),
        Case("pairs-nan", "train_on_pairs", lambda: _train((_x(8), _nan(_x(8)))), ("pairs",)),
        Case("pairs-nan", "distill", lambda: _distill((_nan(_x(8)), _x(8))), ("pairs",)),
        Case(
            "pairs-nan",
            "train_on_pairs",
            lambda: _train(otcfm.reflow.PairSet(_x(8), _nan(_x(8), float("inf")))),
            ("pairs",),
            detail="PairSet",
        ),
        Case(
            "pairs-nan",
            "distill",
            lambda: _distill(_drawer(lambda n: _nan(_x(n)), lambda n: _x(n))),
            ("pairs",),
            detail="callable",
        ),
        Case(
            "pairs-nan",
            "train_on_pairs",
            lambda: _train(_drawer(lambda n: _x(n), lambda n: _nan(_x(n)))),
            ("pairs",),
            detail="callable",
        ),
        # -- what PoolStream's and the loader's samplers return -------------------------------------------
        Case("sampler", "PoolStream", lambda: _pool(_source(lambda n: n + 1)), ("source",), detail="n+1 rows"),
        Case("sampler", "PoolStream", lambda: _pool("8gaussians", _source(lambda n: n - 1)), ("target",)),
        Case("sampler", "PoolStream", lambda: _pool(_source(kind="1d")), ("source",), detail="1-D"),
        Case("sampler", "PoolStream", lambda: _pool(_source(d=3)), ("source", "source and target"), detail="3 dims"),
        Case("sampler", "PoolStream", lambda: _pool(_source(kind="tuple")), ("source",), detail="tuple"),
        Case("sampler", "PoolStream", lambda: _pool(_source(kind="int")), ("source",), detail="integers"),
        Case("sampler", "PoolStream", lambda: _pool(_source(kind="nan")), ("source",), detail="NaN"),
        Case("sampler", "PoolStream", lambda: _pool(5), ("source",), detail="not a sampler"),
        Case(
            "sampler",
            "couple_pool",
            lambda: otcfm.loader.couple_pool(
                _source(lambda n: n + 1), "moons", otcfm.get_coupler("exact"), 8, torch.Generator().manual_seed(0)
            ),
            ("source",),
        ),
        Case("sampler", "coupled_loader", lambda: _loader(_source(lambda n: n + 1)), ("source",), detail="n+1"),
        Case(
            "sampler",
            "coupled_loader",
            lambda: _loader("8gaussians", _source(lambda n: n - 1 if n > 2 else n)),
            ("target",),
            detail="n-1 rows past the probe",
        ),
        # -- teachers with 0-d tensors ------------------------------------------------------------------------
        Case(
            "teacher-0d",
            "generate_pairs",
            lambda: otcfm.reflow.generate_pairs(BatchNormTeacher(), "8gaussians", 8, **QUICK),
            ("teacher",),
            detail="BatchNorm",
            expect=_is_pairs,
        ),
        Case(
            "teacher-0d",
            "generate_pairs",
            lambda: _bn_resumes(d / "bn"),
            ("teacher",),
            detail="BatchNorm, out=, resumed",
            expect=lambda ok: ok is True,
        ),
        Case(
            "teacher-0d",
            "generate_pairs",
            lambda: otcfm.reflow.generate_pairs(ScalarBufferTeacher(), "8gaussians", 8, **QUICK),
            ("teacher",),
            detail="0-d buffer",
            expect=_is_pairs,
        ),
        Case(
            "teacher-0d",
            "generate_pairs",
            _fingerprint_unchanged_by_generation,
            ("teacher",),
            detail="BatchNorm statistics untouched",
            expect=lambda ok: ok is True,
        ),
        Case("teacher-0d", "OnlinePairs", lambda: _online(BatchNormTeacher()), ("teacher",), expect=_online_ok),
        Case(
            "teacher-0d",
            "OnlinePairs",
            lambda: _online(ScalarBufferTeacher()),
            ("teacher",),
            detail="0-d buffer",
            expect=_online_ok,
        ),
        Case(
            "teacher-0d",
            "train_on_pairs",
            lambda: _train(otcfm.reflow.OnlinePairs(BatchNormTeacher(), "8gaussians", steps=1)),
            ("pairs",),
            detail="OnlinePairs of a BatchNorm teacher",
            expect=lambda model: isinstance(model, nn.Module),
        ),
        Case(
            "teacher-0d",
            "teacher_fingerprint",
            lambda: otcfm.reflow.teacher_fingerprint(_fixed_model()),
            ("model",),
            detail="unchanged for models without 0-d tensors",
            expect=lambda fingerprint: fingerprint == FIXED_FINGERPRINT,
        ),
        # -- a float64 batch for a float32 model, and the other way round ----------------------------------
        Case("dtype", "FlowMatcher.loss", lambda: _loss(Model(), _x(8, dtype=f64), _x(8, dtype=f64)), ("x0", "x1")),
        Case(
            "dtype",
            "FlowMatcher.loss",
            lambda: _loss(Model(), _x(8, dtype=f64), _x(8, dtype=f64), "exact"),
            ("x0", "x1"),
            detail="exact",
        ),
        Case(
            "dtype",
            "FlowMatcher.loss",
            lambda: _loss(Model().double(), _x(8), _x(8)),
            ("x0", "x1"),
            detail="float64 model",
        ),
        Case(
            "dtype",
            "FlowMatcher.loss",
            lambda: _loss(Model(), _x(8, dtype=bf16), _x(8, dtype=bf16)),
            ("x0", "x1"),
            detail="bfloat16",
        ),
        Case("dtype", "train_on_pairs", lambda: _train((_x(8, dtype=f64), _x(8, dtype=f64))), ("pairs",)),
        Case("dtype", "distill", lambda: _distill((_x(8, dtype=f64), _x(8, dtype=f64))), ("pairs",)),
        Case(
            "dtype",
            "train_on_pairs",
            lambda: _train(_drawer(lambda n: _x(n, dtype=f64), lambda n: _x(n, dtype=f64))),
            ("pairs",),
            detail="callable",
        ),
        Case(
            "dtype",
            "distill",
            lambda: _distill(otcfm.reflow.PairSet(_x(8), _x(8)), Model().double()),
            ("pairs", "model"),
            detail="float64 model",
        ),
        Case(
            "dtype",
            "OnlinePairs",
            lambda: _online(Model().double()),
            ("teacher",),
            detail="float64 teacher",
        ),
    ]
    return out
