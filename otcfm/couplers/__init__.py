"""Couplers: who is paired with whom inside a minibatch.

A coupler maps ``(x0, x1)`` to index tensors ``(i, j)``; ``x0[i], x1[j]`` are
the pairs and labels follow as ``y1[j]``. Choose one by name with
:func:`get_coupler`: ``"independent"``, ``"exact"``, ``"hungarian"``,
``"sinkhorn"``, ``"paired"``, ``"unbalanced"``, ``"partial"``, and ``"semidiscrete"`` (fitted once on a whole dataset,
then called with the dataset as ``x1``).
"""

from otcfm.couplers.base import Coupler, Pairing
from otcfm.couplers.cost import condition_cost, squared_euclidean_cost
from otcfm.couplers.exact import ExactCoupler, exact_plan, linear_assignment
from otcfm.couplers.hungarian import HungarianCoupler
from otcfm.couplers.independent import IndependentCoupler, PairedCoupler
from otcfm.couplers.plan import OTCoupler, pairs_from_plan
from otcfm.couplers.registry import COUPLERS, get_coupler
from otcfm.couplers.relaxed import PartialCoupler, UnbalancedCoupler, partial_plan, unbalanced_plan
from otcfm.couplers.semidiscrete import SemidiscreteCoupler, SemidiscreteFit
from otcfm.couplers.shards import SemidiscreteShard
from otcfm.couplers.sinkhorn import ConvergenceWarning, SinkhornCoupler, SinkhornResult, sinkhorn_plan

__all__ = [
    "COUPLERS",
    "ConvergenceWarning",
    "Coupler",
    "ExactCoupler",
    "HungarianCoupler",
    "IndependentCoupler",
    "OTCoupler",
    "PairedCoupler",
    "PartialCoupler",
    "Pairing",
    "SemidiscreteCoupler",
    "SemidiscreteFit",
    "SemidiscreteShard",
    "SinkhornCoupler",
    "SinkhornResult",
    "UnbalancedCoupler",
    "condition_cost",
    "exact_plan",
    "get_coupler",
    "linear_assignment",
    "pairs_from_plan",
    "partial_plan",
    "sinkhorn_plan",
    "squared_euclidean_cost",
    "unbalanced_plan",
]
