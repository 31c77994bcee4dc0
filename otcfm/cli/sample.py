"""``otcfm sample``: samples of a recorded run, saved as numpy or torch, and a figure."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from otcfm import report
from otcfm.cli.runs import load_run, nameable
from otcfm.plotting import is_image_shape
from otcfm.solvers import solve

__all__ = ["sample_command"]


def sample_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for name, value in (("--out", out), ("--png", Path(args.png) if args.png else None)):
        if value is not None and (value.is_dir() or (value.parent.exists() and not value.parent.is_dir())):
            raise ValueError(f"{name}: cannot write a file at {str(value)!r}")
    model, config, source, _ = load_run(args.checkpoint, args.model, "--checkpoint")
    images = is_image_shape(source.shape)
    if args.png and not images and not nameable(config.target):
        raise ValueError(
            f"--png: the run's target, {config.target}, was given in Python; there is no reference to draw beside "
            "the samples (leave --png out, or plot them with otcfm.plotting.plot_flow)"
        )
    if args.label is not None and not config.conditional:
        raise ValueError(f"--class: the run in {args.checkpoint} is not class-conditional (trained without labels)")
    if args.guidance != 1.0 and args.label is None:
        raise ValueError("--guidance: needs --class (guidance steers towards a class)")
    x0 = source(args.n, torch.Generator().manual_seed(args.seed))
    solution = solve(model, x0, args.steps, args.method, return_trajectory=True, y=args.label, guidance=args.guidance)
    trajectory = solution.trajectory
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":  # what the name promises: a numpy file (np.load), as train reads one
        np.save(out, trajectory[-1].numpy())
    else:
        torch.save(trajectory[-1], out)
    unit = "output time" if args.method == "dopri5" else "step"  # dopri5 picks its own steps
    steps = f"{args.steps} {unit}{'s' if args.steps != 1 else ''}"
    print(f"saved {args.n} samples ({args.method}, {steps}, {solution.nfe} network evaluations) to {out}")
    if args.png and images:
        from otcfm.plotting import plot_image_grid

        which = f"class {args.label}, guidance {args.guidance:g}, " if args.label is not None else ""
        title = f"{config.target}: {which}{args.method}, {steps}"
        print(f"figure: {plot_image_grid(trajectory[-1][:128], args.png, title=title)}")
    elif args.png:
        from otcfm.plotting import plot_flow

        reference = report.data_of(config)[1](args.n, torch.Generator().manual_seed(args.seed + 1))
        print(f"figure: {plot_flow(trajectory, reference, args.png)}")
    return 0
