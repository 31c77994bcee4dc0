"""The coupler contract: who is paired with whom inside a minibatch.

A coupler maps a source batch ``x0: (B0, ...)`` and a target batch
``x1: (B1, ...)`` to index tensors ``(i, j)`` of equal length, so that
``x0[i], x1[j]`` are the pairs. Labels or conditions follow by the same
indices (``y1[j]``). Indices live on the inputs' device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

from otcfm._args import check_generator
from otcfm._checks import check_finite, check_pair

__all__ = ["Coupler", "Pairing", "check_labels"]


class Pairing(NamedTuple):
    """Index tensors of a coupling: ``x0[i]`` is paired with ``x1[j]``.

    Attributes:
        i: ``(P,)`` int64 indices into the source batch.
        j: ``(P,)`` int64 indices into the target batch.
    """

    i: Tensor
    j: Tensor


class Coupler(ABC):
    """Base class of couplers. Subclasses implement :meth:`pair`.

    Calling a coupler validates the inputs (same sample shape, non-empty,
    finite; labels of shape ``(B,)``) and returns a :class:`Pairing`. This
    call is the one place where a coupler's inputs are checked, for users and
    for :class:`~otcfm.FlowMatcher` alike; :meth:`pair` trusts its inputs.
    """

    #: Registry name, set by subclasses.
    name: str = ""
    #: Whether equal batches always come back as a permutation (every sample used once on both sides).
    one_to_one: bool = False
    #: Whether ``i`` is always ``arange(B0)``: every source sample once, in order (``x0[i]`` is ``x0``,
    #: so :class:`~otcfm.FlowMatcher` does not gather it).
    sources_in_order: bool = False
    #: Whether ``j`` is always ``arange(B1)`` as well (the pairs as given), so the targets are not gathered either.
    targets_in_order: bool = False
    #: Whether the coupler pairs each source sample with a point of a whole fitted dataset (given as ``x1``, all of
    #: it, at every call), as the semidiscrete coupler does; ``otcfm.train`` then fits it and passes the dataset.
    pairs_with_dataset: bool = False

    def finite_checked_later(self) -> bool:
        """Whether :meth:`pair` itself rejects NaN/Inf inputs, so ``__call__`` can skip scanning them."""
        return False

    def entropic_epsilon(self) -> tuple[float, bool] | None:
        """``(epsilon, relative)`` of a coupler that solves entropic OT, None for any other coupler.

        ``relative`` tells whether ``epsilon`` is a fraction of the batch's mean cost rather than in cost
        units. :class:`~otcfm.FlowMatcher` compares it with the epsilon its path declares
        (:attr:`otcfm.paths.Path.entropic_epsilon`, the Schroedinger bridge's ``2 sigma^2``).
        """
        return None

    def __call__(
        self,
        x0: Tensor,
        x1: Tensor,
        *,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
        generator: torch.Generator | None = None,
        finite: bool = True,
    ) -> Pairing:
        """Pair ``x0: (B0, ...)`` with ``x1: (B1, ...)``.

        Args:
            x0: source batch, ``(B0, ...)``.
            x1: target batch, ``(B1, ...)`` with the same sample shape.
            y0: optional source labels or conditions, ``(B0,)`` or ``(B0, k)``.
            y1: optional target labels or conditions, ``(B1,)`` or ``(B1, k)``.
                Couplers that use a cost take them into account (see
                :class:`~otcfm.couplers.OTCoupler`); others ignore them.
            generator: source of randomness for couplers that draw.
            finite: scan ``x0`` and ``x1`` for NaN/Inf. ``False`` is for a caller that detects
                them later at no extra cost (``FlowMatcher.loss`` on the CPU reads its loss, which
                is NaN/Inf if a sample it used is); labels are always checked.

        Returns:
            ``Pairing(i, j)``, index tensors on ``x0.device``.

        Raises:
            ValueError: mismatched sample shapes, empty batches, NaN/Inf, labels of the wrong length.
        """
        x0, x1 = check_pair(x0, x1, finite=False)
        if finite and not self.finite_checked_later():
            self.scan_inputs(x0, x1)
        check_generator(generator)
        if y0 is not None:
            check_labels(y0, x0.shape[0], "y0")
        if y1 is not None:
            check_labels(y1, x1.shape[0], "y1")
        return self.pair(x0, x1, y0, y1, generator)

    def scan_inputs(self, x0: Tensor, x1: Tensor) -> None:
        """Raise ``ValueError`` naming ``x0`` or ``x1`` if it holds NaN/Inf (queued on CUDA); :meth:`__call__`
        runs it when ``finite`` unless :meth:`finite_checked_later`."""
        check_finite(x0, "x0")
        check_finite(x1, "x1")

    @abstractmethod
    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        """Compute the pairing of validated inputs."""

    def _arange(self, n: int, device: torch.device) -> Tensor:
        """``torch.arange(n, device=device)``: the source indices of a pairing that keeps its sources in order."""
        return torch.arange(n, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_labels(y: Tensor | None, batch: int, name: str) -> Tensor | None:
    """Check optional labels: a tensor with ``batch`` rows, finite if floating (see :mod:`otcfm._checks`)."""
    if y is None:
        return None
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({batch},) or ({batch}, k), got {type(y).__name__}")
    if y.ndim not in (1, 2) or y.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) or ({batch}, k), got {tuple(y.shape)}")
    return check_finite(y, name) if y.is_floating_point() else y
