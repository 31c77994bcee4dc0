"""Headline benchmark: what a coupling does to the regression target and to the gradient.

    python benchmarks/variance.py            # defaults: about 2-3 minutes on 2 CPU cores
    python benchmarks/variance.py --docs     # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/variance.py --quick    # seconds; for tests

For each task x coupler x batch size: the target variance (irreducible CFM loss; the same for every model),
and the trace of the minibatch gradient covariance at initialisation and after a short training run.
Prints a table with ratios to independent coupling, saves a log-scale PNG, and writes the raw numbers to
OUT/variance.json and OUT/variance.csv after every configuration; --resume skips configurations already there.
Nothing outside OUT is written unless --docs is given.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    publish_figure,
    pyplot,
    rerun_command,
    save_figure,
    write_section,
)

import otcfm  # noqa: E402
from otcfm.metrics import gradient_variance, target_variance  # noqa: E402

TASKS = {
    "8gaussians->moons": ("8gaussians", "moons", {}),
    "gaussian->checkerboard": ("gaussian", "checkerboard", {}),
    "gaussian->mixture (d=32)": ("gaussian", "mixture", {"dim": 32}),
}


def samplers(task: str) -> tuple[otcfm.data.Sampler, otcfm.data.Sampler, int]:
    source, target, options = TASKS[task]

    def draw_source(n: int, g: torch.Generator) -> torch.Tensor:
        return otcfm.data.sample(source, n, g, **options)

    def draw_target(n: int, g: torch.Generator) -> torch.Tensor:
        return otcfm.data.sample(target, n, g, **options)

    return draw_source, draw_target, options.get("dim", 2)


def train_short(fm: otcfm.FlowMatcher, model: torch.nn.Module, source, target, steps: int, seed: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        loss = fm.loss(model, source(256, g), target(256, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(results: dict, out: Path) -> None:
    """Atomic write of the JSON and CSV of all finished configurations."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".variance.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "variance.json")
    rows = list(results["rows"].values())
    if rows:
        tmp = out / ".variance.csv.tmp"
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out / "variance.csv")


def plot(results: dict, tasks: list[str], couplers: list[str], path: Path) -> Path:
    plt = pyplot()
    rows = list(results["rows"].values())
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for row, (key, label) in enumerate(
            (("target_variance", "target variance"), ("grad_var_trained", "gradient trVar (trained)"))
        ):
            ax = axes[row][col]
            for coupler in couplers:
                pts = sorted((r["batch_size"], r[key]) for r in rows if r["task"] == task and r["coupler"] == coupler)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=coupler)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_title(task, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--couplers", nargs="+", default=["independent", "sinkhorn", "exact"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--seeds", type=int, default=1, help="repeats with different seeds, averaged")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--grad-batches", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/variance"))
    parser.add_argument("--resume", action="store_true", help="keep finished configurations of OUT/variance.json")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.batch_sizes, args.train_steps, args.grad_batches = args.tasks[:1], [32], 20, 3
    pool, n_eval, times = (256, 128, (0.25, 0.75)) if args.quick else (2048, 512, (0.1, 0.3, 0.5, 0.7, 0.9))
    from tqdm.auto import tqdm

    started = time.perf_counter()
    results = {"rows": {}}
    if args.resume and (args.out / "variance.json").is_file():
        results = json.loads((args.out / "variance.json").read_text())
    configs = [(s, task, c) for s in range(args.seeds) for task in args.tasks for c in args.couplers]
    for seed, task, coupler in tqdm(configs, desc="variance", unit="config"):
        keys = [f"{seed}|{task}|{coupler}|{b}" for b in args.batch_sizes]
        if all(k in results["rows"] for k in keys):
            continue
        source, target, dim = samplers(task)
        fm = otcfm.FlowMatcher(coupler=coupler)
        torch.manual_seed(seed)  # the same initial model for every coupler
        initial = otcfm.models.MLP(dim, hidden=128, depth=3)
        trained = copy.deepcopy(initial)
        train_short(fm, trained, source, target, args.train_steps, seed)
        for key, b in zip(keys, args.batch_sizes, strict=True):
            g = torch.Generator().manual_seed(1000 * seed + b)
            tv = target_variance(fm, source, target, b, times=times, n_pool=pool, n_eval=n_eval, generator=g)
            gv0 = gradient_variance(fm, initial, source, target, b, args.grad_batches, g)
            gv1 = gradient_variance(fm, trained, source, target, b, args.grad_batches, g)
            results["rows"][key] = {
                "seed": seed,
                "task": task,
                "coupler": coupler,
                "batch_size": b,
                "target_variance": tv.total,
                "grad_var_init": gv0.trace,
                "grad_var_trained": gv1.trace,
                "noise_scale_trained": gv1.noise_scale,
            }
        _save(results, args.out)

    # Mean over seeds, then ratios to independent coupling at the same task and batch size.
    table: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in results["rows"].values():
        if r["task"] in args.tasks and r["coupler"] in args.couplers and r["batch_size"] in args.batch_sizes:
            acc = table.setdefault((r["task"], r["coupler"], r["batch_size"]), {})
            for k in ("target_variance", "grad_var_init", "grad_var_trained", "noise_scale_trained"):
                acc.setdefault(k, []).append(r[k])
    mean = {key: {k: sum(v) / len(v) for k, v in acc.items()} for key, acc in table.items()}
    rows = []
    for task in args.tasks:
        for coupler in args.couplers:
            for b in args.batch_sizes:
                m, ref = mean[(task, coupler, b)], mean.get((task, "independent", b))

                def ratio(k: str, m: dict = m, ref: dict | None = ref) -> str:
                    return f"{m[k] / ref[k]:.3f}" if ref else "-"

                rows.append(
                    [
                        task,
                        coupler,
                        b,
                        f"{m['target_variance']:.4g}",
                        ratio("target_variance"),
                        f"{m['grad_var_init']:.3g}",
                        ratio("grad_var_init"),
                        f"{m['grad_var_trained']:.3g}",
                        ratio("grad_var_trained"),
                    ]
                )
    header = [
        "task",
        "coupler",
        "batch",
        "target var.",
        "/ indep.",
        "grad trVar (init)",
        "/ indep.",
        "grad trVar (trained)",
        "/ indep.",
    ]
    text = markdown_table(header, rows)
    seconds = time.perf_counter() - started
    png = plot(results, args.tasks, args.couplers, args.out / "variance.png")
    print(text)
    print(f"\n{seconds:.0f} s; raw numbers: {args.out / 'variance.json'}, {args.out / 'variance.csv'}; plot: {png}")
    if args.docs is not None:
        publish_figure(png, args.docs)
        command = rerun_command(__file__, argv)
        body = f"""## Target and gradient variance by coupler and batch size

Command: `{command}` ({seconds:.0f} s). Measured {machine()}. Seeds: {args.seeds}. Linear path, sigma = 0,
uniform t. Target variance: {pool} coupled pairs estimate the marginal velocity at {n_eval} other coupled pairs,
t in {list(times)} (see the definition below). Gradient variance: {args.grad_batches} minibatches, MLP 3x128,
at initialisation (the same weights for every coupler) and after {args.train_steps} Adam steps at batch 256
with that coupler. Ratios are to independent coupling at the same task and batch size.

{text}

![variance vs batch size](figures/variance.png)
"""
        print(f"written to {write_section('variance', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
