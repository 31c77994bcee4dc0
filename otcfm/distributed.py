"""Couplings across ranks of ``torch.distributed``: one OT problem on the global batch.

By default each rank couples its own minibatch (what published work does). :func:`global_pairs` gathers the
source and target batches of all ranks, computes one coupling of the concatenated batch (identically on
every rank: same inputs, same solver, same generator state), and gives each rank its slice of the pairs,
so the effective OT batch grows with the number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from otcfm._checks import check_pair
from otcfm.couplers import Coupler, get_coupler

__all__ = ["gather_batch", "global_pairs"]


def gather_batch(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x: (B, ...)`` of every rank in rank order: ``(world_size * B, ...)``.

    Every rank must pass the same shape. Without an initialised process group, ``x`` itself.
    """
    if not dist.is_available() or not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def global_pairs(
    coupler: str | Coupler,
    x0: Tensor,
    x1: Tensor,
    *,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's share of a coupling computed on the batches of all ranks.

    Pairs are ordered by source index of the global batch, and rank ``r`` of ``W`` receives pairs
    ``r * B`` to ``(r + 1) * B - 1``: with one process this is the ordinary coupling of ``(x0, x1)``.
    Randomised couplers need the same ``generator`` state on every rank (seed it identically).

    Args:
        coupler: coupler name or instance.
        x0: this rank's source batch, ``(B, ...)``; the same ``B`` on every rank.
        x1: this rank's target batch, ``(B, ...)``.
        generator: randomness of the coupler, identical on all ranks.
        group: process group; the default group when None.

    Returns:
        ``(x0_pairs, x1_pairs)``, each ``(B, ...)``: paired row by row (train with ``coupler="paired"``).
    """
    x0, x1 = check_pair(x0, x1, same_batch=True)
    coupler = get_coupler(coupler)
    all0, all1 = gather_batch(x0, group), gather_batch(x1, group)
    i, j = coupler(all0, all1, generator=generator)
    order = torch.argsort(i)
    i, j = i[order], j[order]
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    mine = slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
    return all0[i[mine]], all1[j[mine]]
