"""Adapters from other calling conventions to otcfm's ``model(x, t, ...)``."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["TimeFirst", "time_first"]


class TimeFirst(nn.Module):
    """Calls a time-first ``model(t, x, *args, **kwargs)`` as ``wrapped(x, t, *args, **kwargs)``.

    The wrapped model is the submodule ``model``: its parameters train with the wrapper's, and its state dict keys
    are prefixed ``model.``.

    Args:
        model: the time-first model, e.g. TorchCFM's ``UNetModelWrapper`` or a torchdyn vector field.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module called as model(t, x), got {type(model).__name__}")
        self.model = model

    def forward(self, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        """``x: (N, ...)``, ``t: (N,)`` -> ``model(t, x, *args, **kwargs)``."""
        return self.model(t, x, *args, **kwargs)


def time_first(model: nn.Module) -> nn.Module:
    """``model`` called as ``model(t, x, ...)``, wrapped to be called as ``wrapped(x, t, ...)`` (:class:`TimeFirst`).

    Example: ``velocity = time_first(UNetModelWrapper(dim=(1, 28, 28), num_channels=32, num_res_blocks=1))``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    return TimeFirst(model)
