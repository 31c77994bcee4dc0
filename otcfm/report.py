"""What the ``otcfm`` command measures and draws after a run: a table by number of Euler steps, and a figure.

- Images ``(C, H, W)``: a grid of samples per number of steps (``samples.png``); for a dataset with a feature
  classifier (``"digits"``, ``"mnist"``) the Frechet distance to held-out rows (its test split), and for a
  class-conditional run the classifier's accuracy on samples of known labels without guidance (``w = 0``), with
  the plain conditional field (``w = 1``) and at ``guidance`` (:mod:`otcfm.metrics.images`); ``fd.json``.
- Other data: W2 against the target over several draws, its floor, and trajectories in the first two
  coordinates (``w2.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from otcfm import metrics
from otcfm.data.sources import DataSource, as_source
from otcfm.metrics.frechet import FEATURE_DATASETS
from otcfm.solvers import integrate
from otcfm.training import TrainConfig

__all__ = ["EVAL_STEPS", "describe_stage", "evaluate", "print_table"]

EVAL_STEPS = (1, 2, 4, 8, 100)


def data_of(config: TrainConfig) -> tuple[DataSource, DataSource]:
    """The config's source and target (names or files, as recorded by ``otcfm train``)."""
    target = as_source(config.target, "target", config.target_options)
    return as_source(config.source, "source", config.source_options, like=target), target


def is_image(target: DataSource) -> bool:
    """Whether a target's samples are images ``(C, H, W)`` (drawn as grids, never as scatters of two pixels)."""
    from otcfm.plotting import is_image_shape

    return is_image_shape(target.shape)


def evaluate(
    model: torch.nn.Module,
    config: TrainConfig,
    n: int,
    draws: int,
    out: Path,
    stage: str = "",
    plot_steps: int = 100,
    guidance: float = 2.0,
    teacher: str = "",
) -> dict[str, Any]:
    """Measure ``model`` as described in the module docstring and write ``out/samples.png``; the table's dict
    (``stage`` and ``teacher``: see :func:`describe_stage`)."""
    source, target = data_of(config)
    title = f"{config.source} -> {config.target}, {describe_stage(config, stage, teacher)}"
    if is_image(target):
        result = _evaluate_images(model, config, source, target, n, out, title, guidance)
    else:
        result = _evaluate_w2(model, config, source, target, n, draws, out, title, plot_steps)
    return {**result, "title": title}


def _evaluate_w2(
    model: torch.nn.Module,
    config: TrainConfig,
    source: DataSource,
    target: DataSource,
    n: int,
    draws: int,
    out: Path,
    title: str,
    plot_steps: int,
) -> dict[str, Any]:
    """W2 vs Euler steps over ``draws`` held-out draws (mean and std), a reference floor, and the PNG.

    For a finite dataset (a file) the reference samples are drawn from the training data itself."""
    held_out = torch.Generator().manual_seed(config.seed + 1_000_003)
    per_draw: dict[int, list[float]] = {k: [] for k in EVAL_STEPS}
    floors = []
    for _ in range(draws):
        x0 = source(n, held_out)
        reference = target(n, held_out)
        floors.append(metrics.w2(target(n, held_out), reference))
        for k, value in metrics.w2_by_steps(model, x0, reference, EVAL_STEPS, "euler").items():
            per_draw[k].append(value)
    trajectory = integrate(model, x0, plot_steps, "euler", return_trajectory=True)
    from otcfm.plotting import plot_flow

    png = plot_flow(trajectory, reference, out / "samples.png", title=title)
    return {
        "metric": "w2",
        "n": n,
        "draws": draws,
        "method": "euler",
        "w2": {str(k): _mean_std(v) for k, v in per_draw.items()},
        "w2_floor": _mean_std(floors),
        "reference": "training rows" if target.rows is not None else "held-out draws",
        "reference_rows": None if target.rows is None else target.rows.shape[0],
        "png": str(png),
    }


def held_out_images(config: TrainConfig, target: DataSource, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """Reference images: the test split of a named dataset trained on another split, else ``n`` training rows."""
    from otcfm.data import TABLES

    options = dict(config.target_options)
    if config.target in TABLES and options.get("split", "train") != "test" and options.get("split") != "all":
        options["split"] = "test"
        return TABLES[config.target](**options)[0], "held-out rows (the test split)"
    return target(n, torch.Generator().manual_seed(seed)), "rows drawn from the training data (no held-out split)"


def classes_of(model: torch.nn.Module, config: TrainConfig, target: DataSource) -> int | None:
    """The number of classes of a conditional run (the model's ``null_label``, else the target's), else None."""
    if not config.conditional:
        return None
    from otcfm.guidance import null_label_of

    null = null_label_of(model, None)
    return null if null is not None else target.num_classes


def _evaluate_images(
    model: torch.nn.Module,
    config: TrainConfig,
    source: DataSource,
    target: DataSource,
    n: int,
    out: Path,
    title: str,
    guidance: float,
) -> dict[str, Any]:
    features = metrics.image_features(config.target) if config.target in FEATURE_DATASETS else None
    reference, where = held_out_images(config, target, n, config.seed + 1_000_003)
    count = min(n, reference.shape[0])  # FD is biased by the sample size: as many samples as reference rows
    x0 = source(count, torch.Generator().manual_seed(config.seed + 1_000_003))
    classes = classes_of(model, config, target)
    weights = sorted({0.0, 1.0, float(guidance)})
    scores = metrics.score_images(
        model, x0, reference, features, EVAL_STEPS, classes=classes, guidance=weights, accuracy_n=200
    )
    from otcfm.plotting import plot_image_grid

    rows = {f"{k} step{'s' if k != 1 else ''}": x for k, x in scores.samples.items()}
    png = plot_image_grid(rows, out / "samples.png", title=title)
    return {
        "metric": "fd" if features is not None else "samples",
        "n": count,
        "reference": where,
        "reference_rows": reference.shape[0],
        "method": "euler",
        "fd": None if scores.fd is None else {str(k): v for k, v in scores.fd.items()},
        "classifier_accuracy": None if features is None else features.accuracy,
        "accuracy": {f"{w:g}": {str(k): v for k, v in by_step.items()} for w, by_step in scores.accuracy.items()},
        "png": str(png),
    }


def describe_stage(config: TrainConfig, stage: str, teacher: str = "") -> str:
    """``coupler=..., path=...`` of a run, or what a Reflow stage trained on (``teacher``: the teacher's own stage,
    ``"reflow"`` for a rectified flow, ``"distill"`` for a one-step model, ``""`` for a first-stage flow)."""
    made = {"reflow": "rectified flow", "distill": "one-step model"}.get(teacher, "flow")
    of = f"a {made} whose first stage had coupler={config.coupler}" if teacher else f"a coupler={config.coupler} flow"
    if stage == "reflow":
        return f"rectified flow on the pairs of {of}"
    if stage == "distill":
        return f"one-step generator distilled from {of}"
    objective = ", objective=meanflow (a flow map)" if config.objective == "meanflow" else ""
    return f"coupler={config.coupler}, path={config.path}{objective}"


def _mean_std(values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std()) if len(values) > 1 else 0.0
    return {"mean": float(tensor.mean()), "std": std}


#: How the W2 table names its reference samples (``w2.json``'s "reference").
_REFERENCE = {"training rows": "reference samples drawn from the training data", "held-out draws": "held-out samples"}


def print_table(result: dict[str, Any], config: TrainConfig) -> None:
    """Print the table of :func:`evaluate`'s result (markdown)."""
    if result.get("metric") in ("fd", "samples"):
        _print_image_table(result, config)
        return
    reference = _REFERENCE.get(result.get("reference"), "held-out samples")
    if result.get("reference_rows") is not None:
        reference = f"reference samples drawn with replacement from the {result['reference_rows']} training rows"
    print(
        f"W2 vs Euler steps: {result['title']}, "
        f"n={result['n']} {reference}, mean +- std over {result['draws']} draw{'s' if result['draws'] != 1 else ''}"
    )
    print("| Euler steps | W2 |")
    print("|---:|---:|")
    for k, v in result["w2"].items():
        print(f"| {k} | {v['mean']:.3f} +- {v['std']:.3f} |")
    floor = result["w2_floor"]
    print(f"(W2 between two independent target samples of the same size: {floor['mean']:.3f} +- {floor['std']:.3f})")


def _print_image_table(result: dict[str, Any], config: TrainConfig) -> None:
    if result["fd"] is None:
        print(f"samples of {config.target}: no feature classifier for this data, so no FD (see the figure)")
        return
    accuracy = result["accuracy"]
    print(
        f"FD vs Euler steps: {result['title']}; "
        f"{result['n']} samples against {result['reference_rows']} {result['reference']}, in the features of a "
        f"classifier of {config.target} (test accuracy {result['classifier_accuracy']:.3f})"
        + ("; conditional samples at w = 1, accuracy at guidance weights w" if accuracy else "")
    )
    weights = list(accuracy)
    print("| Euler steps | FD |" + "".join(f" accuracy w={w} |" for w in weights))
    print("|---:|---:|" + "---:|" * len(weights))
    for k, fd in result["fd"].items():
        cells = "".join(f" {accuracy[w][k]:.3f} |" for w in weights)
        print(f"| {k} | {fd:.2f} |{cells}")
