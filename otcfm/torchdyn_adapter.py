"""Use an otcfm model inside torchdyn, whose vector fields are called ``f(t, x)``.

torchdyn is an optional dependency (``pip install 'otcfm[torchdyn]'``); this
module imports it only inside :func:`load_neural_ode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TorchdynField", "load_neural_ode"]

INSTALL_HINT = (
    "method='dopri5' needs the optional torchdyn integration: pip install 'otcfm[torchdyn]'. "
    "With a CPU-only torch whose matching torchvision is unavailable, install it without "
    "torchvision: pip install attrs torchcde pytorch-lightning && pip install --no-deps torchdyn==1.0.6"
)


class TorchdynField(nn.Module):
    """Adapter from otcfm's ``model(x, t)`` to torchdyn's ``f(t, x, args)``.

    A single time from the solver (torchdyn passes shape ``(1,)``) is broadcast to ``(B,)``. :attr:`nfe`
    counts the calls (network evaluations).

    Args:
        model: velocity field ``model(x: (B, ...), t: (B,)) -> (B, ...)``.
        max_nfe: raise ``ValueError`` on the call after this many (an adaptive solver's steps shrink without
            end where the flow blows up or the model returns NaN); None for no limit.

    Example:
        >>> from torchdyn.core import NeuralODE  # doctest: +SKIP
        >>> node = NeuralODE(TorchdynField(model), solver="dopri5")  # doctest: +SKIP
    """

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], max_nfe: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.max_nfe = max_nfe
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor, args: Any = None) -> Tensor:
        """Velocity at ``x: (B, ...)`` and a single time ``t`` (any shape holding one value) or ``t: (B,)``."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if self.max_nfe is not None:
            now = float(t.reshape(-1)[0])  # the adaptive loop reads its time on the host anyway
            if math.isnan(now):  # a NaN error estimate made the step size NaN: no step will be accepted again
                raise ValueError(
                    f"model: the adaptive solver's time became NaN after {self.nfe} evaluations: the model "
                    "returned NaN/Inf or the flow blew up; use a fixed-step method to find where"
                )
            if self.nfe >= self.max_nfe:
                raise ValueError(
                    f"max_nfe: the adaptive solver made {self.nfe} model evaluations and reached only t = {now:.6g}: "
                    "the flow is stiff or blows up; raise max_nfe, loosen atol/rtol, or use a fixed-step method"
                )
        self.nfe += 1
        if t.numel() == 1:
            t = t.reshape(()).expand(x.shape[0])
        return self.model(x, t)


def load_neural_ode() -> type:
    """Import and return ``torchdyn.core.NeuralODE``.

    Raises:
        ImportError: torchdyn is missing or fails to import; the message says how to install it.
    """
    try:
        from torchdyn.core import NeuralODE
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    except RuntimeError as error:  # a torchvision built for another torch fails at import time
        raise ImportError(f"torchdyn failed to import ({error}). {INSTALL_HINT}") from error
    return NeuralODE
