"""Path crossing and straightness by coupler: the segments figure, crossing rate and swap fraction vs batch size,
straightness and NPE of trained flows, and W2 at 1, 2, 4, 8 and 100 Euler steps.

    python benchmarks/crossing.py            # about a minute on 2 CPU cores; prints, writes under --out
    python benchmarks/crossing.py --docs     # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/crossing.py --quick    # seconds; for tests
"""

from __future__ import annotations

import argparse
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
from otcfm.metrics import crossing_rate, flow_statistics, swap_fraction, w2_by_steps  # noqa: E402

STEPS = (1, 2, 4, 8, 100)


def segments_figure(couplers: list[str], source: str, target: str, n: int, seed: int, path: Path) -> Path:
    plt = pyplot()
    g = torch.Generator().manual_seed(seed)
    x0, x1 = otcfm.data.sample(source, n, g), otcfm.data.sample(target, n, g)
    fig, axes = plt.subplots(1, len(couplers), figsize=(4.2 * len(couplers), 4.2), squeeze=False)
    for ax, name in zip(axes[0], couplers, strict=True):
        i, j = otcfm.get_coupler(name)(x0, x1, generator=torch.Generator().manual_seed(seed))
        a, b = x0[i].numpy(), x1[j].numpy()
        ax.plot([a[:, 0], b[:, 0]], [a[:, 1], b[:, 1]], color="gray", alpha=0.5, linewidth=0.6)
        ax.scatter(a[:, 0], a[:, 1], s=4, color="black", label="x0")
        ax.scatter(b[:, 0], b[:, 1], s=4, color="tab:blue", label="x1")
        ax.set_title(f"{name}: {100 * crossing_rate(x0[i], x1[j]):.1f}% of pairs cross", fontsize=10)
        ax.set_aspect("equal")
    axes[0][0].legend(loc="upper right", markerscale=3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--source", default="8gaussians")
    parser.add_argument("--target", default="moons")
    parser.add_argument("--couplers", nargs="+", default=["independent", "sinkhorn", "exact"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/crossing"))
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.train_steps, args.eval_n = [32], 20, 200
    from tqdm.auto import tqdm

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    geometry_rows = []
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(args.seed + b)
        x0, x1 = otcfm.data.sample(args.source, b, g), otcfm.data.sample(args.target, b, g)
        for name in args.couplers:
            i, j = otcfm.get_coupler(name)(x0, x1, generator=g)
            geometry_rows.append([b, name, f"{crossing_rate(x0[i], x1[j]):.4f}", f"{swap_fraction(x0[i], x1[j]):.4f}"])
    geometry = markdown_table(["batch", "coupler", "crossing rate", "swap fraction"], geometry_rows)
    print(geometry)

    held_out = torch.Generator().manual_seed(args.seed + 7)
    x0 = otcfm.data.sample(args.source, args.eval_n, held_out)
    reference = otcfm.data.sample(args.target, args.eval_n, held_out)
    flow_rows = []
    for name in tqdm(args.couplers, desc="train", unit="coupler"):
        config = otcfm.TrainConfig(
            source=args.source, target=args.target, coupler=name, steps=args.train_steps, seed=args.seed
        )
        model = otcfm.train(config, progress=False).sampling_model
        stats = flow_statistics(model, x0, 100, reference)
        w2 = w2_by_steps(model, x0, reference, STEPS)
        flow_rows.append([name, f"{stats.straightness:.4f}", f"{stats.npe:.3f}", *(f"{w2[k]:.3f}" for k in STEPS)])
    flows = markdown_table(["coupler", "straightness", "NPE", *(f"W2 @{k}" for k in STEPS)], flow_rows)
    print(flows)
    png = segments_figure(args.couplers, args.source, args.target, 64, args.seed, args.out / "segments.png")
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s; figure: {png}")
    if args.docs is not None:
        publish_figure(png, args.docs)
        body = f"""## Path crossing and straightness by coupler

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s). Measured {machine()}. Task {args.source} -> {args.target}.

Coupled segments of one batch (crossing rate and swap fraction: fraction of pairs of couples whose segments
cross, and whose swap would lower the squared cost):

{geometry}

Flows trained {args.train_steps} steps (batch 256, MLP 3x256, linear path, sigma 0, seed {args.seed}); straightness
and NPE from 100 Euler steps; W2 on {args.eval_n} held-out samples at 1 to 100 Euler steps:

{flows}

![coupled segments](figures/segments.png)
"""
        print(f"written to {write_section('crossing', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
