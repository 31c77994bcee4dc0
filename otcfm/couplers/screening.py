r"""Certified bfloat16 screening of the semidiscrete argmax: the partners of the float32 argmax, about half the cost.

Pairing a source batch ``x: (B, D)`` with a dataset ``y: (N, D)`` is ``argmax_j 2 x.y_j + h_j``
(``h_j = g_j - |y_j|^2``), a ``B x N x D`` product. On hardware with fast bfloat16 products (CPUs with
AVX512-BF16, GPUs) that product costs about half as much in bfloat16 as in float32, but bfloat16 keeps only 8
significant bits. The screen makes it exact anyway:

1. Shift the problem so it is small and non-negative: with ``z_j = y_j - mean(y)`` and ``c_j = (h_j - m) / 2``
   (``m`` the midrange of ``h``), ``argmax_j 2 x.y_j + h_j = argmax_j t_j`` for ``t_j = x.z_j + c_j`` (the
   terms dropped are constant along a row). With ``K = 1.05 (|x| max_j |z_j| + max_j |c_j|)``, every
   ``v_j = t_j + K`` lies in ``[0.047 K, 2K]``.
2. Compute ``v_j`` in one bfloat16 product of ``[x, 1, K]`` and ``[z_j, c_j, 1]`` (float32 accumulation, a
   bfloat16 result), each row divided by a power of two near its ``K`` and ``z`` by one near ``max |z_j|``
   (exact scalings, so every product is below 2 in magnitude whatever the data's scale; ``max |z_j|`` itself is
   found from ``z`` over a power of two, so its squares neither over- nor underflow). Its error in each
   entry is at most ``E = K (2u + u^2 + 2 (1 + u)^2 (gamma + u (1 + gamma)))``, with ``u = 2^-8`` the unit
   roundoff of bfloat16 (the rounding of the inputs and of the result) and ``gamma = (D + 2) 2^-24 /
   (1 - (D + 2) 2^-24)`` the float32 accumulation's; the rounding of ``K`` itself shifts a whole row alike and
   changes no comparison. Subnormals flushed to zero add at most ``(D + 2) 2^-124`` (in units of the row's
   scale) while ``2^-90 <= K <= 2^100``; other batches go to float32. ``E < 0.02 K`` for ``D <= 30,000`` (the
   screen's limit), so the computed values stay positive.
3. The true argmax ``j*`` then satisfies ``v~_j* >= max_j v~_j - 2E``. Candidates are the entries within ``2E`` of
   their row's screened maximum (found block by block: a row's blocks of 128 columns whose maximum is within
   ``2E``, then the entries of those blocks), a handful per row on the benchmarks' data. They are scored again
   exactly in float32 and the best one wins.

Because ``v > 0``, the order of bfloat16 values is the order of their bits read as int16, so the block maxima
are one integer reduction. When the batch has too many candidates (data with many near-ties, or an outlier that
inflates ``max |z_j|``), :meth:`Screen.argmax` returns None and the caller scores in float32, so the result never
depends on the data being benign (such a call cost 1.5-1.7x the float32 scores alone in a review's measurements
on 8-d data: use ``screen=False`` for data with many near-ties).
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_DIM", "Screen", "fast_bfloat16", "padded_rows"]

_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_BLOCK = 128  # columns per block of the screened row maximum
#: A batch with a row whose ``K`` lies outside ``[_SMALLEST, _LARGEST]`` goes to the float32 scores: there the
#: flush of bfloat16 subnormals to zero, or overflow, would escape the bound (``K = 0``: all scores tie).
_SMALLEST, _LARGEST = 2.0**-90, 2.0**100
MAX_DIM = 30_000  # the error bound keeps the screened values positive up to this dimension
_MAX_CANDIDATES = 64  # mean candidates per row beyond which the float32 scores are cheaper


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products on ``device`` are fast enough for screening to pay: a CPU with
    AVX512-BF16 or AMX-BF16 instructions that oneDNN uses. Other devices only when asked (``screen=True``)."""
    return device.type == "cpu" and _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    """A hardware fact, read once: oneDNN in this torch build and the CPU's bfloat16 instructions (Linux flags)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def padded_rows(n: int) -> int:
    """Rows of the screen's bfloat16 copy of ``n`` data points: whole blocks of 128."""
    return math.ceil(n / _BLOCK) * _BLOCK


def _error_factor(dim: int) -> float:
    """``E / K`` of the module docstring for products of length ``dim + 2``, with a 1% margin."""
    terms = (dim + 2) * 2.0**-24
    gamma = terms / (1.0 - terms)
    return 1.01 * (2 * _U + _U**2 + 2 * (1 + _U) ** 2 * (gamma + _U * (1 + gamma)))


class Screen:
    """A dataset prepared once for screened pairing: centred points in bfloat16, padded to whole blocks.

    Args:
        data: ``(N, D)`` float32 dataset.
        memory_budget: bytes for the float32 rescoring of the candidates at once, and for a block of rows while
            the copy is made (the dataset itself is never copied in float32).

    Attributes:
        calls, fallbacks: calls of :meth:`argmax`, and those that returned None (for the curious: whether to
            screen is decided call by call, never from this history, so a resumed run pairs as an
            uninterrupted one).
    """

    def __init__(self, data: Tensor, memory_budget: int = 2**28) -> None:
        if data.ndim != 2 or data.dtype != torch.float32 or not 0 < data.shape[1] <= MAX_DIM:
            raise ValueError(
                f"data: expected a float32 tensor (N, D) with D <= {MAX_DIM}, got {data.dtype} {tuple(data.shape)}"
            )
        _check_accumulation(data.device)
        n, d = data.shape
        self.data, self.blocks, self.memory_budget = data, math.ceil(n / _BLOCK), memory_budget
        rows = max(_BLOCK, memory_budget // (32 * d))  # a float32 block of centred rows at a time: budget / 8
        mean = data.mean(0)
        # R = max_j |z_j|, as unit * radius with unit a power of two and radius in [0.5, 1): the norms are taken of
        # z over a power of two near max |z_jk|, so that they neither over- nor underflow at any scale of the data
        top = max(float((data[start : start + rows] - mean).abs().amax()) for start in range(0, n, rows))
        shift = math.frexp(top)[1] if 0 < top < math.inf else 0
        radius = 0.0
        for start in range(0, n, rows):
            z = (data[start : start + rows] - mean).mul_(2.0**-shift)
            radius = max(radius, float(z.norm(dim=1).amax()))
        mantissa, exponent = math.frexp(radius) if 0 < radius < math.inf else (0.0, 0)
        self.radius = mantissa  # R / unit
        self.unit = 2.0 ** (exponent + shift)  # z is stored as z / unit (a power of two: exact), of norm below 1
        self.right = torch.zeros(self.blocks * _BLOCK, d + 2, dtype=torch.bfloat16, device=data.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            self.right[start:stop, :d] = (data[start:stop] - mean).div_(self.unit)  # rounded to bfloat16 here
        self.factor = _error_factor(d)
        self.calls = self.fallbacks = 0
        self._lock = threading.Lock()  # self.right's last two columns are rewritten when the potentials change
        self._prepared: tuple[weakref.ref[Tensor], Tensor, Tensor] | None = None

    def _prepare(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``[c_j, 1]`` for score offsets ``h`` into the last two columns of :attr:`right` (under the lock);
        return ``h: (N,)`` in float32 and ``max_j |c_j|``. Kept while ``h`` is the same tensor object
        (fixed potentials while training); a temporary copy, or a new tensor at a freed one's
        address, is prepared afresh. Changes made in place to ``h`` are not seen: pass a new tensor instead (the
        semidiscrete coupler derives a new ``h`` whenever its potentials change)."""
        prepared = self._prepared
        if prepared is not None and prepared[0]() is h:
            return prepared[1], prepared[2]
        n, original = self.data.shape[0], h
        h = h.to(self.data.dtype)
        low, high = torch.aminmax(h)
        c = (h - (low + high) / 2) / 2  # c_j: centred on the midrange, so max |c_j| is least
        self.right[:n, -2], self.right[:n, -1] = c.to(torch.bfloat16), 1.0
        self.right[n:, -2], self.right[n:, -1] = -1.0, 0.0  # padded points: v < 0, below every real entry
        reach = c.abs().amax()
        self._prepared = (weakref.ref(original), h, reach)
        return h, reach

    def argmax(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
        """``argmax_j 2 x.y_j + h_j`` of each row of ``x: (B, D)`` and that maximum, both ``(B,)``; None when the
        screen cannot decide cheaply (too many candidates, or rows too large or too small for the bound): the
        caller then scores in float32.

        Args:
            x: ``(B, D)`` float32 source samples.
            h: ``(N,)`` score offsets ``g_j - |y_j|^2`` (potentials ``g``).
        """
        _check_accumulation(x.device)
        n, b = self.data.shape[0], x.shape[0]
        # K of each row, 5% above |x| R + max|c_j|: v = t + K >= 0 even after the rounding errors. Each row is
        # then divided by a power of two s near K (exact), so every product is below 2 and the bound is scale-free.
        with self._lock:
            self.calls += 1
            h, reach = self._prepare(h)
            moved = x * self.unit  # the products x.z_j are (x unit).(z_j / unit)
            bound = (_norms(moved) * self.radius + reach) * 1.05
            smallest, largest = (float(v) for v in torch.aminmax(bound))
            if not (_SMALLEST <= smallest and largest <= _LARGEST):  # NaN fails too
                self.fallbacks += 1
                return None
            scale = torch.ldexp(torch.ones_like(bound), -torch.frexp(bound).exponent)[:, None]  # 1 / s
            ones = torch.ones(b, 1, dtype=x.dtype, device=x.device)
            left = torch.cat([moved, ones, bound[:, None]], dim=1).mul_(scale)
            screened = (left.to(torch.bfloat16) @ self.right.T).view(b * self.blocks, _BLOCK)
        block_max = screened.view(torch.int16).amax(dim=1).view(torch.bfloat16).float().view(b, self.blocks)
        window = 2 * (self.factor * bound * scale[:, 0] + (x.shape[1] + 2) * 2.0**-124)  # 2E, in units of s
        threshold = block_max.amax(dim=1) - window  # (B,); v > 0: int16 bits order as the values
        rows, blocks = (block_max >= threshold[:, None]).nonzero(as_tuple=True)
        if rows.shape[0] > _MAX_CANDIDATES * b:
            self.fallbacks += 1
            return None
        values = screened.index_select(0, rows * self.blocks + blocks)  # (P, BLOCK) bfloat16
        del screened
        entry, offset = (values >= threshold.index_select(0, rows)[:, None]).nonzero(as_tuple=True)
        rows, columns = rows.index_select(0, entry), blocks.index_select(0, entry) * _BLOCK + offset
        if rows.shape[0] > _MAX_CANDIDATES * b:
            self.fallbacks += 1
            return None
        exact = self._rescore(x, h, rows, columns)
        best = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, rows, exact, "amax")
        won = exact == best.index_select(0, rows)
        partner = torch.full((b,), n, dtype=torch.long, device=x.device)
        return partner.scatter_reduce_(0, rows[won], columns[won], "amin"), best  # ties: the first index

    def _rescore(self, x: Tensor, h: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """``2 x_r.y_c + h_c`` in float32 for the candidates ``(rows, columns)``, in chunks under the budget."""
        step = max(1, self.memory_budget // (12 * x.shape[1]))  # three (chunk, D) float32 tensors at a time
        parts = []
        for start in range(0, rows.shape[0], step):
            r, c = rows[start : start + step], columns[start : start + step]
            products = x.index_select(0, r) * self.data.index_select(0, c)
            parts.append(2 * products.sum(1) + h.index_select(0, c))
        return torch.cat(parts) if len(parts) != 1 else parts[0]


def _norms(x: Tensor) -> Tensor:
    """``|x_i|`` of each row of ``x: (B, D)``, taken over a power of two near ``max |x|`` so that the squares neither
    over- nor underflow (inf or 0 only where the norm itself is beyond the dtype)."""
    top = float(x.abs().amax())
    if not 0 < top < math.inf:
        return x.norm(dim=1)
    exponent = math.frexp(top)[1]
    half = exponent // 2
    return (x * 2.0**-half * 2.0 ** (half - exponent)).norm(dim=1) * 2.0**half * 2.0 ** (exponent - half)


def _check_accumulation(device: torch.device) -> None:
    """The bound needs float32 accumulation of the bfloat16 products; cuBLAS may reduce in bfloat16."""
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
        raise ValueError(
            "screen: the rounding bound needs float32 accumulation of bfloat16 products; set "
            "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False, or use screen=False"
        )
