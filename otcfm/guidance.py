r"""Conditional sampling: class labels for a velocity model, and classifier-free guidance.

A conditional model is called ``model(x, t, y)`` with ``y: (B,)`` integer labels. Classifier-free guidance
(Ho & Salimans 2022) mixes its conditional and unconditional velocities with a weight ``w``:

.. math::
    v_w(x, t \mid y) = v(x, t, \varnothing) + w \, \big(v(x, t, y) - v(x, t, \varnothing)\big)

``w = 1`` is the plain conditional field, ``w = 0`` the unconditional one, ``w > 1`` pushes samples towards what
the model thinks typical of ``y``. The unconditional branch ``\varnothing`` is a "no class" label (the
``null_label`` given, else the model's ``null_label`` attribute, as :class:`otcfm.models.UNet` has), which a
model learns when trained with label dropout (``otcfm.train(label_dropout=0.1)``); a model without one is
called without labels, ``model(x, t)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from otcfm.models.adapters import wrapped_attribute

__all__ = ["class_labels", "guided_field", "null_label_of"]


def class_labels(y: Tensor | int, batch: int, device: torch.device, name: str = "y") -> Tensor:
    """Integer labels ``(batch,)`` from ``y``: a tensor ``(batch,)`` or ``(batch, 1)``, or one ``int`` for all.

    Raises:
        TypeError: ``y`` is neither an integer tensor nor an int.
        ValueError: a tensor of another shape, or negative labels (checked on the CPU only: no host
            synchronisation on a GPU).
    """
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        if y < 0:
            raise ValueError(f"{name}: expected a class index >= 0, got {y!r}")
        return torch.full((batch,), int(y), dtype=torch.int64, device=device)
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = f"a {y.dtype} tensor" if isinstance(y, Tensor) else repr(y)
        raise TypeError(
            f"{name}: expected integer class labels of shape ({batch},) or ({batch}, 1), or an int, got {got}"
        )
    if y.shape not in ((batch,), (batch, 1)):
        raise ValueError(
            f"{name}: expected integer class labels of shape ({batch},) or ({batch}, 1), got {tuple(y.shape)}"
        )
    y = y.reshape(batch).to(device)
    if y.device.type == "cpu" and batch and int(y.min()) < 0:
        raise ValueError(f"{name}: expected class indices >= 0, got {int(y.min())}")
    return y


def null_label_of(model: object, null_label: int | None) -> int | None:
    """The "no class" label of the unconditional branch: ``null_label`` if given, else ``model.null_label``
    (looked up through wrappers: :func:`otcfm.models.adapters.wrapped_attribute`), else None."""
    if null_label is not None:
        if not isinstance(null_label, numbers.Integral) or isinstance(null_label, bool) or null_label < 0:
            raise ValueError(f"null_label: expected a class index >= 0 or None, got {null_label!r}")
        return int(null_label)
    found = wrapped_attribute(
        model, "null_label", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
    )
    return None if found is None else int(found)


def guided_field(
    model: Callable[..., Tensor],
    y: Tensor | int | None,
    guidance: float,
    null_label: int | None,
    batch: int,
    device: torch.device,
) -> Callable[[Tensor, Tensor], Tensor]:
    r"""``f(x, t)``: the velocity a sampler integrates, for labels ``y`` at guidance weight ``w = guidance``.

    - ``y`` None: ``model(x, t)`` (``guidance`` must be 1: there is nothing to guide).
    - ``w = 1``: ``model(x, t, y)``; ``w = 0``: the unconditional branch alone.
    - otherwise, with a null label: one batched call ``model([x; x], [t; t], [y; null])`` per evaluation, split
      into :math:`v_c, v_u` and mixed as :math:`v_u + w (v_c - v_u)`; without one, two calls
      (``model(x, t, y)`` and ``model(x, t)``).

    Args:
        model: the velocity model.
        y: integer labels ``(B,)`` or ``(B, 1)``, one int for every sample, or None.
        guidance: the weight ``w``, a finite real number.
        null_label: the unconditional branch's label (see :func:`null_label_of`).
        batch: ``B``, the number of samples.
        device: where the samples are.

    Raises:
        ValueError: ``guidance`` not finite, or other than 1 without labels; bad labels (:func:`class_labels`).
    """
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ValueError(
            f"guidance: expected a finite number (1: plain conditional, 0: unconditional), got {guidance!r}"
        )
    w = float(guidance)
    if y is None:
        if w != 1.0:
            raise ValueError(f"guidance: {w:g} needs class labels y (guidance mixes v(x, t, y) with v(x, t, null))")
        return model
    labels = class_labels(y, batch, device)
    null = null_label_of(model, null_label)
    nulls = None if null is None else torch.full_like(labels, null)

    def unconditional(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t) if nulls is None else model(x, t, nulls)

    if w == 1.0:
        return lambda x, t: model(x, t, labels)
    if w == 0.0:
        return unconditional
    if nulls is None:

        def two_calls(x: Tensor, t: Tensor) -> Tensor:
            free = model(x, t)
            return free + w * (model(x, t, labels) - free)

        return two_calls
    both = torch.cat([labels, nulls])

    def mixed(x: Tensor, t: Tensor) -> Tensor:
        conditional, free = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return free + w * (conditional - free)

    return mixed
