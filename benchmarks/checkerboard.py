"""The checkerboard study of Lipman et al. (2023): the OT (CondOT) path against the diffusion (VP) path.

    python benchmarks/checkerboard.py            # about 4 minutes on 2 CPU cores
    python benchmarks/checkerboard.py --docs     # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/checkerboard.py --quick    # seconds; for tests

Standard normal -> checkerboard, the same model (MLP 4x256), steps, batch and seed for each flow:
- "OT path": Lipman's Gaussian path x_t = t x1 + (1 - (1 - sigma_min) t) x0, independent pairs;
- "diffusion path": the variance-preserving path (beta 0.1 to 20), independent pairs;
- "OT path + OT coupling": the OT path with exact minibatch OT pairs (what otcfm adds).
For 1 to 100 Euler steps: W2 between held-out checkerboard samples and as many generated samples, and the NLL
(nats) of held-out samples computed with the same number of Euler steps (exact divergence). A PNG shows samples of
each flow against the number of steps. Each model is trained with checkpoints in OUT/<flow>, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
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
from otcfm.metrics import w2  # noqa: E402

FLOWS = {  # name: (path, coupler)
    "OT path": ("gaussian", "independent"),
    "diffusion path": ("diffusion", "independent"),
    "OT path + OT coupling": ("gaussian", "exact"),
}
STEPS = (1, 2, 4, 8, 16, 100)


def figure(samples: dict[str, dict[int, torch.Tensor]], path: Path) -> Path:
    plt = pyplot()
    rows, cols = len(samples), len(STEPS)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for r, (name, by_steps) in enumerate(samples.items()):
        for c, k in enumerate(STEPS):
            ax = axes[r][c]
            x = by_steps[k].numpy()
            ax.scatter(x[:, 0], x[:, 1], s=0.5, color="black", alpha=0.5)
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-4.5, 4.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{k} Euler step{'s' if k > 1 else ''}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=4000, help="training steps per flow")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-n", type=int, default=2000, help="held-out samples for W2 and NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/checkerboard"))
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_n = 30, 64, 200
    args.out = args.out / ("quick" if args.quick else "default")
    started = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed + 12345)
    x0 = otcfm.data.sample("gaussian", args.eval_n, g)
    reference = otcfm.data.sample("checkerboard", args.eval_n, g)
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    samples: dict[str, dict[int, torch.Tensor]] = {}
    for name, (path, coupler) in tqdm(FLOWS.items(), desc="flows", unit="flow"):
        config = otcfm.TrainConfig(
            source="gaussian",
            target="checkerboard",
            coupler=coupler,
            path=path,
            steps=args.steps,
            batch_size=args.batch_size,
            hidden=256,
            depth=4,
            seed=args.seed,
        )
        out = args.out / name.replace(" ", "-").replace("+", "and")
        model = otcfm.train(config, out=out, resume=True, progress=False).model
        w2s, nlls, samples[name] = {}, {}, {}
        for k in STEPS:
            samples[name][k] = otcfm.integrate(model, x0, k, "euler")
            w2s[k] = w2(samples[name][k], reference)
            nlls[k] = -float(otcfm.likelihood(model, reference, steps=k, method="euler").log_prob.mean())
        results[name] = {"w2": w2s, "nll": nlls}
        print(name, {k: f"{v:.3f}" for k, v in w2s.items()}, {k: f"{v:.3f}" for k, v in nlls.items()})
    floor = w2(otcfm.data.sample("checkerboard", args.eval_n, g), reference)
    png = figure(samples, args.out / "checkerboard.png")
    seconds = time.perf_counter() - started
    (args.out / "checkerboard.json").write_text(json.dumps({"results": results, "w2_floor": floor}, indent=1))
    header = ["flow", *(f"@{k}" for k in STEPS)]
    w2_table = markdown_table(header, [[n, *(f"{r['w2'][k]:.3f}" for k in STEPS)] for n, r in results.items()])
    nll_table = markdown_table(header, [[n, *(f"{r['nll'][k]:.3f}" for k in STEPS)] for n, r in results.items()])
    print(f"\nW2 vs Euler steps\n{w2_table}\n\nNLL (nats) vs Euler steps\n{nll_table}")
    print(f"\nW2 between two checkerboard samples of {args.eval_n}: {floor:.3f}; {seconds:.0f} s; figure: {png}")
    if args.docs is not None:
        publish_figure(png, args.docs)
        body = f"""## The checkerboard study: OT path vs diffusion path

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s). Measured {machine()}. Standard normal ->
checkerboard; each flow: MLP 4x256, {args.steps} Adam steps at batch {args.batch_size}, seed {args.seed}. OT path:
Lipman et al.'s Gaussian path (sigma_min 1e-4); diffusion path: variance preserving (beta 0.1 to 20); both with
independent pairs, the third row adds exact minibatch OT pairs. {args.eval_n} held-out samples; W2 of two
checkerboard samples of that size (the floor): {floor:.3f}.

W2 against the number of Euler steps:

{w2_table}

NLL (nats per sample) of held-out samples, computed with the same number of Euler steps (exact divergence; the
diffusion path's source is standard normal up to 0.0066 x1):

{nll_table}

![samples of each flow against the number of Euler steps](figures/checkerboard.png)
"""
        print(f"written to {write_section('checkerboard', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
