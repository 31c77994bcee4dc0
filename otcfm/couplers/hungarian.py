"""Hungarian (Jonker-Volgenant) matching: a one-to-one assignment, rectangular batches included."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from otcfm._memory import check_dense_fits
from otcfm.couplers.base import Pairing
from otcfm.couplers.cost import squared_euclidean_cost
from otcfm.couplers.exact import LSA_BYTES_PER_ENTRY, _assignment
from otcfm.couplers.plan import CostFn, OTCoupler

__all__ = ["HungarianCoupler"]


class HungarianCoupler(OTCoupler):
    """Minimum-cost one-to-one matching by scipy's ``linear_sum_assignment``.

    For equal batch sizes this is the exact OT pairing. For ``B0 != B1`` it
    returns ``min(B0, B1)`` pairs: every sample of the smaller batch is
    matched once, the unmatched samples of the larger batch are left out.

    Args:
        cost: ``cost(x0, x1) -> (B0, B1)``; squared Euclidean by default.
        label_weight: see :class:`~otcfm.couplers.plan.OTCoupler`.
    """

    name = "hungarian"
    one_to_one = True
    sources_in_order = False  # for B0 > B1 only B1 sources are matched

    def __init__(self, cost: CostFn = squared_euclidean_cost, label_weight: float | None = None) -> None:
        super().__init__(cost, label_weight)

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        check_dense_fits(x0.shape[0], x1.shape[0], LSA_BYTES_PER_ENTRY, "Hungarian matching")
        cost, device = self.cost_matrix(x0, x1, y0, y1, generator), x0.device
        rows, cols = _assignment(np.ascontiguousarray(cost.cpu().numpy()))  # validated by cost_matrix
        return Pairing(torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
