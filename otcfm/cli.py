"""The ``otcfm`` command: ``otcfm train``, ``otcfm sample``, ``otcfm reflow`` and ``otcfm distill``."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from otcfm import distributed, metrics, reflow
from otcfm.couplers import COUPLERS
from otcfm.data import DATASETS, sample
from otcfm.paths import PATHS
from otcfm.solvers import METHODS, integrate
from otcfm.timesteps import TIME_SAMPLERS
from otcfm.training import CHECKPOINT_NAME, TrainConfig, load_model, train, write_checkpoint

__all__ = ["main"]

EVAL_STEPS = (1, 2, 4, 8, 100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otcfm", description="Flow matching with minibatch OT couplings.")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    tr = commands.add_parser("train", help="train a 2-D flow, save checkpoint + PNG, print W2 vs Euler steps")
    tr.add_argument("--source", default=defaults.source, choices=sorted(DATASETS))
    tr.add_argument("--target", default=defaults.target, choices=sorted(DATASETS))
    tr.add_argument("--coupler", default=defaults.coupler, choices=sorted(COUPLERS))
    tr.add_argument("--path", default=defaults.path, choices=sorted(PATHS))
    tr.add_argument("--sigma", type=float, default=defaults.sigma, help="the path's noise parameter")
    tr.add_argument("--time-sampler", default=defaults.time_sampler, choices=sorted(TIME_SAMPLERS))
    tr.add_argument("--steps", type=int, default=defaults.steps)
    tr.add_argument("--batch-size", type=int, default=defaults.batch_size)
    tr.add_argument("--lr", type=float, default=defaults.lr)
    tr.add_argument("--hidden", type=int, default=defaults.hidden)
    tr.add_argument("--depth", type=int, default=defaults.depth)
    tr.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    tr.add_argument("--seed", type=int, default=defaults.seed)
    tr.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    tr.add_argument(
        "--global-coupling",
        action="store_true",
        help="under torchrun: couple the batches of all ranks as one OT problem (default: each rank its own)",
    )
    tr.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--eval-n", type=int, default=2000, help="samples per draw for the W2 table (default 2000)")
    tr.add_argument("--eval-draws", type=int, default=3, help="held-out draws averaged in the W2 table (default 3)")
    tr.add_argument("--no-progress", action="store_true")

    for name, helptext in (
        ("reflow", "generate pairs with a trained run, train the 2-rectified flow on them"),
        ("distill", "generate pairs with a trained run, distill a one-step generator"),
    ):
        rf = commands.add_parser(name, help=helptext)
        rf.add_argument("--teacher", required=True, help="run directory or checkpoint.pt of the teacher")
        rf.add_argument("--pairs", type=int, default=20_000, help="number of (noise, sample) pairs")
        rf.add_argument("--out", required=True, help="output directory (pairs in OUT/pairs, resumable)")
        rf.add_argument("--solver-steps", type=int, default=100, help="teacher ODE steps per pair")
        rf.add_argument("--method", default="rk4", choices=METHODS)
        rf.add_argument("--train-steps", type=int, default=2000)
        rf.add_argument("--batch-size", type=int, default=256)
        rf.add_argument("--lr", type=float, default=1e-3)
        rf.add_argument("--seed", type=int, default=0)
        rf.add_argument("--eval-n", type=int, default=2000)
        rf.add_argument("--eval-draws", type=int, default=3)
        rf.add_argument("--no-progress", action="store_true")
        if name == "reflow":
            rf.add_argument("--time-sampler", default="uniform", choices=sorted(TIME_SAMPLERS))
        else:
            rf.add_argument("--loss", default="l2", choices=["l2", "pseudo_huber"])

    sa = commands.add_parser("sample", help="sample from a checkpoint")
    sa.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run directory")
    sa.add_argument("--n", type=int, default=2000)
    sa.add_argument("--steps", type=int, default=100)
    sa.add_argument("--method", default="euler", choices=METHODS)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", required=True, help="output .pt file of the (n, d) samples")
    sa.add_argument("--png", help="also save a PNG of trajectories and samples")
    return parser


def _evaluate(
    model: torch.nn.Module, config: TrainConfig, n: int, draws: int, out: Path, stage: str = ""
) -> dict[str, Any]:
    """W2 vs Euler steps over `draws` held-out draws (mean and std), a reference floor, and the PNG."""
    held_out = torch.Generator().manual_seed(config.seed + 1_000_003)
    per_draw: dict[int, list[float]] = {k: [] for k in EVAL_STEPS}
    floors = []
    for _ in range(draws):
        x0 = sample(config.source, n, held_out)
        reference = sample(config.target, n, held_out)
        floors.append(metrics.w2(sample(config.target, n, held_out), reference))
        for k, value in metrics.w2_by_steps(model, x0, reference, EVAL_STEPS, "euler").items():
            per_draw[k].append(value)
    trajectory = integrate(model, x0, 100, "euler", return_trajectory=True)
    from otcfm.plotting import plot_flow

    title = f"{config.source} -> {config.target}, coupler={config.coupler}, path={config.path}{stage}"
    png = plot_flow(trajectory, reference, out / "samples.png", title=title)
    return {
        "n": n,
        "draws": draws,
        "method": "euler",
        "w2": {str(k): _mean_std(v) for k, v in per_draw.items()},
        "w2_floor": _mean_std(floors),
        "png": str(png),
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std()) if len(values) > 1 else 0.0
    return {"mean": float(tensor.mean()), "std": std}


def _print_table(result: dict[str, Any], config: TrainConfig) -> None:
    print(
        f"W2 vs Euler steps: {config.source} -> {config.target}, coupler={config.coupler}, path={config.path}, "
        f"n={result['n']} held-out samples, mean +- std over {result['draws']} draws"
    )
    print("| Euler steps | W2 |")
    print("|---:|---:|")
    for k, v in result["w2"].items():
        print(f"| {k} | {v['mean']:.3f} +- {v['std']:.3f} |")
    floor = result["w2_floor"]
    print(f"(W2 between two independent target samples of the same size: {floor['mean']:.3f} +- {floor['std']:.3f})")


def _train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        source=args.source,
        target=args.target,
        coupler=args.coupler,
        path=args.path,
        sigma=args.sigma,
        time_sampler=args.time_sampler,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        depth=args.depth,
        ema_decay=args.ema_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        global_coupling=args.global_coupling,
    )
    out = Path(args.out)
    started = time.perf_counter()
    result = train(config, out=out, resume=args.resume, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    if distributed.world()[0] > 0:
        return 0  # rank 0 evaluates and reports
    print(f"trained {config.steps} steps in {seconds:.1f} s; checkpoint: {out / 'checkpoint.pt'}")
    evaluation = _evaluate(result.sampling_model, config, args.eval_n, args.eval_draws, out)
    evaluation["train_seconds"] = seconds
    (out / "w2.json").write_text(json.dumps(evaluation, indent=2))
    _print_table(evaluation, config)
    print(f"figure: {evaluation['png']}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    model, config = load_model(args.checkpoint)
    x0 = sample(config.source, args.n, torch.Generator().manual_seed(args.seed))
    trajectory = integrate(model, x0, args.steps, args.method, return_trajectory=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trajectory[-1], out)
    print(f"saved {args.n} samples ({args.method}, {args.steps} steps) to {out}")
    if args.png:
        from otcfm.plotting import plot_flow

        reference = sample(config.target, args.n, torch.Generator().manual_seed(args.seed + 1))
        print(f"figure: {plot_flow(trajectory, reference, args.png)}")
    return 0


def _reflow(args: argparse.Namespace) -> int:
    """``otcfm reflow`` and ``otcfm distill``: pairs from the teacher, then the student's training."""
    teacher, config = load_model(args.teacher)
    out = Path(args.out)
    started = time.perf_counter()
    pairs = reflow.generate_pairs(
        teacher,
        config.source,
        args.pairs,
        args.solver_steps,
        args.method,
        out / "pairs",
        seed=args.seed,
        progress=not args.no_progress,
    )
    student = copy.deepcopy(teacher)
    common = {
        "steps": args.train_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    if args.command == "reflow":
        reflow.train_on_pairs(pairs, student, time_sampler=args.time_sampler, **common)
    else:
        reflow.distill(student, pairs, loss=args.loss, **common)
    seconds = time.perf_counter() - started
    if distributed.world()[0] > 0:
        return 0  # rank 0 writes the checkpoint, evaluates and reports
    write_checkpoint(
        out / CHECKPOINT_NAME,
        config,
        student,
        step=args.train_steps,
        reflow={"stage": args.command, "pairs": pairs.meta},
    )
    print(
        f"{args.command}: {args.pairs} pairs and {args.train_steps} steps in {seconds:.1f} s; "
        f"checkpoint: {out / CHECKPOINT_NAME}"
    )
    evaluation = _evaluate(student, config, args.eval_n, args.eval_draws, out, f" ({args.command})")
    evaluation["seconds"] = seconds
    (out / "w2.json").write_text(json.dumps(evaluation, indent=2))
    _print_table(evaluation, config)
    print(f"figure: {evaluation['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    commands = {"train": _train, "sample": _sample, "reflow": _reflow, "distill": _reflow}
    launched = distributed.init_from_env()  # under torchrun: one process group for the whole command
    code = None
    try:
        code = commands[args.command](args)
        return code
    except KeyboardInterrupt:
        print("interrupted; finished steps are saved, rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"otcfm: error: {error}", file=sys.stderr)
        return 2
    finally:
        if launched:  # ranks that finished wait for each other (rank 0 evaluates after the others return)
            distributed.shutdown(wait_for_all=code is not None)


if __name__ == "__main__":
    sys.exit(main())
