"""Coupling off the critical path: batches coupled ahead of time in ``DataLoader`` worker processes.

Exact OT on a batch of 256 costs a few milliseconds on the CPU; a training
step of a large model costs more. :func:`coupled_loader` draws and couples the
next batches in background workers while the model trains on the current
one, so the coupling cost overlaps with training. Train on its batches with
``FlowMatcher(coupler="paired")``: they are already paired.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from otcfm._args import check_count
from otcfm._checks import check_batch
from otcfm.couplers import Coupler, get_coupler
from otcfm.data import Sampler, check_sampler, draw

__all__ = ["CoupledBatches", "CoupledLoader", "PoolStream", "check_pool_size", "coupled_loader", "couple_pool"]


def _draw_checked(sampler: Sampler, n: int, generator: torch.Generator, name: str) -> Tensor:
    """``n`` samples of ``sampler``, checked: a finite floating tensor of shape ``(n, ...)``; errors name ``name``.

    Raises:
        TypeError: ``sampler`` is no dataset name or callable, or returns no floating-point tensor.
        ValueError: it returns another number of samples than ``n``, a tensor without a batch dimension, or NaN/Inf.
    """
    x = draw(check_sampler(sampler, name), n, generator)
    if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] != n:
        raise ValueError(f"{name}: asked for {n} samples, the sampler returned {x.shape[0]} ({tuple(x.shape)})")
    return check_batch(x, name)


def couple_pool(
    source: Sampler, target: Sampler, coupler: Coupler, pool_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``pool_size`` samples per side, couple them as one problem and shuffle the pairs: ``(x0, x1)``.

    The pairs come back in a random order (from ``generator``), so consecutive slices of them are
    batches in which each pair of the pool appears once.

    Raises:
        TypeError, ValueError: a sampler that returns no ``(pool_size, ...)`` finite floating tensor, or samples of
            another shape than the other side's (the message names ``source`` or ``target``).
    """
    x0 = _draw_checked(source, pool_size, generator, "source")
    x1 = _draw_checked(target, pool_size, generator, "target")
    _same_shape(x0, x1)
    i, j = coupler(x0, x1, generator=generator, finite=False)  # scanned for NaN/Inf just above
    order = torch.randperm(len(i), generator=generator)
    return x0[i][order], x1[j][order]


class PoolStream:
    """Batches served from OT pools larger than the batch: pool ``k`` is coupled once and split into batches.

    Pool ``k`` is drawn from its own generator, seeded by ``stream_seed(seed, k)``, so the batch of any
    step is a pure function of ``(seed, step)``: a resumed run sees the batches of an uninterrupted one.

    Args:
        source, target: samplers ``f(n, generator)`` or dataset names; what they return is checked at every pool
            (a finite floating tensor of ``pool_size`` rows, samples of one shape on both sides).
        coupler: coupler name or instance (a minibatch coupler).
        pool_size: samples per side coupled at once; a multiple of ``batch_size``.
        batch_size: pairs per batch.
        seed: base seed.
    """

    def __init__(
        self, source: Sampler, target: Sampler, coupler: str | Coupler, pool_size: int, batch_size: int, seed: int = 0
    ) -> None:
        check_sampler(source, "source")
        check_sampler(target, "target")
        check_count(batch_size, "batch_size")
        check_pool_size(pool_size, batch_size)
        self.source, self.target, self.coupler = source, target, get_coupler(coupler)
        self.pool_size, self.batch_size, self.seed = pool_size, batch_size, seed
        self._pool: tuple[int, Tensor, Tensor] | None = None

    @property
    def batches_per_pool(self) -> int:
        return self.pool_size // self.batch_size

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The paired batch ``(x0, x1)`` of step ``step`` (0-based): each ``(batch_size, ...)``."""
        from otcfm.distributed import stream_seed

        index, offset = divmod(step, self.batches_per_pool)
        if self._pool is None or self._pool[0] != index:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, "pool", index))
            self._pool = (index, *couple_pool(self.source, self.target, self.coupler, self.pool_size, generator))
        _, x0, x1 = self._pool
        rows = slice(offset * self.batch_size, (offset + 1) * self.batch_size)
        return x0[rows], x1[rows]


def check_pool_size(pool_size: object, batch_size: int) -> int:
    """``pool_size`` must be a positive multiple of ``batch_size``."""
    valid = isinstance(pool_size, numbers.Integral) and not isinstance(pool_size, bool) and pool_size >= batch_size
    if not valid or pool_size % batch_size:  # type: ignore[operator]
        raise ValueError(f"pool_size: expected a multiple of batch_size {batch_size} (at least it), got {pool_size!r}")
    return pool_size


def _probe(source: Sampler, target: Sampler) -> None:
    """Check ``source`` and ``target`` on two samples each: names, callables, shapes, finite values."""
    probe = torch.Generator().manual_seed(0)
    _same_shape(_draw_checked(source, 2, probe, "source"), _draw_checked(target, 2, probe, "target"))


def _same_shape(x0: Tensor, x1: Tensor) -> None:
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"source and target: expected samples of one shape, got {tuple(x0.shape[1:])} and {tuple(x1.shape[1:])}"
        )


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
        pool_size: couple ``pool_size`` samples per side at once and serve them as ``pool_size / batch_size``
            batches, each pair once (a :class:`PoolStream` per worker); None: each batch coupled alone.
    """

    def __init__(
        self,
        source: Sampler,
        target: Sampler,
        coupler: str | Coupler,
        batch_size: int,
        seed: int = 0,
        pool_size: int | None = None,
    ):
        super().__init__()
        check_count(batch_size, "batch_size")
        check_count(seed, "seed", minimum=0)
        if pool_size is not None:
            check_pool_size(pool_size, batch_size)
        self.source, self.target = source, target
        self.coupler = get_coupler(coupler)
        if self.coupler.name == "semidiscrete":
            raise ValueError(
                "coupler: 'semidiscrete' pairs each source sample with the whole dataset, not with a drawn target "
                "batch; use it in FlowMatcher.loss(model, x0, dataset) or otcfm.train(coupler='semidiscrete')"
            )
        self.batch_size, self.seed, self.pool_size = batch_size, seed, pool_size
        _probe(source, target)  # here, not in a worker process, where an error arrives wrapped at the first batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker_seed = self.seed * 1_000_003 + (info.id if info is not None else 0)
        if self.pool_size is not None:
            pools = PoolStream(self.source, self.target, self.coupler, self.pool_size, self.batch_size, worker_seed)
            step = 0
            while True:
                yield pools.batch(step)
                step += 1
        generator = torch.Generator().manual_seed(worker_seed)
        while True:
            x0 = _draw_checked(self.source, self.batch_size, generator, "source")
            x1 = _draw_checked(self.target, self.batch_size, generator, "target")
            _same_shape(x0, x1)
            i, j = self.coupler(x0, x1, generator=generator, finite=False)  # scanned for NaN/Inf just above
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
    pool_size: int | None = None,
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
        pool_size: OT pools larger than the batch (a multiple of it): see :class:`CoupledBatches`.

    Returns:
        an endless :class:`CoupledLoader` yielding ``(x0, x1)``, each ``(batch_size, ...)``, already paired.
    """
    check_count(num_workers, "num_workers", minimum=0)
    check_count(batches_per_transfer, "batches_per_transfer")
    check_count(prefetch_factor, "prefetch_factor")
    dataset = _Transfers(CoupledBatches(source, target, coupler, batch_size, seed, pool_size), batches_per_transfer)
    extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _one_thread} if num_workers > 0 else {}
    return CoupledLoader(DataLoader(dataset, batch_size=None, num_workers=num_workers, **extra))
