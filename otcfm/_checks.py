"""Input validation shared by the public functions.

Every check raises with the argument's name and what was expected, so a user
sees ``x1: expected ... got ...`` instead of a shape error deep in torch.

One validation per call: a public entry checks its inputs once and passes
checked tensors on to internal code, which does not check them again. In a
training step, ``FlowMatcher.loss`` checks ``x0, x1, y0, y1`` through the
coupler's public call (nowhere else), evaluates the path with its unchecked
``interpolate``, and checks ``t`` only when a user's time sampler drew it.

Device-to-host synchronisation. Structural checks (type, dtype, shape,
device) read metadata only and cost nothing on any device. Value checks
(NaN/Inf, ``t`` in ``[0, 1]``) need a reduction over the data, and reading
its result on the host (``bool(tensor)``) makes the host wait for the device:
on a GPU, a stall of the pipeline per check. The policy, by device:

- CPU: a read costs nothing beyond the reduction, and the check raises
  ``ValueError`` naming the argument at once. The NaN/Inf test is one
  summation (a sum is finite exactly when every entry is, unless it
  overflows, and then the elementwise test decides), about 30x cheaper than
  ``torch.isfinite(x).all()`` on a 256 x 784 batch. ``FlowMatcher.loss`` goes
  further and reads its loss instead (one scalar): the loss is NaN/Inf when a
  sample the step used is, and only then are ``x0`` and ``x1`` scanned, to
  name the culprit. A non-finite loss from the model itself is returned as
  it is.
- CUDA (:func:`value_checks_queued`): no value is read on the host in a
  step. A NaN/Inf in the data reaches the loss, and a time outside ``[0, 1]``
  is made NaN (:func:`mark_invalid`) so that it does too; the engine reads
  the losses back in batches and stops at the first non-finite one, naming
  its step (rerun that step on the CPU for the ``ValueError`` that names the
  argument). ``torch.cuda.set_sync_debug_mode("error")`` shows it: a
  FlowMatcher step with the independent or paired coupler synchronises
  nowhere (an OT coupler reads its cost matrix on the host, where its solver
  runs or where Sinkhorn tests convergence, and checks it with
  :func:`all_finite`; a Gaussian-source path reads the first batch's mean and
  spread, once).
- Other devices (MPS, ...): the CPU's rule, at the price of a synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "check_batch",
    "check_choice",
    "check_finite",
    "check_pair",
    "check_time",
    "check_dtype_fits",
    "explain_dtype",
    "first_nonfinite",
    "floating_dtype",
    "host_reads_free",
    "mark_invalid",
    "named_as_data",
    "total_of",
    "value_checks_queued",
]


_HALF = (torch.float16, torch.bfloat16)


def value_checks_queued(x: Tensor) -> bool:
    """Whether value faults of ``x`` are left to reach the loss as NaN (on CUDA) instead of read on the host."""
    return x.device.type == "cuda"


def mark_invalid(x: Tensor, valid: Tensor) -> Tensor:
    """``x`` with NaN where ``valid`` (broadcastable to ``x``) is False: a fault found on the device, without a host
    read, that the loss and the engine's check of it then carry."""
    return torch.where(valid, x, torch.full((), float("nan"), dtype=x.dtype, device=x.device))


def host_reads_free(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host costs no synchronisation: it lives on the CPU."""
    return x.is_cpu


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN or Inf: one summation, and the elementwise test only if the sum is not finite.

    Reads the result on the host (a synchronisation on an accelerator).
    """
    return math.isfinite(total_of(x)) or bool(torch.isfinite(x).all())


def total_of(x: Tensor) -> float:
    """The sum of ``x`` as a Python float (NaN or Inf if an entry is, or the sum overflows): one read on the host."""
    return (x.sum(dtype=torch.float32) if x.dtype in _HALF else x.sum()).item()


def first_nonfinite(tensors: Mapping[str, object]) -> str | None:
    """The name of the first floating-point tensor in ``tensors`` (a ``state_dict``) holding NaN or Inf, else None.

    Reads each tensor's sum on the host (a synchronisation per tensor on an accelerator): for checkpoints, not steps.
    """
    for name, value in tensors.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel() and not all_finite(value):
            return name
    return None


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise ``ValueError("<name>: contains NaN or Inf")`` if ``x`` has a NaN or Inf (on CUDA it reaches the loss
    instead, see above)."""
    if not value_checks_queued(x) and not all_finite(x):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def check_batch(x: object, name: str, finite: bool = True) -> Tensor:
    """Check that ``x`` is a non-empty, finite, floating tensor of shape ``(B, ...)``.

    ``finite=False`` skips the NaN/Inf scan, for callers that detect NaN/Inf later at
    no extra cost (a squared-distance cost matrix is finite only if both inputs are).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has no batch dimension, an empty batch, or NaN/Inf.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected shape (B, ...) with at least 2 dimensions, got shape {tuple(x.shape)}; "
            "use x.unsqueeze(-1) for 1-D data"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    if x.is_meta:
        raise ValueError(f"{name}: a meta tensor has a shape but no values; expected data on 'cpu' or 'cuda'")
    return check_finite(x, name) if finite else x


def check_pair(x0: object, x1: object, same_batch: bool = False, finite: bool = True) -> tuple[Tensor, Tensor]:
    """Check a source batch ``x0: (B0, ...)`` and a target batch ``x1: (B1, ...)``.

    Each must pass :func:`check_batch`; the trailing shapes, devices and dtypes must match;
    ``same_batch=True`` also requires ``B0 == B1``; ``finite`` as in :func:`check_batch`.
    """
    # One test of every condition, reading each attribute once: a training step calls this with caches the
    # model has just evicted, where each read costs about a microsecond. _explain_pair names what is wrong.
    if not isinstance(x0, Tensor) or not isinstance(x1, Tensor):
        _explain_pair(x0, x1, same_batch)
    s0, s1, dtype = x0.shape, x1.shape, x0.dtype
    if not (
        dtype.is_floating_point
        and x1.dtype == dtype
        and len(s0) >= 2
        and s0[0] > 0
        and s1[0] > 0
        and s0[1:] == s1[1:]
        and (not same_batch or s0[0] == s1[0])
        and (x0.is_cpu and x1.is_cpu or x0.device == x1.device and not x0.is_meta)
    ):
        _explain_pair(x0, x1, same_batch)
    if finite:
        check_finite(x0, "x0")
        check_finite(x1, "x1")
    return x0, x1


def _explain_pair(x0: object, x1: object, same_batch: bool) -> None:
    """Raise the error of the first of :func:`check_pair`'s conditions that ``x0`` and ``x1`` break."""
    check_batch(x0, "x0", finite=False)
    check_batch(x1, "x1", finite=False)
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x0 and x1: expected the same sample shape, got x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)}"
        )
    if same_batch and x0.shape[0] != x1.shape[0]:
        raise ValueError(f"x0 and x1: expected the same batch size, got {x0.shape[0]} and {x1.shape[0]}")
    if x0.device != x1.device:
        raise ValueError(f"x0 and x1: expected the same device, got {x0.device} and {x1.device}")
    if x0.dtype != x1.dtype:
        raise ValueError(f"x0 and x1: expected the same dtype, got {x0.dtype} and {x1.dtype}; cast one of them")
    raise AssertionError("unreachable: check_pair found a fault that _explain_pair does not name")


def check_time(t: object, batch: int, name: str = "t") -> Tensor:
    """Check that ``t`` is a tensor of shape ``(batch,)`` with values in ``[0, 1]`` (on CUDA, values outside are
    made NaN, see above); returns ``t``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({batch},), got {type(t).__name__}")
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
    if value_checks_queued(t):
        return mark_invalid(t, (t >= 0) & (t <= 1))
    if batch:
        low, high = (float(v) for v in t.aminmax())
        if not (low >= 0 and high <= 1):  # NaN fails too
            raise ValueError(f"{name}: expected values in [0, 1], got min {low:.4g}, max {high:.4g}")
    return t


def floating_dtype(model: object) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter; None for a model without one or no ``nn.Module``.

    Metadata only (no synchronisation): cheap enough for a check once per call.
    """
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return None


def explain_dtype(model: object, x: Tensor, name: str) -> None:
    """After ``model(x, ...)`` raised: raise a ``ValueError`` naming ``name`` and both dtypes if ``x``'s dtype is not
    that of ``model``'s parameters (torch's own message says ``mat1 and mat2 must have the same dtype``)."""
    check_dtype_fits(x, floating_dtype(model), name)


def explain_time_first(model: object, x: Tensor, t: Tensor, y: Tensor | None = None, name: str = "model") -> None:
    """After ``model(x, t)`` failed or returned another shape: raise a ``ValueError`` naming ``name`` if
    ``model(t, x)`` works (the time-first convention of TorchCFM's UNet and torchdyn's fields), with the one-line
    adapter."""
    if not callable(model):
        return
    try:
        with torch.no_grad():
            v = model(t, x) if y is None else model(t, x, y)
    except Exception:  # not a time-first model either: the caller's own error stands
        return
    if isinstance(v, Tensor) and v.shape == x.shape:
        raise ValueError(
            f"{name}: it takes the time first, model(t, x), as TorchCFM's UNet and torchdyn's vector fields do; "
            "otcfm calls model(x, t): wrap it, model = otcfm.models.time_first(model)"
        )


def check_dtype_fits(x: Tensor, dtype: torch.dtype | None, name: str, noun: str = "samples") -> None:
    """Raise a ``ValueError`` naming ``name`` and both dtypes if ``x`` is not of ``dtype``, the dtype of a model's
    parameters (None: no check); ``noun`` is what the message calls ``x`` (``"samples"``, ``"pairs"``)."""
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"{name}: {x.dtype} {noun} for a model whose parameters are {dtype}; cast the {noun} "
            f"(x.to({dtype})) or the model (model.to({x.dtype}))"
        )


#: The names a loss or coupler gives its batches, and what a caller that drew them calls them.
_DATA_NAMES = {"x0 and x1": "source and target", "x0": "source", "x1": "target"}


def named_as_data(error: ValueError, where: str) -> ValueError:
    """``error`` of a loss or coupler with ``x0`` / ``x1`` renamed to the ``source`` / ``target`` its batches were
    drawn from (``where`` says which draw), for a caller whose user passed samplers, not batches."""
    message = str(error)
    for batch_name, data_name in _DATA_NAMES.items():
        if message.startswith(f"{batch_name}:"):
            return ValueError(f"{data_name}: {where}{message[len(batch_name) :]}")
    return error


def check_choice(value: str, choices: dict | list | tuple, name: str) -> str:
    """Check that a string option is one of ``choices``, listing them on error."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in sorted(choices))
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {valid}")
    return value
