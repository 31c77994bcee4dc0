"""PyTorch's distributed engine (``torch.distributed``, DDP) in otcfm: ranks, seeds, global couplings.

``otcfm.train``, Reflow's pair generation and training, and the ``otcfm`` command run unchanged under
``torchrun --nproc_per_node K``: each rank draws its own batch of ``batch_size`` pairs, DDP averages the
gradients (so a step equals a single-process step on the concatenated batch), rank 0 writes checkpoints.

Couplings: by default each rank couples its own minibatch (what published work does). With a global
coupling, :func:`global_pairs` gathers the source and target batches of all ranks, rank 0 computes one
coupling of the concatenated batch and broadcasts it, and each rank keeps its slice of the pairs: the
effective OT batch grows with the number of ranks. Without an initialised process group every function
here is the single-process identity (rank 0 of 1).
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from otcfm._checks import check_pair
from otcfm._ranks import active, default_device, fail_together, gather_batch, shared_outcome, stream_seed, world
from otcfm.couplers import Coupler, get_coupler
from otcfm.couplers.base import check_labels

__all__ = [
    "GlobalPairs",
    "barrier",
    "default_device",
    "end_together",
    "exit_worker",
    "fail_together",
    "gather_batch",
    "global_pairs",
    "init_from_env",
    "mean_over_ranks",
    "shutdown",
    "stream_seed",
    "world",
    "wrap",
]


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ...).

    The backend is nccl when CUDA is available, gloo otherwise. Does nothing in a plain process
    (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) or when a group is already initialised.

    Returns:
        True when this call initialised the group (the caller then calls ``dist.destroy_process_group()``).
    """
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown(wait_for_all: bool = True) -> None:
    """Destroy the default process group if one is initialised (the end of :func:`init_from_env`).

    ``wait_for_all``: a barrier first, so every rank tears the group down at the same point, as PyTorch
    expects of ``destroy_process_group``; pass False on an error path, where other ranks may never arrive.
    """
    if active():
        if wait_for_all:
            barrier()
        dist.destroy_process_group()


def exit_worker() -> None:
    """End a spawned worker process (``torch.multiprocessing.spawn``) whose results are saved, after :func:`shutdown`.

    Skips the interpreter's finalisation, where gloo's worker threads can still release work objects holding
    tensors and abort the process ("terminate called without an active exception", pytorch/pytorch#179291).
    What the skipped exit would do for this
    process's semaphores (tqdm's lock) and output streams is done first. Exit status 0.
    """
    import multiprocessing.util

    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when more than one rank runs, else ``model`` itself."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a tensor over all ranks (a copy; ``value`` itself when one rank runs)."""
    if world()[1] == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world()[1]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


def end_together(error: Exception | None, device: torch.device) -> None:
    """Wait for every rank at the end of a run, sharing whether one of them failed on the way (a barrier that
    does not hang when a rank raised, e.g. writing the last checkpoint or in a callback).

    One all-reduce (MAX) of ``failed rank + 1``; a no-op in a single process. The failing rank passes its
    ``error`` and re-raises it itself; the others raise a RuntimeError naming it.
    """
    if world()[1] == 1:
        return
    (failed,) = shared_outcome(error, [], device, None)
    if error is None and failed:
        raise RuntimeError(
            f"rank {failed - 1} failed at the end of the run (its own error says why); stopping here too"
        )


def _device_of(x: object) -> torch.device:
    return x.device if isinstance(x, Tensor) else default_device()


class GlobalPairs(NamedTuple):
    """This rank's share of a global coupling (row ``k`` of ``x0`` is paired with row ``k`` of ``x1``).

    Attributes:
        x0: ``(B, ...)`` source samples.
        x1: ``(B, ...)`` their partners.
        y0: ``(B,)`` labels of ``x0`` (None when none were passed).
        y1: ``(B,)`` labels of ``x1`` (None when none were passed).
    """

    x0: Tensor
    x1: Tensor
    y0: Tensor | None
    y1: Tensor | None


def global_pairs(
    coupler: str | Coupler,
    x0: Tensor,
    x1: Tensor,
    *,
    y0: Tensor | None = None,
    y1: Tensor | None = None,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> GlobalPairs:
    """This rank's share of one coupling of the batches of all ranks.

    The batches (and labels) of all ranks are gathered in rank order; rank 0 of ``group`` couples the
    global batch and broadcasts the pairs, so every rank agrees whatever the solver's determinism.
    Pairs are ordered by source index of the global batch and rank ``r`` receives pairs ``r * B`` to
    ``(r + 1) * B - 1``: with one process this is the ordinary coupling of ``(x0, x1)``. Train on the
    result with ``coupler="paired"``.

    Args:
        coupler: coupler name or instance; one-to-one couplers (exact, Hungarian, Sinkhorn, ...).
        x0: this rank's source batch, ``(B, ...)``; the same shape on every rank.
        x1: this rank's target batch, ``(B, ...)``.
        y0, y1: optional labels ``(B,)`` (see :meth:`otcfm.couplers.Coupler.__call__`); they follow the pairs.
        generator: randomness of the coupler (used on rank 0 only).
        group: process group; the default group when None.

    Returns:
        :class:`GlobalPairs` ``(x0, x1, y0, y1)``, each with ``B`` rows.
    """
    error: Exception | None = None
    try:
        x0, x1 = check_pair(x0, x1, same_batch=True)
        y0, y1 = check_labels(y0, x0.shape[0], "y0"), check_labels(y1, x1.shape[0], "y1")
        coupler = get_coupler(coupler)
    except Exception as caught:  # re-raised by fail_together, on this rank and (as a RuntimeError) on the others
        error = caught
    fail_together(error, x0.shape[0] if error is None else 0, _device_of(x0), group)
    all0, all1 = gather_batch(x0, group), gather_batch(x1, group)
    ally0 = gather_batch(y0, group) if y0 is not None else None
    ally1 = gather_batch(y1, group) if y1 is not None else None
    rank, size = world(group)
    failure: Exception | None = None
    if rank == 0:
        # every rank scanned its own batch above (so a bad batch raises on its rank, not as a hang elsewhere)
        try:
            i, j = coupler(all0, all1, y0=ally0, y1=ally1, generator=generator, finite=False)
            order = torch.argsort(i)
            pairs = torch.stack([i[order], j[order]]).to(x0.device)
        except Exception as caught:  # the others still get their broadcast: -1 everywhere says rank 0 failed
            failure = caught
            pairs = torch.full((2, all0.shape[0]), -1, dtype=torch.int64, device=x0.device)
    else:
        pairs = torch.empty(2, all0.shape[0], dtype=torch.int64, device=x0.device)
    if size > 1:
        dist.broadcast(pairs, dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if failure is not None:
        raise failure
    if rank > 0 and int(pairs[0, 0]) < 0:
        raise RuntimeError("global_pairs: rank 0 failed to couple the global batch (its own error says why)")
    mine = slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
    i, j = pairs[0, mine], pairs[1, mine]
    return GlobalPairs(
        all0[i],
        all1[j],
        ally0[i] if ally0 is not None else None,
        ally1[j] if ally1 is not None else None,
    )
