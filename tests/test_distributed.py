"""torch.distributed over 2 CPU processes (gloo): global coupling, DDP training, resume, sharded Reflow pairs.

Each test spawns 2 processes with ``torch.multiprocessing`` and compares what they wrote with a
single-process computation of the same thing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training import _Dropped  # a Dropout model (module level: the spawned ranks unpickle it)

import otcfm
from otcfm import distributed, reflow
from otcfm.couplers import ExactCoupler, SemidiscreteCoupler, SemidiscreteShard
from otcfm.distributed import global_pairs
from otcfm.flow import FlowMatcher
from otcfm.training import CHECKPOINT_NAME, TrainConfig, build_model

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset

B = 48
CONFIG = TrainConfig(steps=1, batch_size=32, hidden=32, depth=2, global_coupling=True, seed=3)


def _run(rank: int, job: Callable[[int, Path], None], out: str, store: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick, so parallel test runs cannot race for one
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    finished = False
    try:
        job(rank, Path(out))
        finished = True
    finally:  # as otcfm's own launches end: a barrier first, so no rank tears down while the other still talks
        distributed.shutdown(wait_for_all=finished)
    distributed.exit_worker()  # results are on disk: no interpreter finalisation, where gloo can abort a rank


def _spawn(job: Callable[[int, Path], None], out: Path) -> None:
    with tempfile.TemporaryDirectory() as rendezvous:
        mp.spawn(_run, args=(job, str(out), f"{rendezvous}/store"), nprocs=2, join=True)


def _batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = otcfm.data.sample("8gaussians", 2 * B, g).double()
    x1 = otcfm.data.sample("moons", 2 * B, g).double()
    return x0, x1, torch.arange(2 * B) % 3


def _couple(rank: int, out: Path) -> None:
    x0, x1, y = _batches()
    mine = slice(rank * B, (rank + 1) * B)
    pairs = global_pairs("exact", x0[mine], x1[mine], y1=y[mine], generator=torch.Generator().manual_seed(1))
    torch.save(pairs._asdict(), out / f"rank{rank}.pt")


def test_global_exact_coupling_over_two_ranks_equals_single_process(tmp_path: Path) -> None:
    _spawn(_couple, tmp_path)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x0, x1, y = _batches()
    i, j = ExactCoupler()(x0, x1, y1=y, generator=torch.Generator().manual_seed(1))  # draws the source labels
    order = torch.argsort(i)
    assert torch.equal(torch.cat([p["x0"] for p in parts]), x0[i[order]])
    assert torch.equal(torch.cat([p["x1"] for p in parts]), x1[j[order]])
    assert torch.equal(torch.cat([p["y1"] for p in parts]), y[j[order]])  # labels follow their samples


def test_single_process_global_pairs_is_the_local_coupling() -> None:
    x0, x1, _ = _batches()
    p0, p1, y0, y1 = global_pairs("exact", x0, x1)
    i, j = ExactCoupler()(x0, x1)
    assert torch.equal(p0, x0[i]) and torch.equal(p1, x1[j]) and y0 is None and y1 is None


def _train(rank: int, out: Path) -> None:
    otcfm.train(CONFIG, out=out, progress=False)


def _reference_step() -> dict[str, torch.Tensor]:
    """One single-process Adam step on the concatenated batch of both ranks, with the global pairing."""
    config = CONFIG
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generators = [torch.Generator().manual_seed(config.seed)]
    generators.append(torch.Generator().manual_seed(distributed.stream_seed(config.seed, 1, 0)))
    draws = [(otcfm.data.sample("8gaussians", 32, g), otcfm.data.sample("moons", 32, g)) for g in generators]
    x0, x1 = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    i, j = ExactCoupler()(x0, x1)
    order = torch.argsort(i)
    x0, x1 = x0[i[order]], x1[j[order]]
    paired = FlowMatcher(coupler="paired")
    batches = [paired.batch(x0[r * 32 : (r + 1) * 32], x1[r * 32 : (r + 1) * 32], generators[r]) for r in range(2)]
    t, x_t, u_t = (torch.cat([getattr(b, name) for b in batches]) for name in ("t", "x_t", "u_t"))
    loss = torch.mean((model(x_t, t) - u_t) ** 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return model.state_dict()


def test_ddp_step_on_two_ranks_equals_one_step_on_the_concatenated_batch(tmp_path: Path) -> None:
    _spawn(_train, tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 1
    reference = _reference_step()
    for name, value in reference.items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    # a checkpoint written by 2 ranks resumes in this single process
    resumed = otcfm.train(CONFIG, out=tmp_path, resume=True, steps=3, progress=False)
    assert len(resumed.losses) == 3 and resumed.losses[0] == state["losses"][0]
    assert all(torch.isfinite(torch.tensor(resumed.losses)))


def _pairs(rank: int, out: Path) -> None:
    teacher = build_model(TrainConfig(hidden=16, depth=1))
    pairs = reflow.generate_pairs(teacher, "gaussian", 70, 4, "euler", out / "pairs", batch_size=16, progress=False)
    torch.save({"x0": pairs.x0, "x1": pairs.x1}, out / f"rank{rank}.pt")


def test_sharded_pair_generation_writes_the_single_process_pair_set(tmp_path: Path) -> None:
    _spawn(_pairs, tmp_path / "two")
    teacher = build_model(TrainConfig(hidden=16, depth=1))
    single = reflow.generate_pairs(teacher, "gaussian", 70, 4, "euler", tmp_path / "one", batch_size=16, progress=False)
    for r in range(2):  # every rank returns the whole set
        got = torch.load(tmp_path / "two" / f"rank{r}.pt")
        assert torch.equal(got["x0"], single.x0) and torch.equal(got["x1"], single.x1)
    files = sorted(p.name for p in (tmp_path / "two" / "pairs").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir())  # 5 chunks + meta.json, nothing else


def test_cli_train_under_torchrun(tmp_path: Path) -> None:
    # --standalone: torchrun's own rendezvous on a free port it picks, no port chosen here that could be taken
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "otcfm.cli", "train", "--steps", "20", "--hidden", "32", "--global-coupling"]
    command += ["--out", str(tmp_path), "--eval-n", "200", "--eval-draws", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr  # all of it: a rank's own error comes before the launcher's report
    assert done.stdout.count("W2 vs Euler steps") == 1  # rank 0 reports
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["world_size"] == 2 and len(state["losses"]) == 20


def _semidiscrete_fit() -> tuple[torch.Tensor, SemidiscreteCoupler]:
    g = torch.Generator().manual_seed(4)
    data = otcfm.data.sample("mixture", 501, g, dim=6)  # 501 rows: shards of 251 and 250
    coupler = SemidiscreteCoupler()
    coupler.fit("gaussian", data, steps=100, generator=g, progress=False)
    return data, coupler


def _shard_pairs(rank: int, out: Path) -> None:
    data, coupler = _semidiscrete_fit()
    x0 = torch.randn(2 * B, 6, generator=torch.Generator().manual_seed(5))[rank * B : (rank + 1) * B]
    shard = SemidiscreteShard.from_coupler(coupler, data)
    hard = shard.pair(x0)
    coupler.epsilon = 1e-9  # a softmax this sharp is the argmax: noise on each rank, one draw over both
    soft = SemidiscreteShard.from_coupler(coupler, data).pair(x0, torch.Generator().manual_seed(6))
    torch.save({"rows": shard.data.shape[0], "hard": hard, "soft": soft}, out / f"rank{rank}.pt")


def test_sharded_semidiscrete_pairing_over_two_ranks_equals_the_whole_dataset_argmin(tmp_path: Path) -> None:
    _spawn(_shard_pairs, tmp_path)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data, coupler = _semidiscrete_fit()
    x0 = torch.randn(2 * B, 6, generator=torch.Generator().manual_seed(5))
    _, j = coupler(x0, data)  # one process, the whole dataset
    assert [p["rows"] for p in parts] == [251, 250]  # each rank held its shard only
    assert bool((j < 251).any() and (j >= 251).any())  # partners on both ranks: the all-reduces decide
    for kind in ("hard", "soft"):
        got_j = torch.cat([p[kind][0] for p in parts])
        assert torch.equal(got_j, j)
        assert torch.equal(torch.cat([p[kind][1] for p in parts]), data[j])  # partners sent by their owner


def test_semidiscrete_shard_in_one_process_and_its_errors() -> None:
    data, coupler = _semidiscrete_fit()
    shard = SemidiscreteShard.from_coupler(coupler, data)
    x0 = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    j, x1 = shard.pair(x0)
    assert torch.equal(j, coupler(x0, data)[1]) and torch.equal(x1, data[j])
    with pytest.raises(ValueError, match="x0"):
        shard.pair(torch.randn(7, 5))
    with pytest.raises(ValueError, match="potentials"):
        SemidiscreteShard(data[:10], torch.zeros(9), 0)
    with pytest.raises(ValueError, match="epsilon"):
        SemidiscreteShard(data[:10], torch.zeros(10), 0, epsilon=-1.0)
    with pytest.raises(ValueError, match="fitted on|dataset"):
        SemidiscreteShard.from_coupler(coupler, data[:-1])


class _Failing(ExactCoupler):
    """A coupler whose solve fails (it runs on rank 0 only, inside global_pairs)."""

    def pair(self, *args: object) -> object:
        raise RuntimeError("solver failed")


def _bad_input_on_one_rank(rank: int, out: Path) -> None:
    x0, x1, _ = _batches()
    mine = slice(rank * B, (rank + 1) * B)
    data, coupler = _semidiscrete_fit()
    shard = SemidiscreteShard.from_coupler(coupler, data)
    nan = x0[mine].clone()
    nan[0, 0] = float("nan") if rank == 1 else nan[0, 0]
    attempts = {
        "global NaN": lambda: global_pairs("exact", nan, x1[mine]),
        "shard shape": lambda: shard.pair(torch.randn(B, 5 if rank == 1 else 6)),
        "shard sizes": lambda: shard.pair(torch.randn(B - rank, 6)),
        "global sizes": lambda: global_pairs("exact", x0[mine][: B - rank], x1[mine][: B - rank]),
    }
    attempts["rank 0 solver"] = lambda: global_pairs(_Failing(), x0[mine], x1[mine])
    caught = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            caught[name] = "no error"
        except (RuntimeError, ValueError) as error:
            caught[name] = f"{type(error).__name__}: {error}"
    torch.save(caught, out / f"rank{rank}.pt")


def test_a_bad_batch_on_one_rank_raises_on_every_rank(tmp_path: Path) -> None:
    """No rank is left waiting at a collective: the failing rank raises its own error, the others name it."""
    _spawn(_bad_input_on_one_rank, tmp_path)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in ("global NaN", "shard shape"):
        assert zero[name].startswith("RuntimeError: rank 1 rejected its inputs"), zero[name]
    assert one["global NaN"].startswith("ValueError: x0: contains NaN or Inf")
    assert one["shard shape"].startswith("ValueError: x0: expected a non-empty batch of shape (B, (6,))")
    assert zero["rank 0 solver"] == "RuntimeError: solver failed"
    assert one["rank 0 solver"].startswith("RuntimeError: global_pairs: rank 0 failed to couple the global batch")
    for name in ("shard sizes", "global sizes"):
        for caught in (zero, one):
            assert (
                caught[name]
                == f"ValueError: x0: every rank must pass the same batch size, got sizes from {B - 1} to {B}"
            )


def _dropout_runs(rank: int, out: Path) -> None:
    config = TrainConfig(steps=6, batch_size=16, checkpoint_every=3, seed=3)
    otcfm.train(config, model=_Dropped(), out=out / "full", progress=False)
    otcfm.train(config, model=_Dropped(), out=out / "cut", steps=3, progress=False)
    otcfm.train(config, model=_Dropped(), out=out / "cut", resume=True, progress=False)


def test_a_dropout_run_on_two_ranks_resumes_bit_exactly(tmp_path: Path) -> None:
    """Rank 1's Dropout masks came from rank 0's recorded global state after a resume, and the run drifted;
    the global generator is now seeded per step and rank, like the data's. (The resume in the same processes
    also needs fit to wait for rank 0's last checkpoint before returning: rank 1 found none and started over.)"""
    _spawn(_dropout_runs, tmp_path)
    full = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    cut = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)
    assert cut["step"] == full["step"] == 6 and cut["losses"] == full["losses"]
    assert all(torch.equal(cut["model"][k], v) for k, v in full["model"].items())


def _fails_at_the_end_on_rank_0(rank: int, out: Path) -> None:
    def callback(step: int, loss: float) -> None:
        if rank == 0 and step == 4:
            raise ValueError("callback failed")

    try:
        otcfm.train(TrainConfig(steps=4, batch_size=16, hidden=8, depth=1), out=out / "run", progress=False,
                    callback=callback)  # fmt: skip
        outcome = "returned"
    except (RuntimeError, ValueError) as error:
        outcome = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.txt").write_text(outcome)  # rank 0 goes on, as a notebook or a script would


def test_a_rank_failing_after_the_last_step_stops_every_rank(tmp_path: Path) -> None:
    """The end of a run waits for every rank (rank 0's last checkpoint); a rank that raised on the way there (its
    last checkpoint write, a callback) used to leave the others in that wait until the group's timeout when it
    kept running. Now they share the outcome and raise too."""
    _spawn(_fails_at_the_end_on_rank_0, tmp_path)
    assert (tmp_path / "rank0.txt").read_text() == "ValueError: callback failed"
    assert (tmp_path / "rank1.txt").read_text().startswith("RuntimeError: rank 0 failed at the end of the run")
