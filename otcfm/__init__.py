"""otcfm: flow matching with minibatch optimal-transport couplings and Reflow.

The public surface::

    fm = otcfm.FlowMatcher(coupler="exact", path="linear", sigma=0.0)
    loss = fm.loss(model, x0, x1)
    x = otcfm.integrate(model, x0, steps=4, method="euler")
    otcfm.metrics.w2(x, y)

Optional and heavy packages (POT, matplotlib, torchdyn) are imported where used.
"""

from otcfm import couplers, data, metrics, models, paths
from otcfm.couplers import get_coupler
from otcfm.flow import FlowBatch, FlowMatcher
from otcfm.likelihood import LogLikelihood, likelihood
from otcfm.paths import get_path
from otcfm.solvers import Solution, integrate, solve
from otcfm.training import TrainConfig, TrainResult, load_model, train

__version__ = "0.1.0"

__all__ = [
    "FlowBatch",
    "FlowMatcher",
    "LogLikelihood",
    "Solution",
    "TrainConfig",
    "TrainResult",
    "couplers",
    "data",
    "get_coupler",
    "get_path",
    "integrate",
    "likelihood",
    "load_model",
    "metrics",
    "models",
    "paths",
    "solve",
    "train",
]
