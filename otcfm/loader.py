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

from otcfm.couplers import Coupler, get_coupler
from otcfm.data import Sampler, draw

__all__ = ["CoupledBatches", "coupled_loader"]


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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
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
) -> DataLoader:
    """A ``DataLoader`` of coupled batches, computed in ``num_workers`` background processes.

    Example::

        loader = coupled_loader("8gaussians", "moons", "exact", batch_size=256)
        fm = FlowMatcher(coupler="paired")
        for step, (x0, x1) in zip(range(2000), loader):
            loss = fm.loss(model, x0, x1)

    Args:
        source, target, coupler, batch_size, seed: see :class:`CoupledBatches`.
        num_workers: background processes (0 couples in the main process).
        prefetch_factor: batches each worker keeps ready.

    Returns:
        an endless ``DataLoader`` yielding ``(x0, x1)``, each ``(batch_size, ...)``, already paired.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
    dataset = CoupledBatches(source, target, coupler, batch_size, seed)
    extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _one_thread} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, **extra)
