"""Fitting semidiscrete potentials: averaged stochastic gradient ascent on the semi-dual, the report of a fit, and
the fit's own checkpoint, from which an interrupted fit resumes."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from otcfm import _random
from otcfm import checkpoint as files
from otcfm._args import check_count, check_generator, check_rate
from otcfm._checks import check_batch
from otcfm.couplers.base import check_labels
from otcfm.couplers.semidiscrete.kernels import (
    _partners_and_scores,
    _shares,
    _softmax_columns,
)
from otcfm.couplers.semidiscrete.scaling import (
    _affine_warm_start,
    _check_unit,
    _drawn,
    _exponent,
    _flat,
    _mean_cost,
    _scaled_batch,
    _squared_norms,
    _times_power_of_two,
    _unit_for,
)
from otcfm.couplers.sinkhorn import ConvergenceWarning

if TYPE_CHECKING:
    from otcfm.couplers.semidiscrete.coupler import SemidiscreteCoupler

#: File kind of a fit's checkpoint.
FIT_KIND = "otcfm.semidiscrete-potentials-fit"

#: A fit whose assignment error ends above this multiple of its noise floor warns (:class:`ConvergenceWarning`).
FAR_ABOVE_FLOOR = 3.0


def noise_floor(samples: int, n: int) -> float:
    """Expected assignment error of exact potentials measured with ``samples`` draws over ``n`` points.

    Each point's count is about Poisson(``samples / n``), so the total-variation distance of the
    empirical shares from ``1/n`` is ``sqrt(n / (2 pi samples))`` (0.040 for 100 draws per point).
    """
    return math.sqrt(n / (2.0 * math.pi * samples))


@dataclass(frozen=True)
class SemidiscreteFit:
    """Convergence report of :meth:`SemidiscreteCoupler.fit`.

    Attributes:
        steps: stochastic gradient steps taken in total (resumed fits included).
        seconds: wall time of this call's fitting (the evaluation excluded).
        dual: the semi-dual objective ``F_epsilon(g)`` at the returned potentials, estimated on
            ``eval_samples`` fresh source samples (cost units; a lower bound of ``W2^2`` for ``epsilon = 0``).
        assignment_error: total-variation distance between the share of the ``eval_samples`` source
            samples each data point receives and the uniform ``1/N``: partner counts at ``epsilon = 0``,
            expected (softmax) shares for ``epsilon > 0``, whose sampling noise is below ``noise_floor``.
        noise_floor: the assignment error that sampling alone gives at this ``eval_samples`` (see
            :func:`noise_floor`); a converged fit is near it.
        eval_samples: fresh source samples of the evaluation.
        mean_cost: mean cost between source samples and data points, the unit of the relative settings.
    """

    steps: int
    seconds: float
    dual: float
    assignment_error: float
    noise_floor: float
    eval_samples: int
    mean_cost: float


@dataclass(frozen=True)
class FitSettings:
    """How :meth:`SemidiscreteCoupler.fit` runs (its arguments, defaults resolved)."""

    steps: int
    batch_size: int
    lr: float
    eval_samples: int | None
    checkpoint: str | Path | None
    checkpoint_every: int
    progress: bool

    def check(self) -> None:
        check_count(self.steps, "steps")
        check_count(self.batch_size, "batch_size")
        check_count(self.checkpoint_every, "checkpoint_every")
        check_rate(self.lr, "lr")
        if self.eval_samples is not None:
            check_count(self.eval_samples, "eval_samples")


def source_of(source: Any, data: Tensor) -> Any:
    """The source of a fit as :func:`otcfm.data.as_source` reads it, checked to draw samples of the dataset's shape
    (a stand-in for the dataset gives ``"gaussian"`` its sample shape without a scan or a copy of the data)."""
    from otcfm.data.sources import as_source

    draw = as_source(source, "source", like=as_source(torch.zeros(1, *data.shape[1:]), "target"))
    if tuple(draw.shape) != tuple(data.shape[1:]):
        raise ValueError(f"source: draws samples of shape {draw.shape}, the target's are {tuple(data.shape[1:])}")
    return draw


def fit_potentials(
    coupler: SemidiscreteCoupler,
    source: Any,
    target: Tensor,
    generator: torch.Generator | None,
    y1: Tensor | None,
    settings: FitSettings,
) -> SemidiscreteFit:
    """:meth:`SemidiscreteCoupler.fit` (see there): sets the coupler's potentials and returns the report."""
    data = check_batch(target, "target")
    settings.check()
    check_generator(generator)
    if y1 is not None:
        check_labels(y1, data.shape[0], "y1")
        if y1.ndim != 1 or y1.is_floating_point():
            raise ValueError(f"y1: expected integer class labels of shape ({data.shape[0]},)")
    draw = source_of(source, data)
    flat = _flat(data.detach())
    labels = None if y1 is None else y1.detach().to(flat.device)
    coupler._reset(data, labels)
    probe = _drawn(draw, 1024, generator, flat)
    state = _start_state(coupler, settings, flat, _unit_for(flat, probe))
    coupler.unit = unit = state["unit"]
    rows = coupler._rows(flat)
    probe = _times_power_of_two(probe, -_exponent(unit))  # x / unit
    mean_cost = _mean_cost(probe, flat, unit, rows)  # in units of unit^2
    coupler.mean_cost = mean_cost * unit**2
    if state["step"] == 0:
        state["g"] = _affine_warm_start(probe, flat, unit, rows)
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    started = time.perf_counter()
    final = _ascend(coupler, data, draw, labels, state, mean_cost, generator, settings)
    seconds = time.perf_counter() - started
    coupler.potentials = _times_power_of_two(final.to(torch.float64, copy=True), 2 * _exponent(unit))
    coupler.steps = settings.steps
    report = evaluate_potentials(coupler, draw, data, settings.eval_samples or 10 * flat.shape[0], generator, seconds)
    if report.assignment_error > FAR_ABOVE_FLOOR * report.noise_floor:
        warnings.warn(
            f"semidiscrete fit: assignment error {report.assignment_error:.3f} after {settings.steps} steps, "
            f"{report.assignment_error / report.noise_floor:.1f}x its noise floor {report.noise_floor:.3f}: the "
            "potentials are far from optimal; fit longer (steps), change lr, or bring source and target to "
            "similar scales",
            ConvergenceWarning,
            stacklevel=3,
        )
    return report


def _ascend(
    coupler: SemidiscreteCoupler,
    data: Tensor,
    draw: Any,
    labels: Tensor | None,
    state: dict[str, Any],
    mean_cost: float,
    generator: torch.Generator | None,
    settings: FitSettings,
) -> Tensor:
    """The gradient steps from ``state["step"]`` on (saving the fit's state every ``checkpoint_every`` steps); the
    averaged potentials, in units of ``unit^2``."""
    from tqdm.auto import tqdm

    flat, unit, steps = _flat(data.detach()), coupler.unit, settings.steps
    n, device = flat.shape[0], flat.device
    epsilon = coupler.absolute_epsilon() / unit**2
    chunk = coupler._chunk(settings.batch_size)
    screen = coupler._screen_for(data, flat, settings.batch_size, epsilon)
    square = _squared_norms(flat, unit, coupler._rows(flat))
    g, average, averaged = state["g"], state["average"], state["averaged"]
    desc, first = "semidiscrete fit", state["step"]
    with tqdm(total=steps, initial=first, disable=not settings.progress, desc=desc, unit="step") as bar:
        for k in range(first, steps):
            x, factor = _scaled_batch(_drawn(draw, settings.batch_size, generator, flat), unit)
            h = g - square if factor == 1.0 else (g - square) * factor
            classes = None if labels is None else labels[_random.randint(n, (settings.batch_size,), generator, device)]
            share = _shares(x, flat, h, epsilon * factor, chunk, labels, classes, screen)
            g += (settings.lr * mean_cost / math.sqrt(1.0 + k)) * (1.0 - n * share)
            if k >= steps // 2:
                averaged += 1
                average += (g - average) / averaged
            bar.update(1)
            if settings.checkpoint is not None and ((k + 1) % settings.checkpoint_every == 0 or k + 1 == steps):
                _save_state(coupler, settings.checkpoint, (g, average, averaged), k + 1, steps, generator)
    return average if averaged else g


def _start_state(coupler: SemidiscreteCoupler, settings: FitSettings, flat: Tensor, unit: float) -> dict[str, Any]:
    """A fresh fit's state (potentials in units of ``unit^2``), or the one saved in ``settings.checkpoint``."""
    n, dtype, device, checkpoint = flat.shape[0], flat.dtype, flat.device, settings.checkpoint
    fresh = {
        "g": torch.zeros(n, dtype=dtype, device=device),
        "average": torch.zeros(n, dtype=dtype, device=device),
        "averaged": 0,
        "step": 0,
        "unit": unit,
    }
    if checkpoint is None or not Path(checkpoint).exists():
        return fresh
    state = files.load(checkpoint, "semidiscrete fit checkpoint")
    if state.get("kind") != FIT_KIND or state.get("fingerprint") != coupler.fingerprint:
        raise ValueError(f"checkpoint: {checkpoint} is not a fit of these potentials on this dataset")
    if state.get("steps") != settings.steps:
        raise ValueError(f"checkpoint: {checkpoint} was a fit of {state.get('steps')} steps, not {settings.steps}")
    return {
        "g": state["g"].to(device=device, dtype=dtype),
        "average": state["average"].to(device=device, dtype=dtype),
        "averaged": int(state["averaged"]),
        "step": int(state["step"]),
        "generator": state.get("generator"),
        "unit": _check_unit(state.get("unit"), "checkpoint"),
    }


def _save_state(
    coupler: SemidiscreteCoupler,
    path: str | Path,
    iterates: tuple[Tensor, Tensor, int],
    step: int,
    steps: int,
    generator: torch.Generator | None,
) -> None:
    """Write the fit's state after ``step`` of ``steps`` steps: ``iterates`` are the potentials, their running
    average and the number of averaged steps."""
    g, average, averaged = iterates
    files.atomic_save(
        {
            "kind": FIT_KIND,
            "fingerprint": coupler.fingerprint,
            "unit": coupler.unit,
            "g": g.cpu(),
            "average": average.cpu(),
            "averaged": averaged,
            "step": step,
            "steps": steps,
            "generator": None if generator is None else generator.get_state(),
        },
        path,
    )


def evaluate_potentials(
    coupler: SemidiscreteCoupler,
    draw: Any,
    data: Tensor,
    samples: int,
    generator: torch.Generator | None,
    seconds: float = 0.0,
    batch_size: int = 1024,
) -> SemidiscreteFit:
    """:meth:`SemidiscreteCoupler.evaluate` on checked inputs: ``draw`` from :func:`source_of`, ``data`` the
    verified dataset."""
    assert coupler.potentials is not None and coupler.mean_cost is not None
    flat = _flat(data.detach())
    n, device, unit = flat.shape[0], flat.device, coupler.unit
    h = coupler._score_offsets(flat)
    labels = None if coupler.labels is None else coupler.labels.to(device)
    epsilon, chunk = coupler.absolute_epsilon() / unit**2, coupler._chunk(batch_size)
    screen = coupler._screen_for(data, flat, batch_size, epsilon)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    transform_sum, done = 0.0, 0  # the c-transforms, in units of unit^2
    while done < samples:
        b = min(batch_size, samples - done)
        drawn = _drawn(draw, b, generator, flat)
        x, factor = _scaled_batch(drawn, unit)
        scaled = h if factor == 1.0 else h * factor
        norms = _times_power_of_two(drawn.double(), -_exponent(unit)).square().sum(1)  # |x / unit|^2
        classes = None if labels is None else labels[_random.randint(n, (b,), generator, device)]
        if epsilon > 0:  # expected shares (softmax sums): no draws, and less noise than sampled partners
            share, lse = _softmax_columns(x, flat, scaled, epsilon * factor, chunk, labels, classes, True)
            assert lse is not None
            counts += share.to(counts.dtype)
            transform = norms - epsilon * (lse.double() - math.log(n))
        else:
            j, best = _partners_and_scores(x, flat, scaled, 0.0, chunk, labels, classes, None, screen)
            transform = norms - best.double() / factor
            counts += torch.bincount(j, minlength=n).to(counts.dtype)
        transform_sum += float(transform.sum())
        done += b
    dual = unit**2 * (transform_sum / samples) + float(coupler.potentials.double().mean())
    return SemidiscreteFit(
        steps=coupler.steps,
        seconds=seconds,
        dual=dual,
        assignment_error=error_of_counts(counts),
        noise_floor=noise_floor(samples, n),
        eval_samples=samples,
        mean_cost=float(coupler.mean_cost),
    )


def error_of_counts(counts: Tensor) -> float:
    """The assignment error from the partner counts ``(N,)`` of each data point: the total-variation distance
    between their shares and the uniform ``1/N``."""
    shares = counts.to(torch.float64) / float(counts.sum())
    return 0.5 * float((shares - 1.0 / counts.shape[0]).abs().sum())
