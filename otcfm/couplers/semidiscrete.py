r"""Semidiscrete OT: pair fresh source samples with a whole finite dataset through fitted dual potentials.

The target is a dataset of ``N`` points ``y_j`` with uniform weights; the source is a continuous
distribution ``mu`` one can sample. The semi-dual of OT with the cost ``c(x, y) = ||x - y||^2`` is

.. math::
    F_\epsilon(g) = \mathbb{E}_{x \sim \mu}\big[g^{c,\epsilon}(x)\big] + \frac{1}{N}\sum_j g_j,\qquad
    g^{c,0}(x) = \min_j\, c(x, y_j) - g_j,\quad
    g^{c,\epsilon}(x) = -\epsilon \log \frac{1}{N}\sum_j e^{(g_j - c(x, y_j))/\epsilon},

concave in ``g``, with gradient ``dF/dg_j = 1/N - P_x(j)``, where ``P_x(j)`` is the share of the source
that goes to ``y_j``: the mass of its Laguerre cell (``epsilon = 0``) or the mean softmax weight
(``epsilon > 0``). At the maximiser every data point receives ``1/N`` of the source, and
``x -> argmin_j c(x, y_j) - g_j`` is the OT map (Mousavi-Hosseini, Zhang, Klein, Cuturi, "Flow Matching
with Semidiscrete Couplings", 2025). :meth:`SemidiscreteCoupler.fit` finds ``g`` by averaged stochastic
gradient ascent; pairing a source batch is one scoring of it against the dataset:
``argmax_j 2 x.y_j + g_j - |y_j|^2`` (the ``|x|^2`` term is common to a row), or for ``epsilon > 0`` a
draw from the softmax of the score over ``epsilon`` (Gumbel-max). Scores are computed in chunks of the
dataset under a memory budget, so the ``(B, N)`` score matrix never exists at once; for ``epsilon = 0`` a
certified bfloat16 screen (:mod:`otcfm.couplers.screening`) finds the same partners at about half the cost.

Scale. Inputs whose magnitudes lie far from 1 (beyond ``2^32`` or below ``2^-31`` in float32, where squares
leave the dtype's range or its normal numbers) are scored in units of a power of two ``u`` near their largest
magnitude: ``x / u``, ``y / u`` and costs over ``u^2``, an exact rescaling with the same partners. The unit is
chosen by the fit from the dataset and a source probe; a batch far larger than that unit is scored with all its
scores multiplied by one more power of two. The potentials are kept in cost units in float64.

Memory. Besides the dataset (never copied) and one ``(N,)`` vector per derived quantity (squared norms,
potentials), the fit and the pairing use ``memory_budget`` bytes: scores, and the passes over the dataset
(squared norms, the warm start) go block by block; the bfloat16 screen is used only where its copy of the
dataset fits in the budget too.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_count, check_flag, check_generator, check_rate
from otcfm._checks import check_batch, check_finite, mark_invalid, value_checks_queued
from otcfm.couplers.base import Coupler, Pairing, check_labels
from otcfm.couplers.screening import MAX_DIM, Screen, fast_bfloat16, padded_rows
from otcfm.couplers.sinkhorn import ConvergenceWarning

__all__ = ["SemidiscreteCoupler", "SemidiscreteFit", "noise_floor"]

#: Datasets smaller than this are paired in float32 unless ``screen=True``: the screen's fixed cost is larger than
#: its gain there (measured on a 2-core AVX512-BF16 CPU).
SCREEN_MIN_POINTS = 8192

#: File kind recorded by :meth:`SemidiscreteCoupler.save`.
KIND = "otcfm.semidiscrete-potentials"

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


class SemidiscreteCoupler(Coupler):
    r"""Pair each source sample with a point of the whole dataset by fitted semidiscrete OT potentials.

    Call it with a source batch ``x0: (B, ...)`` and the dataset the potentials were fitted on,
    ``x1: (N, ...)``: it returns ``i = arange(B)`` and the partner ``j`` of each source sample,
    ``argmin_j ||x0_i - x1_j||^2 - g_j`` (``epsilon = 0``) or a draw from the softmax of
    ``(g_j - ||x0_i - x1_j||^2) / epsilon``. Fit first (:meth:`fit`), or :meth:`load` potentials.

    Args:
        epsilon: entropic regularisation, ``>= 0``; relative to the mean cost unless ``relative=False``.
        relative: see ``epsilon``.
        memory_budget: bytes of working memory beside the dataset: one block of scores (the dataset is scored in
            chunks of ``memory_budget // (8 B)`` points), one block of rows in the passes over the dataset, and
            the screen's bfloat16 copy of the dataset with its scores.
        online_lr: when set, every pairing during training also takes a gradient step of this size
            (relative to the mean cost) on the potentials, from the batch's own assignment: the
            potentials keep adapting (off by default: the fitted potentials stay fixed).
        screen: score in bfloat16 first, then only the candidates in float32
            (:mod:`otcfm.couplers.screening`): the same partners, at about half the cost of the ``B x N x D``
            product where bfloat16 products are fast, for a bfloat16 copy of the dataset (half its float32 size).
            Used for ``epsilon = 0`` without labels when that copy and the ``(B, N)`` bfloat16 scores together fit
            ``memory_budget``, in one process (not by :class:`SemidiscreteShard`). None (the default): on a CPU
            with AVX512-BF16 for datasets of at least 8,192 float32 points (the screen's fixed cost exceeds its
            gain below); True or False to choose. A batch with too many near-ties is scored in float32 after all
            (exact either way).
        fit_steps, fit_batch_size, fit_lr: defaults of :meth:`fit`'s ``steps``, ``batch_size`` and ``lr``
            (``otcfm.train`` fits with them: ``coupler_options={"fit_steps": 2000}``).

    Attributes:
        potentials: ``(N,)`` float64 fitted dual potentials ``g`` in cost units, or None before a fit.
        unit: the power of two the scores are computed in units of (``x / unit``, costs over ``unit^2``): 1 for
            inputs of ordinary scale; chosen by :meth:`fit` (see the module docstring).
        fingerprint: content hash of the dataset they belong to.
        labels: ``(N,)`` integer classes of the dataset when fitted with ``y1`` (pairing then stays in class; a
            source sample of a class without data points is an error).
    """

    name = "semidiscrete"
    sources_in_order = True
    pairs_with_dataset = True

    def __init__(
        self,
        epsilon: float = 0.0,
        relative: bool = True,
        memory_budget: int = 2**28,
        online_lr: float | None = None,
        screen: bool | None = None,
        fit_steps: int = 1000,
        fit_batch_size: int = 1024,
        fit_lr: float = 0.01,
    ) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon)):
            raise ValueError(f"epsilon: expected a finite number >= 0, got {epsilon!r}")
        if epsilon < 0:
            raise ValueError(f"epsilon: expected a finite number >= 0, got {epsilon!r}")
        check_count(memory_budget, "memory_budget")
        if online_lr is not None:
            check_rate(online_lr, "online_lr")
        check_count(fit_steps, "fit_steps")
        check_count(fit_batch_size, "fit_batch_size")
        check_rate(fit_lr, "fit_lr")
        self.fit_steps, self.fit_batch_size, self.fit_lr = fit_steps, fit_batch_size, float(fit_lr)
        self.epsilon, self.relative = float(epsilon), check_flag(relative, "relative")
        if screen is not None and not isinstance(screen, bool):
            raise ValueError(f"screen: expected True, False or None, got {screen!r}")
        self.memory_budget, self.online_lr, self.screen = int(memory_budget), online_lr, screen
        self.potentials: Tensor | None = None
        self.unit = 1.0
        self.fingerprint: str | None = None
        self.labels: Tensor | None = None
        self.mean_cost: float | None = None
        self.steps = 0
        self._classes: Tensor | None = None
        self._verified: tuple[Any, ...] | None = None
        self._verified_tensor: weakref.ref[Tensor] | None = None
        self._square: tuple[Any, Tensor] | None = None
        self._offsets: tuple[Tensor, int, Any, Tensor] | None = None
        self._screen: tuple[Any, Tensor, Screen] | None = None

    # ----------------------------------------------------------------------------------------------- pairing

    def entropic_epsilon(self) -> tuple[float, bool] | None:
        return (self.epsilon, self.relative) if self.epsilon > 0 else None

    def absolute_epsilon(self) -> float:
        """``epsilon`` in cost units (needs the fitted mean cost when relative)."""
        if not self.relative or self.epsilon == 0:
            return self.epsilon
        if self.mean_cost is None:
            raise ValueError("epsilon: a relative epsilon needs fitted potentials (call fit or load first)")
        return self.epsilon * self.mean_cost

    def scan_inputs(self, x0: Tensor, x1: Tensor) -> None:
        """Scan ``x0`` for NaN/Inf, and the dataset ``x1`` only if it is not the tensor already verified (fingerprint
        and scan, :meth:`check_dataset`): a scan of all ``N`` points on every call would cost a good part of a step."""
        check_finite(x0, "x0")
        if not self._is_verified(x1):
            check_finite(x1, "x1")

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        self.check_dataset(x1, y1)
        assert self.potentials is not None
        a, data = _flat(x0), _flat(x1)
        classes = self._source_classes(y0, a.shape[0], generator, a.device)
        labels = None if self.labels is None else self.labels.to(data.device)
        h = self._score_offsets(data)
        x, factor = _scaled_batch(a, self.unit)
        chunk, epsilon = self._chunk(a.shape[0]), self.absolute_epsilon() / self.unit**2
        screen = self._screen_for(x1, data, a.shape[0], epsilon)
        h = h if factor == 1.0 else h * factor
        j = _partners_and_scores(x, data, h, epsilon * factor, chunk, labels, classes, generator, screen)[0]
        if self.online_lr is not None:
            counts = torch.bincount(j, minlength=data.shape[0]).to(self.potentials.dtype)
            step = self.online_lr * float(self.mean_cost or 1.0)
            self.potentials.add_((step * (1.0 - data.shape[0] * counts / a.shape[0])).to(self.potentials))
            self._offsets = None  # derived from the potentials before this update
        return Pairing(torch.arange(a.shape[0], device=x0.device), j.to(x0.device))

    def _chunk(self, batch: int) -> int:
        return max(1, self.memory_budget // (8 * batch))

    def _rows(self, data: Tensor) -> int:
        """Rows of ``data: (N, D)`` per block of a pass over the dataset: a float64 copy of a block takes a quarter of
        ``memory_budget``, so that it and its temporaries fit."""
        return max(1, self.memory_budget // (32 * data.shape[1]))

    def _squares(self, data: Tensor) -> Tensor:
        """``|y_j / unit|^2`` of the verified dataset ``data: (N, D)``, ``(N,)``: computed once per dataset."""
        key = (self._verified, self.unit, data.dtype, data.device)
        if self._square is None or self._square[0] != key:
            self._square = (key, _squared_norms(data, self.unit, self._rows(data)))
        return self._square[1]

    def _score_offsets(self, data: Tensor) -> Tensor:
        """``h_j = g_j / unit^2 - |y_j / unit|^2`` of the verified dataset ``data: (N, D)``, ``(N,)`` in its dtype:
        the score of ``y_j`` is ``2 (x / unit^2).y_j + h_j``. Derived again when the potentials change (a new
        tensor, or an update of the online mode, which drops the cache). Potentials changed in place by other code
        are not seen: assign a new tensor, or use :meth:`load_state_dict`."""
        g = self.potentials
        assert g is not None
        cached, key = self._offsets, (self._verified, self.unit, data.dtype, data.device)
        if cached is not None and cached[0] is g and cached[1] == key:
            return cached[2]
        scaled = _times_power_of_two(g.detach().to(device=data.device, dtype=torch.float64), -2 * _exponent(self.unit))
        h = scaled.to(data.dtype) - self._squares(data)
        self._offsets = (g, key, h)
        return h

    def _screen_for(self, data: Tensor, flat: Tensor, batch: int, epsilon: float) -> Screen | None:
        """The :class:`Screen` of the dataset ``data: (N, ...)`` (flattened: ``flat``) when pairing ``batch``
        samples goes through one, else None. One per dataset tensor, shared by :meth:`fit`, :meth:`evaluate` and
        pairing; the record holds ``data``, so no other tensor can take its address while the key stands."""
        if not self._screens(flat, batch, epsilon):
            return None
        key = _dataset_key(data)
        if self._screen is None or self._screen[0] != key:
            self._screen = (key, data, Screen(flat, self.memory_budget))
        return self._screen[2]

    def _screens(self, data: Tensor, batch: int, epsilon: float) -> bool:
        """Whether pairing ``batch`` samples with ``data: (N, D)`` goes through a :class:`Screen`."""
        usable = epsilon == 0 and self.labels is None and data.dtype == torch.float32 and data.shape[1] <= MAX_DIM
        copy = 2 * padded_rows(data.shape[0]) * (data.shape[1] + 2)  # the screen's bfloat16 copy of the dataset
        usable = usable and copy + 2 * batch * (data.shape[0] + 256) <= self.memory_budget  # + (B, N) scores
        if self.screen is not None:
            return self.screen and usable
        return usable and data.shape[0] >= SCREEN_MIN_POINTS and fast_bfloat16(data.device)

    def _source_classes(
        self, y0: Tensor | None, batch: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor | None:
        """Classes of the source samples: ``y0``, or a random data point's class (the classes' proportions)."""
        if self.labels is None:
            if y0 is not None:
                raise ValueError("y0: these potentials were fitted without labels; fit with y1 to pair within classes")
            return None
        if y0 is None:
            return self.labels.to(device)[_random.randint(self.labels.shape[0], (batch,), generator, device)]
        if y0.ndim != 1 or y0.is_floating_point():
            raise ValueError(f"y0: expected integer class labels of shape ({batch},)")
        classes = y0.to(device)
        if self._classes is None:
            self._classes = torch.unique(self.labels)
        known = self._classes.to(device)
        absent = ~torch.isin(classes, known)
        if bool(absent.any()):  # a host read on every device: a partner index cannot carry the fault as NaN
            missing = torch.unique(classes[absent]).tolist()
            raise ValueError(
                f"y0: classes {missing[:10]} have no point in the dataset (the potentials' labels hold classes "
                f"{known.tolist()[:20]}); a source sample is paired within its class"
            )
        return classes

    def __getstate__(self) -> dict[str, Any]:
        """For pickling: without the record of the last verified dataset tensor (the next call verifies again)
        and what was derived from it."""
        state = self.__dict__.copy()
        state["_verified"] = state["_verified_tensor"] = state["_screen"] = state["_offsets"] = None
        state["_square"] = None
        return state

    def _is_verified(self, x1: Tensor) -> bool:
        """Whether ``x1`` is the tensor :meth:`check_dataset` verified last (the same object, storage, shape, dtype
        and device).

        Changes made in place to that tensor after it was verified are not seen: pass a fresh tensor, or call
        :meth:`check_dataset` after such a write.
        """
        ref = self._verified_tensor
        return ref is not None and ref() is x1 and _dataset_key(x1) == self._verified

    def check_dataset(self, x1: Tensor, y1: Tensor | None = None) -> None:
        """Raise ValueError unless ``x1`` (and ``y1``) are the dataset (and labels) the potentials were fitted on."""
        if self.potentials is None or self.fingerprint is None:
            raise ValueError("potentials: not fitted; call fit(source, target) or load potentials first")
        n = self.potentials.shape[0]
        if x1.shape[0] != n:
            raise ValueError(
                f"x1: expected the whole dataset of {n} points the potentials were fitted on, got {x1.shape[0]}"
            )
        if not self._is_verified(x1):  # hashing and the NaN/Inf scan are O(N d): once per dataset tensor, not per step
            check_finite(x1, "x1")
            found = fingerprint(x1)
            if found != self.fingerprint:
                raise ValueError(
                    f"x1: these potentials were fitted on another dataset (fingerprint {self.fingerprint}, got "
                    f"{found}); fit again on this data or pass the data they were fitted on"
                )
            self._verified, self._verified_tensor = _dataset_key(x1), weakref.ref(x1)
        if self.labels is not None and y1 is not None and not torch.equal(y1.to(self.labels.device), self.labels):
            raise ValueError("y1: not the labels the potentials were fitted with")

    # ------------------------------------------------------------------------------------------------- fit

    def fit(
        self,
        source: Any,
        target: Tensor,
        steps: int | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        *,
        y1: Tensor | None = None,
        lr: float | None = None,
        eval_samples: int | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 100,
        progress: bool = True,
    ) -> SemidiscreteFit:
        r"""Fit the potentials by averaged stochastic gradient ascent on the semi-dual.

        Step ``k`` draws ``batch_size`` source samples, computes the share ``w_j`` of the batch each data
        point receives (partner counts, or softmax weights for ``epsilon > 0``) and ascends along the
        gradient scaled by ``N``: ``g <- g + lr_k (1 - N w)``, with ``lr_k = lr * mean_cost / sqrt(1 + k)``;
        the potentials returned are the average of the iterates of the second half (Polyak-Ruppert).

        Args:
            source: the source distribution: a dataset name (``"gaussian"`` draws the target's shape), a
                sampler ``f(n, generator)``, or a tensor to draw rows from (see :func:`otcfm.data.as_source`).
            target: ``(N, ...)`` the whole dataset, on the device to fit on.
            steps: gradient steps in total (a resumed fit continues up to it); ``fit_steps`` when None.
            batch_size: source samples per step; ``fit_batch_size`` when None.
            generator: randomness of the source draws (and of class draws with labels).
            y1: ``(N,)`` integer classes of the dataset: potentials per class, pairing within a class.
            lr: step size relative to the mean cost; ``fit_lr`` when None.
            eval_samples: fresh source samples of the report's assignment error and dual; ``10 N`` when None
                (``100 N`` brings the sampling noise to about 0.04).
            checkpoint: a file to save the fit's state to every ``checkpoint_every`` steps and resume from.
            checkpoint_every: steps between checkpoints.
            progress: show a progress bar.

        Returns:
            a :class:`SemidiscreteFit` report; the potentials are set on the coupler.

        Raises:
            ValueError, TypeError: an empty, non-finite or 1-D target, bad counts or rates, labels of the
                wrong shape, a source of another sample shape or one that draws NaN/Inf, a checkpoint of another
                problem, or magnitudes no power-of-two unit brings into the dtype's range (float32 values below
                about ``2^-120``, float64 ones beyond ``2^500`` or below ``2^-500``).

        Warns:
            ConvergenceWarning: the report's assignment error is above ``FAR_ABOVE_FLOOR`` (3) times its noise
                floor: the potentials are far from optimal (more steps, another ``lr``, or source and target of
                very different scales).
        """
        from otcfm.data.sources import as_source

        data = check_batch(target, "target")
        steps = self.fit_steps if steps is None else steps
        batch_size = self.fit_batch_size if batch_size is None else batch_size
        lr = self.fit_lr if lr is None else lr
        check_count(steps, "steps")
        check_count(batch_size, "batch_size")
        check_count(checkpoint_every, "checkpoint_every")
        check_rate(lr, "lr")
        check_generator(generator)
        if eval_samples is not None:
            check_count(eval_samples, "eval_samples")
        if y1 is not None:
            check_labels(y1, data.shape[0], "y1")
            if y1.ndim != 1 or y1.is_floating_point():
                raise ValueError(f"y1: expected integer class labels of shape ({data.shape[0]},)")
        draw = as_source(source, "source", like=_shape_of(data))
        if tuple(draw.shape) != tuple(data.shape[1:]):
            raise ValueError(f"source: draws samples of shape {draw.shape}, the target's are {tuple(data.shape[1:])}")
        flat = _flat(data.detach())
        n, device = flat.shape[0], flat.device
        labels = None if y1 is None else y1.detach().to(device)

        def sample(count: int) -> Tensor:
            return _drawn(draw, count, generator, flat)

        def classes(count: int) -> Tensor | None:
            return None if labels is None else labels[_random.randint(n, (count,), generator, device)]

        self.fingerprint, self.labels, self._verified = fingerprint(data), labels, None
        self._classes = None if labels is None else torch.unique(labels)
        self._square = self._offsets = None
        probe = sample(1024)
        unit = _unit_for(flat, probe)
        state = self._start_state(checkpoint, n, steps, flat.dtype, device, unit)
        self.unit = unit = state["unit"]
        rows = self._rows(flat)
        probe = _times_power_of_two(probe, -_exponent(unit))  # x / unit
        mean_cost = _mean_cost(probe, flat, unit, rows)  # in units of unit^2
        self.mean_cost = mean_cost * unit**2
        if state["step"] == 0:
            state["g"] = _affine_warm_start(probe, flat, unit, rows)
        epsilon = self.absolute_epsilon() / unit**2
        chunk = self._chunk(batch_size)
        screen = self._screen_for(data, flat, batch_size, epsilon)
        square = _squared_norms(flat, unit, rows)
        g, average, averaged = state["g"], state["average"], state["averaged"]
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        from tqdm.auto import tqdm

        started = time.perf_counter()
        with tqdm(
            total=steps, initial=state["step"], disable=not progress, desc="semidiscrete fit", unit="step"
        ) as bar:
            for k in range(state["step"], steps):
                x, factor = _scaled_batch(sample(batch_size), unit)
                h = g - square if factor == 1.0 else (g - square) * factor
                share = _shares(x, flat, h, epsilon * factor, chunk, labels, classes(batch_size), screen)
                g += (lr * mean_cost / math.sqrt(1.0 + k)) * (1.0 - n * share)
                if k >= steps // 2:
                    averaged += 1
                    average += (g - average) / averaged
                bar.update(1)
                if checkpoint is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
                    self._save_state(checkpoint, g, average, averaged, k + 1, steps, generator)
        seconds = time.perf_counter() - started
        final = average if averaged else g
        self.potentials = _times_power_of_two(final.to(torch.float64, copy=True), 2 * _exponent(unit))
        self.steps = steps
        report = self.evaluate(source, data, eval_samples or 10 * n, generator, seconds=seconds)
        if report.assignment_error > FAR_ABOVE_FLOOR * report.noise_floor:
            warnings.warn(
                f"semidiscrete fit: assignment error {report.assignment_error:.3f} after {steps} steps, "
                f"{report.assignment_error / report.noise_floor:.1f}x its noise floor {report.noise_floor:.3f}: the "
                "potentials are far from optimal; fit longer (steps), change lr, or bring source and target to "
                "similar scales",
                ConvergenceWarning,
                stacklevel=2,
            )
        return report

    def _start_state(
        self,
        checkpoint: str | Path | None,
        n: int,
        steps: int,
        dtype: torch.dtype,
        device: torch.device,
        unit: float,
    ) -> dict[str, Any]:
        """A fresh fit's state (potentials in units of ``unit^2``), or the one saved in ``checkpoint``."""
        fresh = {
            "g": torch.zeros(n, dtype=dtype, device=device),
            "average": torch.zeros(n, dtype=dtype, device=device),
            "averaged": 0,
            "step": 0,
            "unit": unit,
        }
        if checkpoint is None or not Path(checkpoint).exists():
            return fresh
        from otcfm import checkpoint as files

        state = files.load(checkpoint, "semidiscrete fit checkpoint")
        if state.get("kind") != KIND + "-fit" or state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint: {checkpoint} is not a fit of these potentials on this dataset")
        if state.get("steps") != steps:
            raise ValueError(f"checkpoint: {checkpoint} was a fit of {state.get('steps')} steps, not {steps}")
        return {
            "g": state["g"].to(device=device, dtype=dtype),
            "average": state["average"].to(device=device, dtype=dtype),
            "averaged": int(state["averaged"]),
            "step": int(state["step"]),
            "generator": state.get("generator"),
            "unit": _check_unit(state.get("unit", 1.0), "checkpoint"),
        }

    def _save_state(
        self,
        path: str | Path,
        g: Tensor,
        average: Tensor,
        averaged: int,
        step: int,
        steps: int,
        generator: torch.Generator | None,
    ) -> None:
        from otcfm import checkpoint as files

        files.atomic_save(
            {
                "kind": KIND + "-fit",
                "fingerprint": self.fingerprint,
                "unit": self.unit,
                "g": g.cpu(),
                "average": average.cpu(),
                "averaged": averaged,
                "step": step,
                "steps": steps,
                "generator": None if generator is None else generator.get_state(),
            },
            path,
        )

    def evaluate(
        self,
        source: Any,
        target: Tensor,
        samples: int,
        generator: torch.Generator | None = None,
        *,
        seconds: float = 0.0,
        batch_size: int = 1024,
    ) -> SemidiscreteFit:
        """Report the assignment error and semi-dual objective of the current potentials on fresh samples.

        Args:
            source: as in :meth:`fit`.
            target: ``(N, ...)`` the dataset of the potentials.
            samples: fresh source samples to draw.
            generator: randomness of the draws.
            seconds: fitting time to put in the report.
            batch_size: samples scored at once.

        Returns:
            a :class:`SemidiscreteFit`.

        Raises:
            ValueError, TypeError: a target that is not the potentials' dataset, a bad count or generator, a
                source of another sample shape or one that draws NaN/Inf.
        """
        from otcfm.data.sources import as_source
        from otcfm.metrics.coupling import error_of_counts

        data = check_batch(target, "target")
        self.check_dataset(data, None)
        check_count(samples, "samples")
        check_generator(generator)
        assert self.potentials is not None and self.mean_cost is not None
        draw = as_source(source, "source", like=_shape_of(data))
        if tuple(draw.shape) != tuple(data.shape[1:]):
            raise ValueError(f"source: draws samples of shape {draw.shape}, the target's are {tuple(data.shape[1:])}")
        flat = _flat(data.detach())
        n, device, unit = flat.shape[0], flat.device, self.unit
        h = self._score_offsets(flat)
        labels = None if self.labels is None else self.labels.to(device)
        epsilon, chunk = self.absolute_epsilon() / unit**2, self._chunk(batch_size)
        screen = self._screen_for(data, flat, batch_size, epsilon)
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
        dual = unit**2 * (transform_sum / samples) + float(self.potentials.double().mean())
        return SemidiscreteFit(
            steps=self.steps,
            seconds=seconds,
            dual=dual,
            assignment_error=error_of_counts(counts),
            noise_floor=noise_floor(samples, n),
            eval_samples=samples,
            mean_cost=float(self.mean_cost),
        )

    # ----------------------------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """The fitted potentials and what identifies them, for :meth:`save` and training checkpoints."""
        if self.potentials is None:
            raise ValueError("potentials: not fitted; call fit(source, target) first")
        return {
            "kind": KIND,
            "potentials": self.potentials.detach().cpu(),
            "unit": self.unit,
            "fingerprint": self.fingerprint,
            "labels": None if self.labels is None else self.labels.cpu(),
            "mean_cost": self.mean_cost,
            "epsilon": self.epsilon,
            "relative": self.relative,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any], target: Tensor | None = None) -> SemidiscreteCoupler:
        """Set the potentials from :meth:`state_dict`; with ``target``, check at once that they belong to it."""
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise ValueError("state: not semidiscrete potentials (saved by SemidiscreteCoupler.save)")
        potentials = state["potentials"]
        if not isinstance(potentials, Tensor) or potentials.ndim != 1 or not bool(torch.isfinite(potentials).all()):
            raise ValueError("state: the potentials are not a finite (N,) tensor")
        if (state["epsilon"], state["relative"]) != (self.epsilon, self.relative):
            raise ValueError(
                f"epsilon: the potentials were fitted at epsilon={state['epsilon']} (relative={state['relative']}), "
                f"this coupler has epsilon={self.epsilon} (relative={self.relative})"
            )
        self.unit = _check_unit(state.get("unit", 1.0), "state")
        self.potentials = potentials.to(torch.float64, copy=True)
        self.fingerprint = str(state["fingerprint"])
        self.labels, self.mean_cost = state["labels"], float(state["mean_cost"])
        self._classes = None if self.labels is None else torch.unique(self.labels)
        self.steps, self._verified, self._square, self._offsets = int(state["steps"]), None, None, None
        if target is not None:
            self.check_dataset(check_batch(target, "target"), None)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the potentials, with the dataset's fingerprint, to ``path`` (atomic, checksummed)."""
        from otcfm import checkpoint as files

        return files.atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, target: Tensor | None = None, **options: Any) -> SemidiscreteCoupler:
        """A coupler with the potentials saved at ``path`` (epsilon as saved unless given in ``options``).

        Args:
            path: a file written by :meth:`save`.
            target: the dataset, to check at once that the potentials belong to it.
            **options: constructor options (``memory_budget``, ``online_lr``).

        Raises:
            ValueError: a corrupt or foreign file, or potentials of another dataset.
        """
        from otcfm import checkpoint as files

        state = files.load(path, "semidiscrete potentials")
        if state.get("kind") != KIND:
            raise ValueError(f"semidiscrete potentials: {path} holds no potentials (saved by SemidiscreteCoupler.save)")
        options = {"epsilon": state["epsilon"], "relative": state["relative"], **options}
        return cls(**options).load_state_dict(state, target)

    def __repr__(self) -> str:
        kind = "relative" if self.relative else "absolute"
        fitted = "unfitted" if self.potentials is None else f"N={self.potentials.shape[0]}"
        return f"SemidiscreteCoupler(epsilon={self.epsilon} ({kind}), {fitted})"


# --------------------------------------------------------------------------------------------------- kernels


def fingerprint(data: Tensor) -> str:
    """Content hash of a dataset: SHA-256 of its shape, dtype and values (first 16 hex digits)."""
    from otcfm.data.sources import content_hash

    return content_hash(data)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _shape_of(data: Tensor) -> Any:
    """A stand-in for the dataset ``data: (N, ...)`` that gives :func:`~otcfm.data.as_source` its sample shape (for
    ``"gaussian"``) without a scan or a copy of the data."""
    from otcfm.data.sources import as_source

    return as_source(torch.zeros(1, *data.shape[1:]), "target")


def _drawn(draw: Any, count: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``count`` source samples, flattened, checked for NaN/Inf (named ``source``), on ``like``'s device and dtype."""
    x = _flat(draw(count, generator))
    check_finite(x, "source")
    return x.to(device=like.device, dtype=like.dtype)


def _exponent(unit: float) -> int:
    """``k`` of a power of two ``unit = 2^k``."""
    return math.frexp(unit)[1] - 1


def _times_power_of_two(x: Tensor, exponent: int) -> Tensor:
    """``x * 2^exponent``, exact barring under- or overflow of the result (in steps the dtype can hold); ``x``
    itself for ``exponent = 0``."""
    while exponent != 0:
        step = max(-60, min(60, exponent))
        x = x * 2.0**step
        exponent -= step
    return x


def _largest(x: Tensor) -> float:
    """``max |x|`` without a temporary of ``x``'s size."""
    low, high = torch.aminmax(x)
    return max(float(high), -float(low))


def _plain_range(dtype: torch.dtype) -> tuple[float, float]:
    """Magnitudes scored without a unit: within ``2^(e/4)`` of 1, ``e`` the dtype's extreme exponents (``[2^-31,
    2^32]`` for float32): their squares, summed over a row, stay normal numbers of the dtype."""
    info = torch.finfo(dtype)
    return 2.0 ** (math.frexp(info.tiny)[1] / 4), 2.0 ** (math.frexp(info.max)[1] / 4)


def _unit_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents ``k`` of the units ``2^k`` that scoring in ``dtype`` can use: ``1 / unit`` a number of the dtype
    with room for the products, ``unit^2`` (cost units) a float64."""
    top = math.frexp(torch.finfo(dtype).max)[1]
    return -min(top - 8, 500), 500


def _check_unit(unit: object, name: str) -> float:
    if isinstance(unit, bool) or not isinstance(unit, (int, float)) or not 0 < unit < math.inf:
        raise ValueError(f"{name}: expected a power of two as the unit, got {unit!r}")
    if math.frexp(unit)[0] != 0.5:
        raise ValueError(f"{name}: expected a power of two as the unit, got {unit!r}")
    return float(unit)


def _unit_for(data: Tensor, probe: Tensor) -> float:
    """The unit of a fit on ``data: (N, D)`` from the source ``probe: (M, D)``: 1 when the largest magnitude of both
    lies in :func:`_plain_range`, else the power of two just above it.

    Raises:
        ValueError: magnitudes no unit of :func:`_unit_range` brings into range, naming ``target`` or ``source``.
    """
    top_data, top_probe = _largest(data), _largest(probe)
    largest = max(top_data, top_probe)
    low, high = _plain_range(data.dtype)
    if largest == 0.0 or low <= largest <= high:
        return 1.0
    exponent = math.frexp(largest)[1]
    lowest, highest = _unit_range(data.dtype)
    if not lowest <= exponent <= highest:
        name = "target" if top_data >= top_probe else "source"
        raise ValueError(
            f"{name}: magnitudes up to {largest:.3g} cannot be scored in {data.dtype} at any power-of-two unit "
            f"(2^{lowest} to 2^{highest}); rescale the data"
            + (" or pass float64 data" if data.dtype != torch.float64 else "")
        )
    return math.ldexp(1.0, exponent)


def _scaled_batch(x: Tensor, unit: float) -> tuple[Tensor, float]:
    """``(c x / unit^2, c)`` for source samples ``x: (B, D)``: ``c = 1`` unless ``max |x| / unit``
    exceeds the dtype's plain range, then the power of two that brings it to 1. ``2 (c x / unit^2).y_j + c h_j`` is
    ``c`` times the score in units of ``unit^2``: the same partners, and no overflow however large ``x`` is.

    On CUDA, where reading ``max |x|`` on the host would stall each step, ``c = 1`` and such a batch is made NaN
    (:func:`otcfm._checks.mark_invalid`), which its loss then carries (as the value checks of :mod:`otcfm._checks`)."""
    exponent, high = _exponent(unit), _plain_range(x.dtype)[1]
    if value_checks_queued(x):
        x = mark_invalid(x, x.abs().amax() <= high * unit)
        extra = 0
    else:
        largest = _largest(x) / unit
        extra = math.frexp(largest)[1] if largest > high else 0
    if exponent == 0 and extra == 0:
        return x, 1.0
    return _times_power_of_two(x, -2 * exponent - extra), math.ldexp(1.0, -extra)


def _squared_norms(data: Tensor, unit: float, rows: int) -> Tensor:
    """``|y_j / unit|^2`` of the rows of ``data: (N, D)``: ``(N,)`` in its dtype, ``rows`` rows at a time (no
    temporary of the dataset's size)."""
    exponent = _exponent(unit)
    out = torch.empty(data.shape[0], dtype=data.dtype, device=data.device)
    for start in range(0, data.shape[0], rows):
        block = _times_power_of_two(data[start : start + rows], -exponent)
        out[start : start + rows] = (block * block).sum(1)
    return out


def _mean_cost(x: Tensor, data: Tensor, unit: float, rows: int) -> float:
    """Mean squared distance between source samples ``x`` (in units of ``unit``) and (up to 4096) data points, in
    units of ``unit^2``: ``mean |x|^2 + mean |y|^2 - 2 mean(x).mean(y)``, summed in float64 ``rows`` rows at a
    time."""
    y, exponent = data[:4096], _exponent(unit)
    column, square = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device), 0.0
    for start in range(0, y.shape[0], rows):
        block = _times_power_of_two(y[start : start + rows].double(), -exponent)
        column += block.sum(0)
        square += float(block.square().sum())
    a = x.double()
    mean = float(a.square().sum(1).mean()) + square / y.shape[0] - 2.0 * float(a.mean(0) @ (column / y.shape[0]))
    return max(mean, 1e-30)


def _affine_warm_start(x: Tensor, data: Tensor, unit: float, rows: int) -> Tensor:
    r"""Potentials whose pairing is the OT map to an isotropic Gaussian fit of the data: ``(N,)``, in units of
    ``unit^2`` (``x``, the source probe, is in units of ``unit``).

    With ``T(x) = s x + m`` (``s`` the ratio of the data's and the source's standard deviations, ``m`` matching
    the means), ``g_j = |y_j|^2 - |y_j - m|^2 / s`` makes ``argmax_j 2 x.y_j + g_j - |y_j|^2`` the data point
    nearest to ``T(x)``: far better than ``g = 0`` (nearest neighbour of ``x`` itself) when the data are more
    spread out or shifted than the source, so the ascent starts near the optimum. The data's mean and spread
    are summed in float64 ``rows`` rows at a time.
    """
    exponent, n = _exponent(unit), data.shape[0]

    def blocks() -> Any:
        for start in range(0, n, rows):
            yield start, _times_power_of_two(data[start : start + rows], -exponent)

    mean = sum(block.double().sum(0) for _, block in blocks()) / n
    spread_y = float(sum(float((block.double() - mean).square().sum()) for _, block in blocks())) / n
    spread_x = float(x.double().var(0, unbiased=False).sum())
    if spread_x <= 0 or spread_y <= 0:
        return torch.zeros(n, dtype=data.dtype, device=data.device)
    scale = math.sqrt(spread_y / spread_x)
    shift = (mean - scale * x.double().mean(0)).to(data.dtype)
    out = torch.empty(n, dtype=data.dtype, device=data.device)
    for start, block in blocks():
        out[start : start + block.shape[0]] = (block * block).sum(1) - ((block - shift) ** 2).sum(1) / scale
    return out


def _dataset_key(x1: Tensor) -> tuple[Any, ...]:
    """What identifies a dataset tensor between calls: storage, shape, strides, dtype, device."""
    return (x1.data_ptr(), tuple(x1.shape), x1.stride(), x1.dtype, x1.device)


def _scores(x: Tensor, data: Tensor, h: Tensor, start: int, stop: int) -> Tensor:
    """``2 x.y_j + h_j`` for ``j`` in ``[start, stop)``: ``(B, stop - start)``; equals ``g_j - c(x, y_j) + |x|^2``."""
    return torch.addmm(h[None, start:stop], x, data[start:stop].T, alpha=2.0)


def _masked(scores: Tensor, labels: Tensor | None, classes: Tensor | None, start: int, stop: int) -> Tensor:
    if labels is None or classes is None:
        return scores
    return scores.masked_fill(labels[None, start:stop] != classes[:, None], -math.inf)


_BLOCK = 256  # columns per block of the two-level row maximum


def _row_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=1)`` of a ``(B, n)`` block, about 5x faster on the CPU for long rows.

    ``max`` with indices is a slow reduction, ``amax`` a vectorised one: take the ``amax`` of blocks of
    :data:`_BLOCK` columns, then the index inside each row's best block only. Ties go to the first index.
    """
    b, n = scores.shape
    full = n - n % _BLOCK
    if full < 4 * _BLOCK:
        return scores.max(dim=1)
    block_max = scores[:, :full].unflatten(1, (full // _BLOCK, _BLOCK)).amax(dim=2)
    _, block = block_max.max(dim=1)
    columns = block[:, None] * _BLOCK + torch.arange(_BLOCK, device=scores.device)
    value, offset = scores.gather(1, columns).max(dim=1)
    index = block * _BLOCK + offset
    if full < n:
        tail_value, tail_index = scores[:, full:].max(dim=1)
        better = tail_value > value
        value, index = torch.where(better, tail_value, value), torch.where(better, tail_index + full, index)
    return value, index


def _partners_and_scores(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    generator: torch.Generator | None,
    screen: Screen | None = None,
) -> tuple[Tensor, Tensor]:
    """Partners ``(B,)`` of source samples ``x: (B, D)`` and their score ``max_j 2 x.y_j + h_j`` ``(B,)``.

    ``h: (N,)`` are the score offsets ``g_j - |y_j|^2`` (in the units of ``x``, see :func:`_scaled_batch`).
    ``epsilon = 0``: the argmax, and ``|x|^2 - score`` is the c-transform ``min_j c(x, y_j) - g_j``.
    ``epsilon > 0``: a draw from the softmax of ``score / epsilon`` by Gumbel-max (the score then carries the
    Gumbel noise). ``screen``: ``data`` prepared for the screened argmax (``epsilon = 0`` without labels only).
    """
    if screen is not None:
        if epsilon > 0 or labels is not None:
            raise ValueError("screen: only for epsilon = 0 without labels")
        found = screen.argmax(x, h)
        if found is not None:
            return found
    n = data.shape[0]
    best = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    partner = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop)
        if epsilon > 0:
            value, index = _gumbel_max(scores.div_(epsilon), generator)
        else:
            value, index = _row_max(scores)
        better = value > best
        best = torch.where(better, value, best)
        partner = torch.where(better, index + start, partner)
    return partner, best


#: Entries more than this below their row's maximum (in units of epsilon) are left out of a softmax draw: each has
#: a probability below e^-30 (1e-13) relative to the maximum, so the draw's distribution moves by under N e^-30.
_TAU = 30.0


def _gumbel_max(logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A draw from the softmax of each row of ``logits: (B, n)``: ``(perturbed maximum, index)``, each ``(B,)``.

    Gumbel noise is drawn only for the candidates within :data:`_TAU` of their row's maximum (one vectorised
    comparison), not for all ``B n`` entries: for a sharp softmax that is a handful per row.
    """
    rows, cols = (logits >= (logits.amax(dim=1) - _TAU)[:, None]).nonzero(as_tuple=True)
    uniform = _random.rand((rows.shape[0],), generator, logits.device, logits.dtype).clamp_min_(1e-30)
    noisy = logits[rows, cols] - torch.log(-torch.log(uniform))
    value = torch.full((logits.shape[0],), -math.inf, dtype=logits.dtype, device=logits.device)
    value = value.scatter_reduce(0, rows, noisy, reduce="amax")
    winner = noisy == value[rows]
    index = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return value, index.scatter_(0, rows[winner], cols[winner])


def _shares(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    screen: Screen | None = None,
) -> Tensor:
    """Share of the batch ``x: (B, D)`` each data point receives, ``(N,)``: partner counts / B, or mean softmax
    (``h``: the score offsets, as in :func:`_partners_and_scores`)."""
    if epsilon == 0:
        partner = _partners_and_scores(x, data, h, 0.0, chunk, labels, classes, None, screen)[0]
        return torch.bincount(partner, minlength=data.shape[0]).to(h.dtype) / x.shape[0]
    return _softmax_columns(x, data, h, epsilon, chunk, labels, classes)[0] / x.shape[0]  # type: ignore[operator]


def _softmax_columns(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    with_normalisers: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Column sums ``(N,)`` of the row softmax of scores over ``epsilon``, and the rows' log-normalisers ``(B,)``
    (always when the scores take two passes, else only ``with_normalisers``); ``h``: the score offsets."""
    n = data.shape[0]
    if chunk >= n:  # the whole (B, N) block fits in the budget: one pass
        scores = _masked(_scores(x, data, h, 0, n), labels, classes, 0, n).div_(epsilon)
        if not with_normalisers:
            return torch.softmax(scores, dim=1).sum(0).to(h.dtype), None
        lse = torch.logsumexp(scores, dim=1)
        return scores.sub_(lse[:, None]).exp_().sum(0).to(h.dtype), lse
    lse = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):  # pass 1: each row's log-normaliser
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop) / epsilon
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
    share = torch.empty(n, dtype=h.dtype, device=h.device)
    for start in range(0, n, chunk):  # pass 2: column sums of the softmax
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop) / epsilon
        share[start:stop] = torch.exp(scores - lse[:, None]).sum(0)
    return share, lse
