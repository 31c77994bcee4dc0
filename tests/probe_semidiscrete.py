"""The semidiscrete coupler: classes absent from the data, input scales, fits far from their noise floor,
NaN from a source or sampler.

A case at an extreme input scale is right when the fit's potentials are finite, every partner is the argmin of
``||x - y_j||^2 - g_j`` (checked in float64) and the fit either reached its noise floor or said it did not (a
:class:`~otcfm.couplers.ConvergenceWarning`); a refusal must name the argument at the odd scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from probe import Case

from otcfm.couplers import ConvergenceWarning, SemidiscreteCoupler

#: Input scales of the cases: float32 squares of these under- or overflow.
SCALES = (1e-30, 1e-20, 1e20, 1e30)
#: How far below the largest score term a partner's float64 score may lie (float32 rounding of the scores).
TOLERANCE = 1e-4
#: A fit that ends above this multiple of its noise floor must have warned.
FAR = 3.0


@dataclass(frozen=True)
class Fitted:
    """A fitted coupler, its report, a paired batch and whether the fit warned."""

    coupler: SemidiscreteCoupler
    error: float
    floor: float
    x0: torch.Tensor
    data: torch.Tensor
    j: torch.Tensor
    warned: bool


def _sampler(scale: float, seed: int = 0) -> Callable[[int, torch.Generator | None], torch.Tensor]:
    def draw(n: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(n, 2, generator=generator) * scale

    return draw


def _fit(source_scale: float, data_scale: float) -> Fitted:
    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(5)) * data_scale
    coupler = SemidiscreteCoupler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = coupler.fit(
            _sampler(source_scale), data, steps=150, batch_size=256, generator=torch.Generator().manual_seed(1),
            progress=False,
        )  # fmt: skip
    x0 = _sampler(source_scale)(64, torch.Generator().manual_seed(2))
    j = coupler(x0, data).j
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return Fitted(coupler, report.assignment_error, report.noise_floor, x0, data, j, warned)


def is_argmin(x0: torch.Tensor, data: torch.Tensor, potentials: torch.Tensor, j: torch.Tensor) -> bool:
    """Whether each ``j`` maximises ``2 x.y_k - |y_k|^2 + g_k`` (``-||x - y_k||^2 + g_k`` without the row's
    ``|x|^2``) in float64, up to :data:`TOLERANCE` of the largest term of the row's scores."""
    x, y, g = x0.double(), data.double(), potentials.double()
    if not bool(torch.isfinite(g).all()) or j.shape != (x.shape[0],):
        return False
    cross, square = 2 * x @ y.T, (y * y).sum(1)
    scores = cross - square[None] + g[None]
    scale = cross.abs().amax(1) + (square + g.abs()).amax()
    chosen = scores.gather(1, j[:, None].long())[:, 0]
    return bool(((scores.amax(1) - chosen) <= TOLERANCE * scale).all())


def _right(fitted: Fitted) -> bool:
    potentials = fitted.coupler.potentials
    if potentials is None or not is_argmin(fitted.x0, fitted.data, potentials, fitted.j):
        return False
    return fitted.error <= FAR * fitted.floor or fitted.warned


def _short_fit(steps: int) -> Fitted:
    """Two far clusters: the affine warm start sends the source between them; a few steps cannot fix that."""
    g = torch.Generator().manual_seed(7)
    data = torch.cat([torch.randn(20, 2, generator=g) - 40.0, torch.randn(20, 2, generator=g) + 40.0])
    data[:20, 1] += 200.0
    coupler = SemidiscreteCoupler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = coupler.fit(
            "gaussian", data, steps=steps, batch_size=64, generator=torch.Generator().manual_seed(1), progress=False
        )
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return Fitted(coupler, report.assignment_error, report.noise_floor, x0, data, coupler(x0, data).j, warned)


def _nan_after(draws: int) -> Callable[[int, torch.Generator | None], torch.Tensor]:
    """A sampler whose draws hold a NaN after its first ``draws`` calls (``as_source`` takes 3 to probe it)."""
    calls = {"n": 0}

    def draw(n: int, generator: torch.Generator | None) -> torch.Tensor:
        calls["n"] += 1
        x = torch.randn(n, 2, generator=generator)
        if calls["n"] > draws:
            x[n // 2, 1] = float("nan")
        return x

    return draw


def _labelled() -> tuple[SemidiscreteCoupler, torch.Tensor, torch.Tensor]:
    data = torch.randn(30, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(30) % 3
    coupler = SemidiscreteCoupler()
    coupler.fit(
        "gaussian", data, steps=20, batch_size=64, y1=labels, generator=torch.Generator().manual_seed(0),
        eval_samples=300, progress=False,
    )  # fmt: skip
    return coupler, data, labels


def _fitted_unit() -> tuple[SemidiscreteCoupler, torch.Tensor]:
    data = torch.randn(20, 2, generator=torch.Generator().manual_seed(4))
    coupler = SemidiscreteCoupler()
    coupler.fit("gaussian", data, steps=20, batch_size=64, generator=torch.Generator().manual_seed(0), progress=False)
    return coupler, data


def _absent(label: int) -> object:
    coupler, data, labels = _labelled()
    y0 = torch.tensor([0, 1, label, 2])
    return coupler(torch.randn(4, 2), data, y0=y0, y1=labels)


def _absent_unlabelled_target() -> object:
    coupler, data, _ = _labelled()
    return coupler(torch.randn(3, 2), data, y0=torch.tensor([7, 7, 7]))


def _fit_nan(draws: int) -> object:
    return SemidiscreteCoupler().fit(
        _nan_after(draws), torch.randn(20, 2), steps=10, batch_size=32, generator=torch.Generator().manual_seed(0),
        progress=False,
    )  # fmt: skip


def _evaluate_nan(draws: int) -> object:
    coupler, data = _fitted_unit()
    return coupler.evaluate(_nan_after(draws), data, 3000, torch.Generator().manual_seed(0))


def _pair_at(x0_scale: float) -> object:
    """Unit-scale potentials, a batch at another scale: partners are still the argmin, or x0 is refused."""
    coupler, data = _fitted_unit()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(6)) * x0_scale
    return coupler, x0, data, coupler(x0, data).j


def _pair_right(result: tuple[SemidiscreteCoupler, torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
    coupler, x0, data, j = result
    return coupler.potentials is not None and is_argmin(x0, data, coupler.potentials, j)


def cases(directory: Path) -> list[Case]:
    """The cases of this class; files are made in ``directory``."""
    out = [
        Case("absent-class", "SemidiscreteCoupler", lambda: _absent(5), ("y0",)),
        Case("absent-class", "SemidiscreteCoupler", lambda: _absent(-1), ("y0",), detail="negative"),
        Case("absent-class", "SemidiscreteCoupler", _absent_unlabelled_target, ("y0",), detail="no-y1"),
        Case("nan-source", "SemidiscreteCoupler.fit", lambda: _fit_nan(0), ("source",), detail="at-once"),
        Case("nan-source", "SemidiscreteCoupler.fit", lambda: _fit_nan(3), ("source",), detail="first-draw"),
        Case("nan-source", "SemidiscreteCoupler.fit", lambda: _fit_nan(8), ("source",), detail="later-draw"),
        Case("nan-source", "SemidiscreteCoupler.evaluate", lambda: _evaluate_nan(3), ("source",), detail="at-once"),
        Case("nan-source", "SemidiscreteCoupler.evaluate", lambda: _evaluate_nan(4), ("source",), detail="later"),
    ]
    for steps in (1, 3):
        out.append(
            Case(
                "far-from-floor",
                "SemidiscreteCoupler.fit",
                lambda s=steps: _short_fit(s),
                ("steps",),
                detail=f"steps-{steps}",
                expect=_right,
            )
        )
    for scale in SCALES:
        for side, (source_scale, data_scale) in {
            "both": (scale, scale),
            "x0": (scale, 1.0),
            "data": (1.0, scale),
        }.items():
            names = {"both": ("source", "target"), "x0": ("source",), "data": ("target",)}[side]
            out.append(
                Case(
                    "scale",
                    "SemidiscreteCoupler.fit",
                    lambda a=source_scale, b=data_scale: _fit(a, b),
                    names,
                    detail=f"{side}-{scale:g}",
                    expect=_right,
                )
            )
        out.append(
            Case(
                "scale",
                "SemidiscreteCoupler",
                lambda s=scale: _pair_at(s),
                ("x0",),
                detail=f"pair-x0-{scale:g}",
                expect=_pair_right,
            )
        )
    return out
