"""Part "sinkhorn" of benchmarks/scale.py: the blockwise Sinkhorn at 16,384 and 65,536 points against GeomLoss.

Every solve runs in its own subprocess (``python benchmarks/_large_sinkhorn.py METHOD N``), which prints one JSON
line: seconds, iterations, the marginal error and the extra peak memory (the peak resident set during the solve
minus the resident set before it, with the data and libraries loaded; the peak is reset first). Inputs: N(0, I) ->
an 8-component Gaussian mixture in d = 64, float32 (the d = 64 task of benchmarks/couplers.py), epsilon 0.05 x the
mean cost (our default), squared Euclidean cost. The marginal error is the L1 distance of the plan's row and column
sums to the uniform weights (the larger of the two; 2 x the total variation), evaluated blockwise from the
potentials after the timed region, in the same way for both solvers.

- otcfm: ``blockwise_sinkhorn`` with its default memory budget (256 MiB of scores) and the L2 tolerance
  1e-3 / sqrt(N) on the target marginal, which guarantees an L1 error below 1e-3. At 65,536 points it makes a
  fixed number of iterations (``--large-iterations``): time per iteration and memory are what is measured there.
- GeomLoss: ``SamplesLoss("sinkhorn", p=2, blur=sqrt(epsilon / 2), debias=False, potentials=True,
  backend="tensorized")`` at several ``scaling`` values (its cost is |x - y|^2 / 2 and its epsilon blur^2, hence
  the blur); it anneals epsilon and makes a number of iterations set by ``scaling``, with no tolerance. Its
  tensorized backend holds the N x N cost: at 65,536 points that is 16 GiB, so it is not run there.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, peak_memory, reset_peak_memory  # noqa: E402

from otcfm.couplers.blockwise import _lse_rows, blockwise_sinkhorn  # noqa: E402

DIM = 64
RELATIVE_EPSILON = 0.05
SIZES = (16_384, 65_536)
SCALINGS = (0.5, 0.8, 0.9)  # GeomLoss's epsilon-scaling factors: more iterations as it approaches 1


def clouds(n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(x0, x1, epsilon)``: float32 clouds of the d = 64 task and the absolute epsilon (0.05 x mean cost)."""
    import otcfm

    g = torch.Generator().manual_seed(0)
    x0 = otcfm.data.sample("gaussian", n, g, dim=DIM).float().contiguous()
    x1 = otcfm.data.sample("mixture", n, g, dim=DIM).float().contiguous()
    probe = torch.cdist(x0[:2048].double(), x1[:2048].double()) ** 2
    return x0, x1, RELATIVE_EPSILON * float(probe.mean())


def marginal_error(x0: torch.Tensor, x1: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> float:
    """Larger L1 distance of the row / column sums of ``exp((f_k + g_l - C_kl) / eps)`` to uniform weights."""
    x_sq, y_sq = (x0 * x0).sum(1), (x1 * x1).sum(1)
    rows = torch.exp(f / eps + _lse_rows(x0, x1, x_sq, y_sq, g, eps, 1024)).double()
    cols = torch.exp(g / eps + _lse_rows(x1, x0, y_sq, x_sq, f, eps, 1024)).double()
    return max(float((rows - 1 / x0.shape[0]).abs().sum()), float((cols - 1 / x1.shape[0]).abs().sum()))


def worker(method: str, n: int, iterations: int) -> dict:
    """One solve in this process (see the module docstring); ``method`` is "otcfm" or "geomloss-<scaling>".

    ``iterations``: 0 to solve to an L1 marginal error below 1e-3, else that many iterations (otcfm only).
    """
    torch.set_num_threads(2)
    x0, x1, eps = clouds(n)
    blockwise_sinkhorn(x0[:256], x1[:256], eps, relative=False, max_iter=2)  # load the kernels before the baseline
    log_w = -math.log(n)
    if method == "otcfm":
        before = reset_peak_memory()
        started = time.perf_counter()
        if iterations:  # a fixed number of iterations: the tolerance is never met
            out = blockwise_sinkhorn(x0, x1, eps, relative=False, tol=1e-30, max_iter=iterations)
        else:
            out = blockwise_sinkhorn(x0, x1, eps, relative=False, tol=1e-3 / math.sqrt(n), max_iter=10_000)
        seconds = time.perf_counter() - started
        extra = peak_memory() - before
        f, g, steps = out.f, out.g, out.iterations
        entropy = None if iterations else out.renormalised_entropy(x0, x1)
    else:
        from geomloss import SamplesLoss

        scaling = float(method.split("-")[1])
        loss = SamplesLoss(
            "sinkhorn", p=2, blur=math.sqrt(eps / 2), scaling=scaling, debias=False, potentials=True,
            backend="tensorized",
        )  # fmt: skip
        before = reset_peak_memory()
        started = time.perf_counter()
        big_f, big_g = loss(x0, x1)
        seconds = time.perf_counter() - started
        extra = peak_memory() - before
        f, g = 2 * big_f.flatten() + eps * log_w, 2 * big_g.flatten() + eps * log_w  # to cost |x - y|^2, weights in
        steps, entropy = None, None
    return {
        "method": method, "n": n, "seconds": seconds, "iterations": steps, "extra_peak_gib": extra / 2**30,
        "error": marginal_error(x0, x1, f, g, eps), "entropy": entropy,
    }  # fmt: skip


def run(args: argparse.Namespace, done: dict, record) -> str:  # noqa: ANN001
    """Run every missing solve (each in a subprocess), then return the table of all of them."""
    sizes = (1024, 2048) if args.quick else SIZES
    scalings = (0.5,) if args.quick else SCALINGS
    for n in sizes:
        methods = ["otcfm"] + ([f"geomloss-{s}" for s in scalings] if n < sizes[-1] else [])
        for method in methods:
            if (f"sinkhorn-{n}", method) in done:
                continue
            print(f"[sinkhorn] {method} at n = {n}", flush=True)
            iterations = 0 if n < sizes[-1] else (2 if args.quick else args.large_iterations)
            command = [sys.executable, __file__, method, str(n), str(iterations)]
            finished = subprocess.run(command, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                reason = (finished.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"[sinkhorn] {method} at n = {n} failed: {reason}", flush=True)
                if "geomloss" in reason.lower() or "No module named" in reason:
                    continue  # the peer is not installed here: not recorded, a rerun where it is measures it
                record(f"sinkhorn-{n}", method, {"failed": reason})
                continue
            record(f"sinkhorn-{n}", method, json.loads(finished.stdout.strip().splitlines()[-1]))
    rows = []
    for n in sizes:
        for (task, method), m in sorted(done.items(), key=lambda kv: kv[0][1]):
            if task != f"sinkhorn-{n}":
                continue
            if "failed" in m:
                rows.append([n, method, "failed: " + m["failed"], "", "", "", "", ""])
                continue
            per_iteration = f"{m['seconds'] / m['iterations']:.2f}" if m["iterations"] else ""
            entropy = f"{m['entropy']:.3f}" if m.get("entropy") is not None else ""
            rows.append(
                [n, method, f"{m['seconds']:.1f}", m["iterations"] or "", per_iteration, f"{m['error']:.1e}",
                 f"{m['extra_peak_gib']:.2f}", entropy]
            )  # fmt: skip
    header = ["N", "solver", "seconds", "iterations", "s / iteration", "marginal error (L1)", "extra peak GiB",
              "renormalised entropy"]  # fmt: skip
    return markdown_table(header, rows)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
