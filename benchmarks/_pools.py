"""Part "pools" of benchmarks/scale.py: OT pools larger than the batch against minibatch exact OT at B = 256.

On the gaussian -> mixture task of scale.py (d = 32, a finite dataset of N = 20,000 draws), each set-up couples
pools of P source draws and P dataset draws with ``otcfm.loader.couple_pool`` and serves them as P / 256 batches,
each pair once. The same MLP 3x512 (scale.py's --recipe, batch 256, the same seed) trains ``--pool-steps`` steps on
every set-up. Reported per set-up:

- coupling ms per training step: the median time of coupling one pool (all pools of the training run) over P / 256;
- extra peak memory of coupling one pool, in a fresh subprocess (peak resident set during the coupling minus the
  resident set before it);
- transport cost ratio (mean squared pair distance over W2^2, W2^2 being the dual of the epsilon = 0 semidiscrete
  fit of scale.py's semidiscrete part, loaded or fitted) and the target variance (the estimator of variance.py),
  on the pairs of the first training pools;
- the renormalised entropy of the coupling of one pool (0 for a permutation, 1 for independent pairs);
- W2 to 2,000 held-out draws after 1, 2, 4 and 100 Euler steps (floor: W2 of fresh draws of the target).

The cost ratio and target variance use the pairs of the first pools (``--pool`` pairs, and a quarter of that
to evaluate on). Sinkhorn at P = 16,384 is coupled and measured, not trained (a pool takes tens of seconds on 2
CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, peak_memory, reset_peak_memory  # noqa: E402

import otcfm  # noqa: E402
from otcfm.couplers import SemidiscreteCoupler, sinkhorn_plan  # noqa: E402
from otcfm.couplers.blockwise import blockwise_sinkhorn  # noqa: E402
from otcfm.loader import couple_pool  # noqa: E402
from otcfm.metrics import renormalised_entropy, target_variance_of_pairs, transport_cost_ratio, w2  # noqa: E402

BATCH = 256
BUDGET = 2**28  # bytes of a dense plan above which the Sinkhorn coupler goes blockwise
#: set-up -> (coupler name, options, pool size, trained)
SETUPS: dict[str, tuple[str, dict, int, bool]] = {
    "exact B=256": ("exact", {}, 256, True),
    "exact P=1024": ("exact", {}, 1024, True),
    "exact P=4096": ("exact", {}, 4096, True),
    "sinkhorn 0.05 P=4096": ("sinkhorn", {"epsilon": 0.05}, 4096, True),
    "sinkhorn 0.01 P=4096": ("sinkhorn", {"epsilon": 0.01}, 4096, True),
    "sinkhorn 0.05 P=16384": ("sinkhorn", {"epsilon": 0.05}, 16384, False),
}
QUICK = {"exact B=256": 256, "exact P=1024": 512, "sinkhorn 0.05 P=4096": 512, "sinkhorn 0.05 P=16384": 1024}


def mixture(n: int) -> tuple[torch.Tensor, Callable, Callable]:
    """``(data, source, target)``: the finite dataset of scale.py and samplers ``f(count, generator)``."""
    from scale import task_data

    data, _, source = task_data("mixture", n, seed=0)

    def target(count: int, generator: torch.Generator) -> torch.Tensor:
        return data[torch.randint(data.shape[0], (count,), generator=generator)]

    return data, source, target


def coupler_of(setup: str) -> otcfm.couplers.Coupler:
    name, options, _, _ = SETUPS[setup]
    return otcfm.get_coupler(name, **({"memory_budget": BUDGET} if name == "sinkhorn" else {}), **options)


class PoolDraw:
    """Training batches served from pools (what ``PoolStream`` does), with every pool's coupling timed."""

    def __init__(self, setup: str, pool_size: int, data: torch.Tensor, source: Callable, target: Callable) -> None:
        self.name, self.data, self.pool_size = setup, data, pool_size
        self.source, self.target, self.coupler = source, target, coupler_of(setup)
        self.seconds: list[float] = []
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self._next = 0

    def pool(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        pairs = couple_pool(self.source, self.target, self.coupler, self.pool_size, generator)
        self.seconds.append(time.perf_counter() - started)
        self.pairs.append(pairs)
        return pairs

    def __call__(self, generator: torch.Generator, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None or self._next >= self.pool_size:
            self._pool, self._next = self.pool(generator), 0
        start, self._next = self._next, self._next + BATCH
        return self._pool[0][start : self._next], self._pool[1][start : self._next]

    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.seconds) / (self.pool_size / BATCH)


def entropy_of_pool(setup: str, x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Renormalised entropy of the coupling of one pool ``(x0, x1)``: 0 for exact OT (a permutation), else of its
    Sinkhorn plan (from the potentials, blockwise, above the dense budget)."""
    name, options, _, _ = SETUPS[setup]
    if name == "exact":
        return 0.0
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    if a.shape[0] * b.shape[0] * 8 > BUDGET:
        return blockwise_sinkhorn(a, b, options["epsilon"]).renormalised_entropy(a, b)
    return renormalised_entropy(sinkhorn_plan(torch.cdist(a.double(), b.double()) ** 2, options["epsilon"]).plan)


def memory_worker(setup: str, pool_size: int, n: int) -> dict:
    """Extra peak memory and seconds of coupling one pool, in this (fresh) process."""
    torch.set_num_threads(2)
    data, source, target = mixture(n)
    g = torch.Generator().manual_seed(0)
    x0, x1 = source(pool_size, g), target(pool_size, g)
    coupler = coupler_of(setup)
    coupler(x0[:BATCH], x1[:BATCH], generator=g)  # load the kernels before the baseline
    before = reset_peak_memory()
    started = time.perf_counter()
    coupler(x0, x1, generator=g)
    return {"seconds": time.perf_counter() - started, "extra_peak_gib": (peak_memory() - before) / 2**30}


def run(args: argparse.Namespace, done: dict, record) -> str:  # noqa: ANN001
    """Measure and train every missing set-up; return the table of all of them."""
    from scale import RECIPES, quality, train

    setups = QUICK if args.quick else {name: spec[2] for name, spec in SETUPS.items()}
    data, source, target = mixture(args.n)
    held_out = otcfm.data.sample("mixture", 2000, torch.Generator().manual_seed(1), dim=32)
    if ("pools", "floor") not in done:
        record(
            "pools",
            "floor",
            {
                "value": w2(
                    otcfm.data.sample("mixture", args.eval_n, torch.Generator().manual_seed(7), dim=32), held_out
                )
            },
        )
    w2_squared = _w2_squared(args, data, source, done, record)
    x0_eval = source(args.eval_n, torch.Generator().manual_seed(10_000))
    for setup, pool_size in setups.items():
        if ("pools", setup) in done:
            continue
        print(f"[pools] {setup}", flush=True)
        command = [sys.executable, __file__, setup, str(pool_size), str(args.n)]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        values = json.loads(finished.stdout.strip().splitlines()[-1])
        draw = PoolDraw(setup, pool_size, data, source, target)
        trained = SETUPS[setup][3]
        model = train(draw, args.pool_steps, 0, RECIPES[args.recipe]) if trained else None
        g = torch.Generator().manual_seed(0)
        while sum(p[0].shape[0] for p in draw.pairs) < args.pool + args.pool // 4:  # pairs for the estimates
            draw.pool(g)
        x0s, x1s = (torch.cat([p[k] for p in draw.pairs]) for k in (0, 1))
        end = args.pool + args.pool // 4
        pool, evaluation = (x0s[: args.pool], x1s[: args.pool]), (x0s[args.pool : end], x1s[args.pool : end])
        values |= {
            "pool_size": pool_size,
            "coupling_ms": draw.ms_per_step(),
            "pools_timed": len(draw.seconds),
            "cost_ratio": transport_cost_ratio(*pool, w2_squared),
            "target_variance": target_variance_of_pairs(
                pool, evaluation, generator=torch.Generator().manual_seed(2)
            ).total,
            "entropy": entropy_of_pool(setup, source(pool_size, g), target(pool_size, g)),  # a pool's clouds
        }
        if model is not None:
            values["quality"] = quality("mixture", model, x0_eval, held_out, None)
        record("pools", setup, values)
    return table(done, setups)


def _w2_squared(args: argparse.Namespace, data: torch.Tensor, source: Callable, done: dict, record) -> float:  # noqa: ANN001
    """W2^2 of source and dataset: the dual of the converged epsilon = 0 semidiscrete fit (the semidiscrete part's)."""
    if ("pools", "w2") in done:
        return done["pools", "w2"]["w2_squared"]
    path = args.out / "mixture-semidiscrete.pt"
    if path.exists():
        coupler = SemidiscreteCoupler.load(path, target=data)
        dual = coupler.evaluate(source, data, 10 * data.shape[0], torch.Generator().manual_seed(3)).dual
    else:
        print(f"[pools] fitting the semidiscrete potentials for W2^2 ({args.fit_steps} steps)", flush=True)
        coupler = SemidiscreteCoupler(epsilon=0.0)
        dual = coupler.fit(source, data, steps=args.fit_steps, generator=torch.Generator().manual_seed(1)).dual
        coupler.save(path)
    record("pools", "w2", {"w2_squared": dual})
    return dual


def table(done: dict, setups: dict[str, int]) -> str:
    floor = done.get(("pools", "floor"), {}).get("value", float("nan"))
    rows = []
    for setup in setups:
        m = done.get(("pools", setup))
        if m is None:
            continue
        q = m.get("quality", {})
        w2s = [f"{q[k]:.2f}" if k in q else "-" for k in ("1", "2", "4", "100")]
        label = setup if m["pool_size"] == SETUPS[setup][2] else f"{setup}, run at P={m['pool_size']} (--quick)"
        rows.append(
            [label, m["pool_size"], f"{m['coupling_ms']:.1f}", f"{m['extra_peak_gib']:.2f}", f"{m['cost_ratio']:.3f}",
             f"{m['target_variance']:.1f}", f"{m['entropy']:.3f}", *w2s]
        )  # fmt: skip
    header = ["set-up", "P", "coupling ms / step", "extra peak GiB", "cost ratio", "target variance",
              "renormalised entropy", "W2 1 step", "W2 2 steps", "W2 4 steps", "W2 100 steps"]  # fmt: skip
    return f"W2 floor (fresh draws of the target): {floor:.2f}\n\n" + markdown_table(header, rows)


if __name__ == "__main__":
    print(json.dumps(memory_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
