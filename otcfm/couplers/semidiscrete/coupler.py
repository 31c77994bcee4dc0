"""The semidiscrete coupler: pairs a source batch with the whole dataset through fitted potentials, and keeps,
saves and loads them."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from otcfm import _random
from otcfm import checkpoint as files
from otcfm._args import check_count, check_flag, check_generator, check_rate
from otcfm._checks import check_batch, check_finite
from otcfm._hashing import content_hash
from otcfm.couplers.base import Coupler, Pairing
from otcfm.couplers.screening import MAX_DIM, Screen, fast_bfloat16, padded_rows
from otcfm.couplers.semidiscrete.fit import (
    FitSettings,
    SemidiscreteFit,
    evaluate_potentials,
    fit_potentials,
    source_of,
)
from otcfm.couplers.semidiscrete.kernels import (
    _partners_and_scores,
)
from otcfm.couplers.semidiscrete.scaling import (
    _check_unit,
    _exponent,
    _flat,
    _scaled_batch,
    _squared_norms,
    _times_power_of_two,
)

#: Datasets smaller than this are paired in float32 unless ``screen=True``: the screen's fixed cost is larger than
#: its gain there (measured on a 2-core AVX512-BF16 CPU).
SCREEN_MIN_POINTS = 8192

#: File kind recorded by :meth:`SemidiscreteCoupler.save`.
KIND = "otcfm.semidiscrete-potentials"


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
        self._offsets: tuple[Tensor, Any, Tensor] | None = None
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
        settings = FitSettings(
            steps=self.fit_steps if steps is None else steps,
            batch_size=self.fit_batch_size if batch_size is None else batch_size,
            lr=self.fit_lr if lr is None else lr,
            eval_samples=eval_samples,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        return fit_potentials(self, source, target, generator, y1, settings)

    def _reset(self, data: Tensor, labels: Tensor | None) -> None:
        """Forget the potentials' dataset and what was derived from it, before a fit on ``data``."""
        self.fingerprint, self.labels, self._verified = fingerprint(data), labels, None
        self._classes = None if labels is None else torch.unique(labels)
        self._square = self._offsets = None

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
        data = check_batch(target, "target")
        self.check_dataset(data, None)
        check_count(samples, "samples")
        check_generator(generator)
        draw = source_of(source, data)
        return evaluate_potentials(self, draw, data, samples, generator, seconds, batch_size)

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
        self.unit = _check_unit(state.get("unit"), "state")
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
        state = files.load(path, "semidiscrete potentials")
        if state.get("kind") != KIND:
            raise ValueError(f"semidiscrete potentials: {path} holds no potentials (saved by SemidiscreteCoupler.save)")
        options = {"epsilon": state["epsilon"], "relative": state["relative"], **options}
        return cls(**options).load_state_dict(state, target)

    def __repr__(self) -> str:
        kind = "relative" if self.relative else "absolute"
        fitted = "unfitted" if self.potentials is None else f"N={self.potentials.shape[0]}"
        return f"SemidiscreteCoupler(epsilon={self.epsilon} ({kind}), {fitted})"


def fingerprint(data: Tensor) -> str:
    """Content hash of a dataset: SHA-256 of its shape, dtype and values (first 16 hex digits)."""
    return content_hash(data)


def _dataset_key(x1: Tensor) -> tuple[Any, ...]:
    """What identifies a dataset tensor between calls: storage, shape, strides, dtype, device."""
    return (x1.data_ptr(), tuple(x1.shape), x1.stride(), x1.dtype, x1.device)
