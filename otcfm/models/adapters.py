"""Adapters from other calling conventions to otcfm's ``model(x, t, ...)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["TimeFirst", "time_first", "wrapped_attribute"]


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


#: Where wrappers keep the model they wrap: DDP (``.module``), :class:`TimeFirst` (``.model``), the engine's
#: autocast wrapper (``.net``).
_WRAPPED = ("module", "model", "net")


def wrapped_attribute(model: object, name: str, accept: Callable[[object], bool]) -> Any:
    """``model.name`` where ``accept`` takes it, else the same attribute of the model a wrapper holds (up to 8
    wrappers deep); None when no model on the way has an accepted one."""
    for _ in range(8):
        if model is None:
            return None
        found = getattr(model, name, None)
        if accept(found):
            return found
        model = next((inner for inner in (getattr(model, k, None) for k in _WRAPPED) if inner is not None), None)
    return None
