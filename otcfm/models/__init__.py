"""Velocity models called as ``model(x, t)`` with ``x: (B, ...)`` and ``t: (B,)`` (``model(x, t, y)`` with labels).

- :class:`MLP`: flattened samples of any shape.
- :class:`UNet` and :func:`unet`: images ``(C, H, W)``, optionally class-conditional; sizes in :data:`UNET_PRESETS`.
- :func:`time_first`: an adapter for models called ``model(t, x)``.
- :func:`model_spec` / :func:`rebuild_model`: what a checkpoint records of an MLP or UNet, and the rebuild.
"""

from otcfm.models.adapters import TimeFirst, time_first
from otcfm.models.mlp import MLP, TimeEmbedding
from otcfm.models.spec import MAX_PARAMETERS, model_spec, rebuild_model
from otcfm.models.unet import UNET_PRESETS, UNet, unet

__all__ = [
    "MAX_PARAMETERS",
    "MLP",
    "TimeEmbedding",
    "TimeFirst",
    "UNET_PRESETS",
    "UNet",
    "model_spec",
    "rebuild_model",
    "time_first",
    "unet",
]
