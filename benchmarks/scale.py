"""Couplings in high dimension: minibatch OT against semidiscrete OT over the whole dataset.

    python benchmarks/scale.py            # about 15 minutes on 2 CPU cores
    python benchmarks/scale.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/scale.py --quick    # seconds; for tests
    python benchmarks/scale.py --part pools      # OT pools larger than the batch (benchmarks/_pools.py), ~7 min
    python benchmarks/scale.py --part sinkhorn   # Sinkhorn on 16,384 and 65,536 points vs GeomLoss
                                                 # (benchmarks/_large_sinkhorn.py), ~5 min

Tasks: gaussian -> mixture (d = 32, 8 separated Gaussians, a finite dataset of N = 20,000 draws) and
noise -> digits (64 pixels, the 1,437 training images). Couplers: independent, minibatch exact OT at B = 256 and
1024, Sinkhorn (epsilon 0.05 x mean cost, B = 256), and semidiscrete OT (epsilon 0 and 0.01 x mean cost) fitted on
the whole dataset. Reported per coupler:

- fit: seconds and assignment error of the semidiscrete potentials, measured on 100 N fresh source samples
  (the sampling noise of that measurement is printed beside it);
- coupling milliseconds per training step (median over repeats; B = 256 except exact at 1024);
- target variance of the linear path (the estimator of benchmarks/variance.py on pairs of the coupling) and the
  transport cost ratio: mean squared distance of its pairs over W2^2, W2^2 being the dual of the converged
  epsilon = 0 semidiscrete fit (a ratio near or above 1 for any coupling with the right marginals);
- quality after training the same MLP 3x512 with the recipe below for --steps steps at batch 256 with each of
  independent, exact (B = 256) and the two semidiscrete couplers: W2 to held-out draws (mixture; floor: W2
  between two independent draws of that size) and the Frechet distance of benchmarks/digits.py (digits; floor:
  train vs test) after 1, 2, 4 and 100 Euler steps. --train-all also trains exact at B = 1024 and Sinkhorn.

Training recipe (every flow of scale.py and of its pools part), --recipe tuned (the default): Adam at a peak rate
of 3e-3 decayed to 0 by a cosine (``lr_schedule="cosine"`` of ``otcfm.train``), times drawn from a logit-normal
centred at t = sigmoid(-1.5) = 0.18 (``LogitNormal(-1.5, 1)``), since few-step sampling evaluates the velocity at
small t. --recipe plain: uniform times at a constant 1e-3 (the recipe of earlier runs).

Finished results are appended to OUT/results.jsonl, so a rerun resumes; torch runs on --threads threads (2).
The entropic fit is measured on 20 N samples: its expected (softmax) shares carry less sampling noise than
partner counts. ott-jax's semidiscrete solver is timed as a peer when it is importable (it is
not a dependency; install ott-jax in a benchmark environment).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_docs_options, machine, markdown_table, median_ms, read_jsonl, rerun_command, write_section  # noqa: E402

import otcfm  # noqa: E402
from otcfm.couplers import SemidiscreteCoupler  # noqa: E402
from otcfm.engine import LRSchedule, learning_rate  # noqa: E402
from otcfm.metrics import target_variance_of_pairs, transport_cost_ratio, w2  # noqa: E402

EULER = (1, 2, 4, 100)
TRAINED = ("independent", "exact-256", "semidiscrete", "semidiscrete-entropic")
COUPLERS = ("independent", "exact-256", "exact-1024", "sinkhorn", "semidiscrete", "semidiscrete-entropic")
ENTROPIC = 0.01  # relative to the mean cost


class Recipe(NamedTuple):
    """How every flow of this benchmark is trained, besides the model, steps and batch: Adam's peak rate, its
    schedule (``otcfm.engine.learning_rate``) and the time sampler."""

    lr: float
    lr_schedule: LRSchedule
    time_sampler: otcfm.timesteps.TimeSampler
    about: str


#: ``--recipe``: "tuned" (the default) or "plain" (the recipe of runs before 2026-11-24's session 7). The name is
#: part of the results directory, so results of two recipes are never mixed.
RECIPES = {
    "tuned": Recipe(
        3e-3, "cosine", otcfm.timesteps.LogitNormal(-1.5, 1.0), "peak rate 3e-3, cosine decay, logit-normal times"
    ),
    "plain": Recipe(1e-3, "constant", otcfm.timesteps.Uniform(), "constant rate 1e-3, uniform times"),
}


def task_data(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """``(dataset, held_out, source)``: the finite training set, held-out target samples, and the source sampler."""
    if task == "mixture":
        data = otcfm.data.sample("mixture", n, torch.Generator().manual_seed(seed), dim=32)
        held_out = otcfm.data.sample("mixture", 2000, torch.Generator().manual_seed(seed + 1), dim=32)
    else:
        from otcfm.data.digits import load_digits

        data, held_out = load_digits("train")[0][:n], load_digits("test")[0]
    shape = tuple(data.shape[1:])

    def source(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((count, *shape), generator=generator)

    return data, held_out, source


class Pairs:
    """Draws coupled training batches ``(x0, x1)`` for one coupler: minibatch couplers or the semidiscrete one."""

    def __init__(self, name: str, data: torch.Tensor, source: Callable[..., torch.Tensor], fitted: dict) -> None:
        self.name, self.data, self.source = name, data, source
        self.batch = 1024 if name == "exact-1024" else 256
        if name.startswith("semidiscrete"):
            self.coupler = fitted[name]
        elif name == "sinkhorn":
            self.coupler = otcfm.get_coupler("sinkhorn", epsilon=0.05)
        else:
            self.coupler = otcfm.get_coupler(name.split("-")[0])

    def __call__(self, generator: torch.Generator, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch or self.batch
        x0 = self.source(b, generator)
        if isinstance(self.coupler, SemidiscreteCoupler):
            _, j = self.coupler(x0, self.data, generator=generator)
            return x0, self.data[j]
        x1 = self.data[torch.randint(self.data.shape[0], (b,), generator=generator)]
        i, j = self.coupler(x0, x1, generator=generator)
        return x0[i], x1[j]

    def coupling_ms(self, repeats: int) -> float:
        g = torch.Generator().manual_seed(0)
        x0 = self.source(self.batch, g)
        if isinstance(self.coupler, SemidiscreteCoupler):
            return median_ms(lambda: self.coupler(x0, self.data, generator=g), repeats)
        x1 = self.data[torch.randint(self.data.shape[0], (self.batch,), generator=g)]
        return median_ms(lambda: self.coupler(x0, x1, generator=g), repeats)


def pairs_of(draw: Pairs, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x0s, x1s, count = [], [], 0
    while count < n:
        x0, x1 = draw(generator)
        x0s.append(x0)
        x1s.append(x1)
        count += x0.shape[0]
    return torch.cat(x0s)[:n], torch.cat(x1s)[:n]


def train(draw: Pairs, steps: int, seed: int, recipe: Recipe) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = otcfm.models.MLP(draw.data[0].numel(), hidden=512, depth=3)
    fm = otcfm.FlowMatcher(coupler="paired", path="linear", sigma=0.0, time_sampler=recipe.time_sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(seed)
    from tqdm.auto import trange

    for step in trange(steps, desc=draw.name, unit="step", leave=False):
        x0, x1 = draw(g, 256)
        loss = fm.loss(model, x0, x1, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe.lr, recipe.lr_schedule, step, steps)
        optimizer.step()
    return model.eval()


def quality(task: str, model: nn.Module, x0: torch.Tensor, held_out: torch.Tensor, features: Any) -> dict[str, float]:
    out = {}
    for k in EULER:
        x = otcfm.integrate(model, x0, k, "euler")
        out[str(k)] = features.frechet_distance(x, held_out) if task == "digits" else w2(x, held_out)
    return out


def ott_jax_fit(data: torch.Tensor, steps: int, batch: int, mean_cost: float) -> tuple[str, torch.Tensor | None]:
    """ott-jax's semidiscrete solver on the same problem, with the same step rule as ours (``0.01 * mean_cost * N /
    sqrt(1 + k)`` on its unscaled gradient, plain SGD; it averages by an EMA of 0.99): ``(summary, potentials)``,
    or why it was not run and None."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from ott.geometry.semidiscrete_pointcloud import SemidiscretePointCloud
        from ott.problems.linear.semidiscrete_linear_problem import SemidiscreteLinearProblem
        from ott.solvers.linear.semidiscrete import SemidiscreteSolver
    except ImportError as error:
        return f"not run: ott-jax is not installed in this environment ({error.name})", None
    y = jnp.asarray(data.reshape(data.shape[0], -1).numpy())
    n = y.shape[0]
    try:
        geom = SemidiscretePointCloud(lambda key, shape, dtype=None: jax.random.normal(key, shape), y, epsilon=0.0)
        rate = optax.sgd(learning_rate=lambda k: 0.01 * mean_cost * n / jnp.sqrt(1.0 + k))
        solver = SemidiscreteSolver(num_iterations=steps, batch_size=batch, optimizer=rate, error_eval_every=steps)
        started = time.perf_counter()
        out = solver(jax.random.key(0), SemidiscreteLinearProblem(geom))
        g = out.g.block_until_ready()
        seconds = time.perf_counter() - started
    except Exception as error:  # an API of another ott-jax version
        return f"not run: ott-jax's API differs here ({type(error).__name__}: {error})", None
    import ott

    summary = f"ott-jax {ott.__version__}: {seconds:.1f} s for {steps} steps at batch {batch} (compilation included)"
    return summary, torch.as_tensor(jax.device_get(g).copy())


def append_result(results: Path, done: dict[tuple[str, str], dict], task: str, key: str, values: dict) -> None:
    """Record a finished measurement in ``done`` and append it to ``results`` (JSON lines), so a rerun resumes."""
    entry = {"task": task, "coupler": key, **values}
    done[task, key] = entry
    with results.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def run_task(task: str, args: argparse.Namespace, done: dict[tuple[str, str], dict], results: Path) -> None:
    data, held_out, source = task_data(task, args.n if task == "mixture" else 1437, seed=0)
    n = data.shape[0]

    def record(coupler: str, values: dict) -> None:
        append_result(results, done, task, coupler, values)

    fitted: dict[str, SemidiscreteCoupler] = {}
    for name, epsilon in (("semidiscrete", 0.0), ("semidiscrete-entropic", ENTROPIC)):
        coupler = SemidiscreteCoupler(epsilon=epsilon)
        path = args.out / f"{task}-{name}.pt"
        if (task, name) in done and path.exists():
            fitted[name] = SemidiscreteCoupler.load(path, target=data)
            continue
        print(f"[{task}] fitting {name} ({args.fit_steps} steps)", flush=True)
        factor = args.eval_factor if epsilon == 0 else max(1, args.eval_factor // 5)  # soft shares: less noise
        report = coupler.fit(
            source, data, steps=args.fit_steps, generator=torch.Generator().manual_seed(1), eval_samples=factor * n
        )
        coupler.save(path)
        fitted[name] = coupler
        record(
            name,
            {
                "fit_seconds": report.seconds,
                "assignment_error": report.assignment_error,
                "noise_floor": report.noise_floor,
                "dual": report.dual,
            },
        )
    w2_squared = done[task, "semidiscrete"]["dual"]
    features = otcfm.metrics.digits_features(cache=args.cache) if task == "digits" else None
    if (task, "floor") not in done:  # what a perfect sampler scores: W2 of eval_n fresh draws, or FD train vs test
        fresh = task_data(task, args.eval_n, seed=7)[0]
        record("floor", {"value": features.frechet_distance(data, held_out) if features else w2(fresh, held_out)})
    x0 = source(args.eval_n, torch.Generator().manual_seed(10_000))
    for name in COUPLERS:
        key = (task, name + ":measured")
        if key in done:
            continue
        draw = Pairs(name, data, source, fitted)
        g = torch.Generator().manual_seed(2)
        pool, evaluation = pairs_of(draw, args.pool, g), pairs_of(draw, args.pool // 4, g)
        values = {
            "coupling_ms": draw.coupling_ms(args.repeats),
            "batch": draw.batch,
            "target_variance": target_variance_of_pairs(pool, evaluation, generator=g).total,
            "cost_ratio": transport_cost_ratio(*pool, w2_squared),
        }
        if name in TRAINED or args.train_all:
            print(f"[{task}] training with {name}", flush=True)
            values["quality"] = quality(task, train(draw, args.steps, 0, RECIPES[args.recipe]), x0, held_out, features)
        record(name + ":measured", values)
    if task == "mixture" and (task, "ott-jax") not in done:
        summary, potentials = ott_jax_fit(data, args.fit_steps, 1024, fitted["semidiscrete"].mean_cost)
        if potentials is None:  # not recorded: a rerun where ott-jax is installed times it
            print(f"[{task}] ott-jax peer {summary}", flush=True)
        else:
            peer = SemidiscreteCoupler()
            peer.load_state_dict({**fitted["semidiscrete"].state_dict(), "potentials": potentials.to(data.dtype)})
            check = peer.evaluate(source, data, args.eval_factor * n, torch.Generator().manual_seed(3))
            ours = done[task, "semidiscrete"]
            record(
                "ott-jax",
                {
                    "fit": f"{summary}, assignment error {check.assignment_error:.3f}; otcfm: "
                    f"{ours['fit_seconds']:.1f} s, {ours['assignment_error']:.3f} (same steps, batch "
                    "and step rule)"
                },
            )


def tables(done: dict[tuple[str, str], dict], args: argparse.Namespace) -> str:
    parts = []
    for task in args.tasks:
        metric = "FD" if task == "digits" else "W2"
        rows = []
        for name in COUPLERS:
            m = done.get((task, name + ":measured"))
            if m is None:
                continue
            fit = done.get((task, name), {})
            q = m.get("quality", {})
            rows.append(
                [
                    name,
                    f"{fit['fit_seconds']:.1f}" if fit else "",
                    f"{fit['assignment_error']:.3f} ({fit['noise_floor']:.3f})" if fit else "",
                    f"{m['coupling_ms']:.2f} (B={m['batch']})",
                    m["target_variance"],
                    m["cost_ratio"],
                    *[f"{q[str(k)]:.2f}" if str(k) in q else "" for k in EULER],
                ]
            )
        floor = done.get((task, "floor"), {}).get("value", float("nan"))
        header = [
            "coupler",
            "fit s",
            "assignment error (noise)",
            "coupling ms/step",
            "target variance",
            "cost ratio",
            *[f"{metric} {k} step{'s' if k > 1 else ''}" for k in EULER],
        ]
        title = f"gaussian -> mixture (d = 32, N = {args.n})" if task == "mixture" else "noise -> digits (N = 1437)"
        parts.append(f"**{title}**; {metric} floor {floor:.2f}\n\n" + markdown_table(header, rows))
    peer = done.get(("mixture", "ott-jax"), {}).get("fit")
    if peer:
        parts.append(f"ott-jax semidiscrete solver on the mixture: {peer}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    parser.add_argument("--part", choices=["semidiscrete", "pools", "sinkhorn"], default="semidiscrete",
                        help="what to measure (see the docstring)")  # fmt: skip
    parser.add_argument("--pool-steps", type=int, default=1000, help="training steps of each pool set-up")
    parser.add_argument("--large-iterations", type=int, default=3, help="iterations timed at 65,536 points")
    parser.add_argument("--tasks", nargs="+", default=["mixture", "digits"], choices=["mixture", "digits"])
    parser.add_argument("--n", type=int, default=20_000, help="size of the finite mixture dataset")
    parser.add_argument("--fit-steps", type=int, default=1000, help="SGD steps of each semidiscrete fit")
    parser.add_argument("--eval-factor", type=int, default=100, help="fresh samples per data point to measure fits")
    parser.add_argument("--steps", type=int, default=4000, help="training steps of each flow")
    parser.add_argument("--train-all", action="store_true", help="also train with exact at B=1024 and Sinkhorn")
    parser.add_argument("--pool", type=int, default=4096, help="pairs of the target-variance estimate")
    parser.add_argument("--eval-n", type=int, default=1000, help="generated samples per quality evaluation")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of a coupling")
    parser.add_argument("--recipe", choices=list(RECIPES), default="tuned", help="training recipe (see the docstring)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--cache", type=Path, help="directory of the digits classifier (default: the user cache)")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.fit_steps, args.eval_factor, args.steps, args.pool, args.eval_n, args.repeats = (
            400,
            20,
            5,
            5,
            256,
            100,
            2,
        )
        args.pool_steps = 3
    torch.set_num_threads(args.threads)
    # results per training recipe; the Sinkhorn part trains nothing, so its results do not depend on one
    suffix = "" if args.part == "sinkhorn" else f"-{args.recipe}"
    args.out = args.out / f"{'quick' if args.quick else 'default'}{suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / ("results.jsonl" if args.part == "semidiscrete" else f"{args.part}.jsonl")
    done = {(r["task"], r["coupler"]): r for r in read_jsonl(results)}
    started = time.perf_counter()
    if args.part != "semidiscrete":
        return other_part(args, argv, done, results, started)
    for task in args.tasks:
        run_task(task, args, done, results)
    text = tables(done, args)
    print(f"\n{text}\n\n{time.perf_counter() - started:.0f} s this run; {machine()}")
    if args.docs is not None:
        soft_factor = max(1, args.eval_factor // 5)
        write_section(
            "scale",
            f"""## Semidiscrete OT in high dimension

Command: `{rerun_command(__file__, argv)}` ({machine()}). Fit: seconds and assignment error of the semidiscrete
potentials on {args.eval_factor} N fresh source samples (the sampling noise alone in parentheses). Coupling
milliseconds per training step: median of {args.repeats}. Target variance: the estimator of `variance.py` on
{args.pool} pairs; cost ratio: mean squared pair distance over W2^2 (the dual of the converged epsilon = 0 fit).
Quality: MLP 3x512, {args.steps} Adam steps at batch 256 per coupler (--recipe {args.recipe}:
{RECIPES[args.recipe].about}), then Euler steps; W2 to 2,000
held-out draws (mixture; floor: {args.eval_n} fresh draws of the target) or the Frechet distance of `digits.py`
(floor: train vs test). The entropic fit (epsilon {ENTROPIC} x mean cost) is measured on {soft_factor} N
samples with its expected (softmax) shares, whose noise is below the printed one. In d = 32 the W2 estimate at this n
favours samples concentrated near the modes, so few-step samples can score below the floor: read W2 there together
with the target variance and the cost ratio.

{text}
""",
            args.docs,
        )
    return 0


def other_part(args: argparse.Namespace, argv: list[str] | None, done: dict, results: Path, started: float) -> int:
    """The "pools" or "sinkhorn" part: run what is missing, print its table, and write its docs section if asked."""
    import _large_sinkhorn
    import _pools

    def record(task: str, key: str, values: dict) -> None:
        append_result(results, done, task, key, values)

    module = _pools if args.part == "pools" else _large_sinkhorn
    text = module.run(args, done, record)
    seconds = time.perf_counter() - started
    print(f"\n{text}\n\n{seconds:.0f} s this run; {machine()}")
    if args.docs is not None:
        title = "OT pools larger than the batch" if args.part == "pools" else "Sinkhorn on 10^4-10^5 points vs GeomLoss"
        about = (module.__doc__ or "").split("\n", 2)[2].strip()
        settings = (
            f"--pool-steps {args.pool_steps}, --recipe {args.recipe}"
            if args.part == "pools"
            else f"--large-iterations {args.large_iterations}"
        )
        body = (
            f"## {title}\n\nCommand: `{rerun_command(__file__, argv)}` ({machine()}; settings: {settings}).\n\n"
            f"{about}\n\n{text}\n"
        )
        write_section(f"scale-{args.part}", body, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
