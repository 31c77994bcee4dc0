"""From a transport plan to pairs, and the OT coupler base class shared by exact, Hungarian and Sinkhorn."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from otcfm import _random
from otcfm._args import check_flag, check_rate
from otcfm._checks import all_finite, check_pair, total_of
from otcfm.couplers.base import Coupler, Pairing
from otcfm.couplers.cost import (
    TINY_TOTAL,
    condition_cost,
    pairwise_squared_distances,
    rescaled_squared_distances,
    squared_euclidean_cost,
)

__all__ = ["CostFn", "OTCoupler", "pairs_from_plan"]

CostFn = Callable[[Tensor, Tensor], Tensor]


def pairs_from_plan(
    plan: Tensor, generator: torch.Generator | None, device: torch.device, replace: bool = False
) -> Pairing:
    """Turn a transport plan into pairs.

    Default (``replace=False``): every source sample is used exactly once.
    Where ``plan`` is a scaled permutation matrix (equal uniform batches and an
    exact solver) the permutation itself is returned, nothing is drawn and
    every target is used once too; otherwise row ``a`` draws its partner from
    ``plan[a] / plan[a].sum()``.

    ``replace=True`` (TorchCFM's behaviour, to reproduce published numbers):
    ``B0`` pairs ``(i, j)`` drawn with replacement from the whole plan, so some
    pairs repeat and others are dropped (about 63% are unique for a permutation plan).

    Args:
        plan: ``(B0, B1)`` non-negative plan.
        generator: randomness of the draws.
        device: where the indices go.
        replace: draw pairs with replacement from the flattened plan.

    Returns:
        ``Pairing(i, j)`` of length ``B0``.

    Raises:
        ValueError: the plan has NaN/Inf, negative entries, or a row without mass.
    """
    plan = plan.detach().to(torch.float64)
    n0, n1 = plan.shape
    if not all_finite(plan) or bool((plan < 0).any()):
        raise ValueError("plan: expected finite non-negative entries")
    if replace:
        flat = _random.multinomial_replace(plan.reshape(-1), n0, generator, device)
        return Pairing(flat // n1, flat % n1)
    i = torch.arange(n0, device=device)
    if n0 == n1:
        j = plan.argmax(dim=1)
        is_permutation = torch.equal(torch.sort(j).values, torch.arange(n1, device=plan.device))
        if is_permutation and torch.allclose(plan.gather(1, j[:, None]).squeeze(1), plan.sum(1), rtol=1e-9, atol=0):
            return Pairing(i, j.to(device))
    if bool((plan.sum(1) <= 0).any()):
        raise ValueError("plan: a row has no mass, so its source sample has no partner")
    return Pairing(i, _random.multinomial(plan, generator, device))


class OTCoupler(Coupler):
    """Base of couplers that solve an OT problem on a cost matrix.

    The cost is ``cost(x0, x1)`` (squared Euclidean between flattened samples
    by default) plus, when labels are passed, the term of
    :func:`~otcfm.couplers.cost.condition_cost`.

    Args:
        cost: ``cost(x0, x1) -> (B0, B1)`` tensor.
        label_weight: penalty of a label mismatch (None: pairs stay within labels
            wherever the label counts allow), or weight of a continuous condition distance.
        replace: draw pairs with replacement from the plan (TorchCFM-compatible; off by default).
    """

    def __init__(
        self, cost: CostFn = squared_euclidean_cost, label_weight: float | None = None, replace: bool = False
    ) -> None:
        if not callable(cost):
            raise TypeError(f"cost: expected a callable cost(x0, x1) -> (B0, B1) tensor, got {cost!r}")
        self.cost = cost
        self.label_weight = None if label_weight is None else check_rate(label_weight, "label_weight", allow_zero=True)
        self.replace = check_flag(replace, "replace")

    @property
    def sources_in_order(self) -> bool:  # type: ignore[override]
        """Every source sample once, in order (the rows of the plan), unless pairs are drawn with replacement."""
        return not self.replace

    def finite_checked_later(self) -> bool:
        """The default squared-Euclidean cost is finite only if both batches are: its check covers theirs."""
        return self.cost is squared_euclidean_cost

    def cost_matrix(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """The ``(B0, B1)`` float64 cost the plan minimises, labels included; validated.

        In units of ``unit^2`` (see :meth:`scaled_base_cost`): the same optimal plans as the true cost.
        """
        return condition_cost(self.scaled_base_cost(x0, x1)[0], y0, y1, self.label_weight, generator)

    def base_cost(self, x0: Tensor, x1: Tensor) -> Tensor:
        """``cost(x0, x1)`` as a validated ``(B0, B1)`` float64 tensor, without the label term."""
        cost, unit = self.scaled_base_cost(x0, x1)
        return cost if unit == 1.0 else cost * (unit * unit)

    def scaled_base_cost(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, float]:
        """``(cost / unit^2, unit)``: the validated float64 cost without the label term, and its length unit.

        ``unit`` is 1 except for the default squared-Euclidean cost of inputs so large or small that
        float64 squares overflow or underflow (beyond about 1e150 or below 1e-150): then both batches
        are scaled by a power of two first (exact), so the plan stays optimal at any finite input scale.
        """
        default = self.cost is squared_euclidean_cost
        cost = pairwise_squared_distances(x0, x1) if default else self.cost(x0, x1)
        if not isinstance(cost, Tensor) or cost.shape != (x0.shape[0], x1.shape[0]):
            shape = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
            raise ValueError(f"cost: expected a ({x0.shape[0]}, {x1.shape[0]}) tensor, got {shape}")
        cost = cost.detach().to(torch.float64)
        total = total_of(cost)  # read at once: the cost goes to a solver on the host, or into Sinkhorn's loop
        if default and (not math.isfinite(total) or total < TINY_TOTAL):
            check_pair(x0, x1)  # names x0 or x1 when the NaN/Inf came from an input
            return rescaled_squared_distances(x0, x1)  # finite inputs: the squares over- or underflowed
        if not (math.isfinite(total) or all_finite(cost)):
            check_pair(x0, x1)
            raise ValueError("cost: contains NaN or Inf")
        return cost, 1.0
