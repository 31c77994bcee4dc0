"""Couplers: who is paired with whom inside a minibatch.

A coupler maps ``(x0, x1)`` to index tensors ``(i, j)``; ``x0[i], x1[j]`` are
the pairs. Choose one by name with :func:`get_coupler`.
"""

from otcfm.couplers.base import Coupler, Pairing, pairs_from_plan, squared_euclidean_cost
from otcfm.couplers.exact import ExactCoupler, exact_plan
from otcfm.couplers.independent import IndependentCoupler
from otcfm.couplers.registry import COUPLERS, get_coupler

__all__ = [
    "COUPLERS",
    "Coupler",
    "ExactCoupler",
    "IndependentCoupler",
    "Pairing",
    "exact_plan",
    "get_coupler",
    "pairs_from_plan",
    "squared_euclidean_cost",
]
