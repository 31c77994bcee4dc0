r"""Certified bfloat16 screening of the semidiscrete argmax: the partners of the float32 argmax, about half the cost.

Pairing a source batch ``x: (B, D)`` with a dataset ``y: (N, D)`` is ``argmax_j 2 x.y_j + h_j``
(``h_j = g_j - |y_j|^2``), a ``B x N x D`` product. On hardware with fast bfloat16 products (CPUs with
AVX512-BF16, GPUs) that product costs about half as much in bfloat16 as in float32, but bfloat16 keeps only 8
significant bits. The screen makes it exact anyway:

1. Shift the problem so it is small and non-negative: with ``z_j = y_j - mean(y)`` and ``c_j = (h_j - m) / 2``
   (``m`` the midrange of ``h``), ``argmax_j 2 x.y_j + h_j = argmax_j t_j`` for ``t_j = x.z_j + c_j`` (the
   terms dropped are constant along a row). With ``K = 1.05 (|x| max_j |z_j| + max_j |c_j|)``, every
   ``v_j = t_j + K`` lies in ``[0.047 K, 2K]``.
2. Compute ``v_j`` in one bfloat16 product of ``[x, 1, K]`` and ``[z_j, c_j, 1]`` (float32
   accumulation, a bfloat16 result). Its error in each entry is at most ``E = K (2u + u^2 + 2 (1 + u)^2
   (gamma + u (1 + gamma)))``, with ``u = 2^-8`` the unit roundoff of bfloat16 (the rounding of the inputs and
   of the result) and ``gamma = (D + 2) 2^-24 / (1 - (D + 2) 2^-24)`` the float32 accumulation's; the rounding of
   ``K`` itself shifts a whole row alike and changes no comparison. ``E < 0.02 K`` for ``D <= 30,000`` (the
   screen's limit), so the computed values stay positive.
3. The true argmax ``j*`` then satisfies ``v~_j* >= max_j v~_j - 2E``. Candidates are the entries within ``2E`` of
   their row's screened maximum (found block by block: a row's blocks of 128 columns whose maximum is within
   ``2E``, then the entries of those blocks), usually a handful per row. They are scored again exactly in
   float32 and the best one wins.

Because ``v > 0``, the order of bfloat16 values is the order of their bits read as int16, so the block maxima
are one integer reduction. When a row has too many candidates (data with many near-ties), the screen falls back
to the float32 scores, so the result never depends on the data being benign.
"""

from __future__ import annotations

import functools
import math
import weakref
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_DIM", "Screen", "fast_bfloat16"]

_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_BLOCK = 128  # columns per block of the screened row maximum
MAX_DIM = 30_000  # the error bound keeps the screened values positive up to this dimension
_MAX_CANDIDATES = 64  # mean candidates per row beyond which the float32 scores are cheaper


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products on ``device`` are fast enough for screening to pay: a CPU with
    AVX512-BF16 or AMX-BF16 instructions that oneDNN uses. Other devices only when asked (``screen=True``)."""
    return device.type == "cpu" and _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    """A hardware fact, read once: oneDNN's bfloat16 kernels and the CPU's bfloat16 instructions (Linux flags)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        flags = Path("/proc/cpuinfo").read_text().split()
    except (AttributeError, RuntimeError, OSError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _error_factor(dim: int) -> float:
    """``E / K`` of the module docstring for products of length ``dim + 2``, with a 1% margin."""
    terms = (dim + 2) * 2.0**-24
    gamma = terms / (1.0 - terms)
    return 1.01 * (2 * _U + _U**2 + 2 * (1 + _U) ** 2 * (gamma + _U * (1 + gamma)))


class Screen:
    """A dataset prepared once for screened pairing: centred points in bfloat16, padded to whole blocks.

    Args:
        data: ``(N, D)`` float32 dataset.
    """

    def __init__(self, data: Tensor) -> None:
        if data.ndim != 2 or data.dtype != torch.float32 or not 0 < data.shape[1] <= MAX_DIM:
            raise ValueError(
                f"data: expected a float32 tensor (N, D) with D <= {MAX_DIM}, got {data.dtype} {tuple(data.shape)}"
            )
        if data.device.type == "cuda" and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
            raise ValueError(
                "screen: the rounding bound needs float32 accumulation of bfloat16 products; set "
                "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False, or use screen=False"
            )
        n, d = data.shape
        self.data, self.blocks = data, math.ceil(n / _BLOCK)
        self.square = (data * data).sum(1)
        centred = data - data.mean(0)
        self.radius = centred.norm(dim=1).max()  # max_j |z_j|
        padded = torch.zeros(self.blocks * _BLOCK, d, dtype=torch.bfloat16, device=data.device)
        padded[:n] = centred.to(torch.bfloat16)
        self.points = padded
        self.factor = _error_factor(d)
        self._prepared: tuple[weakref.ref[Tensor], int, Tensor, Tensor, Tensor] | None = None

    def _right(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[z_j, c_j, 1]`` in bfloat16 ``(N', D + 2)``, ``h: (N,)`` and ``max_j |c_j|`` for potentials ``g``;
        kept while ``g`` is the same tensor object, unchanged by in-place ops (fixed potentials while training;
        a temporary copy, or a new tensor at a freed one's address, is prepared afresh)."""
        prepared = self._prepared
        if prepared is not None and prepared[0]() is g and prepared[1] == g._version:
            return prepared[2:]
        n = self.data.shape[0]
        h = g.to(self.square) - self.square
        low, high = torch.aminmax(h)
        column = torch.ones(self.points.shape[0], 2, dtype=torch.float32, device=h.device)
        column[:n, 0] = (h - (low + high) / 2) / 2  # c_j: centred on the midrange, so max |c_j| is least
        column[n:, 0], column[n:, 1] = -1e30, 0.0  # padded points: v = -1e30, below every real entry
        right = torch.cat([self.points, column.to(torch.bfloat16)], dim=1)
        reach = (high - low) / 4
        self._prepared = (weakref.ref(g), g._version, right, h, reach)
        return right, h, reach

    def argmax(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``argmax_j 2 x.y_j + g_j - |y_j|^2`` of each row of ``x: (B, D)`` and that maximum, both ``(B,)``.

        Args:
            x: ``(B, D)`` float32 source samples.
            g: ``(N,)`` potentials.
        """
        n, b = self.data.shape[0], x.shape[0]
        right, h, reach = self._right(g)
        # K of each row, 5% above |x| max|z_j| + max|c_j|: v = t + K >= 0 even after the rounding errors
        bound = (x.norm(dim=1) * self.radius + reach) * 1.05
        left = torch.cat([x, torch.ones(b, 1, dtype=x.dtype, device=x.device), bound[:, None]], dim=1)
        screened = (left.to(torch.bfloat16) @ right.T).view(b * self.blocks, _BLOCK)
        block_max = screened.view(torch.int16).amax(dim=1).view(torch.bfloat16).float().view(b, self.blocks)
        threshold = block_max.amax(dim=1) - 2 * self.factor * bound  # (B,); v > 0: int16 bits order as values
        rows, blocks = (block_max >= threshold[:, None]).nonzero(as_tuple=True)
        if rows.shape[0] > _MAX_CANDIDATES * b:
            return self._float32(x, h)
        values = screened.index_select(0, rows * self.blocks + blocks)  # (P, BLOCK) bfloat16
        entry, offset = (values >= threshold.index_select(0, rows)[:, None]).nonzero(as_tuple=True)
        rows, columns = rows.index_select(0, entry), blocks.index_select(0, entry) * _BLOCK + offset
        if rows.shape[0] > _MAX_CANDIDATES * b:
            return self._float32(x, h)
        pairs = x.index_select(0, rows) * self.data.index_select(0, columns)
        exact = 2 * pairs.sum(1) + h.index_select(0, columns)
        best = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, rows, exact, "amax")
        won = exact == best.index_select(0, rows)
        partner = torch.full((b,), n, dtype=torch.long, device=x.device)
        return partner.scatter_reduce_(0, rows[won], columns[won], "amin"), best  # ties: the first index

    def _float32(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        value, index = torch.addmm(h[None], x, self.data.T, alpha=2.0).max(dim=1)
        return index, value
