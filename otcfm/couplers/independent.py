"""Independent coupling (I-CFM) and the identity pairing of pre-paired data."""

from __future__ import annotations

import torch
from torch import Tensor

from otcfm import _random
from otcfm.couplers.base import Coupler, Pairing

__all__ = ["IndependentCoupler", "PairedCoupler"]


class IndependentCoupler(Coupler):
    """Pair samples at random, independently of their positions (labels are ignored).

    Equal batch sizes give a uniformly random permutation (every sample used
    once); for ``B0 != B1`` each source sample gets a partner drawn uniformly
    from the target batch. The draw comes from ``generator``, so a seeded
    generator gives the same pairing.
    """

    name = "independent"
    one_to_one = True
    sources_in_order = True

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        n0, n1, device = x0.shape[0], x1.shape[0], x0.device
        i = self._arange(n0, device)
        if n0 == n1:
            return Pairing(i, _random.randperm(n1, generator, device))
        return Pairing(i, _random.randint(n1, (n0,), generator, device))


class PairedCoupler(Coupler):
    """Keep the pairing the data already has: ``x0[k]`` with ``x1[k]``.

    For pairs made elsewhere: Reflow's (noise, sample) pairs, or batches coupled
    ahead of time by :func:`otcfm.loader.coupled_loader`. Needs ``B0 == B1``.
    """

    name = "paired"
    one_to_one = True
    sources_in_order = True
    targets_in_order = True

    def pair(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, generator: torch.Generator | None
    ) -> Pairing:
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"x0 and x1: the paired coupler needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}"
            )
        i = self._arange(x0.shape[0], x0.device)
        return Pairing(i, i)
