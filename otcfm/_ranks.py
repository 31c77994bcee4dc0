"""Ranks of a ``torch.distributed`` process group, seeds per stream, and the collectives that the couplers need.

The base of :mod:`otcfm.distributed` (which re-exports these names): it imports nothing of otcfm, so the
couplers that work across ranks (:mod:`otcfm.couplers.shards`) can use it without importing the couplers back.
Without an initialised process group every function here is the single-process identity (rank 0 of 1).
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["active", "default_device", "fail_together", "gather_batch", "shared_outcome", "stream_seed", "world"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialised process group."""
    if not active():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under a distributed launch with CUDA, otherwise the CPU."""
    if active() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def stream_seed(seed: int, *key: int | str) -> int:
    """A seed for the random stream named by ``key`` (e.g. ``rank, step``), derived from ``seed`` by SHA-256.

    Streams with different keys are independent for all practical purposes, and each is a pure function of
    ``(seed, key)``: a rank can recreate its stream at any step without saved state.
    """
    text = ":".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def fail_together(
    error: Exception | None, batch: int, device: torch.device, group: dist.ProcessGroup | None = None
) -> None:
    """Share the outcome of this rank's input checks before the collectives that follow them.

    Without it, a bad input on one rank raises there while the other ranks wait at the next collective until the
    process group's timeout (30 minutes by default). One all-reduce (MAX) of ``(failed rank + 1, B, -B)``, a
    synchronisation on an accelerator; a single process only re-raises ``error``.

    Args:
        error: what this rank's checks raised, or None.
        batch: this rank's batch size (collectives such as ``all_gather`` need the same on every rank).
        device: where the flag tensor lives (CUDA for nccl).
        group: process group; the default group when None.

    Raises:
        ``error`` on the rank that raised it; RuntimeError naming that rank on the others; ValueError on every
        rank when the batch sizes differ.
    """
    if world(group)[1] > 1:
        failed, largest, negated_smallest = shared_outcome(error, [batch, -batch], device, group)
        if error is None and failed:
            raise RuntimeError(f"rank {failed - 1} rejected its inputs (its own error says why); stopping here too")
        if error is None and largest != -negated_smallest:
            raise ValueError(
                f"x0: every rank must pass the same batch size, got sizes from {-negated_smallest} to {largest}"
            )
    if error is not None:
        raise error


def shared_outcome(
    error: Exception | None, values: list[int], device: torch.device, group: dist.ProcessGroup | None
) -> list[int]:
    """One all-reduce (MAX) of ``[failed rank + 1 (0 when this rank did not fail), *values]`` over the ranks."""
    flag = [world(group)[0] + 1 if error is not None else 0, *values]
    shared = torch.tensor(flag, dtype=torch.int64, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in shared.tolist()]


def gather_batch(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x: (B, ...)`` of every rank in rank order: ``(world_size * B, ...)``.

    Every rank must pass the same shape. Without an initialised process group, ``x`` itself.
    """
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)
