"""Independent coupling: random pairs, the baseline of I-CFM."""

from __future__ import annotations

import torch
from torch import Tensor

from otcfm import _random
from otcfm.couplers.base import Coupler, Pairing

__all__ = ["IndependentCoupler"]


class IndependentCoupler(Coupler):
    """Pair samples at random, independently of their positions.

    Equal batch sizes give a uniformly random permutation (every sample used
    once); for ``B0 != B1`` each source sample gets a partner drawn uniformly
    from the target batch. The draw comes from ``generator``, so a seeded
    generator gives the same pairing.
    """

    name = "independent"

    def pair(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Pairing:
        n0, n1 = x0.shape[0], x1.shape[0]
        i = torch.arange(n0, device=x0.device)
        if n0 == n1:
            return Pairing(i, _random.randperm(n1, generator, x0.device))
        return Pairing(i, _random.randint(n1, (n0,), generator, x0.device))
