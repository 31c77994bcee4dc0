"""Exact OT in 2-D: could anything available here beat POT's dense network simplex? Measured alternatives.

    python benchmarks/exact2d.py            # about two minutes on 2 cores; prints only
    python benchmarks/exact2d.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/exact2d.py --quick    # seconds; for tests

otcfm's exact coupler uses POT's network simplex (`ot.emd`) for equal batches of fewer than 16 features and more
than 128 samples, because scipy's Jonker-Volgenant solver is slower there. This script times, on the same cost
matrices, what would have to be true for another route to win:

- `ot.emd` warm-started (`potentials_init`, POT >= 0.9.6) with the exact dual potentials, and with potentials off
  by noise of 1% of the mean cost (what a cheap estimate could deliver at best);
- scipy's `linear_sum_assignment` on the cost reduced by exact potentials, and by potentials off by 0.1%;
- column generation on a sparse candidate graph: POT's sparse network simplex on the k nearest partners of each
  sample (in a cost reduced by duals of an exact OT on a quarter of the points), certified by the dual potentials
  on the full cost, violated edges added until none is left. The result is exact (gap column).

Solving from exact potentials is the lower bound of a warm start; the potentials themselves cost a full solve.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_array

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    median_ms,
    rerun_command,
    write_section,
)

import otcfm  # noqa: E402
from otcfm.couplers import squared_euclidean_cost  # noqa: E402


def tasks(n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "8gaussians -> moons": (otcfm.data.sample("8gaussians", n, g), otcfm.data.sample("moons", n, g)),
        "N(0, I) -> checkerboard": (
            otcfm.data.sample("gaussian", n, g, dim=2),
            otcfm.data.sample("checkerboard", n, g),
        ),
    }


def _smallest(d: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the k smallest entries of every row and of every column of ``d``."""
    n = d.shape[0]
    by_row = torch.topk(d, k, dim=1, largest=False, sorted=False).indices
    by_col = torch.topk(d, k, dim=0, largest=False, sorted=False).indices
    rows = torch.cat([torch.arange(n).repeat_interleave(k), by_col.reshape(-1)])
    cols = torch.cat([by_row.reshape(-1), torch.arange(n).repeat(k)])
    return rows.numpy(), cols.numpy()


def column_generation(cost: np.ndarray, k: int = 12, add: int = 8, seed: int = 0) -> tuple[np.ndarray, int]:
    """Exact assignment by sparse network simplex on candidate edges, certified on the full cost.

    Returns the matched column of every row and the number of sparse solves.
    """
    n = cost.shape[0]
    reduced = torch.from_numpy(cost)
    reduced = reduced - reduced.min(1, keepdim=True).values
    reduced -= reduced.min(0, keepdim=True).values
    dense = reduced.numpy()
    m = max(32, n // 4)  # duals of an exact OT on a quarter of the points pick the first candidates
    rng = np.random.default_rng(seed)
    sub0, sub1 = rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)
    _, log = ot.emd(np.full(m, 1 / m), np.full(m, 1 / m), dense[np.ix_(sub0, sub1)], log=True, numItermax=10**9)
    u0 = (reduced[:, sub1] - torch.from_numpy(log["v"])[None]).min(1).values
    guess = reduced - u0[:, None]
    guess -= guess.min(0, keepdim=True).values
    rows, cols = _smallest(guess.float(), k)
    keys = np.unique(np.concatenate([rows * n + cols, np.arange(n) * (n + 1)]))  # the diagonal keeps it feasible
    tol = 1e-12 * max(1.0, float(reduced.max()))
    a = np.full(n, 1 / n)
    for solves in range(1, 100):
        rows, cols = keys // n, keys % n
        plan, log = ot.emd(a, a, coo_array((dense[rows, cols] + 1.0, (rows, cols)), shape=(n, n)), log=True)
        slack = reduced - torch.from_numpy(log["v"])[None, :]
        slack -= torch.from_numpy(log["u"] - 1.0)[:, None]  # reduced cost of every edge under the sparse duals
        if float(slack.min()) >= -tol:  # dual feasible on the full cost: the sparse optimum is the optimum
            plan = plan.tocoo()
            match = np.empty(n, dtype=np.int64)
            match[plan.row[plan.data > 0]] = plan.col[plan.data > 0]
            return match, solves
        rows, cols = _smallest(slack.float(), add)
        violated = (slack.numpy()[rows, cols] < -tol).nonzero()[0]
        keys = np.union1d(keys, rows[violated] * n + cols[violated])
    raise RuntimeError("column generation did not converge")


def measure_task(name: str, cost: np.ndarray, repeats: int, noise: np.random.Generator) -> list[list[object]]:
    n = cost.shape[0]
    a = np.full(n, 1 / n)
    plan, log = ot.emd(a, a, cost, log=True, numItermax=10**9)
    optimum = float((plan * cost).sum()) * n
    u, v = log["u"], log["v"]
    scale = float(cost.mean())
    noisy = (u + 1e-2 * scale * noise.random(n), v + 1e-2 * scale * noise.random(n))
    exact = cost - u[:, None] - v[None, :]
    exact -= exact.min(1, keepdims=True)
    off = cost - (u + 1e-3 * scale * noise.random(n))[:, None] - (v + 1e-3 * scale * noise.random(n))[None, :]
    off -= off.min(1, keepdims=True)
    row_col = cost - cost.min(1, keepdims=True)
    row_col -= row_col.min(0, keepdims=True)
    _, solves = column_generation(cost)
    emd = functools.partial(ot.emd, a, a, cost, numItermax=10**9)
    methods = {
        "ot.emd (otcfm's choice)": emd,
        "ot.emd from exact potentials": functools.partial(emd, potentials_init=(u, v)),
        "ot.emd from potentials +- 1%": functools.partial(emd, potentials_init=noisy),
        "scipy LSA, row-column reduced": functools.partial(linear_sum_assignment, row_col),
        "scipy LSA from exact potentials": functools.partial(linear_sum_assignment, exact),
        "scipy LSA from potentials +- 0.1%": functools.partial(linear_sum_assignment, off),
        f"sparse column generation ({solves} sparse solves)": functools.partial(column_generation, cost),
    }
    rows, base = [], None
    for label, run in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms = median_ms(run, repeats)
            result = run()
        base = base or ms
        if isinstance(result, np.ndarray):  # a plan (ot.emd)
            total = float((result * cost).sum()) * n
        elif len(result[0]) == n and result[0].ndim == 1 and isinstance(result[1], np.ndarray):  # (rows, cols)
            total = float(cost[result].sum())
        else:  # (match, solves)
            total = float(cost[np.arange(n), result[0]].sum())
        gap = total / optimum - 1
        gap = 0.0 if abs(gap) < 1e-12 else gap  # float64 rounding of the sums, not a different matching
        rows.append([name, n, label, f"{ms:.1f}", f"{ms / base:.2f}", f"{100 * gap:.2f}%"])
    print(f"  {name} n={n} done", flush=True)
    return rows


def measure(n: int, repeats: int, seed: int) -> list[list[object]]:
    noise = np.random.default_rng(seed)
    return [
        row
        for name, (x0, x1) in tasks(n, seed).items()
        for row in measure_task(name, squared_euclidean_cost(x0, x1).numpy(), repeats, noise)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--seed", type=int, default=0)
    add_docs_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes, repeats = ([64], 1) if args.quick else ([256, 1024, 2048], 3)
    started = time.perf_counter()
    rows = [row for n in sizes for row in measure(n, repeats, args.seed)]
    table = markdown_table(["task", "N", "method", "median ms", "/ ot.emd", "gap"], rows)
    print(table)
    command = rerun_command(__file__, argv)
    body = f"""### Exact OT in 2-D: the alternatives to POT's network simplex, measured

Command: `{command}` ({time.perf_counter() - started:.0f} s). Measured {machine()}; one torch thread; median of
{repeats} runs on the same cost matrices (squared Euclidean, float64); the potentials come from a full `ot.emd`
solve and are not counted. "+- x%": uniform noise of x% of the mean cost added to each potential. The sparse
column generation is exact and counted in full (candidate selection, every sparse solve, every check on the
full cost). "gap": total cost over the optimum, minus 1 (|gap| < 1e-12 shown as 0). The module docstring of
`benchmarks/exact2d.py` describes each method.

{table}
"""
    if args.docs is not None:
        print(f"written to {write_section('exact2d', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
