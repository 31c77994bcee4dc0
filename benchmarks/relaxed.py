"""What the partial coupler costs: ``"partial"`` against ``"exact"`` on the same batches, and otcfm's entropic
partial plan against POT's ``entropic_partial_wasserstein`` on the same problem.

    python benchmarks/relaxed.py            # about a minute on 2 CPU cores
    python benchmarks/relaxed.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/relaxed.py --quick    # seconds; for tests

Batches: 8gaussians -> moons (2-D) and N(0, I) -> the 8-component mixture in 64 dimensions, B = 256 (and the sizes
of ``--sizes``). Couplers with their defaults (partial: epsilon 0.05 x mean cost, mass 0.9, tol 1e-7, at most 1000
iterations). Times are medians over ``--repeats`` calls, exact and partial taking turns, POT timed after them. POT
solves the same problem (absolute epsilon, the same mass, stopThr and numItermax); "max plan difference" is the
largest entry of ``|ours - POT|`` relative to POT's largest entry.
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
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_docs_options, machine, markdown_table, rerun_command, write_section  # noqa: E402

import otcfm  # noqa: E402
from otcfm.couplers import PartialCoupler, partial_plan, squared_euclidean_cost  # noqa: E402


def batches(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if d == 2:
        return otcfm.data.sample("8gaussians", n, g), otcfm.data.sample("moons", n, g)
    return otcfm.data.sample("gaussian", n, g, dim=d), otcfm.data.sample("mixture", n, g, dim=d)


def medians_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, one warm-up each, the calls taking turns."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def row(d: int, n: int, repeats: int, seed: int) -> list[str]:
    x0, x1 = batches(d, n, seed)
    g = torch.Generator().manual_seed(seed)
    exact, partial = otcfm.get_coupler("exact"), PartialCoupler()
    cost = squared_euclidean_cost(x0.double(), x1.double())
    epsilon = partial.epsilon * float(cost.mean())
    a = np.full(n, 1 / n)

    def pot() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns when it stops at numItermax; the difference column shows it
            return ot.partial.entropic_partial_wasserstein(
                a, a, cost.numpy(), epsilon, partial.mass, numItermax=partial.max_iter, stopThr=partial.tol
            )

    ours = partial_plan(cost, epsilon, partial.mass, tol=partial.tol, max_iter=partial.max_iter)
    theirs = pot()
    difference = float(np.abs(ours.plan.numpy() - theirs).max() / theirs.max())
    ms = medians_ms(
        {"exact": lambda: exact(x0, x1, generator=g), "partial": lambda: partial(x0, x1, generator=g)}, repeats
    )
    ms.update(medians_ms({"pot": pot}, repeats))  # apart: POT's numpy threads, left spinning, slowed the next call
    return [
        str(d),
        str(n),
        f"{ms['exact']:.1f}",
        f"{ms['partial']:.1f}",
        f"{ms['partial'] / ms['exact']:.1f}x",
        str(ours.iterations),
        f"{ms['pot']:.1f}",
        f"{ms['pot'] / ms['partial']:.1f}x",
        f"{difference:.1e}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [32], 1
    started = time.perf_counter()
    rows = [row(d, n, args.repeats, args.seed) for d in (2, 64) for n in args.sizes]
    header = [
        "d",
        "B",
        "exact ms",
        "partial ms",
        "partial / exact",
        "partial iterations",
        "POT partial ms",
        "POT / otcfm",
        "max plan difference",
    ]
    table = markdown_table(header, rows)
    seconds = time.perf_counter() - started
    print(f"{table}\n\n{seconds:.0f} s")
    if args.docs is not None:
        body = f"""## The partial coupler's cost

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s). Measured {machine()}.
`"partial"` (entropic partial OT, epsilon 0.05 x mean cost, mass 0.9, tol 1e-7, Dykstra's iterations on the
kernel's scalings) against `"exact"` on the same batches, and against POT's `entropic_partial_wasserstein` on the
same problem (plans equal to the difference shown). Medians over {args.repeats} calls, exact and partial taking
turns, POT timed after them.

{table}
"""
        print(f"written to {write_section('relaxed', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
