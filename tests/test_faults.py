"""Faults: corrupt, truncated and foreign files, oversized configs, two writers, kills during training."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import otcfm
from otcfm import checkpoint, reflow
from otcfm.runlock import run_lock

SMALL = otcfm.TrainConfig(steps=6, batch_size=16, hidden=8, depth=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    otcfm.train(SMALL, out=out, progress=False)
    return out


def _fast_error(path: Path, match: str = "") -> str:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as info:
        otcfm.load_model(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)
    return str(info.value)


def test_every_flipped_bit_is_caught_or_harmless(run_dir: Path, tmp_path: Path) -> None:
    """A flipped bit anywhere: a clear error naming the file, or (in bytes the reader ignores) the same content."""
    original = (run_dir / "checkpoint.pt").read_bytes()
    reference = checkpoint.load(run_dir / "checkpoint.pt")
    rng = random.Random(0)
    caught = 0
    for position in [rng.randrange(len(original)) for _ in range(60)]:
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        bad = tmp_path / "checkpoint.pt"
        bad.write_bytes(bytes(data))
        try:
            state = checkpoint.load(bad)
        except ValueError as error:
            assert str(bad) in str(error)
            caught += 1
            continue
        assert checkpoint.digest(state) == checkpoint.digest(reference), f"bit at byte {position} changed the content"
    assert caught >= 30


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"hello, I am a text file\n", "not a readable otcfm file"),
        (bytes(random.Random(1).randrange(256) for _ in range(5000)), "not a readable otcfm file"),
    ],
    ids=["empty", "text", "random"],
)
def test_empty_text_random_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    _fast_error(path, match)


def test_truncated_and_foreign_files(run_dir: Path, tmp_path: Path) -> None:
    data = (run_dir / "checkpoint.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        _fast_error(path, "truncated, corrupt or foreign")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _fast_error(tensor, "not an otcfm file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    _fast_error(foreign, "not an otcfm training checkpoint")
    array = tmp_path / "data.npy"  # a data file passed as --teacher: no advice to unpickle it
    np.save(array, np.zeros((4, 2)))
    _fast_error(array, "holds objects other than tensors and plain values, which otcfm never unpickles")


def test_oversized_or_mismatched_config_fails_before_building(run_dir: Path, tmp_path: Path) -> None:
    state = checkpoint.load(run_dir / "checkpoint.pt")
    for change, match in (({"depth": 1_000_000}, "do not match|more than"), ({"hidden": 9}, "do not match")):
        path = tmp_path / "checkpoint.pt"
        checkpoint.atomic_save({**state, "model_spec": {**state["model_spec"], **change}}, path)
        _fast_error(path, match)


def test_pair_chunk_of_another_size_is_refused(tmp_path: Path) -> None:
    teacher = otcfm.models.MLP(2, hidden=8, depth=1)
    settings = {"n": 40, "steps": 2, "method": "euler", "batch_size": 16, "progress": False}
    reflow.generate_pairs(teacher, "8gaussians", out=tmp_path / "a", **settings)
    reflow.generate_pairs(teacher, "8gaussians", out=tmp_path / "b", **{**settings, "n": 60, "batch_size": 20})
    (tmp_path / "a" / "chunk-00001.pt").write_bytes((tmp_path / "b" / "chunk-00001.pt").read_bytes())
    with pytest.raises(ValueError, match=r"chunk-00001.pt holds \(20, 2\) pairs; expected 16 rows"):
        reflow.load_pairs(tmp_path / "a")
    (tmp_path / "a" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not a readable pair-set description"):
        reflow.load_pairs(tmp_path / "a")


def test_failed_generation_writes_no_meta(tmp_path: Path) -> None:
    """Settings are recorded only once they are valid, so a corrected rerun into the same folder works."""
    teacher = otcfm.models.MLP(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="steps"):
        reflow.generate_pairs(teacher, "8gaussians", 10, steps=0, out=tmp_path, progress=False)
    assert not (tmp_path / "meta.json").exists()
    reflow.generate_pairs(teacher, "8gaussians", 10, steps=1, out=tmp_path, progress=False)


def test_two_writers_and_stale_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.pt.abc.tmp").write_bytes(b"left by a killed writer")
    with run_lock(tmp_path):
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"):
            otcfm.train(SMALL, out=tmp_path, progress=False)
    otcfm.train(SMALL, out=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.tmp"))


def _cli_train(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    args = ["train", "--steps", str(steps), "--batch-size", "32", "--hidden", "16", "--depth", "1"]
    args += ["--checkpoint-every", "1", "--eval-n", "20", "--eval-draws", "1", "--no-progress", "--out", str(out)]
    command = [sys.executable, "-m", "otcfm.cli", *args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_and_resume_trials(tmp_path: Path, trials: int, seed: int = 0) -> dict[str, int]:
    """Train with a checkpoint every step, SIGINT or SIGKILL at a random moment, resume, compare with a run that
    was never interrupted. Returns counts; raises AssertionError on any mismatch, traceback or leftover file."""
    steps = 60
    reference = tmp_path / "reference"
    process = _cli_train(reference, steps)
    while not (reference / "checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.01)
    started = time.time()
    assert process.wait() == 0
    # from the first checkpoint to the last (the file's final write), not to the end of the evaluation after it
    training = (reference / "checkpoint.pt").stat().st_mtime - started
    expected = checkpoint.load(reference / "checkpoint.pt")
    rng = random.Random(seed)
    counts = {"sigint": 0, "sigkill": 0, "finished_first": 0, "during_training": 0}
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        process = _cli_train(out, steps)
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # training has started once the first checkpoint (step 1) is written
        time.sleep(rng.uniform(0.0, 0.9 * training))  # within the reference run's training time
        kind = rng.choice((signal.SIGINT, signal.SIGKILL))
        process.send_signal(kind)
        _, stderr = process.communicate(timeout=120)
        if (out / "checkpoint.pt").exists() and checkpoint.load(out / "checkpoint.pt")["step"] < steps:
            counts["during_training"] += 1  # the signal stopped training before its last step
        if process.returncode == 0:
            counts["finished_first"] += 1
        else:
            counts["sigint" if kind == signal.SIGINT else "sigkill"] += 1
            if kind == signal.SIGINT:
                assert "Traceback" not in stderr, stderr
                assert process.returncode == 130, (process.returncode, stderr)
            resumed = _cli_train(out, steps, "--resume")
            _, stderr = resumed.communicate(timeout=300)
            assert resumed.returncode == 0, stderr
        got = checkpoint.load(out / "checkpoint.pt")
        assert got["losses"] == expected["losses"], f"trial {trial}: losses differ"
        assert all(torch.equal(got["model"][k], v) for k, v in expected["model"].items()), f"trial {trial}"
        assert not list(out.glob("*.tmp")), f"trial {trial}: temporary files left"
    return counts


@pytest.mark.slow
def test_interrupted_cli_training_resumes_bit_exact(tmp_path: Path) -> None:
    """One random kill (SIGINT or SIGKILL) and resume; `python tests/test_faults.py N` runs N trials."""
    counts = kill_and_resume_trials(tmp_path, trials=1, seed=3)
    assert counts["sigint"] + counts["sigkill"] + counts["finished_first"] == 1


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
        started = time.perf_counter()
        print(kill_and_resume_trials(Path(directory), n, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0))
        seconds = time.perf_counter() - started
        print(f"{n} trials, all bit-exact, no traceback on SIGINT, no temporary file left ({seconds:.0f} s)")
