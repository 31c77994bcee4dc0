"""Coupling off the critical path: batches coupled ahead of time in ``DataLoader`` worker processes.

Exact OT on a batch of 256 costs a few milliseconds on the CPU; a training
step of a large model costs more. :func:`coupled_loader` draws and couples the
next batches in background workers while the model trains on the current
one, so the coupling cost overlaps with training. Train on its batches with
``FlowMatcher(coupler="paired")``: they are already paired.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from otcfm._args import check_count
from otcfm.couplers import Coupler, get_coupler
from otcfm.data import Sampler, draw

__all__ = ["CoupledBatches", "CoupledLoader", "coupled_loader"]


class CoupledBatches(IterableDataset):
    """An endless stream of coupled batches ``(x0[i], x1[j])``.

    Worker ``w`` of ``W`` draws from its own generator seeded with
    ``seed * 1_000_003 + w``, so a run is reproducible for a fixed number of
    workers (the ``DataLoader`` takes batches from the workers in turn).

    Args:
        source: dataset name or ``f(n, generator) -> (n, ...)`` for ``x0``.
        target: dataset name or sampler for ``x1``.
        coupler: coupler name or instance.
        batch_size: samples per side and batch.
        seed: base seed.
    """

    def __init__(self, source: Sampler, target: Sampler, coupler: str | Coupler, batch_size: int, seed: int = 0):
        super().__init__()
        check_count(batch_size, "batch_size")
        check_count(seed, "seed", minimum=0)
        self.source, self.target = source, target
        self.coupler = get_coupler(coupler)
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (info.id if info is not None else 0))
        while True:
            x0 = draw(self.source, self.batch_size, generator)
            x1 = draw(self.target, self.batch_size, generator)
            i, j = self.coupler(x0, x1, generator=generator)
            yield x0[i], x1[j]


class _Transfers(IterableDataset):
    """``per_transfer`` consecutive batches of a :class:`CoupledBatches` stream, stacked: ``(x0s, x1s)``, each
    ``(per_transfer, batch_size, ...)``. A worker hands tensors over through shared memory at a fixed cost per
    tensor, paid by the receiving training process, so fewer, larger hand-overs cost it less."""

    def __init__(self, batches: CoupledBatches, per_transfer: int) -> None:
        super().__init__()
        self.batches, self.per_transfer = batches, per_transfer

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        stream = iter(self.batches)
        while True:
            x0s, x1s = zip(*(next(stream) for _ in range(self.per_transfer)), strict=True)
            yield torch.stack(x0s), torch.stack(x1s)


class CoupledLoader:
    """An endless iterable of coupled batches ``(x0, x1)``; made by :func:`coupled_loader`.

    Attributes:
        loader: the underlying ``DataLoader``; it yields stacks of ``batches_per_transfer`` batches.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x0s, x1s in self.loader:
            yield from zip(x0s, x1s, strict=True)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker's OT solver is single-threaded; leave the cores to training


def coupled_loader(
    source: Sampler,
    target: Sampler,
    coupler: str | Coupler = "exact",
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 1,
    prefetch_factor: int = 4,
    batches_per_transfer: int = 8,
) -> CoupledLoader:
    """Coupled batches, computed ahead of time in ``num_workers`` background ``DataLoader`` processes.

    Example::

        loader = coupled_loader("8gaussians", "moons", "exact", batch_size=256)
        fm = FlowMatcher(coupler="paired")
        for step, (x0, x1) in zip(range(2000), loader):
            loss = fm.loss(model, x0, x1)

    The batches are the stream of :class:`CoupledBatches` (worker ``w`` seeded by ``seed``
    and ``w``); a worker hands them over ``batches_per_transfer`` at a time, because the
    training process pays a fixed cost per tensor it receives from a worker
    (``benchmarks/couplers.py`` measures training throughput with the worker).

    Args:
        source, target, coupler, batch_size, seed: see :class:`CoupledBatches`.
        num_workers: background processes (0 couples in the main process).
        prefetch_factor: hand-overs each worker keeps ready.
        batches_per_transfer: batches stacked into one hand-over.

    Returns:
        an endless :class:`CoupledLoader` yielding ``(x0, x1)``, each ``(batch_size, ...)``, already paired.
    """
    check_count(num_workers, "num_workers", minimum=0)
    check_count(batches_per_transfer, "batches_per_transfer")
    check_count(prefetch_factor, "prefetch_factor")
    dataset = _Transfers(CoupledBatches(source, target, coupler, batch_size, seed), batches_per_transfer)
    extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _one_thread} if num_workers > 0 else {}
    return CoupledLoader(DataLoader(dataset, batch_size=None, num_workers=num_workers, **extra))
