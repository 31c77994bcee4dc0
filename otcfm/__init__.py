"""otcfm: flow matching with minibatch optimal-transport couplings and Reflow.

The public surface::

    fm = otcfm.FlowMatcher(coupler="exact", path="linear", sigma=0.0)
    loss = fm.loss(model, x0, x1)
    x = otcfm.integrate(model, x0, steps=4, method="euler")
    otcfm.metrics.w2(x, y)

Every public name loads on first access (PEP 562), so ``import otcfm`` and ``otcfm --help`` do not import torch;
optional and heavy packages (POT, scipy, matplotlib, torchdyn) are imported where used.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and editors
    from otcfm import couplers, data, distributed, engine, loader, metrics, models, paths, reflow
    from otcfm.couplers import get_coupler
    from otcfm.flow import BridgeEpsilonWarning, FlowBatch, FlowMatcher
    from otcfm.likelihood import LogLikelihood, likelihood
    from otcfm.paths import get_path
    from otcfm.solvers import Solution, integrate, solve
    from otcfm.training import TrainConfig, TrainResult, load_model, train

__version__ = "0.1.0"

#: Where each public name lives: a submodule of its own name (None), or the module that defines it.
_HOMES: dict[str, str | None] = {
    "BridgeEpsilonWarning": "otcfm.flow",
    "FlowBatch": "otcfm.flow",
    "FlowMatcher": "otcfm.flow",
    "LogLikelihood": "otcfm.likelihood",
    "Solution": "otcfm.solvers",
    "TrainConfig": "otcfm.training",
    "TrainResult": "otcfm.training",
    "couplers": None,
    "data": None,
    "distributed": None,
    "engine": None,
    "get_coupler": "otcfm.couplers",
    "get_path": "otcfm.paths",
    "integrate": "otcfm.solvers",
    "likelihood": "otcfm.likelihood",
    "load_model": "otcfm.training",
    "loader": None,
    "metrics": None,
    "models": None,
    "paths": None,
    "reflow": None,
    "solve": "otcfm.solvers",
    "train": "otcfm.training",
}

__all__ = [
    "BridgeEpsilonWarning",
    "FlowBatch",
    "FlowMatcher",
    "LogLikelihood",
    "Solution",
    "TrainConfig",
    "TrainResult",
    "couplers",
    "data",
    "distributed",
    "engine",
    "get_coupler",
    "get_path",
    "integrate",
    "likelihood",
    "load_model",
    "loader",
    "metrics",
    "models",
    "paths",
    "reflow",
    "solve",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first access and keep it (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'otcfm' has no attribute {name!r}")
    home = _HOMES[name]
    value = importlib.import_module(f"otcfm.{name}") if home is None else getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """The ``otcfm`` module: ``otcfm.likelihood`` stays the function :func:`otcfm.likelihood.likelihood` when the
    submodule of that name is imported (Python binds a submodule as an attribute of its package on import)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "likelihood" and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
