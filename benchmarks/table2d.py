"""The 2-D table of the OT-CFM paper (Tong et al. 2023): W2, NPE and NLL for six methods on four tasks, 5 seeds.

    python benchmarks/table2d.py            # default budget: about 14 minutes on 2 CPU cores
    python benchmarks/table2d.py --paper    # the paper's budget (batch 512, 20,000 steps): hours on a CPU
    python benchmarks/table2d.py --quick    # seconds; for tests

Any of these with --docs also writes its section of docs/benchmarks.md; without it only OUT is written.

Tasks: N -> 8gaussians, moons -> 8gaussians, N -> moons, N -> scurve (N: standard normal). Methods:
I-CFM (independent pairs, linear path, sigma 0.1), OT-CFM (exact OT), Sinkhorn-CFM (entropic OT, epsilon 0.05 x
mean cost), SB-CFM (Brownian-bridge path, sigma 1, entropic OT at epsilon 2 sigma^2), FM (Lipman et al.'s Gaussian
path, sigma_min 0.1; needs a Gaussian source), 2-RF (the I-CFM model's rk4 pairs, retrained with a straight
path). Every model: MLP 3x64 with SELU, Adam lr 1e-3. Per cell the mean +- std over seeds of
- W2: exact, between ``--eval-n`` held-out target samples and as many samples pushed by 100 Euler steps (the
  paper's solver), next to the W2 of two target samples of that size (the floor);
- NPE: |PE - W2^2(q0, q1)| / W2^2(q0, q1), PE from 100 Euler steps (docs/benchmarks.md has the definitions);
- NLL: -log p(x) in nats of held-out target samples, exact divergence, rk4 50 steps back to the source density
  (Gaussian sources only; the source of a path with constant noise sigma is N(0, (1 + sigma^2) I)).

Jobs (task, seed) run in ``--workers`` processes with one torch thread each; every finished (task, method, seed)
is appended to OUT/results.jsonl at once, and a rerun (or ``--resume``) skips what is there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    read_jsonl,
    rerun_command,
    write_section,
)

import otcfm  # noqa: E402
from otcfm import checkpoint, reflow  # noqa: E402
from otcfm.likelihood import standard_normal_log_prob  # noqa: E402
from otcfm.metrics import flow_statistics, w2  # noqa: E402

TASKS = {
    "N->8gaussians": ("gaussian", "8gaussians"),
    "moons->8gaussians": ("moons", "8gaussians"),
    "N->moons": ("gaussian", "moons"),
    "N->scurve": ("gaussian", "scurve"),
}
METHODS = {  # name: (coupler, path, sigma)
    "I-CFM": ("independent", "linear", 0.1),
    "OT-CFM": ("exact", "linear", 0.1),
    "Sinkhorn-CFM": ("sinkhorn", "linear", 0.1),
    "SB-CFM": ("sinkhorn", "bridge", 1.0),
    "FM": ("independent", "gaussian", 0.1),
    "2-RF": ("paired", "linear", 0.0),
}
BUDGETS = {  # steps, batch size, reflow pairs
    "quick": (30, 64, 512),
    "default": (2000, 256, 10_000),
    "paper": (20_000, 512, 50_000),
}


def mlp(seed: int) -> nn.Module:
    """The paper's network size: 3 hidden layers of 64 units, SELU; initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return otcfm.models.MLP(2, hidden=64, depth=3, activation=nn.SELU)


def source_log_prob(path: otcfm.paths.Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """log-density of the flow's source at t = 0: N(0, (1 + s^2) I), s the path's noise at t = 0."""
    s = 0.0
    if path.needs_noise:
        zero, one = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
        s = float(path(zero, zero, torch.zeros(1, dtype=torch.float64), one).x_t[0, 0])
    std = math.sqrt(1.0 + s * s)

    def log_prob(x: torch.Tensor) -> torch.Tensor:  # log N(x; 0, std^2 I) = log N(x / std; 0, I) - d log std
        return standard_normal_log_prob(x / std) - x[0].numel() * math.log(std)

    return log_prob


def evaluate(model: nn.Module, fm: otcfm.FlowMatcher, task: str, seed: int, n: int) -> dict[str, float | None]:
    source, target = TASKS[task]
    g = torch.Generator().manual_seed(1_000_000 + seed)
    x0, reference = otcfm.data.sample(source, n, g), otcfm.data.sample(target, n, g)
    model = model.eval()
    samples = otcfm.integrate(model, x0, 100, "euler")
    nll = None
    if source == "gaussian":
        ll = otcfm.likelihood(model, reference, steps=50, method="rk4", source_log_prob=source_log_prob(fm.path))
        nll = -float(ll.log_prob.mean())
    return {"w2": w2(samples, reference), "npe": flow_statistics(model, x0, 100, reference).npe, "nll": nll}


def job(task: str, seed: int, budget: str, n_eval: int, done: list[str], out: str) -> list[dict]:
    """Train and evaluate every method not in ``done`` on ``task`` with ``seed``; one row per method."""
    torch.set_num_threads(1)
    steps, batch, n_pairs = BUDGETS[budget]
    source, target = TASKS[task]
    rows, teacher_file = [], Path(out) / "models" / f"{task}-{seed}-I-CFM.pt"
    for name, (coupler, path, sigma) in METHODS.items():
        if name in done or (name == "FM" and source != "gaussian"):
            continue
        started = time.perf_counter()
        config = otcfm.TrainConfig(
            source=source,
            target=target,
            coupler=coupler,
            path=path,
            sigma=sigma,
            steps=steps,
            batch_size=batch,
            seed=seed,
        )
        if name == "2-RF":
            teacher = mlp(seed)
            teacher.load_state_dict(checkpoint.load(teacher_file))
            pairs = reflow.generate_pairs(teacher, source, n_pairs, 100, "rk4", seed=seed, progress=False)
            model = reflow.train_on_pairs(pairs, copy.deepcopy(teacher), steps, batch, seed=seed, progress=False)
            fm = otcfm.FlowMatcher(coupler="paired", path="linear", sigma=0.0)
        else:
            model = otcfm.train(config, model=mlp(seed), progress=False).model
            fm = config.flow_matcher()
            if name == "I-CFM":
                checkpoint.atomic_save(model.state_dict(), teacher_file)
        row = {"task": task, "method": name, "seed": seed, **evaluate(model, fm, task, seed, n_eval)}
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
    return rows


def floor_rows(tasks: list[str], seeds: int, n: int) -> list[dict]:
    """W2 between two target samples of ``n``: the same held-out reference as :func:`evaluate`, and a fresh one."""
    rows = []
    for task in tasks:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(1_000_000 + seed)
            source, target = TASKS[task]
            otcfm.data.sample(source, n, g)
            reference = otcfm.data.sample(target, n, g)
            rows.append(
                {"task": task, "method": FLOOR, "seed": seed, "w2": w2(otcfm.data.sample(target, n, g), reference)}
            )
    return rows


FLOOR = "(two target samples)"


def summary(rows: list[dict], metric: str, tasks: list[str]) -> str:
    table = []
    for name in [*METHODS, FLOOR] if metric == "w2" else METHODS:
        cells = []
        for task in tasks:
            values = [r[metric] for r in rows if r["task"] == task and r["method"] == name and r[metric] is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}")
        table.append([name, *cells])
    return markdown_table(["method", *tasks], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="a few steps, 1 seed, 2 tasks: for tests")
    budget.add_argument("--paper", action="store_true", help="the paper's budget: batch 512, 20,000 steps")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out samples per evaluation (the paper: 1000)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/table2d"))
    parser.add_argument("--fresh", action="store_true", help="discard OUT/results.jsonl instead of resuming it")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "paper" if args.paper else "default"
    tasks = ["N->8gaussians", "moons->8gaussians"] if args.quick else list(TASKS)
    seeds = 1 if args.quick else args.seeds
    n_eval = 200 if args.quick else args.eval_n
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.fresh and results.exists():
        results.unlink()
    rows = read_jsonl(results)
    jobs = []
    for seed in range(seeds):
        for task in tasks:
            done = [r["method"] for r in rows if r["task"] == task and r["seed"] == seed]
            if len(done) < len(METHODS) - (TASKS[task][0] != "gaussian"):
                jobs.append((task, seed, name, n_eval, done, str(out)))
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(job, *spec) for spec in jobs]
        with results.open("a") as handle:
            for future in tqdm(as_completed(futures), total=len(futures), desc="table2d", unit="job"):
                for row in future.result():
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    rows.append(row)
    seconds = time.perf_counter() - started
    steps, batch, n_pairs = BUDGETS[name]
    rows += floor_rows(tasks, seeds, n_eval)
    tables = {metric: summary(rows, metric, tasks) for metric in ("w2", "npe", "nll")}
    for metric, table in tables.items():
        print(f"\n{metric.upper()} (mean +- std over {seeds} seeds)\n{table}")
    train_seconds = sum(r.get("seconds", 0.0) for r in rows)
    print(f"\n{seconds:.0f} s wall for {len(jobs)} jobs this run; {train_seconds:.0f} s of work in all rows")
    if args.docs is not None:
        command = rerun_command(__file__, argv)
        body = f"""## The 2-D table of the OT-CFM paper

Command: `{command}` ({seconds:.0f} s wall on {args.workers} processes for the jobs of this run;
{train_seconds:.0f} s of work in all rows). Measured {machine()} (each process: 1 torch thread). Budget "{name}":
{steps} Adam steps (lr 1e-3) at batch {batch}, MLP 3x64 SELU (with otcfm's time embedding), 2-RF from
{n_pairs} rk4 pairs of the I-CFM model; {seeds} seeds; {n_eval} held-out samples per evaluation. Mean +- std over
seeds. Method settings, data conventions and departures from the paper: see the comparison below the tables.

W2 (exact, held-out target samples vs 100 Euler steps; last row: two target samples):

{tables["w2"]}

NPE (normalised path energy, 100 Euler steps):

{tables["npe"]}

NLL (nats per sample, exact divergence, rk4 50 steps; Gaussian sources only):

{tables["nll"]}
"""
        print(f"written to {write_section('table2d-' + name, body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
