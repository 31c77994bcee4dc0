"""Coupling benchmark: time, optimality and unique pairs of otcfm's couplers vs POT, scipy and TorchCFM.

    python benchmarks/couplers.py            # full run (a few minutes on 2 cores); prints only
    python benchmarks/couplers.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/couplers.py --quick    # seconds; for tests

TorchCFM is a peer, not a dependency: `pip install --no-deps torchcfm==1.0.7` in the benchmark
environment (its declared dependencies pull torchdyn and torchvision; the OT module needs only POT).
Without it the TorchCFM rows are skipped and said so.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

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
from otcfm.couplers import ExactCoupler, IndependentCoupler, SinkhornCoupler, sinkhorn_plan  # noqa: E402
from otcfm.couplers import squared_euclidean_cost as sq_cost  # noqa: E402
from otcfm.loader import coupled_loader  # noqa: E402

try:
    from torchcfm.optimal_transport import OTPlanSampler
except ImportError:  # the peer is optional
    OTPlanSampler = None

HIDDEN = {2: 256, 64: 512, 784: 1024}  # MLP widths of the throughput runs (depth 3)


def task(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8gaussians -> moons in 2-D; N(0, I) -> an 8-component Gaussian mixture otherwise."""
    g = torch.Generator().manual_seed(seed)
    if d == 2:
        return otcfm.data.sample("8gaussians", n, g), otcfm.data.sample("moons", n, g)
    return otcfm.data.sample("gaussian", n, g, dim=d), otcfm.data.sample("mixture", n, g, dim=d)


def _pot_emd(x0: torch.Tensor, x1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Raw POT as most code calls it: float64 cost, ot.emd with its default numItermax."""
    cost = ot.dist(x0.numpy().astype(np.float64), x1.numpy().astype(np.float64))
    n = len(x0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns when it stops short; the gap column shows it
        plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), cost)
    return np.arange(n), plan.argmax(1)


def _scipy(x0: torch.Tensor, x1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return linear_sum_assignment(ot.dist(x0.numpy().astype(np.float64), x1.numpy().astype(np.float64)))


def _torchcfm(sampler: object) -> object:
    def pair(x0: torch.Tensor, x1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = sampler.get_map(x0, x1)  # what sample_plan does, keeping the indices
            return sampler.sample_map(plan, x0.shape[0], replace=True)

    def run(x0: torch.Tensor, x1: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler.sample_plan(x0, x1)

    return pair, run


def coupling_table(dims: list[int], sizes: list[int], repeats: dict[int, int], seed: int) -> str:
    rows = []
    np.random.seed(seed)  # TorchCFM draws from numpy's global generator
    for d, n in itertools.product(dims, sizes):
        x0, x1 = task(d, n, seed)
        cost = sq_cost(x0, x1).numpy()
        rows_i, cols_i = linear_sum_assignment(cost)
        optimum = cost[rows_i, cols_i].mean()
        eps = 0.05 * float(cost.mean())
        g = torch.Generator().manual_seed(seed)
        methods: dict[str, tuple] = {}  # label -> (pair(x0, x1) -> (i, j), optional timed(x0, x1))
        for label, coupler in (
            ("otcfm exact (auto)", ExactCoupler()),
            ("otcfm exact, emd", ExactCoupler(solver="emd")),
            ("otcfm exact, lsa", ExactCoupler(solver="lsa")),
            ("otcfm sinkhorn eps=0.05", SinkhornCoupler(epsilon=0.05)),
            ("otcfm independent", IndependentCoupler()),
        ):
            methods[label] = (functools.partial(coupler, generator=g), None)
        methods["POT ot.emd (defaults)"] = (_pot_emd, None)
        methods["scipy linear_sum_assignment"] = (_scipy, None)
        if OTPlanSampler is not None:
            for label, sampler in (
                ("TorchCFM exact", OTPlanSampler("exact")),
                ("TorchCFM sinkhorn eps=0.05", OTPlanSampler("sinkhorn", reg=eps)),
            ):
                methods[label] = _torchcfm(sampler)
        times: dict[str, float] = {}
        quality: dict[str, tuple[float, float]] = {}
        for label, (pair, timed) in methods.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times[label] = median_ms(functools.partial(timed or pair, x0, x1), repeats[n], warmup=int(n <= 256))
                i, j = (np.asarray(v) for v in pair(x0, x1))
            unique = len(set(zip(i.tolist(), j.tolist(), strict=True))) / n
            quality[label] = (cost[i, j].mean() / optimum - 1, unique)
        reference = times.get("TorchCFM exact")
        for label in methods:
            gap, unique = quality[label]
            ratio = f"{times[label] / reference:.2f}" if reference else "-"  # "-": TorchCFM not installed
            rows.append([d, n, label, f"{times[label]:.1f}", ratio, f"{100 * gap:.2f}%", f"{100 * unique:.0f}%"])
        print(f"  d={d} n={n} done", flush=True)
    header = ["d", "N", "method", "median ms", "/ TorchCFM exact", "gap to optimum", "unique pairs"]
    return markdown_table(header, rows)


def sinkhorn_table(n: int, epsilons: list[float], max_iter: int, repeats: int, seed: int) -> str:
    """Our Sinkhorn vs POT's log-domain Sinkhorn at the same absolute epsilon, tolerance and iteration limit."""
    x0, x1 = task(2, n, seed)
    cost = sq_cost(x0, x1)
    a = np.full(n, 1 / n)
    rows = []
    for rel in epsilons:
        eps = rel * float(cost.mean())
        ours = sinkhorn_plan(cost, eps, relative=False, tol=1e-6, max_iter=max_iter)
        t_ours = median_ms(lambda e=eps: sinkhorn_plan(cost, e, relative=False, tol=1e-6, max_iter=max_iter), repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, log = ot.bregman.sinkhorn_log(a, a, cost.numpy(), eps, numItermax=max_iter, stopThr=1e-6, log=True)
            t_pot = median_ms(
                lambda e=eps: ot.bregman.sinkhorn_log(a, a, cost.numpy(), e, numItermax=max_iter, stopThr=1e-6), repeats
            )
        pot_err = float(np.linalg.norm(plan.sum(0) - a))
        rows.append(
            [
                rel,
                f"{t_ours:.1f}",
                ours.iterations,
                f"{ours.error:.1e}",
                f"{t_pot:.1f}",
                log["niter"] + 1,
                f"{pot_err:.1e}",
                f"{t_pot / t_ours:.1f}x",
            ]
        )
    header = [
        "epsilon / mean cost",
        "otcfm ms",
        "otcfm iters",
        "otcfm error",
        "POT sinkhorn_log ms",
        "POT iters",
        "POT error",
        "speed-up",
    ]
    return markdown_table(header, rows)


def pot_sinkhorn_table(n: int, dims: list[int], repeats: int, seed: int) -> str:
    """Our Sinkhorn vs POT's ``ot.sinkhorn`` (kernel form) at epsilon 0.05 x mean cost, tolerance 1e-5 and
    5000 iterations: the same problem, the same stopping rule (L2 target-marginal error), interleaved repeats."""
    rows = []
    for d in dims:
        x0, x1 = task(d, n, seed)
        cost = sq_cost(x0, x1)
        eps, a, matrix = 0.05 * float(cost.mean()), np.full(n, 1 / n), cost.numpy()
        ours = sinkhorn_plan(cost, eps, relative=False, tol=1e-5, max_iter=5000)
        plan, log = ot.sinkhorn(a, a, cost.numpy(), eps, numItermax=5000, stopThr=1e-5, log=True)
        times: dict[str, list[float]] = {"ours": [], "pot": []}
        for _ in range(repeats):  # interleaved, so drift of the machine hits both alike
            times["ours"].append(
                median_ms(lambda c=cost, e=eps: sinkhorn_plan(c, e, relative=False, tol=1e-5, max_iter=5000), 3)
            )
            times["pot"].append(
                median_ms(lambda m=matrix, w=a, e=eps: ot.sinkhorn(w, w, m, e, numItermax=5000, stopThr=1e-5), 3)
            )
        t_ours, t_pot = statistics.median(times["ours"]), statistics.median(times["pot"])
        rows.append(
            [d, f"{t_ours:.1f}", ours.iterations, f"{ours.error:.1e}", f"{t_pot:.1f}", log["niter"],
             f"{float(np.linalg.norm(plan.sum(0) - a)):.1e}", f"{t_ours / t_pot:.2f}"]
        )  # fmt: skip
    header = ["d", "otcfm ms", "otcfm iters", "otcfm error", "POT ot.sinkhorn ms", "POT iters", "POT error",
              "otcfm / POT"]  # fmt: skip
    return markdown_table(header, rows)


def _steps_per_second(d: int, coupler: str, helper: bool, steps: int, seed: int, pool: int | None = None) -> float:
    torch.manual_seed(seed)
    model = otcfm.models.MLP(d, hidden=HIDDEN[d], depth=3)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(seed)

    def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return task(d, n, int(torch.randint(2**31, (1,), generator=gen)))

    if helper:

        def source(n: int, gen: torch.Generator) -> torch.Tensor:
            return draw(n, gen)[0]

        def target(n: int, gen: torch.Generator) -> torch.Tensor:
            return draw(n, gen)[1]

        batches = iter(coupled_loader(source, target, coupler, 256, seed=seed, num_workers=1, pool_size=pool))
        fm = otcfm.FlowMatcher(coupler="paired")
    else:
        fm = otcfm.FlowMatcher(coupler=coupler)

    def step() -> None:
        x0, x1 = next(batches) if helper else draw(256, g)
        loss = fm.loss(model, x0, x1, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


#: (coupler, background worker, pool size) of the throughput table; pools only where d >= 64
SETUPS = [("independent", False, None), ("exact", False, None), ("independent", True, None), ("exact", True, None)]
POOL_SETUPS = [("exact", True, 1024), ("sinkhorn", True, 1024), ("sinkhorn", True, 4096)]
#: timed steps of a pool set-up: 5x the batches its loader holds ready (4 hand-overs of 8), so a worker slower
#: than training shows in the rate instead of being hidden by the batches it prepared during the warm-up
POOL_STEPS = 5 * 4 * 8


def throughput_table(
    dims: list[int], steps: int, repeats: int, seed: int, pool_steps: int = POOL_STEPS, pools: list | None = None
) -> str:
    """Steps/s of each set-up, median of ``repeats`` runs taken in turn (timings here drift 20-50% between runs)."""
    rows = []
    for d in dims:
        setups = SETUPS + ((POOL_SETUPS if pools is None else pools) if d >= 64 else [])
        rates: dict[tuple, list[float]] = {setup: [] for setup in setups}
        for repeat in range(repeats):
            for coupler, helper, pool in setups:
                n = pool_steps if pool else steps
                rates[coupler, helper, pool].append(_steps_per_second(d, coupler, helper, n, seed + repeat, pool))
        base = float(np.median(rates["independent", False, None]))
        for (coupler, helper, pool), values in rates.items():
            rate = float(np.median(values))
            mode = ("background worker" if helper else "inline") + (f", pools of {pool}" if pool else "")
            rows.append([d, f"MLP 3x{HIDDEN[d]}", coupler, mode, f"{rate:.1f}", f"{rate / base:.2f}"])
        print(f"  throughput d={d} done", flush=True)
    return markdown_table(["d", "model", "coupler", "coupling", "steps/s", "/ independent inline"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--seed", type=int, default=0)
    add_docs_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # single-threaded main process: the background worker gets the other core
    if args.quick:
        dims, sizes, reps, eps_list, sk_n, sk_iter, steps, tdims = [2], [64], {64: 1}, [1e-2], 32, 200, 3, [2, 64]
        step_repeats = 1
    else:
        dims, sizes = [2, 64, 784], [64, 256, 1024, 2048]
        reps, eps_list, sk_n, sk_iter, steps, tdims = (
            {64: 21, 256: 21, 1024: 3, 2048: 3},
            [1e-2, 1e-3],
            256,
            2000,
            40,
            [2, 64, 784],
        )
        step_repeats = 3
    command = rerun_command(__file__, argv)
    started = time.perf_counter()
    print("coupling time, optimality gap and unique pairs ...", flush=True)
    if OTPlanSampler is None:
        print("  torchcfm is not importable: no TorchCFM rows, and '/ TorchCFM exact' is '-'", flush=True)
    coupling = coupling_table(dims, sizes, reps, args.seed)
    print(coupling)
    print("sinkhorn vs POT sinkhorn_log ...", flush=True)
    sinkhorn = sinkhorn_table(sk_n, eps_list, sk_iter, 3 if not args.quick else 1, args.seed)
    print(sinkhorn)
    print("sinkhorn vs POT ot.sinkhorn ...", flush=True)
    kernel = pot_sinkhorn_table(64 if args.quick else 1024, dims, 1 if args.quick else 5, args.seed)
    print(kernel)
    print("training throughput at batch 256 ...", flush=True)
    quick_pools = [("sinkhorn", True, 512)] if args.quick else None
    throughput = throughput_table(tdims, steps, step_repeats, args.seed, 3 if args.quick else POOL_STEPS, quick_pools)
    print(throughput)
    peer = "TorchCFM 1.0.7" if OTPlanSampler is not None else "TorchCFM not installed: its rows are missing"
    body = f"""## Couplers: speed, optimality, unique pairs

Command: `{command}` ({time.perf_counter() - started:.0f} s). Measured {machine()}; main process limited to
one torch thread. Peer: {peer}. Inputs: 8gaussians -> moons for d = 2, N(0, I) -> an 8-component Gaussian mixture
(`otcfm.data.sample("mixture", dim=d)`) for d = 64 and 784; every method sees the same inputs. Times include the
cost matrix. "gap to optimum": mean squared distance of the returned pairs over the exact optimum (scipy, float64).
"unique pairs": distinct (i, j) pairs over N. TorchCFM's sampler draws N pairs with replacement from its plan;
its Sinkhorn uses the same absolute epsilon as ours (0.05 x mean cost).

{coupling}

### Sinkhorn vs POT's `ot.sinkhorn` at the default epsilon

N = {64 if args.quick else 1024}, epsilon 0.05 x mean cost (our default), tolerance 1e-5 on the target marginal (L2)
and 5000 iterations for both; the cost matrix is given (not timed); median of interleaved repeats.

{kernel}

### Sinkhorn at small epsilon vs POT's `sinkhorn_log`

N = {sk_n}, 8gaussians -> moons, the same absolute epsilon, tolerance 1e-6 on the target marginal (L2, POT's
criterion) and iteration limit {sk_iter}; "error" is the final target-marginal violation.

{sinkhorn}

### Training throughput, batch 256

Steps per second of a flow-matching training step (Adam, MLP depth 3), coupling inline or in one background
`DataLoader` worker (`otcfm.loader.coupled_loader` + `FlowMatcher(coupler="paired")`), and for d >= 64 with
OT pools of P samples coupled once and served as P / 256 batches in the worker (`coupled_loader(pool_size=P)`):
median of {step_repeats} runs of {steps} steps ({POOL_STEPS} for pools, so that batches the worker prepared during
the warm-up cannot hide a worker slower than training), the set-ups taking turns.

{throughput}
"""
    if args.docs is not None:
        print(f"written to {write_section('couplers', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
