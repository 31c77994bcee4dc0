"""One network evaluation on scikit-learn's digits: Reflow + distillation from an exact-OT teacher and from a
semidiscrete one, against flow maps trained with MeanFlow on independent, exact and semidiscrete couplings.

    python benchmarks/onestep.py                 # about 40 minutes on 2 CPU cores
    python benchmarks/onestep.py --docs          # the same, then its section of docs/benchmarks.md and the figure
    python benchmarks/onestep.py --json out.json # also one record per method in a JSON file
    python benchmarks/onestep.py --quick         # seconds; for tests

Every network is the MLP 3x512 on the 64 pixels (``flow_map=True`` for MeanFlow), trained by ``otcfm.train`` or
otcfm.reflow at batch 256 from a standard normal source, linear path. Methods:

- ``<coupler> teacher``: flow matching with that coupler (``--steps`` Adam steps at a constant 1e-3, uniform
  times: the recipe of benchmarks/digits.py); the semidiscrete fit is part of its time.
- ``<coupler> 2-RF``: pairs ``(x0, teacher(x0))`` from ``--pairs`` source draws by rk4, with the fewest steps
  among 2, 4, ..., 32 whose endpoints lie within ``--pair-tol`` (RMS per pixel) of 64 rk4 steps on ``--probe-n``
  draws (the steps a teacher needs; the probe's time and evaluations count); then ``--steps`` steps of flow
  matching on the pairs, warm-started from the teacher.
- ``<coupler> distilled``: the 2-RF model distilled into one step on the same pairs (``--steps`` steps).
- ``meanflow <coupler>``: ``otcfm.train(objective="meanflow")`` for ``--meanflow-steps`` steps; its recipe is
  ``MEANFLOW`` below.

Reported per method: FD (the features of benchmarks/digits.py, 1,000 samples against the 360 test images) after
1 and 2 network evaluations (Euler steps; a distilled student is a one-step model and has no 2-step figure),
training wall seconds (every stage that leads to the model: fit, teacher, pair generation, 2-RF, student) and
network evaluations per sample and pass: a training step of batch B counts 2B (forward and backward), a MeanFlow
step 3B (the Jacobian-vector product is a forward pass with its tangent, then the backward pass), and each pair
4 per rk4 step. The straightness of each teacher and 2-RF (``otcfm.metrics.straightness``, 100 Euler steps) is
printed beside them. Finished methods are appended to OUT/results.jsonl, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from otcfm.metrics import digits_features, straightness  # noqa: E402

TEACHERS = ("exact", "semidiscrete")
FLOW_MAPS = ("independent", "exact", "semidiscrete")
BATCH = 256
PAIR_STEPS = (2, 4, 8, 16, 32)
REFERENCE_STEPS = 64
#: The MeanFlow recipe: Adam at a peak rate of 3e-3 under a cosine decay, gradient norms clipped at 1 (without the
#: clip, runs with more r < t pairs diverged), times from a logit-normal (the paper's -0.4, 1), half of the pairs
#: with r < t, the paper's adaptive weight (p = 1, c = 1e-3).
MEANFLOW: dict[str, Any] = {
    "lr": 3e-3,
    "lr_schedule": "cosine",
    "grad_clip": 1.0,
    "time_sampler": "logit_normal",
    "time_sampler_options": {"mean": -0.4, "std": 1.0},
    "objective_options": {"flow_map_fraction": 0.5, "adaptive_p": 1.0, "adaptive_c": 1e-3},
}


def noise(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal images ``(n, 1, 8, 8)``: the source."""
    return torch.randn(n, 1, 8, 8, generator=generator)


class Clock:
    """Training wall seconds and network evaluations, summed over the stages that lead to a model."""

    def __init__(self, seconds: float = 0.0, evals: int = 0) -> None:
        self.seconds, self.evals = seconds, evals

    def timed(self, evals: int, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        self.seconds += time.perf_counter() - started
        self.evals += evals
        return result

    def copy(self) -> Clock:
        return Clock(self.seconds, self.evals)


class Judge:
    """FD after 1 and 2 Euler steps, on fixed source draws against the test split."""

    def __init__(self, eval_n: int, seed: int, cache: Path | None) -> None:
        self.features = digits_features(cache=cache)
        self.test, _ = otcfm.data.load_digits("test")
        self.x0 = noise(eval_n, torch.Generator().manual_seed(10_000 + seed))

    def fd(self, model: nn.Module, steps: int) -> float:
        with torch.no_grad():
            x = otcfm.integrate(model.eval(), self.x0, steps, "euler")
        return round(self.features.frechet_distance(x, self.test), 3)

    def record(self, method: str, model: nn.Module, clock: Clock, one_step_only: bool = False, **extra: Any) -> dict:
        return {
            "method": method,
            "fd_1": self.fd(model, 1),
            "fd_2": None if one_step_only else self.fd(model, 2),
            "train_seconds": round(clock.seconds, 1),
            "network_evals": clock.evals,
            **extra,
        }


def pair_steps(
    teacher: nn.Module, tol: float, draws: int, generator: torch.Generator
) -> tuple[int, dict[str, float], int]:
    """The fewest rk4 steps of ``PAIR_STEPS`` whose endpoints lie within ``tol`` (RMS per pixel) of
    ``REFERENCE_STEPS`` rk4 steps on ``draws`` source draws (the last when none does); returns it, the RMS error of
    each candidate tried, and the network evaluations per sample spent measuring."""
    x0 = noise(draws, generator)
    errors, spent = {}, draws * 4 * REFERENCE_STEPS
    with torch.no_grad():
        reference = otcfm.integrate(teacher, x0, REFERENCE_STEPS, "rk4")
        for k in PAIR_STEPS:
            errors[str(k)] = round(float((otcfm.integrate(teacher, x0, k, "rk4") - reference).pow(2).mean().sqrt()), 5)
            spent += draws * 4 * k
            if errors[str(k)] <= tol:
                return k, errors, spent
    return PAIR_STEPS[-1], errors, spent


def train_options(coupler: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """``otcfm.train``'s settings common to every method (and the semidiscrete fit's steps, if given)."""
    fit = {"coupler_options": {"fit_steps": args.fit_steps}} if coupler == "semidiscrete" and args.fit_steps else {}
    return {"coupler": coupler, "target": "digits", "batch_size": BATCH, "seed": seed, "progress": False, **fit}


def pipeline(
    coupler: str, args: argparse.Namespace, seed: int, judge: Judge, out: Path
) -> tuple[list[dict], nn.Module]:
    """Teacher -> Reflow -> distillation: the records of the three stages, and the student."""
    clock = Clock()
    settings = train_options(coupler, args, seed)
    run = clock.timed(2 * BATCH * args.steps, lambda: otcfm.train(steps=args.steps, hidden=512, depth=3, **settings))
    teacher = run.model.eval()
    records = [judge.record(f"{coupler} teacher", teacher, clock, straightness=straightness(teacher, judge.x0))]
    g = torch.Generator().manual_seed(seed)
    probe = Clock()
    steps, errors, spent = probe.timed(0, lambda: pair_steps(teacher, args.pair_tol, args.probe_n, g))
    clock.seconds, clock.evals = clock.seconds + probe.seconds, clock.evals + spent
    pairs = clock.timed(
        args.pairs * 4 * steps,
        lambda: reflow.generate_pairs(
            teacher, noise, args.pairs, steps, "rk4", out / "pairs" / f"{coupler}-{seed}", seed=seed, progress=False
        ),
    )
    rectified = clock.timed(
        2 * BATCH * args.steps,
        lambda: reflow.train_on_pairs(pairs, copy.deepcopy(teacher), args.steps, BATCH, seed=seed, progress=False),
    )
    records.append(
        judge.record(
            f"{coupler} 2-RF",
            rectified,
            clock,
            pair_steps=steps,
            pair_errors=errors,
            straightness=straightness(rectified.eval(), judge.x0),
        )
    )
    student = clock.timed(
        2 * BATCH * args.steps,
        lambda: reflow.distill(copy.deepcopy(rectified), pairs, args.steps, BATCH, seed=seed, progress=False),
    )
    records.append(judge.record(f"{coupler} distilled", student, clock, one_step_only=True))
    return records, student


def new_model(seed: int, flow_map: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return otcfm.models.MLP(64, hidden=512, depth=3, flow_map=flow_map)


def meanflow(coupler: str, args: argparse.Namespace, seed: int, judge: Judge) -> tuple[list[dict], nn.Module]:
    """A flow map trained with MeanFlow: its record, with FD after 1 step at quarters of the run (its curve), and
    the model."""
    model = new_model(seed, flow_map=True)
    marks = {args.meanflow_steps * q // 4 for q in (1, 2, 3)}
    snapshots: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    started = time.perf_counter()
    paused = 0.0

    def snapshot(step: int, loss: float) -> None:
        nonlocal paused
        if step in marks:
            held = time.perf_counter()
            snapshots.append((step, held - started - paused, copy.deepcopy(model.state_dict())))
            paused += time.perf_counter() - held

    run = otcfm.train(
        objective="meanflow",
        model=model,
        steps=args.meanflow_steps,
        callback=snapshot,
        **MEANFLOW,
        **train_options(coupler, args, seed),
    )
    clock = Clock(time.perf_counter() - started - paused, 3 * BATCH * args.meanflow_steps)
    curve = []
    for step, seconds, state in snapshots:
        partial = copy.deepcopy(model)
        partial.load_state_dict(state)
        curve.append([step, round(seconds, 1), judge.fd(partial, 1)])
    final = judge.record(f"meanflow {coupler}", run.model, clock)
    final["curve"] = [*curve, [args.meanflow_steps, final["train_seconds"], final["fd_1"]]]
    return [final], run.model


def figure(rows: list[dict], judge: Judge, models: dict[str, nn.Module], path: Path) -> Path:
    """FD after one step against training seconds (each pipeline's stages, each MeanFlow run's quarters), and one
    row of one-step samples per final model."""
    plt = pyplot()
    fig = plt.figure(figsize=(12, 4.6))
    grid = fig.add_gridspec(len(models), 2, width_ratios=(1.0, 1.1))
    ax = fig.add_subplot(grid[:, 0])
    for coupler in TEACHERS:
        stages = [r for r in rows if r["method"].startswith(f"{coupler} ") and r["seed"] == 0]
        if stages:
            ax.plot([r["train_seconds"] for r in stages], [r["fd_1"] for r in stages], "o-", label=f"{coupler} Reflow")
    for coupler in FLOW_MAPS:
        runs = [r for r in rows if r["method"] == f"meanflow {coupler}" and r["seed"] == 0]
        if runs:
            curve = runs[0]["curve"]
            ax.plot([c[1] for c in curve], [c[2] for c in curve], "s--", label=f"MeanFlow {coupler}")
    ax.set_xlabel("training seconds (seed 0)")
    ax.set_ylabel("FD after 1 network evaluation")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cols = 12
    for r, (name, model) in enumerate(models.items()):
        sub = fig.add_subplot(grid[r, 1])
        with torch.no_grad():
            images = otcfm.integrate(model.eval(), judge.x0[:cols], 1, "euler").clamp(-1, 1)
        sub.imshow(torch.cat(list(images[:, 0]), dim=1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        sub.set_xticks([])
        sub.set_yticks([])
        sub.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    return save_figure(fig, path)


def summary(rows: list[dict], methods: list[str]) -> list[list[Any]]:
    """One table row per method: means over seeds (+- std with several)."""

    def cell(values: list[float], digits: int) -> str:
        if not values:
            return ""
        mean = statistics.fmean(values)
        spread = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{mean:.{digits}f}{spread}"

    table = []
    for method in methods:
        done = [r for r in rows if r["method"] == method]
        fd2 = [r["fd_2"] for r in done if r["fd_2"] is not None]
        extra = ""
        if "pair_steps" in (done[0] if done else {}):
            extra = f"pairs: rk4 x {'/'.join(str(r['pair_steps']) for r in done)}"
        if "straightness" in (done[0] if done else {}):
            extra = f"{extra}; " if extra else ""
            extra += f"straightness {cell([r['straightness'] for r in done], 4)}"
        table.append(
            [
                method,
                cell([r["fd_1"] for r in done], 2),
                cell(fd2, 2),
                cell([r["train_seconds"] for r in done], 0),
                f"{statistics.fmean(r['network_evals'] for r in done) / 1e6:.1f}M" if done else "",
                extra,
            ]
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4000, help="steps of each flow-matching stage")
    parser.add_argument("--meanflow-steps", type=int, default=8000, help="steps of each MeanFlow run")
    parser.add_argument("--pairs", type=int, default=10_000, help="Reflow pairs per teacher")
    parser.add_argument("--pair-tol", type=float, default=0.01, help="RMS per pixel of the pairs' endpoints")
    parser.add_argument("--probe-n", type=int, default=1000, help="source draws that choose the pairs' rk4 steps")
    parser.add_argument("--eval-n", type=int, default=1000, help="generated images per evaluation")
    parser.add_argument("--fit-steps", type=int, help="steps of the semidiscrete fits (default: the coupler's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--out", type=Path, default=Path("runs/onestep"))
    parser.add_argument("--cache", type=Path, help="directory of the cached classifier (default: the user cache)")
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.meanflow_steps, args.pairs, args.eval_n, args.seeds, args.fit_steps = 8, 8, 64, 100, 1, 20
        args.probe_n = 32
    torch.set_num_threads(args.threads)
    out = args.out / ("quick" if args.quick else "default")
    results = out / "results.jsonl"
    rows = read_jsonl(results)
    started = time.perf_counter()
    finals = [*(f"{c} distilled" for c in TEACHERS), *(f"meanflow {c}" for c in FLOW_MAPS)]
    judge, computed = None, False
    for seed in range(args.seeds):
        judge = Judge(args.eval_n, seed, args.cache)
        for final in finals:
            if any(r["method"] == final and r["seed"] == seed for r in rows):
                continue
            print(f"seed {seed}: {final} ...", flush=True)
            computed = True
            if final.startswith("meanflow"):
                records, model = meanflow(final.split(" ")[1], args, seed, judge)
            else:
                records, model = pipeline(final.split(" ")[0], args, seed, judge, out)
            checkpoint.atomic_save(model.state_dict(), out / "models" / f"{final.replace(' ', '-')}-{seed}.pt")
            for record in records:
                record["seed"] = seed
                rows.append(record)
                print(
                    f"  {record['method']}: FD@1 {record['fd_1']}, FD@2 {record['fd_2']}, "
                    f"{record['train_seconds']} s, {record['network_evals'] / 1e6:.1f}M evaluations",
                    flush=True,
                )
            with results.open("a") as handle:  # a method's records at once: a rerun redoes an unfinished one
                handle.writelines(json.dumps(record) + "\n" for record in records)
    seconds = _total_seconds(out / "seconds.json", time.perf_counter() - started, computed)
    judge = judge or Judge(args.eval_n, 0, args.cache)
    methods = [f"{c} {stage}" for c in TEACHERS for stage in ("teacher", "2-RF", "distilled")]
    methods += [f"meanflow {c}" for c in FLOW_MAPS]
    table = markdown_table(["method", "FD@1", "FD@2", "train s", "network evals", "notes"], summary(rows, methods))
    floor = judge.features.frechet_distance(otcfm.data.load_digits("train")[0], judge.test)
    curves = _curves(rows)
    print(f"\n{table}\n\n{curves}\n\nfloor (train split vs test split): FD {floor:.2f}; {seconds:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"records: {args.json}")
    models = {}
    for final in finals:
        model = new_model(0, flow_map=final.startswith("meanflow"))
        model.load_state_dict(checkpoint.load(out / "models" / f"{final.replace(' ', '-')}-0.pt"))
        models[final] = model
    png = figure(rows, Judge(args.eval_n, 0, args.cache), models, out / "onestep.png")
    print(f"figure: {png}")
    if args.docs is not None:
        publish_figure(png, args.docs)
        body = f"""## One network evaluation: Reflow from OT teachers, and flow maps (MeanFlow)

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s; needs `pip install -e ".[digits]"`). Measured {machine()}.
Noise N(0, I) -> digits (8x8). Every network: MLP 3x512; flow-matching stages: {args.steps} Adam steps at batch
{BATCH}, constant rate 1e-3, uniform times; Reflow: {args.pairs} pairs by rk4 with the fewest steps within
{args.pair_tol} RMS per pixel of {REFERENCE_STEPS} steps; distillation: {args.steps} steps on the same pairs;
MeanFlow: {args.meanflow_steps} steps, {_recipe()}. FD of {args.eval_n} samples against the 360 test images
(train split vs test split: {floor:.2f}); {args.seeds} seed(s). "train s" is the wall time of every stage that leads
to the model, semidiscrete fit and pair generation included; "network evals" counts per-sample forward and
backward passes (a MeanFlow step 3 per sample, a flow-matching step 2, an rk4 step 4).

{table}

{curves}

![FD after one step against training seconds; one-step samples](figures/onestep.png)
"""
        print(f"written to {write_section('onestep', body, args.docs)}")
    return 0


def _total_seconds(ledger: Path, elapsed: float, computed: bool) -> float:
    """Wall seconds of the whole benchmark over the invocations that computed methods (a resumed run adds its own),
    kept in ``ledger``; an invocation that only reports adds nothing."""
    before = json.loads(ledger.read_text())["seconds"] if ledger.is_file() else 0.0
    if not computed:
        return before or elapsed
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps({"seconds": before + elapsed}))
    return before + elapsed


def _curves(rows: list[dict]) -> str:
    """Each MeanFlow run's FD after one step at the quarters of its steps (seed 0): its curve in the figure."""
    lines = []
    for coupler in FLOW_MAPS:
        run = next((r for r in rows if r["method"] == f"meanflow {coupler}" and r["seed"] == 0), None)
        if run is not None:
            points = ", ".join(f"{fd:.1f} at step {step} ({seconds:.0f} s)" for step, seconds, fd in run["curve"])
            lines.append(f"- MeanFlow, {coupler}: FD@1 {points}")
    return "FD after one step during each MeanFlow run (seed 0):\n\n" + "\n".join(lines) if lines else ""


def _recipe() -> str:
    options = MEANFLOW["objective_options"]
    return (
        f"Adam at a peak rate of {MEANFLOW['lr']:g} under a cosine decay, gradients clipped at norm "
        f"{MEANFLOW['grad_clip']:g}, logit-normal times ({MEANFLOW['time_sampler_options']['mean']}, "
        f"{MEANFLOW['time_sampler_options']['std']}), r < t for a fraction {options['flow_map_fraction']}, adaptive "
        f"weight p = {options['adaptive_p']:g}, c = {options['adaptive_c']:g}"
    )


if __name__ == "__main__":
    sys.exit(main())
