"""Where a training step's coupled batch comes from: one protocol for every way of sourcing pairs.

A :class:`BatchSource` is called as ``batches(step, generator) -> CoupledBatch``. A batch either holds samples that
the flow matcher's coupler is still to pair (``paired=False``: fresh draws, or fresh sources beside a whole dataset)
or pairs that are final (``paired=True``: OT pools, a global coupling across ranks, Reflow's pairs); the loss then
treats it alike (:func:`coupled_loss`). A new way of sourcing batches is one new class.

- :class:`Draws`: ``batch_size`` fresh samples from each side (and the target's labels).
- :class:`WholeDataset`: fresh sources beside the whole target dataset, for a coupler that pairs with all of it
  (the semidiscrete coupler).
- :class:`Pools`: batches of OT pools larger than the batch (:class:`otcfm.loader.PoolStream`).
- :class:`GlobalCoupling`: draws of every rank coupled as one problem (:func:`otcfm.distributed.global_pairs`).
- :class:`FixedPairs`: pairs kept as given (a Reflow pair set, or any ``f(n, generator) -> (x0, x1)``).

Every draw comes from the step's ``generator`` in a fixed order (source, then target), so a run is a function of
its seed and resumes bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from otcfm import _ranks
from otcfm.couplers import Coupler
from otcfm.data.sources import DataSource
from otcfm.distributed import global_pairs
from otcfm.flow import FlowMatcher

__all__ = [
    "BatchSource",
    "CoupledBatch",
    "Draws",
    "FixedPairs",
    "GlobalCoupling",
    "Pools",
    "WholeDataset",
    "coupled_loss",
]


@dataclass(frozen=True)
class CoupledBatch:
    """One step's batch.

    Attributes:
        x0: ``(B0, ...)`` source samples.
        x1: ``(B1, ...)`` target samples (the whole dataset for :class:`WholeDataset`).
        y1: ``(B1,)`` target labels, or None.
        paired: whether ``x0[k]`` and ``x1[k]`` are final pairs (else the flow matcher's coupler pairs them).
    """

    x0: Tensor
    x1: Tensor
    y1: Tensor | None = None
    paired: bool = False


class BatchSource(Protocol):
    """``batches(step, generator) -> CoupledBatch`` for step ``step`` (from 0), drawing from ``generator``."""

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch: ...


@dataclass
class Draws:
    """``batch_size`` fresh samples from ``source`` and from ``target`` (with its labels when ``labels``), moved to
    ``device``; the coupler pairs them."""

    source: DataSource
    target: DataSource
    batch_size: int
    device: torch.device
    labels: bool = False

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch:
        x0 = self.source(self.batch_size, generator).to(self.device)
        if not self.labels:
            return CoupledBatch(x0, self.target(self.batch_size, generator).to(self.device))
        x1, y1 = self.target.labeled(self.batch_size, generator)
        return CoupledBatch(x0, x1.to(self.device), y1.to(self.device))


@dataclass
class WholeDataset:
    """``batch_size`` fresh source samples beside the whole dataset ``(N, ...)`` (and its labels ``(N,)``) on the
    device, for a coupler that pairs each source sample with a point of all ``N``."""

    source: DataSource
    dataset: Tensor
    batch_size: int
    labels: Tensor | None = None

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch:
        x0 = self.source(self.batch_size, generator).to(self.dataset.device)
        return CoupledBatch(x0, self.dataset, self.labels)


@dataclass
class Pools:
    """The batches of OT pools (:class:`otcfm.loader.PoolStream`): pool ``k`` is coupled once, served in batches."""

    stream: Any  # otcfm.loader.PoolStream
    device: torch.device

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch:
        x0, x1 = self.stream.batch(step)
        return CoupledBatch(x0.to(self.device), x1.to(self.device), paired=True)


@dataclass
class GlobalCoupling:
    """The draws of every rank coupled as one OT problem on rank 0; each rank keeps its slice of the pairs. The
    coupling draws from a generator of ``(seed, step)``, the same on every rank."""

    draws: Draws
    coupler: Coupler
    seed: int

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch:
        batch = self.draws(step, generator)
        shared = torch.Generator().manual_seed(_ranks.stream_seed(self.seed, "coupling", step))
        x0, x1, _, y1 = global_pairs(self.coupler, batch.x0, batch.x1, y1=batch.y1, generator=shared)
        return CoupledBatch(x0, x1, y1, paired=True)


@dataclass
class FixedPairs:
    """Pairs kept as given: ``pairs(n, generator) -> (x0, x1)`` (a :class:`otcfm.reflow.PairSet`, or
    ``pairs.labeled(n, generator) -> (x0, x1, y)`` when ``labels``), ``batch_size`` per step, on ``device``;
    ``check`` is called on each draw of a callable that may return anything."""

    pairs: Callable[..., Any]
    batch_size: int
    device: torch.device
    labels: bool = False
    check: Callable[[Any], None] | None = None  # run on each raw draw of ``pairs`` (a callable of the user's)

    def __call__(self, step: int, generator: torch.Generator) -> CoupledBatch:
        if self.labels:
            x0, x1, y = self.pairs.labeled(self.batch_size, generator)  # type: ignore[attr-defined]
            return CoupledBatch(x0.to(self.device), x1.to(self.device), y.to(self.device), paired=True)
        drawn = self.pairs(self.batch_size, generator)
        if self.check is not None:
            self.check(drawn)
        x0, x1 = drawn
        return CoupledBatch(x0.to(self.device), x1.to(self.device), paired=True)


def coupled_loss(
    fm: FlowMatcher, net: nn.Module, batch: CoupledBatch, generator: torch.Generator, **labelled: Any
) -> Tensor:
    """``fm.loss`` on a batch: the pairs of a paired batch are kept (``fm``'s path and time sampler, no coupling),
    the others are coupled by ``fm``'s coupler; ``labelled``: ``label_dropout`` and ``null_label``."""
    matcher = fm.paired() if batch.paired else fm
    return matcher.loss(net, batch.x0, batch.x1, generator, y1=batch.y1, **labelled)
