"""Reflow: deterministic, resumable pair generation; wrong-teacher refusal; straighter 2-rectified flows;
a one-step generator by distillation; the CLI commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm import reflow
from otcfm.metrics import flow_statistics, w2
from otcfm.timesteps import UShaped
from otcfm.training import TrainConfig

SMALL = TrainConfig(steps=400, batch_size=128, hidden=64, depth=2, lr=3e-3, coupler="independent", seed=0)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    """An independently coupled (curved) 1-rectified flow on 8gaussians -> moons."""
    return otcfm.train(SMALL, progress=False).model


def _chunks(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("chunk-*.pt"))}


def test_pairs_are_deterministic_and_resume_to_identical_files(
    teacher: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"n": 50, "steps": 4, "method": "euler", "batch_size": 16, "seed": 3, "progress": False}
    full = reflow.generate_pairs(teacher, "8gaussians", out=tmp_path / "full", **settings)
    again = reflow.generate_pairs(teacher, "8gaussians", **settings)  # in memory, same pairs
    assert torch.equal(full.x0, again.x0) and torch.equal(full.x1, again.x1) and len(full) == 50

    calls = {"n": 0}
    real = reflow.integrate

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reflow, "integrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reflow.generate_pairs(teacher, "8gaussians", out=tmp_path / "cut", **settings)
    assert len(_chunks(tmp_path / "cut")) == 2  # finished chunks were kept
    monkeypatch.setattr(reflow, "integrate", real)
    resumed = reflow.generate_pairs(teacher, "8gaussians", out=tmp_path / "cut", **settings)
    assert _chunks(tmp_path / "cut") == _chunks(tmp_path / "full")
    assert torch.equal(resumed.x1, full.x1)
    loaded = reflow.load_pairs(tmp_path / "cut")
    assert torch.equal(loaded.x0, full.x0) and loaded.meta == full.meta


def test_pairs_from_another_teacher_or_settings_are_refused(teacher: torch.nn.Module, tmp_path: Path) -> None:
    reflow.generate_pairs(teacher, "8gaussians", 20, steps=2, method="euler", out=tmp_path, progress=False)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="teacher"):
        reflow.generate_pairs(other, "8gaussians", 20, steps=2, method="euler", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="steps: file 2 vs now 3"):
        reflow.generate_pairs(teacher, "8gaussians", 20, steps=3, method="euler", out=tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    replaced = reflow.generate_pairs(
        teacher, "8gaussians", 20, steps=3, method="euler", out=tmp_path, progress=False, overwrite=True
    )
    fresh = reflow.generate_pairs(teacher, "8gaussians", 20, steps=3, method="euler", progress=False)
    assert replaced.meta["steps"] == 3 and torch.equal(replaced.x1, fresh.x1)  # not the steps=2 chunks
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the pair set's own files are replaced
    reflow.generate_pairs(
        teacher, "8gaussians", 20, steps=2, method="euler", out=tmp_path, progress=False, overwrite=True
    )

    def shifted(n: int, generator: torch.Generator) -> torch.Tensor:  # named like the next one
        return 10 + torch.randn(n, 2, generator=generator)

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 2, generator=generator)

    shifted.__qualname__ = sampler.__qualname__
    reflow.generate_pairs(teacher, sampler, 20, steps=2, method="euler", out=tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match="source_draw"):  # same name, other draws: the walkthrough got old pairs
        reflow.generate_pairs(teacher, shifted, 20, steps=2, method="euler", out=tmp_path / "f", progress=False)
    (tmp_path / "chunk-00000.pt").unlink()
    with pytest.raises(ValueError, match="chunks missing"):
        reflow.load_pairs(tmp_path)
    with pytest.raises(FileNotFoundError):
        reflow.load_pairs(tmp_path / "nothing")


def test_two_rectified_flow_is_straighter_and_distills_to_one_step(teacher: torch.nn.Module) -> None:
    """2-rectified straightness below half the teacher's; the distilled one-step W2 within 2x of the teacher's
    100-step W2 (loose bound for a 2-second budget; the benchmark measures the real figure)."""
    g = torch.Generator().manual_seed(5)
    x0, reference = otcfm.data.sample("8gaussians", 1000, g), otcfm.data.sample("moons", 1000, g)
    pairs = reflow.generate_pairs(teacher, "8gaussians", 4000, steps=50, method="rk4", progress=False)
    student = reflow.train_on_pairs(pairs, copy.deepcopy(teacher), steps=400, lr=3e-3, progress=False)
    before, after = flow_statistics(teacher, x0, 50).straightness, flow_statistics(student, x0, 50).straightness
    assert after < 0.5 * before
    one_step = reflow.distill(copy.deepcopy(student), pairs, steps=400, lr=3e-3, progress=False)
    teacher_w2 = w2(otcfm.integrate(teacher, x0, 100), reference)
    assert w2(otcfm.integrate(one_step, x0, 1), reference) < 2.0 * teacher_w2


def test_online_pairs_and_pseudo_huber(teacher: torch.nn.Module) -> None:
    online = reflow.OnlinePairs(teacher, "8gaussians", steps=3)
    x0, x1 = online(16, torch.Generator().manual_seed(0))
    assert x0.shape == x1.shape == (16, 2) and not x1.requires_grad
    student = reflow.distill(copy.deepcopy(teacher), online, steps=3, loss="pseudo_huber", progress=False)
    assert student(x0, torch.zeros(16)).shape == (16, 2)
    with pytest.raises(ValueError, match="loss"):
        reflow.distill(student, online, steps=1, loss="l1", progress=False)  # type: ignore[arg-type]


def test_rectify_rounds(teacher: torch.nn.Module, tmp_path: Path) -> None:
    models = reflow.rectify(
        teacher,
        "8gaussians",
        rounds=2,
        n_pairs=64,
        steps=2,
        method="euler",
        train_steps=2,
        out=tmp_path,
        progress=False,
    )
    assert len(models) == 2 and (tmp_path / "round-2" / "meta.json").is_file()
    assert reflow.teacher_fingerprint(models[1]) != reflow.teacher_fingerprint(teacher)


def test_u_shaped_time_sampler_density() -> None:
    """Histogram of 200k draws vs p(t) = a cosh(a (2t - 1)) / sinh(a), a = 2 (tolerance 0.03 per bin)."""
    import math

    t = UShaped(2.0)(200_000, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    hist = torch.histc(t, 10, 0, 1) / len(t) * 10
    for k in range(10):
        mid = (k + 0.5) / 10
        assert float(hist[k]) == pytest.approx(2 * math.cosh(2 * (2 * mid - 1)) / math.sinh(2), abs=0.03)


def test_cli_reflow_and_distill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otcfm.cli import main

    run = tmp_path / "run"
    small = [
        "--steps",
        "20",
        "--batch-size",
        "32",
        "--hidden",
        "16",
        "--depth",
        "1",
        "--no-progress",
        "--eval-n",
        "100",
        "--eval-draws",
        "1",
    ]
    assert main(["train", "--out", str(run), *small]) == 0
    common = [
        "--teacher",
        str(run),
        "--pairs",
        "64",
        "--solver-steps",
        "2",
        "--train-steps",
        "3",
        "--no-progress",
        "--eval-n",
        "100",
        "--eval-draws",
        "1",
    ]
    for command in ("reflow", "distill"):
        out = tmp_path / command
        assert main([command, *common, "--out", str(out)]) == 0
        assert {"checkpoint.pt", "samples.png", "w2.json", "pairs"} <= {p.name for p in out.iterdir()}
        model, _ = otcfm.load_model(out)
        assert model(torch.zeros(2, 2), torch.zeros(2)).shape == (2, 2)
    assert "| 1 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="stage: checkpoint 'reflow' vs now 'train'"):
        otcfm.train(SMALL, out=tmp_path / "reflow", resume=True, progress=False)
    # an existing run is refused before any work, and resumes with --resume (pairs and steps)
    assert main(["reflow", *common, "--out", str(tmp_path / "reflow")]) == 2
    assert "--resume" in capsys.readouterr().err
    more = [a if a != "3" else "5" for a in common]
    assert main(["reflow", *more, "--out", str(tmp_path / "reflow"), "--resume"]) == 0
    assert otcfm.checkpoint.load(tmp_path / "reflow" / "checkpoint.pt")["step"] == 5
    assert "2 steps (resumed at step 3)" in capsys.readouterr().out  # as train reports it


def test_pairs_held_as_a_tuple_train_and_resume_only_on_the_same_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    net = otcfm.models.MLP(2, hidden=16, depth=1)
    options = {"steps": 4, "batch_size": 16, "progress": False}
    reflow.train_on_pairs((x0, x1), copy.deepcopy(net), run=reflow.RunOptions(out=tmp_path), **options)
    again = reflow.RunOptions(out=tmp_path, resume=True)
    reflow.train_on_pairs((x0, x1), copy.deepcopy(net), run=again, **options)  # the same pairs: resumes
    with pytest.raises(ValueError, match="pairs_content"):  # other pairs with the same (empty) description
        reflow.train_on_pairs((x0, x1 + 1), copy.deepcopy(net), run=again, **options)
    reflow.train_on_pairs((x0, x1), copy.deepcopy(net), run=again, **dict(options, steps=6))
    with pytest.raises(TypeError, match="pairs: expected a PairSet, a tuple"):
        reflow.train_on_pairs(x0, copy.deepcopy(net), **options)


def test_online_pairs_and_target_variance_name_bad_settings_up_front(teacher: torch.nn.Module) -> None:
    from otcfm.metrics import target_variance

    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        reflow.OnlinePairs(teacher, "8gaussians", steps=0)
    with pytest.raises(ValueError, match="method: unknown value 'bogus'"):
        reflow.OnlinePairs(teacher, "8gaussians", method="bogus")
    with pytest.raises(ValueError, match="source: unknown dataset 'nonexistent'"):
        reflow.OnlinePairs(teacher, "nonexistent")
    with pytest.raises(ValueError, match="source: unknown value 'nonexistent'"):  # said 'name:'
        target_variance(otcfm.FlowMatcher(coupler="independent"), "nonexistent", "moons", batch_size=8)


def test_online_pairs_take_any_source_and_resume_in_another_process(teacher: torch.nn.Module, tmp_path: Path) -> None:
    """A tensor source was accepted when made and refused at the first draw ('sampler: ...'); a run on OnlinePairs
    recorded their default repr, whose memory address made every resume in a new process fail."""
    data = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    x0, x1 = reflow.OnlinePairs(teacher, data, steps=2)(8, torch.Generator().manual_seed(1))
    assert x0.shape == x1.shape == (8, 2) and all(bool((data == row).all(1).any()) for row in x0)
    made = [repr(reflow.OnlinePairs(teacher, "8gaussians", steps=2)) for _ in range(2)]
    assert made[0] == made[1] and "0x" not in made[0]

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    model = copy.deepcopy(teacher)
    run = reflow.RunOptions(out=tmp_path, checkpoint_every=2, callback=stop)
    with pytest.raises(KeyboardInterrupt):
        reflow.train_on_pairs(reflow.OnlinePairs(teacher, "8gaussians", 2), model, steps=5, batch_size=16, run=run)
    run = reflow.RunOptions(out=tmp_path, resume=True, checkpoint_every=2)  # new objects, as in another process
    again = copy.deepcopy(teacher)
    reflow.train_on_pairs(reflow.OnlinePairs(teacher, "8gaussians", 2), again, steps=5, batch_size=16, run=run)
    assert otcfm.checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 5


class _BatchNormTeacher(torch.nn.Module):
    """A teacher whose BatchNorm holds a 0-d buffer (``num_batches_tracked``); left in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(torch.cat([x, t.reshape(-1, 1)], dim=1)))


def _tiny(seed: int = 0) -> torch.nn.Module:
    """A small MLP teacher with weights of its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return otcfm.models.MLP(2, hidden=8, depth=1)


TINY = {"steps": 1, "method": "euler", "batch_size": 4, "progress": False}


def test_a_chunk_from_another_pair_set_or_position_is_refused(tmp_path: Path) -> None:
    """Chunks of one size from two teachers' (or seeds') sets were mixed without a word: each chunk now records its
    set's identity and index."""
    reflow.generate_pairs(_tiny(0), "8gaussians", 12, out=tmp_path / "a", **TINY)
    reflow.generate_pairs(_tiny(1), "8gaussians", 12, out=tmp_path / "b", **TINY)  # another teacher
    reflow.generate_pairs(_tiny(0), "8gaussians", 12, out=tmp_path / "c", seed=1, **TINY)  # another seed
    reference = reflow.load_pairs(tmp_path / "a")
    for other in ("b", "c"):
        (tmp_path / "a" / "chunk-00001.pt").write_bytes((tmp_path / other / "chunk-00001.pt").read_bytes())
        with pytest.raises(ValueError, match=r"^path: .*chunk-00001\.pt is not chunk 1 of this pair set"):
            reflow.load_pairs(tmp_path / "a")
        with pytest.raises(ValueError, match=r"^out: .*chunk-00001\.pt is not chunk 1"):  # resumed: named too
            reflow.generate_pairs(_tiny(0), "8gaussians", 12, out=tmp_path / "a", **TINY)
    (tmp_path / "a" / "chunk-00001.pt").write_bytes((tmp_path / "a" / "chunk-00002.pt").read_bytes())
    with pytest.raises(ValueError, match=r"records set '\w+', chunk 2"):  # this set's chunk, another position
        reflow.load_pairs(tmp_path / "a")
    (tmp_path / "a" / "chunk-00001.pt").unlink()  # the advice: delete it and resume
    resumed = reflow.generate_pairs(_tiny(0), "8gaussians", 12, out=tmp_path / "a", **TINY)
    assert torch.equal(resumed.x1, reference.x1) and resumed.meta == reference.meta and "set" not in resumed.meta
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    (tmp_path / "a" / "meta.json").write_text(json.dumps({**meta, "seed": 5}))  # edited by hand
    with pytest.raises(ValueError, match="path: .*meta.json records the pair set"):
        reflow.load_pairs(tmp_path / "a")
    (tmp_path / "a" / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="^path: .*meta.json is not a readable"):  # said 'pairs:'
        reflow.load_pairs(tmp_path / "a")


def test_pairs_of_other_shapes_rows_dtypes_or_values_are_refused_naming_pairs() -> None:
    """(n, 2) and (n, 1) pairs were broadcast by distill; a float64 pair set for a float32 model failed in torch;
    NaN pairs were named x0 / x1 or not at all."""
    g = torch.Generator().manual_seed(0)
    x, column = torch.randn(8, 2, generator=g), torch.randn(8, 1, generator=g)
    nan = x.clone()
    nan[2, 1] = float("nan")
    for fit in (
        lambda pairs: reflow.distill(_tiny(), pairs, steps=1, batch_size=4, progress=False),
        lambda pairs: reflow.train_on_pairs(pairs, _tiny(), steps=1, batch_size=4, progress=False),
    ):
        with pytest.raises(ValueError, match=r"^pairs: x0 and x1: expected pairs of the same shape"):
            fit((x, column))
        with pytest.raises(ValueError, match=r"^pairs: x0 and x1: expected pairs of the same shape"):
            fit(lambda n, gen: (x[:n], column[:n]))
        with pytest.raises(ValueError, match=r"^pairs: x0 and x1: asked for 4 pairs, got 5"):
            fit(lambda n, gen: (x[: n + 1], x[: n + 1]))
        with pytest.raises(ValueError, match=r"^pairs: torch.float64 pairs for a model whose parameters are "):
            fit((x.double(), x.double()))
        with pytest.raises(ValueError, match=r"^pairs: torch.float64 pairs"):
            fit(lambda n, gen: (x[:n].double(), x[:n].double()))
        with pytest.raises(ValueError, match=r"^pairs: x1 contains NaN or Inf"):
            fit((x, nan))
        with pytest.raises(ValueError, match=r"^pairs: x0 contains NaN or Inf"):
            fit(lambda n, gen: (nan[:n], x[:n]))
        with pytest.raises(TypeError, match=r"^pairs: expected f\(n, generator\) to return a tuple"):
            fit(lambda n, gen: x[:n])


def test_a_teacher_with_0d_tensors_generates_pairs_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    """BatchNorm's num_batches_tracked (a 0-d buffer) made teacher_fingerprint raise, and with it generate_pairs,
    OnlinePairs and `otcfm reflow --model`; a teacher in training mode also had its statistics updated by the
    generation, so its fingerprint changed and the set could not be resumed."""
    teacher = _BatchNormTeacher()
    before = reflow.teacher_fingerprint(teacher)
    state = copy.deepcopy(teacher.state_dict())
    pairs = reflow.generate_pairs(teacher, "8gaussians", 12, out=tmp_path, **TINY)
    assert len(pairs) == 12 and bool(torch.isfinite(pairs.x1).all()) and teacher.training
    assert reflow.teacher_fingerprint(teacher) == before == pairs.meta["teacher"]
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())  # running statistics untouched
    (tmp_path / "chunk-00001.pt").unlink()
    again = reflow.generate_pairs(teacher, "8gaussians", 12, out=tmp_path, **TINY)
    assert torch.equal(again.x1, pairs.x1)
    online = reflow.OnlinePairs(teacher, "8gaussians", steps=1)
    assert f"teacher={before}" in repr(online) and online(4, torch.Generator().manual_seed(0))[1].shape == (4, 2)

    # models without 0-d tensors keep the fingerprints of before, which existing pair sets record
    fixed = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).double())
    with torch.no_grad():
        for k, p in enumerate(fixed.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 7 + k)
    assert reflow.teacher_fingerprint(fixed) == "29a18fb389235ce2"
