"""The coupler contract: who is paired with whom inside a minibatch.

A coupler maps a source batch ``x0: (B0, ...)`` and a target batch
``x1: (B1, ...)`` to index tensors ``(i, j)`` of equal length, so that
``x0[i], x1[j]`` are the pairs. Labels or conditions follow by the same
indices (``y1[j]``). Indices live on the inputs' device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from otcfm import _random
from otcfm._checks import check_pair

__all__ = ["Pairing", "Coupler", "squared_euclidean_cost", "pairs_from_plan"]


class Pairing(NamedTuple):
    """Index tensors of a coupling: ``x0[i]`` is paired with ``x1[j]``.

    Attributes:
        i: ``(P,)`` int64 indices into the source batch.
        j: ``(P,)`` int64 indices into the target batch.
    """

    i: Tensor
    j: Tensor


class Coupler(ABC):
    """Base class of couplers. Subclasses implement :meth:`pair`.

    Calling a coupler validates the inputs (same sample shape, non-empty,
    finite) and returns a :class:`Pairing`.
    """

    #: Registry name, set by subclasses.
    name: str = ""

    def __call__(self, x0: Tensor, x1: Tensor, *, generator: torch.Generator | None = None) -> Pairing:
        """Pair ``x0: (B0, ...)`` with ``x1: (B1, ...)``.

        Args:
            x0: source batch, ``(B0, ...)``.
            x1: target batch, ``(B1, ...)`` with the same sample shape.
            generator: source of randomness for couplers that draw.

        Returns:
            ``Pairing(i, j)``, index tensors of shape ``(B0,)`` on ``x0.device``.

        Raises:
            ValueError: mismatched sample shapes, empty batches, NaN/Inf.
        """
        x0, x1 = check_pair(x0, x1)
        return self.pair(x0, x1, generator)

    @abstractmethod
    def pair(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Pairing:
        """Compute the pairing of validated inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def squared_euclidean_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean cost between flattened samples, in float64.

    ``C[a, b] = ||x0[a] - x1[b]||^2``, computed as ``|x0|^2 + |x1|^2 - 2 x0.x1``
    in float64 (clamped at 0) on the inputs' device.

    Args:
        x0: ``(B0, ...)``.
        x1: ``(B1, ...)``.

    Returns:
        ``(B0, B1)`` float64 tensor.
    """
    a = x0.reshape(x0.shape[0], -1).to(torch.float64)
    b = x1.reshape(x1.shape[0], -1).to(torch.float64)
    cost = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return cost.clamp_min_(0.0)


def pairs_from_plan(plan: np.ndarray, generator: torch.Generator | None, device: torch.device) -> Pairing:
    """Turn a transport plan into pairs: every source sample used exactly once.

    Where ``plan`` is a scaled permutation matrix (equal uniform batches and an
    exact solver), the permutation itself is returned: nothing is drawn and
    every target sample is also used exactly once. Otherwise each row ``a``
    draws its partner ``j[a]`` from ``plan[a] / plan[a].sum()``.

    Args:
        plan: ``(B0, B1)`` non-negative plan (numpy, any float dtype).
        generator: used only when drawing from rows.
        device: where the returned indices live.

    Returns:
        ``Pairing(i, j)`` with ``i = arange(B0)``.
    """
    n0, n1 = plan.shape
    i = torch.arange(n0, device=device)
    if n0 == n1:
        j = plan.argmax(axis=1)
        if np.array_equal(np.sort(j), np.arange(n1)) and np.allclose(
            plan[np.arange(n0), j], plan.sum(axis=1), rtol=1e-9, atol=0.0
        ):
            return Pairing(i, torch.as_tensor(j, dtype=torch.int64, device=device))
    weights = torch.as_tensor(plan, dtype=torch.float64).clamp_min(0.0)
    if bool((weights.sum(1) <= 0).any()):
        raise ValueError("plan: a row has no mass, so its source sample has no partner")
    return Pairing(i, _random.multinomial(weights, generator, device))
