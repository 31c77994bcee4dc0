"""Reflow benchmark: I-CFM and OT-CFM teachers, their 2-rectified flows, and distilled one-step generators.

    python benchmarks/reflow.py            # about 8 minutes on 2 CPU cores (3 teachers x 2 tasks)
    python benchmarks/reflow.py --docs     # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/reflow.py --quick    # seconds; for tests

For each task and teacher coupler: W2 (n held-out samples) at 1, 2, 4, 8 and 100 Euler steps and with the
adaptive dopri5 solver (when torchdyn is installed), straightness, and the wall time of each stage.
Results are saved after every (task, teacher) to OUT/reflow.json; --resume skips finished ones.
"""

from __future__ import annotations

import argparse
import copy
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
from otcfm import reflow  # noqa: E402
from otcfm.metrics import flow_statistics, w2, w2_by_steps  # noqa: E402

STEPS = (1, 2, 4, 8, 100)
TASKS = {"8gaussians->moons": ("8gaussians", "moons"), "gaussian->checkerboard": ("gaussian", "checkerboard")}


def _adaptive_w2(model: torch.nn.Module, x0: torch.Tensor, reference: torch.Tensor) -> tuple[float, int] | None:
    try:
        solution = otcfm.solve(model, x0, steps=1, method="dopri5", atol=1e-5, rtol=1e-5)
    except ImportError:
        return None
    return w2(solution.x, reference), solution.nfe


def evaluate(model: torch.nn.Module, x0: torch.Tensor, reference: torch.Tensor) -> dict:
    adaptive = _adaptive_w2(model, x0, reference)
    one_step = otcfm.integrate(model, x0[:600], 1)
    return {
        "one_step_samples": one_step.tolist(),
        "w2": {str(k): v for k, v in w2_by_steps(model, x0, reference, STEPS).items()},
        "w2_adaptive": adaptive[0] if adaptive else None,
        "nfe_adaptive": adaptive[1] if adaptive else None,
        "straightness": flow_statistics(model, x0, 100).straightness,
    }


def run(task: str, coupler: str, args: argparse.Namespace) -> dict:
    source, target = TASKS[task]
    held_out = torch.Generator().manual_seed(args.seed + 99)
    x0, reference = otcfm.data.sample(source, args.eval_n, held_out), otcfm.data.sample(target, args.eval_n, held_out)
    stages, seconds = {}, {}
    start = time.perf_counter()
    config = otcfm.TrainConfig(source=source, target=target, coupler=coupler, steps=args.train_steps, seed=args.seed)
    teacher = otcfm.train(config, progress=False).model
    seconds["train"] = time.perf_counter() - start
    stages["1-rectified (teacher)"] = evaluate(teacher, x0, reference)

    start = time.perf_counter()
    pairs = reflow.generate_pairs(teacher, source, args.pairs, 100, "rk4", seed=args.seed, progress=False)
    seconds["pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    student = reflow.train_on_pairs(pairs, copy.deepcopy(teacher), args.train_steps, seed=args.seed, progress=False)
    seconds["reflow"] = time.perf_counter() - start
    stages["2-rectified"] = evaluate(student, x0, reference)

    start = time.perf_counter()
    pairs2 = reflow.generate_pairs(student, source, args.pairs, 100, "rk4", seed=args.seed + 1, progress=False)
    one_step = reflow.distill(copy.deepcopy(student), pairs2, args.train_steps, seed=args.seed, progress=False)
    seconds["distill"] = time.perf_counter() - start
    stages["distilled one-step"] = evaluate(one_step, x0, reference)
    return {"stages": stages, "seconds": seconds}


def figure(results: dict, tasks: list[str], couplers: list[str], path: Path) -> Path:
    """One-step (single Euler step) samples of every stage beside the target."""
    plt = pyplot()
    keys = [(t, c) for t in tasks for c in couplers]
    stages = list(results[f"{keys[0][0]}|{keys[0][1]}"]["stages"])
    fig, axes = plt.subplots(len(keys), len(stages), figsize=(3.3 * len(stages), 3.3 * len(keys)), squeeze=False)
    for row, (task, coupler) in enumerate(keys):
        result = results[f"{task}|{coupler}"]
        for col, stage in enumerate(stages):
            ax = axes[row][col]
            pts = torch.tensor(result["stages"][stage]["one_step_samples"])
            w2_one = result["stages"][stage]["w2"]["1"]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6)
            ax.set_title(f"{task}\n{coupler}: {stage}\n1 Euler step, W2 {w2_one:.2f}", fontsize=8)
            ax.set_aspect("equal")
    return save_figure(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--couplers", nargs="+", default=["independent", "sinkhorn", "exact"])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/reflow"))
    parser.add_argument("--resume", action="store_true")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.couplers, args.train_steps, args.pairs, args.eval_n = args.tasks[:1], ["exact"], 10, 64, 100
    from tqdm.auto import tqdm

    started = time.perf_counter()
    path = args.out / "reflow.json"
    results = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    for task in tqdm(args.tasks, desc="tasks"):
        for coupler in args.couplers:
            key = f"{task}|{coupler}"
            if key not in results:
                results[key] = run(task, coupler, args)
                args.out.mkdir(parents=True, exist_ok=True)
                tmp = args.out / ".reflow.json.tmp"
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, path)
    rows, time_rows = [], []
    for task in args.tasks:
        for coupler in args.couplers:
            result = results[f"{task}|{coupler}"]
            teacher_name = {"independent": "I-CFM", "exact": "OT-CFM", "sinkhorn": "Sinkhorn-CFM"}.get(coupler, coupler)
            for stage, m in result["stages"].items():
                adaptive = "-" if m["w2_adaptive"] is None else f"{m['w2_adaptive']:.3f} ({m['nfe_adaptive']})"
                rows.append(
                    [
                        task,
                        teacher_name,
                        stage,
                        f"{m['straightness']:.4f}",
                        *(f"{m['w2'][str(k)]:.3f}" for k in STEPS),
                        adaptive,
                    ]
                )
            s = result["seconds"]
            time_rows.append([task, teacher_name, *(f"{s[k]:.1f}" for k in ("train", "pairs", "reflow", "distill"))])
    header = ["task", "teacher", "model", "straightness", *(f"W2 @{k}" for k in STEPS), "W2 dopri5 (NFE)"]
    table = markdown_table(header, rows)
    timing = markdown_table(
        ["task", "teacher", "train s", "pairs s", "reflow s", "distill s (pairs + training)"], time_rows
    )
    seconds = time.perf_counter() - started
    print(table)
    print(timing)
    png = figure(results, args.tasks, args.couplers, args.out / "reflow.png")
    print(f"\n{seconds:.0f} s; raw numbers: {path}; figure: {png}")
    if args.docs is not None:
        publish_figure(png, args.docs)
        body = f"""## Reflow: 2-rectified flows and one-step distillation

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s). Measured {machine()}. Teachers: {args.train_steps} Adam
steps, batch 256, MLP 3x256, linear path, sigma 0 (I-CFM: independent coupling, OT-CFM: exact, Sinkhorn-CFM:
entropic OT at epsilon 0.05 x mean cost). 2-rectified:
{args.pairs} pairs from the teacher (rk4, 100 steps), {args.train_steps} steps warm-started from the teacher.
Distilled: {args.pairs} pairs from the 2-rectified flow, {args.train_steps} steps of the one-step L2 loss
`||x0 + v(x0, 0) - x1||^2`, warm-started from the 2-rectified flow. W2 on {args.eval_n} held-out samples (its
floor, two target draws of that size, is about 0.2-0.3); straightness from 100 Euler steps.

{table}

Wall time of each stage (seconds):

{timing}

![one-step samples of each stage](figures/reflow.png)
"""
        print(f"written to {write_section('reflow', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
