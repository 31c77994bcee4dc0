r"""How close a coupling is to the OT coupling of a whole dataset: assignment error and transport cost ratio.

Definitions (docs/benchmarks.md):

- *assignment error* of partner indices ``j`` into a dataset of ``N`` points: the total-variation
  distance between the share each point receives and the uniform ``1/N``,
  ``0.5 * sum_k |count_k / len(j) - 1/N|``. A coupling with the right target marginal has 0 up to
  sampling noise (:func:`otcfm.couplers.semidiscrete.noise_floor`); nearest neighbour has nearly 1.
- *renormalised entropy* of a plan ``P: (n0, n1)`` with total mass 1 (the sharpness measure of Klein et al.,
  "On Fitting Flow Models with Large Sinkhorn Couplings", 2025): ``(H(P) - log max(n0, n1)) / log min(n0, n1)``
  with ``H(P) = -sum P log P``; 0 for a deterministic matching (a permutation), 1 for the independent coupling,
  so it compares couplings of different sizes and epsilons.
- *transport cost ratio* of pairs ``(x0_a, x1_a)``: their mean squared distance over ``W2^2`` of
  source and target. Any coupling with the right marginals has a ratio ``>= 1`` (up to the noise of
  the estimates); 1 is the OT coupling. Read it with the assignment error: a map that ignores the
  target marginal (nearest neighbour) can cost less than the OT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from otcfm._args import check_count, check_rate
from otcfm._checks import check_pair
from otcfm.couplers.semidiscrete.fit import error_of_counts

__all__ = ["assignment_error", "error_of_counts", "renormalised_entropy", "transport_cost_ratio"]


def assignment_error(partners: Tensor, n: int) -> float:
    """Total-variation distance between the partner shares of ``partners: (M,)`` over ``n`` points and ``1/n``.

    Args:
        partners: ``(M,)`` integer indices into a dataset of ``n`` points, ``M >= 1``.
        n: the dataset's size.

    Returns:
        a float in ``[0, 1)``.
    """
    check_count(n, "n")
    if not isinstance(partners, Tensor) or partners.ndim != 1 or partners.is_floating_point() or not len(partners):
        raise ValueError("partners: expected a non-empty (M,) tensor of integer indices")
    if int(partners.min()) < 0 or int(partners.max()) >= n:
        raise ValueError(f"partners: expected indices in [0, {n})")
    return error_of_counts(torch.bincount(partners, minlength=n))


def transport_cost_ratio(x0: Tensor, x1: Tensor, w2_squared: float) -> float:
    """Mean squared distance of the pairs ``(x0[a], x1[a])`` over ``W2^2(source, target)``.

    Args:
        x0: ``(M, ...)`` source samples.
        x1: ``(M, ...)`` their partners.
        w2_squared: ``W2^2`` of source and target, e.g. a converged semidiscrete dual
            (:attr:`otcfm.couplers.SemidiscreteFit.dual`) or exact OT on a large sample.

    Returns:
        the ratio (float).
    """
    x0, x1 = check_pair(x0, x1, same_batch=True)
    if isinstance(w2_squared, Tensor) and w2_squared.numel() == 1:  # a 0-d tensor, e.g. metrics.w2(...) ** 2
        w2_squared = float(w2_squared)
    w2_squared = check_rate(w2_squared, "w2_squared")  # a boolean is refused, numpy scalars count
    cost = (x0.double() - x1.double()).reshape(x0.shape[0], -1).square().sum(1).mean()
    return float(cost) / float(w2_squared)


def renormalised_entropy(plan: Tensor) -> float:
    """``(H(P) - log max(n0, n1)) / log min(n0, n1)`` of a plan ``P: (n0, n1)`` (normalised to mass 1 first).

    0 for a permutation (every row one partner), 1 for the independent (product) coupling; a coupling of the
    uniform marginals is assumed (a couplers' plan), and a plan that leaves mass off some rows or columns can
    fall below 0.

    Raises:
        ValueError: not a 2-D non-negative finite plan with positive mass and at least 2 rows and columns.
    """
    if not isinstance(plan, Tensor) or plan.ndim != 2 or min(plan.shape) < 2:
        raise ValueError("plan: expected a (n0, n1) tensor with n0, n1 >= 2")
    p = plan.detach().to(torch.float64)
    total = float(p.sum())
    if not (math.isfinite(total) and total > 0) or bool((p < 0).any()):
        raise ValueError("plan: expected finite non-negative entries with a positive sum")
    p = p / total
    entropy = -float(torch.special.xlogy(p, p).sum())
    n0, n1 = plan.shape
    return (entropy - math.log(max(n0, n1))) / math.log(min(n0, n1))
