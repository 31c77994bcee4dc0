r"""Semidiscrete pairing with the dataset and its potentials sharded over ``torch.distributed`` ranks.

A dataset too large for one process (or one GPU) is split in contiguous row blocks, one per rank, each with its
block of the fitted potentials ``g``. Every rank's source batch is scored against every shard: the batches are
gathered, each rank finds the best partner in its own rows,

.. math::
    j^\star(x) = \arg\max_j\ 2\, x \cdot y_j + g_j - |y_j|^2 \quad (= \arg\min_j |x - y_j|^2 - g_j),

and an all-reduce (max) over ranks picks the winner (ties: the smallest index, as in one process); another one
sends each winner's row to every rank.
With ``epsilon > 0`` the scores carry Gumbel noise drawn independently on each rank, so the maximum over ranks is
a draw from the softmax over the whole dataset. Communication per pairing (``B`` samples per rank, ``W`` ranks):
the gathered batch, two all-reduces of ``W B`` numbers and one of the ``W B`` partner rows; no rank holds more of
the dataset than its shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from otcfm._checks import all_finite, check_finite
from otcfm._ranks import fail_together, gather_batch, stream_seed, world
from otcfm.couplers.semidiscrete import SemidiscreteCoupler
from otcfm.couplers.semidiscrete.kernels import _partners_and_scores
from otcfm.couplers.semidiscrete.scaling import (
    _check_unit,
    _exponent,
    _flat,
    _scaled_batch,
    _squared_norms,
    _times_power_of_two,
)

__all__ = ["SemidiscreteShard"]


class SemidiscreteShard:
    """This rank's rows of a semidiscrete coupling: pairs its source batch with the whole (sharded) dataset.

    Args:
        data: this rank's rows of the dataset, ``(N_r, ...)``: rows ``offset`` to ``offset + N_r - 1`` of it.
        potentials: their fitted potentials ``g``, ``(N_r,)``, in cost units.
        offset: index of ``data[0]`` in the whole dataset.
        epsilon: absolute entropic regularisation (``coupler.absolute_epsilon()``); 0 for the hard assignment.
        memory_budget: bytes for one block of scores (and of rows while the squared norms are summed).
        group: process group; the default group when None (a single process without one).
        unit: the power of two the scores are computed in units of (``coupler.unit``, see
            :class:`SemidiscreteCoupler`); the same on every rank.

    Every rank of ``group`` must call :meth:`pair` together, with batches of the same shape.
    Use :meth:`from_coupler` to cut the shards from a fitted :class:`SemidiscreteCoupler`.
    """

    def __init__(
        self,
        data: Tensor,
        potentials: Tensor,
        offset: int,
        epsilon: float = 0.0,
        memory_budget: int = 2**28,
        group: dist.ProcessGroup | None = None,
        unit: float = 1.0,
    ) -> None:
        if not isinstance(data, Tensor) or data.ndim < 2 or data.shape[0] == 0 or not data.is_floating_point():
            raise ValueError(f"data: expected a non-empty floating-point tensor (N_r, ...), got {_shape(data)}")
        if not isinstance(potentials, Tensor) or potentials.shape != (data.shape[0],):
            raise ValueError(f"potentials: expected a tensor of shape ({data.shape[0]},), got {_shape(potentials)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset: expected an integer >= 0, got {offset!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < math.inf:
            raise ValueError(f"epsilon: expected a finite number >= 0, got {epsilon!r}")
        self.data = check_finite(data, "data")
        self.unit = _check_unit(unit, "unit")
        self.potentials = check_finite(potentials.to(device=data.device, dtype=torch.float64), "potentials")
        self.offset, self.epsilon, self.memory_budget, self.group = offset, float(epsilon), memory_budget, group
        flat = _flat(self.data)
        rows = max(1, memory_budget // (32 * flat.shape[1]))
        square = _squared_norms(flat, self.unit, rows)  # |y / unit|^2
        scaled = _times_power_of_two(self.potentials, -2 * _exponent(self.unit)).to(data.dtype)
        self._offsets = scaled - square  # the score offsets g_j / unit^2 - |y_j / unit|^2
        if not all_finite(self._offsets):
            raise ValueError(
                f"unit: at unit={self.unit:g}, the potentials over unit^2 or the squared norms of the data over unit^2 "
                f"overflow {data.dtype}; pass the coupler's unit (SemidiscreteShard.from_coupler does)"
            )

    @classmethod
    def from_coupler(
        cls, coupler: SemidiscreteCoupler, data: Tensor, group: dist.ProcessGroup | None = None
    ) -> SemidiscreteShard:
        """This rank's shard of a fitted coupler: rows ``torch.tensor_split(arange(N), world_size)[rank]``.

        ``data`` is the whole dataset the potentials were fitted on (checked by its fingerprint); only this
        rank's rows are kept (a view: free the rest by dropping ``data``). Labels are not supported here.
        """
        coupler.check_dataset(data)
        if coupler.labels is not None:
            raise ValueError("coupler: potentials fitted with labels cannot be sharded (pair within classes unsharded)")
        rank, size = world(group)
        start, stop = _bounds(data.shape[0], rank, size)
        assert coupler.potentials is not None
        return cls(
            data[start:stop], coupler.potentials[start:stop], start, coupler.absolute_epsilon(),
            coupler.memory_budget, group, coupler.unit,
        )  # fmt: skip

    def pair(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Partners of this rank's source batch ``x0: (B, ...)`` in the whole dataset.

        Args:
            x0: source samples with the dataset's sample shape; the same ``B`` on every rank.
            generator: randomness of the entropic draw (unused for ``epsilon = 0``). Each rank draws its
                noise from a stream derived from one draw of ``generator`` and its rank, so ranks that pass
                identically seeded generators still draw independent noise.

        Returns:
            ``(j, x1)``: global partner indices ``(B,)`` (int64) and the partners ``(B, ...)``, row ``k`` of
            ``x1`` paired with row ``k`` of ``x0``; train on them with ``coupler="paired"``.
        """
        error: Exception | None = None
        try:  # a bad batch raises on every rank, not as a hang of the others at the collectives below
            if not isinstance(x0, Tensor) or x0.shape[1:] != self.data.shape[1:] or x0.shape[0] == 0:
                raise ValueError(
                    f"x0: expected a non-empty batch of shape (B, {tuple(self.data.shape[1:])}), got {_shape(x0)}"
                )
            x0 = check_finite(x0.to(device=self.data.device, dtype=self.data.dtype), "x0")
        except Exception as caught:  # re-raised by fail_together, on this rank and (as a RuntimeError) on the others
            error = caught
        fail_together(error, x0.shape[0] if error is None else 0, self.data.device, self.group)

        rank, size = world(self.group)
        batch = x0.shape[0]
        sources = gather_batch(_flat(x0), self.group)  # (W B, D), rank order
        noise = None
        if self.epsilon > 0:  # independent Gumbel noise per rank, reproducible from the caller's generator
            base = int(torch.randint(2**62, (1,), generator=generator))
            noise = torch.Generator(device=self.data.device).manual_seed(stream_seed(base, "shard", rank))
        chunk = max(1, self.memory_budget // (8 * sources.shape[0]))
        scaled, factor = _scaled_batch(sources, self.unit)  # the same factor on every rank: the same sources
        offsets = self._offsets if factor == 1.0 else self._offsets * factor
        epsilon = self.epsilon * factor / self.unit**2
        local, best = _partners_and_scores(scaled, _flat(self.data), offsets, epsilon, chunk, None, None, noise)
        winner = best.clone()
        index = local + self.offset
        if size > 1:
            dist.all_reduce(winner, op=dist.ReduceOp.MAX, group=self.group)
            # ties go to the smallest index, as in one process
            index = torch.where(best == winner, index, torch.full_like(index, torch.iinfo(index.dtype).max))
            dist.all_reduce(index, op=dist.ReduceOp.MIN, group=self.group)
        mine = (index >= self.offset) & (index < self.offset + self.data.shape[0])
        partners = torch.zeros((sources.shape[0], *self.data.shape[1:]), dtype=self.data.dtype, device=self.data.device)
        partners[mine] = self.data[index[mine] - self.offset]
        if size > 1:
            dist.all_reduce(partners, group=self.group)  # each row is non-zero on its owner only
        rows = slice(rank * batch, (rank + 1) * batch)
        return index[rows], partners[rows]

    def __repr__(self) -> str:
        return (
            f"SemidiscreteShard(rows {self.offset}..{self.offset + self.data.shape[0] - 1}, epsilon={self.epsilon:g})"
        )


def _bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank``: the split of ``torch.tensor_split`` (first ranks one row more)."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
