"""otcfm: flow matching with minibatch optimal-transport couplings and Reflow.

The public surface::

    fm = otcfm.FlowMatcher(coupler="exact", path="linear", sigma=0.0)
    loss = fm.loss(model, x0, x1)
    x = otcfm.integrate(model, x0, steps=4, method="euler")
    otcfm.metrics.w2(x, y)

Optional and heavy packages (POT, scipy, matplotlib, torchdyn) are imported where used;
``otcfm.reflow``, ``otcfm.loader``, ``otcfm.distributed`` and ``otcfm.engine`` load on first access.
"""

import importlib
from types import ModuleType

from otcfm import couplers, data, metrics, models, paths
from otcfm.couplers import get_coupler
from otcfm.flow import BridgeEpsilonWarning, FlowBatch, FlowMatcher
from otcfm.likelihood import LogLikelihood, likelihood
from otcfm.paths import get_path
from otcfm.solvers import Solution, integrate, solve
from otcfm.training import TrainConfig, TrainResult, load_model, train

__version__ = "0.1.0"

#: Submodules imported on first attribute access (``otcfm.reflow.generate_pairs(...)``).
_LAZY_SUBMODULES = ("distributed", "engine", "loader", "reflow")

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


def __getattr__(name: str) -> ModuleType:
    """Import a lazy submodule on first access (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"otcfm.{name}")
    raise AttributeError(f"module 'otcfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
