"""Training-step benchmark: one full step with otcfm's FlowMatcher vs TorchCFM's matchers, side by side.

    python benchmarks/step.py            # full run (about 12 minutes on an idle machine); prints the table
    python benchmarks/step.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/step.py --quick    # seconds; for tests

A step is: couple -> draw t -> path -> network -> loss -> backward -> Adam step, on batches drawn before
the timed region (both implementations train on the same pool of batches). Both use the same network
(``otcfm.models.MLP``, the same initial weights), the same optimiser and the same seeds; TorchCFM's matcher
returns ``(t, x_t, u_t)``, and its step calls the network and takes ``torch.mean((v - u_t) ** 2)`` as
TorchCFM's examples do.

Timing: in each round both implementations are built afresh (a new copy of the network and optimiser:
where their memory lands moves a step by a percent or so), warmed up, and then take turns step by step,
the order alternating (ABBA...), so that a busy phase of a shared machine falls on both alike. Reported:
the median step time (wall clock) of each over all rounds, their ratio, the range of the per-round ratios,
and the ratio of the medians of the thread's CPU time (which leaves out the time other processes take the
core; with one torch thread the step runs on that thread alone).

TorchCFM is a peer, not a dependency: install it in a benchmark environment outside the repository,
``pip install torch==<the same version> torchcfm`` beside ``pip install -e .``. Without it the script says
so and times otcfm alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_docs_options, machine, markdown_table, rerun_command, write_section  # noqa: E402

import otcfm  # noqa: E402

try:
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    PEERS: dict[str, type] = {
        "ConditionalFlowMatcher": ConditionalFlowMatcher,
        "ExactOptimalTransportConditionalFlowMatcher": ExactOptimalTransportConditionalFlowMatcher,
    }
except ImportError:  # the peer is optional
    PEERS = {}

BATCH = 256
#: task name -> (sample shape, MLP width); depth 3 everywhere.
TASKS: dict[str, tuple[tuple[int, ...], int]] = {
    "2-D": ((2,), 256),
    "d=64": ((64,), 512),
    "d=784": ((1, 28, 28), 1024),
}

Step = Callable[[torch.Tensor, torch.Tensor], None]


def draw_pool(task: str, batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` pairs of batches of the task: 8gaussians -> moons in 2-D, N(0, I) -> a mixture otherwise."""
    shape, _ = TASKS[task]
    d = int(np.prod(shape))
    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(batches):
        if d == 2:
            x0, x1 = otcfm.data.sample("8gaussians", BATCH, g), otcfm.data.sample("moons", BATCH, g)
        else:
            x0, x1 = otcfm.data.sample("gaussian", BATCH, g, dim=d), otcfm.data.sample("mixture", BATCH, g, dim=d)
        pool.append((x0.reshape(BATCH, *shape).contiguous(), x1.reshape(BATCH, *shape).contiguous()))
    return pool


def otcfm_step(fm: otcfm.FlowMatcher, model: torch.nn.Module, seed: int) -> Step:
    """A training step with ``fm.loss``; the coupling, ``t`` and noise come from a generator seeded ``seed``."""
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(seed)

    def step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        loss = fm.loss(model, x0, x1, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def torchcfm_step(matcher: object, model: torch.nn.Module, seed: int) -> Step:
    """A training step as TorchCFM's examples write it; its draws come from torch's (and numpy's) global generator."""
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    torch.manual_seed(seed)
    np.random.seed(seed)

    def step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = model(xt, t)
        loss = torch.mean((vt - ut) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def side_by_side(
    makers: dict[str, Callable[[int], Step]],
    pool: list[tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
    steps: int,
    warmup: int,
) -> dict[str, list[list[tuple[float, float]]]]:
    """``(wall, cpu)`` milliseconds of each step, per implementation and round: ``times[name][round][step]``.

    Each round builds every implementation afresh (``makers[name](round)``), warms it up, and times
    ``steps`` steps of each, taking turns step by step; the order within a turn is reversed every
    other turn (ABBA...), and the order of building every other round.
    """
    names = list(makers)
    times: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        made = {name: makers[name](r) for name in order}
        for k in range(warmup):
            for name in order:
                made[name](*pool[k % len(pool)])
        for name in names:
            times[name].append([])
        for k in range(steps):
            batch = pool[k % len(pool)]
            for name in order if k % 2 == 0 else order[::-1]:
                wall, cpu = time.perf_counter(), time.thread_time()
                made[name](*batch)
                times[name][-1].append((1e3 * (time.perf_counter() - wall), 1e3 * (time.thread_time() - cpu)))
    return times


def _median(runs: list[list[tuple[float, float]]], clock: int) -> float:
    return statistics.median(step[clock] for run in runs for step in run)


#: pairing -> (otcfm coupler, TorchCFM matcher class name)
PAIRINGS = {
    "independent": ("independent", "ConditionalFlowMatcher"),
    "paired": ("paired", "ConditionalFlowMatcher"),
    "exact": ("exact", "ExactOptimalTransportConditionalFlowMatcher"),
}


def compare(task: str, pairing: str, rounds: int, steps: int, warmup: int, seed: int) -> list:
    """One table row: otcfm's and TorchCFM's step with ``pairing`` (see :data:`PAIRINGS`) on ``task``."""
    shape, hidden = TASKS[task]
    d = int(np.prod(shape))
    pool = draw_pool(task, 8, seed)
    torch.manual_seed(seed)
    initial = otcfm.models.MLP(d, hidden=hidden, depth=3).state_dict()

    def network() -> torch.nn.Module:
        model = otcfm.models.MLP(d, hidden=hidden, depth=3)
        model.load_state_dict(initial)
        return model

    coupler, peer_name = PAIRINGS[pairing]
    fm = otcfm.FlowMatcher(coupler=coupler, path="linear", sigma=0.0)
    makers = {"otcfm": lambda r: otcfm_step(fm, network(), seed + r)}
    peer = PEERS.get(peer_name)
    if peer is not None:
        makers["torchcfm"] = lambda r: torchcfm_step(peer(sigma=0.0), network(), seed + r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's and TorchCFM's warnings are not what is measured
        times = side_by_side(makers, pool, rounds, steps, warmup)
    ours = _median(times["otcfm"], 0)
    row = [task, pairing, rounds * steps, f"{ours:.3f}"]
    if peer is None:
        return row + ["-"] * 4
    theirs = _median(times["torchcfm"], 0)
    per_round = [
        statistics.median(a[0] for a in mine) / statistics.median(b[0] for b in peers)
        for mine, peers in zip(times["otcfm"], times["torchcfm"], strict=True)
    ]
    cpu = _median(times["otcfm"], 1) / _median(times["torchcfm"], 1)
    return row + [f"{theirs:.3f}", f"{ours / theirs:.3f}", f"{min(per_round):.3f}-{max(per_round):.3f}", f"{cpu:.3f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run, for tests")
    parser.add_argument(
        "--rounds", type=int, default=20, help="rounds, each with fresh copies of the networks (default: %(default)s)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--pairings", nargs="+", default=list(PAIRINGS), choices=list(PAIRINGS))
    add_docs_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    per_round = {"2-D": 300, "d=64": 100, "d=784": 30}  # steps of each per round: about 1-2 s per round
    peer = f"TorchCFM {_version()}" if PEERS else None
    if peer is None:
        print("torchcfm is not importable: timing otcfm alone (install torchcfm in a benchmark environment to compare)")
    command = rerun_command(__file__, argv)
    started = time.perf_counter()
    rows = []
    for pairing in args.pairings:
        for task in args.tasks:
            rounds, n = (2, 3) if args.quick else (args.rounds, max(3, round(args.scale * per_round[task])))
            rows.append(compare(task, pairing, rounds, n, 1 if args.quick else max(2, n // 10), args.seed))
            print(f"  {task} {pairing} done", flush=True)
    header = [
        "task",
        "pairing",
        "steps",
        "otcfm ms/step",
        "TorchCFM ms/step",
        "ratio",
        "ratio per round",
        "ratio, CPU time",
    ]
    table = markdown_table(header, rows)
    print(table)
    tasks = "; ".join(f"{name}: `x` (B, {', '.join(map(str, s))}), MLP 3x{h}" for name, (s, h) in TASKS.items())
    body = f"""## One training step: FlowMatcher vs TorchCFM

Command: `{command}` ({time.perf_counter() - started:.0f} s). Measured {machine()}.
Peer: {peer or "TorchCFM not installed: its columns are empty"}. Batch {BATCH}; {tasks}; Adam (lr 1e-4);
8gaussians -> moons in 2-D, N(0, I) -> an 8-component Gaussian mixture otherwise, drawn before the timed
region. Pairings: "independent" is `FlowMatcher(coupler="independent")` (a random permutation of the target
batch) against `ConditionalFlowMatcher`, which keeps the pairs as they come; "paired" is
`FlowMatcher(coupler="paired")`, which keeps them too, against the same; "exact" is `FlowMatcher(coupler="exact")`
against `ExactOptimalTransportConditionalFlowMatcher` (for information: TorchCFM draws its pairs with replacement
from the plan). Each round builds both afresh, and they take turns step by step (ABBA); "ms/step" is the median
wall time over all steps, "ratio" otcfm / TorchCFM of those medians, "ratio per round" the range of the ratios of
the {args.rounds if not args.quick else 2} rounds, and "ratio, CPU time" the ratio of the medians of the thread's CPU
time, which leaves out the time other processes take the core.

{table}
"""
    if args.docs is not None:
        print(f"written to {write_section('step', body, args.docs)}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchcfm")
    except PackageNotFoundError:
        return "unknown version"


if __name__ == "__main__":
    sys.exit(main())
