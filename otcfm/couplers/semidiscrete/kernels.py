"""The pairing kernels of semidiscrete OT: scores ``2 x.y_j + h_j`` of a batch against the dataset in chunks, their row
maxima (partners, through the bfloat16 screen where it applies), Gumbel-max draws and softmax shares."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from otcfm import _random
from otcfm.couplers.screening import Screen


def _scores(x: Tensor, data: Tensor, h: Tensor, start: int, stop: int) -> Tensor:
    """``2 x.y_j + h_j`` for ``j`` in ``[start, stop)``: ``(B, stop - start)``; equals ``g_j - c(x, y_j) + |x|^2``."""
    return torch.addmm(h[None, start:stop], x, data[start:stop].T, alpha=2.0)


def _masked(scores: Tensor, labels: Tensor | None, classes: Tensor | None, start: int, stop: int) -> Tensor:
    if labels is None or classes is None:
        return scores
    return scores.masked_fill(labels[None, start:stop] != classes[:, None], -math.inf)


_BLOCK = 256  # columns per block of the two-level row maximum


def _row_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=1)`` of a ``(B, n)`` block, about 5x faster on the CPU for long rows.

    ``max`` with indices is a slow reduction, ``amax`` a vectorised one: take the ``amax`` of blocks of
    :data:`_BLOCK` columns, then the index inside each row's best block only. Ties go to the first index.
    """
    b, n = scores.shape
    full = n - n % _BLOCK
    if full < 4 * _BLOCK:
        return scores.max(dim=1)
    block_max = scores[:, :full].unflatten(1, (full // _BLOCK, _BLOCK)).amax(dim=2)
    _, block = block_max.max(dim=1)
    columns = block[:, None] * _BLOCK + torch.arange(_BLOCK, device=scores.device)
    value, offset = scores.gather(1, columns).max(dim=1)
    index = block * _BLOCK + offset
    if full < n:
        tail_value, tail_index = scores[:, full:].max(dim=1)
        better = tail_value > value
        value, index = torch.where(better, tail_value, value), torch.where(better, tail_index + full, index)
    return value, index


def _partners_and_scores(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    generator: torch.Generator | None,
    screen: Screen | None = None,
) -> tuple[Tensor, Tensor]:
    """Partners ``(B,)`` of source samples ``x: (B, D)`` and their score ``max_j 2 x.y_j + h_j`` ``(B,)``.

    ``h: (N,)`` are the score offsets ``g_j - |y_j|^2`` (in the units of ``x``, see :func:`_scaled_batch`).
    ``epsilon = 0``: the argmax, and ``|x|^2 - score`` is the c-transform ``min_j c(x, y_j) - g_j``.
    ``epsilon > 0``: a draw from the softmax of ``score / epsilon`` by Gumbel-max (the score then carries the
    Gumbel noise). ``screen``: ``data`` prepared for the screened argmax (``epsilon = 0`` without labels only).
    """
    if screen is not None:
        if epsilon > 0 or labels is not None:
            raise ValueError("screen: only for epsilon = 0 without labels")
        found = screen.argmax(x, h)
        if found is not None:
            return found
    n = data.shape[0]
    best = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    partner = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop)
        if epsilon > 0:
            value, index = _gumbel_max(scores.div_(epsilon), generator)
        else:
            value, index = _row_max(scores)
        better = value > best
        best = torch.where(better, value, best)
        partner = torch.where(better, index + start, partner)
    return partner, best


#: Entries more than this below their row's maximum (in units of epsilon) are left out of a softmax draw: each has
#: a probability below e^-30 (1e-13) relative to the maximum, so the draw's distribution moves by under N e^-30.
_TAU = 30.0


def _gumbel_max(logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A draw from the softmax of each row of ``logits: (B, n)``: ``(perturbed maximum, index)``, each ``(B,)``.

    Gumbel noise is drawn only for the candidates within :data:`_TAU` of their row's maximum (one vectorised
    comparison), not for all ``B n`` entries: for a sharp softmax that is a handful per row.
    """
    rows, cols = (logits >= (logits.amax(dim=1) - _TAU)[:, None]).nonzero(as_tuple=True)
    uniform = _random.rand((rows.shape[0],), generator, logits.device, logits.dtype).clamp_min_(1e-30)
    noisy = logits[rows, cols] - torch.log(-torch.log(uniform))
    value = torch.full((logits.shape[0],), -math.inf, dtype=logits.dtype, device=logits.device)
    value = value.scatter_reduce(0, rows, noisy, reduce="amax")
    winner = noisy == value[rows]
    index = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return value, index.scatter_(0, rows[winner], cols[winner])


def _shares(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    screen: Screen | None = None,
) -> Tensor:
    """Share of the batch ``x: (B, D)`` each data point receives, ``(N,)``: partner counts / B, or mean softmax
    (``h``: the score offsets, as in :func:`_partners_and_scores`)."""
    if epsilon == 0:
        partner = _partners_and_scores(x, data, h, 0.0, chunk, labels, classes, None, screen)[0]
        return torch.bincount(partner, minlength=data.shape[0]).to(h.dtype) / x.shape[0]
    return _softmax_columns(x, data, h, epsilon, chunk, labels, classes)[0] / x.shape[0]  # type: ignore[operator]


def _softmax_columns(
    x: Tensor,
    data: Tensor,
    h: Tensor,
    epsilon: float,
    chunk: int,
    labels: Tensor | None,
    classes: Tensor | None,
    with_normalisers: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Column sums ``(N,)`` of the row softmax of scores over ``epsilon``, and the rows' log-normalisers ``(B,)``
    (always when the scores take two passes, else only ``with_normalisers``); ``h``: the score offsets."""
    n = data.shape[0]
    if chunk >= n:  # the whole (B, N) block fits in the budget: one pass
        scores = _masked(_scores(x, data, h, 0, n), labels, classes, 0, n).div_(epsilon)
        if not with_normalisers:
            return torch.softmax(scores, dim=1).sum(0).to(h.dtype), None
        lse = torch.logsumexp(scores, dim=1)
        return scores.sub_(lse[:, None]).exp_().sum(0).to(h.dtype), lse
    lse = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):  # pass 1: each row's log-normaliser
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop) / epsilon
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
    share = torch.empty(n, dtype=h.dtype, device=h.device)
    for start in range(0, n, chunk):  # pass 2: column sums of the softmax
        stop = min(start + chunk, n)
        scores = _masked(_scores(x, data, h, start, stop), labels, classes, start, stop) / epsilon
        share[start:stop] = torch.exp(scores - lse[:, None]).sum(0)
    return share, lse
