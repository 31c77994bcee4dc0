"""Real data: scikit-learn's digits (8x8 images), noise -> digits with independent, exact and Sinkhorn couplings,
and a Reflow + distillation one-step generator. Needs the ``digits`` extra (scikit-learn).

    python benchmarks/digits.py            # about 16 minutes on 2 CPU cores (3 seeds)
    python benchmarks/digits.py --docs     # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/digits.py --quick    # seconds; for tests

Quality: the Frechet distance (FD) between features of generated and held-out test images, the features being
the penultimate layer of a small classifier trained once on the train split (cached; its test accuracy is
printed), and W2 in pixel space; both against the number of Euler steps. Every flow: MLP 3x512 on the 64 pixels,
linear path (sigma 0), Adam lr 1e-3, standard normal source. "2-RF" is trained on rk4 pairs of the exact-OT flow,
"distilled" is the 2-RF model distilled into one step on the same pairs. Finished (seed, method) results are
appended to OUT/results.jsonl and models saved, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    publish_figure,
    pyplot,
    read_jsonl,
    rerun_command,
    save_figure,
    write_section,
)

import otcfm  # noqa: E402
from otcfm import checkpoint, reflow  # noqa: E402
from otcfm.metrics import DigitsFeatures, digits_features, w2  # noqa: E402

COUPLED = ("independent", "exact", "sinkhorn")
METHODS = (*COUPLED, "2-RF", "distilled")
STEPS = (1, 2, 4, 8, 16, 100)


def noise(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal images ``(n, 1, 8, 8)``: the source."""
    return torch.randn(n, 1, 8, 8, generator=generator)


def new_model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return otcfm.models.MLP(64, hidden=512, depth=3)


def fit(coupler: str, steps: int, batch: int, seed: int) -> nn.Module:
    """Flow matching from noise to the digits' train split with ``coupler``."""
    fm = otcfm.FlowMatcher(coupler=coupler, path="linear", sigma=0.0)
    model, g = new_model(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    from tqdm.auto import trange

    for _ in trange(steps, desc=coupler, unit="step", leave=False):
        x1 = otcfm.data.sample("digits", batch, g)
        loss = fm.loss(model, noise(batch, g), x1, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def evaluate(model: nn.Module, features: DigitsFeatures, test: torch.Tensor, x0: torch.Tensor, method: str) -> dict:
    steps = (1,) if method == "distilled" else STEPS
    fd, pixel_w2 = {}, {}
    for k in steps:
        x = otcfm.integrate(model, x0, k, "euler")
        fd[str(k)], pixel_w2[str(k)] = features.frechet_distance(x, test), w2(x, test)
    return {"fd": fd, "w2": pixel_w2}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def grid(models: dict[str, nn.Module], x0: torch.Tensor, path: Path) -> Path:
    plt = pyplot()
    rows = [(m, k) for m in models for k in ((1,) if m == "distilled" else (1, 100))]
    cols = 12
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.7, len(rows) * 0.8), squeeze=False)
    for r, (method, k) in enumerate(rows):
        images = otcfm.integrate(models[method], x0[:cols], k, "euler").clamp(-1, 1)
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(f"{method}\n{k} step{'s' if k > 1 else ''}", fontsize=7, rotation=0, ha="right")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4000, help="training steps of each flow and stage")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=10_000, help="Reflow pairs from the exact-OT flow")
    parser.add_argument("--eval-n", type=int, default=1000, help="generated images per evaluation")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--cache", type=Path, help="directory of the cached classifier (default: the user cache)")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.pairs, args.eval_n = 1, 20, 32, 256, 200
    out = args.out / ("quick" if args.quick else "default")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    features = digits_features(cache=args.cache)
    print(f"feature classifier: test accuracy {features.accuracy:.4f}")
    test, _ = otcfm.data.load_digits("test")
    train, _ = otcfm.data.load_digits("train")
    floor = {"fd": features.frechet_distance(train, test), "w2": w2(train[: args.eval_n], test)}
    results_file = out / "results.jsonl"
    rows = read_jsonl(results_file)
    done = {(r["seed"], r["method"]) for r in rows}
    models: dict[str, nn.Module] = {}
    for seed in range(args.seeds):
        x0 = noise(args.eval_n, torch.Generator().manual_seed(10_000 + seed))
        for method in METHODS:
            model_file = out / "models" / f"{method}-{seed}.pt"
            if model_file.is_file():
                model = new_model(seed)
                model.load_state_dict(checkpoint.load(model_file))
            elif method in COUPLED:
                model = fit(method, args.steps, args.batch_size, seed)
            else:
                teacher = models["exact"]
                pairs = reflow.generate_pairs(
                    teacher, noise, args.pairs, 100, "rk4", out / "pairs" / f"seed-{seed}", seed=seed, progress=False
                )
                if method == "2-RF":
                    model = reflow.train_on_pairs(
                        pairs, copy.deepcopy(teacher), args.steps, args.batch_size, seed=seed, progress=False
                    )
                else:
                    model = reflow.distill(
                        copy.deepcopy(models["2-RF"]), pairs, args.steps, args.batch_size, seed=seed, progress=False
                    )
            checkpoint.atomic_save(model.state_dict(), model_file)
            models[method] = model.eval()
            if (seed, method) not in done:
                row = {"seed": seed, "method": method, **evaluate(model, features, test, x0, method)}
                with results_file.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
                print(f"seed {seed} {method}: FD {row['fd']}")
        if seed == 0:
            png = grid(models, x0, out / "digits.png")
    seconds = time.perf_counter() - started
    tables = {}
    for metric in ("fd", "w2"):
        table = []
        for method in METHODS:
            cells = []
            for k in STEPS:
                values = [r[metric][str(k)] for r in rows if r["method"] == method and str(k) in r[metric]]
                cells.append(mean_std(values) if values else "-")
            table.append([method, *cells])
        tables[metric] = markdown_table(["method", *(f"@{k}" for k in STEPS)], table)
        print(f"\n{metric.upper()} vs Euler steps (mean +- std over {args.seeds} seeds)\n{tables[metric]}")
    print(f"\nfloor (train split vs test split): FD {floor['fd']:.2f}, W2 {floor['w2']:.3f}; {seconds:.0f} s")
    if args.docs is not None:
        publish_figure(png, args.docs)
        body = f"""## Real data: scikit-learn digits

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s; needs `pip install -e ".[digits]"`). Measured {machine()}.
Noise N(0, I) -> digits (8x8, pixels scaled to [-1, 1]; train split 1437 images, test split 360). Every flow: MLP
3x512, linear path (sigma 0), {args.steps} Adam steps at batch {args.batch_size}; 2-RF: {args.pairs} rk4 pairs of the
exact-OT flow, {args.steps} steps; distilled: the 2-RF model distilled into one step on the same pairs. Mean +- std
over {args.seeds} seeds; {args.eval_n} generated images against the 360 test images.

Frechet distance in the features of a small classifier (MLP, test accuracy {100 * features.accuracy:.1f}%; trained
once and cached) against the number of Euler steps; the train split against the test split gives {floor["fd"]:.2f}:

{tables["fd"]}

W2 in pixel space (train split sample of {args.eval_n} vs test: {floor["w2"]:.3f}):

{tables["w2"]}

![samples: each method at 1 and 100 Euler steps](figures/digits.png)
"""
        print(f"written to {write_section('digits', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
