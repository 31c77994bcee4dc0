"""OT pools larger than the batch: each pair once, reproducible, resumable in training, in the loader and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm.loader import CoupledBatches, PoolStream, couple_pool


def test_a_pool_is_one_exact_problem_served_once() -> None:
    stream = PoolStream("8gaussians", "moons", "exact", pool_size=128, batch_size=32, seed=3)
    batches = [stream.batch(step) for step in range(4)]
    x0 = torch.cat([b[0] for b in batches])
    x1 = torch.cat([b[1] for b in batches])
    g = torch.Generator().manual_seed(otcfm.distributed.stream_seed(3, "pool", 0))
    y0, y1 = couple_pool("8gaussians", "moons", otcfm.get_coupler("exact"), 128, g)
    assert torch.equal(x0, y0) and torch.equal(x1, y1)  # batch of a step = slice of its pool
    assert x0.unique(dim=0).shape[0] == 128 and x1.unique(dim=0).shape[0] == 128  # every pair once
    # the pool's pairing is optimal as a whole, so its cost is below that of 4 separately coupled batches
    independent = otcfm.get_coupler("independent")
    pooled_cost = float(((x0 - x1) ** 2).sum(1).mean())
    shuffled = x1[independent(x0, x1, generator=torch.Generator().manual_seed(0)).j]
    assert pooled_cost < 0.5 * float(((x0 - shuffled) ** 2).sum(1).mean())
    again = PoolStream("8gaussians", "moons", "exact", pool_size=128, batch_size=32, seed=3)
    assert torch.equal(again.batch(5)[0], stream.batch(5)[0])  # a pure function of (seed, step)


def test_pool_size_must_be_a_multiple_of_the_batch() -> None:
    with pytest.raises(ValueError, match="pool_size: expected a multiple of batch_size 32"):
        PoolStream("gaussian", "moons", "exact", pool_size=100, batch_size=32)
    with pytest.raises(ValueError, match="pool_size"):
        otcfm.TrainConfig(batch_size=64, pool_size=32)
    with pytest.raises(ValueError, match="pool_size"):
        CoupledBatches("gaussian", "moons", "exact", 32, pool_size=48)


def test_loader_serves_pools() -> None:
    loader = otcfm.loader.coupled_loader("8gaussians", "moons", "exact", 32, seed=1, num_workers=0, pool_size=96)
    batches = [b for _, b in zip(range(3), loader, strict=False)]
    x0 = torch.cat([b[0] for b in batches])
    assert x0.shape == (96, 2) and x0.unique(dim=0).shape[0] == 96


def test_training_with_pools_resumes_bit_exact(tmp_path: Path) -> None:
    settings = dict(steps=10, batch_size=16, pool_size=64, hidden=16, depth=1, checkpoint_every=1, progress=False)
    whole = otcfm.train(out=tmp_path / "whole", **settings)
    otcfm.train(out=tmp_path / "split", **{**settings, "steps": 5})
    resumed = otcfm.train(out=tmp_path / "split", resume=True, **settings)
    assert resumed.losses == whole.losses
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    assert whole.config.pool_size == 64


@pytest.mark.slow
def test_cli_pool_size(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "otcfm.cli",
        "train",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--pool-size",
        "64",
        "--hidden",
        "8",
        "--depth",
        "1",
        "--eval-n",
        "20",
        "--eval-draws",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([*command[:-1], str(tmp_path / "bad"), "--pool-size", "40"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--pool-size: expected a multiple of --batch-size 16" in bad.stderr
    assert "Traceback" not in bad.stderr


def _rows(extra: int, features: int = 2):  # noqa: ANN202 - a sampler f(n, generator)
    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n + extra, features, generator=generator)

    return sample


def test_what_the_samplers_return_is_checked_and_named() -> None:
    """A sampler returning n + 1 rows was coupled as given (a pool of n + 1 pairs, batches of other sizes)."""
    g = torch.Generator().manual_seed(0)
    exact = otcfm.get_coupler("exact")
    with pytest.raises(ValueError, match=r"^source: asked for 8 samples, the sampler returned 9"):
        PoolStream(_rows(1), "moons", "exact", pool_size=8, batch_size=4).batch(0)
    with pytest.raises(ValueError, match=r"^target: asked for 8 samples, the sampler returned 7"):
        PoolStream("8gaussians", _rows(-1), "exact", pool_size=8, batch_size=4).batch(0)
    with pytest.raises(ValueError, match=r"^source and target: expected samples of one shape, got \(3,\) and \(2,\)"):
        couple_pool(_rows(0, 3), "moons", exact, 8, g)
    with pytest.raises(TypeError, match="^source: expected a dataset name or a callable"):
        PoolStream(5, "moons", "exact", pool_size=8, batch_size=4)

    def late(n: int, generator: torch.Generator) -> torch.Tensor:  # right for the loader's probe of 2 samples
        return torch.randn(n if n <= 2 else n + 1, 2, generator=generator)

    with pytest.raises(ValueError, match=r"^target: asked for 4 samples, the sampler returned 5"):
        next(iter(otcfm.loader.coupled_loader("8gaussians", late, "exact", batch_size=4, num_workers=0)))
