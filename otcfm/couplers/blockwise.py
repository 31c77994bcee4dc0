r"""Sinkhorn for large point clouds: log-domain iterations on blocks of the cost, never the whole matrix.

For ``x0: (n0, D)``, ``x1: (n1, D)`` and the squared Euclidean cost, each half-iteration

.. math::
    g_l = \epsilon \big(\log b_l - \mathrm{LSE}_k\, (f_k - C_{kl}) / \epsilon\big),\qquad
    f_k = \epsilon \big(\log a_k - \mathrm{LSE}_l\, (g_l - C_{kl}) / \epsilon\big)

is computed on row or column blocks of ``C = |x0|^2 + |x1|^2 - 2 x0 x1^T`` (one matrix product per block), sized
by a memory budget, so ``n0 = n1 = 10^5`` points need a few hundred MB instead of the 80 GB of a dense float64 plan.
The target marginal error comes for free from the column pass. Epsilon scaling (annealing) and warm starts from
given potentials (the previous pool's, for a stream of pools) shorten the runs. Pairs are drawn from the implicit
plan row by row (Gumbel-max over the blocks): one partner per source sample, never the dense plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_anneal, check_count, check_flag, check_rate
from otcfm._checks import check_pair

__all__ = ["ANNEAL_BELOW", "BlockwiseSinkhorn", "blockwise_sinkhorn", "draw_partners"]

#: With ``anneal="auto"``, epsilon scaling is used below this fraction of the mean cost, where it saves
#: iterations; above it plain scaling iterations converge in a few dozen steps and annealing costs kernels (also
#: the dense solver's threshold, :mod:`otcfm.couplers.sinkhorn`).
ANNEAL_BELOW = 0.005


@dataclass(frozen=True)
class BlockwiseSinkhorn:
    """Output of :func:`blockwise_sinkhorn`: the plan is ``exp((f_k + g_l - C_kl) / epsilon)``, never stored.

    Attributes:
        f: ``(n0,)`` source potential (weights folded in).
        g: ``(n1,)`` target potential.
        epsilon: the absolute epsilon of the final iterations.
        iterations: iterations made (annealing included).
        error: L2 norm of the target marginal violation before the last target update.
        converged: ``error <= tol``.
    """

    f: Tensor
    g: Tensor
    epsilon: float
    iterations: int
    error: float
    converged: bool

    def renormalised_entropy(self, x0: Tensor, x1: Tensor, memory_budget: int = 2**28) -> float:
        """:func:`otcfm.metrics.renormalised_entropy` of this implicit plan on the clouds it was solved for.

        Computed on row blocks of ``log P_kl = (f_k + g_l - C_kl) / epsilon`` under ``memory_budget``:
        ``H = -sum P log P`` of the plan normalised to mass 1, then ``(H - log max(n0, n1)) / log min(n0, n1)``.
        """
        n0, n1 = x0.shape[0], x1.shape[0]
        if (n0, n1) != (self.f.shape[0], self.g.shape[0]) or min(n0, n1) < 2:
            raise ValueError(f"x0, x1: expected the {self.f.shape[0]} x {self.g.shape[0]} clouds of this solve")
        a, b, a_sq, b_sq = _clouds(x0, x1)
        f, g = self.f.to(a.dtype), self.g.to(a.dtype)
        mass, weighted = 0.0, 0.0  # sum P and sum P log P, in float64
        rows = _block(memory_budget, n1, a.element_size())
        for start in range(0, n0, rows):
            stop = min(start + rows, n0)
            log_p = torch.addmm(g - b_sq, a[start:stop], b.T, alpha=2.0)
            log_p.add_((f[start:stop] - a_sq[start:stop])[:, None]).div_(self.epsilon)
            p = log_p.exp()
            mass += float(p.sum(dtype=torch.float64))
            weighted += float((p * log_p).sum(dtype=torch.float64))
        entropy = math.log(mass) - weighted / mass
        return (entropy - math.log(max(n0, n1))) / math.log(min(n0, n1))


#: Centre clouds whose squared distance from the origin exceeds this many times their variance (float32 then
#: loses at most about 1e-4 of the cost without centring).
_CENTRE_ABOVE = 1024.0


def _clouds(x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, |a|^2, |b|^2)``: the flattened clouds, detached, in a dtype whose range holds their costs.

    Half precision is computed in float32, and float32 clouds whose squared norms float32 cannot hold (coordinates
    beyond about 1e19, or below about 1e-16 for all points, where they may underflow to zero) in float64. Clouds
    whose centre lies farther from the origin than :data:`_CENTRE_ABOVE` times their variance are centred first:
    the cost is translation-invariant, and ``|a|^2 + |b|^2 - 2 a.b`` loses about ``eps * |centre|^2 / variance``
    of its digits (ordinary clouds keep their values exactly as given).

    Raises:
        ValueError: float64 cannot hold the squared distances either.
    """
    a, b = x0.detach().reshape(x0.shape[0], -1), x1.detach().reshape(x1.shape[0], -1)
    start = torch.promote_types(a.dtype, torch.float32)
    for dtype in dict.fromkeys((start, torch.float64)):
        a, b = a.to(dtype), b.to(dtype)
        a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
        centre = 0.5 * (a.mean(0) + b.mean(0))
        spread = 0.5 * (float(a_sq.mean()) + float(b_sq.mean())) - float(centre @ centre)
        if float(centre @ centre) > _CENTRE_ABOVE * spread:
            a, b = a - centre, b - centre
            a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
        bound, info = 2.0 * (float(a_sq.max()) + float(b_sq.max())), torch.finfo(dtype)
        if info.tiny / info.eps < bound < info.max:
            return a, b, a_sq, b_sq
        if bound == 0 and float(torch.maximum(a.abs().max(), b.abs().max())) == 0:
            return a, b, a_sq, b_sq  # every point at the origin (after centring): the cost is truly zero
        # else the squares under- or overflowed (a zero bound of clouds away from the origin is underflow, not a
        # zero cost, which would give the independent coupling): try float64
    raise ValueError(
        f"x0, x1: their squared distances (bound {bound:.3g}) overflow or underflow float64; rescale the data "
        "(with a relative epsilon the coupling does not depend on the scale)"
    )


def _block(budget: int, other: int, itemsize: int) -> int:
    return max(1, budget // (3 * other * itemsize))


def _lse_rows(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, pot_y: Tensor, eps: float, rows: int) -> Tensor:
    """``LSE_l (pot_y_l - C_kl) / eps`` for each row ``k`` of ``x``: ``(n_x,)``, blocks of ``rows`` rows.

    Every block is computed in one buffer, in place (a fresh block per step would cost a page fault per 4 KiB:
    about a third of the time at 16,384 points).
    """
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    shift = (pot_y - y_sq)[None, :]
    buffer = torch.empty((min(rows, x.shape[0]), y.shape[0]), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        scores = torch.addmm(shift, x[start:stop], y.T, alpha=2.0, out=buffer[: stop - start])  # pot_y - |y|^2 + 2x.y
        scores.sub_(x_sq[start:stop, None]).div_(eps)  # (pot_y - C) / eps
        top = scores.amax(dim=1, keepdim=True)
        out[start:stop] = scores.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
    return out


def blockwise_sinkhorn(
    x0: Tensor,
    x1: Tensor,
    epsilon: float,
    *,
    relative: bool = True,
    tol: float = 1e-5,
    max_iter: int = 2000,
    anneal: bool | str = "auto",
    potentials: tuple[Tensor, Tensor] | None = None,
    memory_budget: int = 2**28,
) -> BlockwiseSinkhorn:
    """Entropic OT between uniform ``x0: (n0, ...)`` and ``x1: (n1, ...)`` (squared Euclidean), blockwise.

    Args:
        x0, x1: the point clouds (flattened), on the device to compute on, in their dtype (half precision in
            float32, float32 beyond its range in float64); centred when far from the origin.
        epsilon: regularisation; relative to the mean cost (estimated on up to 2048 x 2048 points) unless
            ``relative=False``.
        relative: see ``epsilon``.
        tol: tolerance on the L2 norm of the target marginal violation.
        max_iter: iteration limit (annealing stages included).
        anneal: epsilon scaling from the largest cost down: True, False or ``"auto"`` (below
            :data:`ANNEAL_BELOW` of the mean cost, or from warm potentials never).
        potentials: ``(f, g)`` to start from, e.g. those of the previous pool: ``(n0,)`` and ``(n1,)``.
        memory_budget: bytes for the blocks of scores.

    Returns:
        a :class:`BlockwiseSinkhorn`.

    Raises:
        ValueError: bad inputs, settings or potentials; clouds whose squared distances float64 cannot hold; an
            epsilon too small for the dtype (the potentials overflow).
    """
    x0, x1 = check_pair(x0, x1)
    check_rate(epsilon, "epsilon")
    check_rate(tol, "tol")
    check_count(max_iter, "max_iter")
    check_count(memory_budget, "memory_budget")
    check_flag(relative, "relative")
    check_anneal(anneal)
    a, b, a_sq, b_sq = _clouds(x0, x1)
    n0, n1 = a.shape[0], b.shape[0]
    probe_a, probe_b = a[:2048], b[:2048]
    probe = (a_sq[:2048, None] + b_sq[None, :2048] - 2.0 * probe_a @ probe_b.T).clamp_min(0)
    mean_cost, largest = float(probe.double().mean()), float(probe.max())
    eps = epsilon * mean_cost if relative and mean_cost > 0 else float(epsilon)
    if potentials is not None:
        f, g = (p.detach().to(device=a.device, dtype=a.dtype).clone() for p in potentials)
        if f.shape != (n0,) or g.shape != (n1,) or not bool(torch.isfinite(f).all() and torch.isfinite(g).all()):
            raise ValueError(f"potentials: expected finite tensors of shapes ({n0},) and ({n1},)")
    else:
        f, g = torch.zeros(n0, dtype=a.dtype, device=a.device), torch.zeros(n1, dtype=a.dtype, device=a.device)
    use_anneal = anneal is True or (anneal == "auto" and potentials is None and eps < ANNEAL_BELOW * mean_cost)
    current = max(eps, 2.0 * largest) if use_anneal else eps
    rows0, rows1 = _block(memory_budget, n1, a.element_size()), _block(memory_budget, n0, a.element_size())
    log_a, log_b = -math.log(n0), -math.log(n1)
    b_target = 1.0 / n1
    error, iterations = math.inf, 0
    while iterations < max_iter:
        lse_col = _lse_rows(b, a, b_sq, a_sq, f, current, rows1)  # LSE_k (f_k - C_kl) / eps
        if current == eps:
            mass = torch.exp(g / current + lse_col)  # the plan's column sums before this update
            error = float(torch.linalg.vector_norm(mass - b_target))
            if error <= tol:
                break
        g = current * (log_b - lse_col)
        f = current * (log_a - _lse_rows(a, b, a_sq, b_sq, g, current, rows0))
        iterations += 1
        if current > eps:
            current = max(eps, current / 2)
    if not bool(torch.isfinite(f).all() and torch.isfinite(g).all()):
        raise ValueError(
            f"epsilon: {eps:.3g} (absolute) is too small for {a.dtype} on these clouds (mean cost {mean_cost:.3g}): "
            "the potentials overflowed; raise it, or pass float64 clouds"
        )
    return BlockwiseSinkhorn(f, g, eps, iterations, error, error <= tol)


def draw_partners(
    x0: Tensor,
    x1: Tensor,
    g: Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
    memory_budget: int = 2**28,
) -> Tensor:
    """One partner index in ``x1`` per row of ``x0``, drawn from row ``k`` of the plan ``∝ exp((g_l - C_kl) / eps)``.

    Blocks of whole rows under ``memory_budget``: each row's weights relative to its maximum, then the inverse
    draw of :func:`otcfm._random.multinomial` (one pass, exact for any sharpness; a Gumbel-max draw would need
    noise for every entry within reach of the maximum, most of a blurry row). ``(n0,)`` int64, never the dense plan.
    """
    a, b, _, b_sq = _clouds(x0, x1)
    g = g.to(device=a.device, dtype=a.dtype)
    shift = (g - b_sq)[None, :]
    rows = _block(memory_budget, b.shape[0], 8)  # as if float64: the draw's own buffers come on top
    buffer = torch.empty((min(rows, a.shape[0]), b.shape[0]), dtype=a.dtype, device=a.device)
    partners = torch.empty(a.shape[0], dtype=torch.long, device=a.device)
    for start in range(0, a.shape[0], rows):
        stop = min(start + rows, a.shape[0])
        weights = torch.addmm(shift, a[start:stop], b.T, alpha=2.0, out=buffer[: stop - start])  # g - C + |x|^2
        weights.sub_(weights.amax(dim=1, keepdim=True)).div_(epsilon).exp_()  # |x|^2 cancels in the row maximum
        partners[start:stop] = _random.multinomial(weights, generator, a.device)
    return partners
