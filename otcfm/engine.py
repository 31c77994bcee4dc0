"""The one training engine behind ``otcfm.train``, ``reflow.train_on_pairs``, ``reflow.distill`` and the CLI.

:func:`fit` runs Adam on ``step_loss(net, step, generator)`` with everything a long run needs: a progress bar,
optional EMA of the weights, gradient clipping, bf16 autocast of the model's forward pass, DDP under
``torchrun``, atomic checkpoints every ``checkpoint_every`` steps and on Ctrl-C, and ``resume=True`` to continue
to the same parameters an uninterrupted run reaches (bit for bit on the same number of ranks).

Randomness: one CPU ``torch.Generator`` seeded with ``schedule.seed`` feeds ``step_loss`` on rank 0 (a
one-process run is the one-rank case) and is saved in every checkpoint; rank ``r > 0`` draws step ``s`` from a
generator seeded with ``stream_seed(seed, r, s)``, so resuming on any number of ranks needs no per-rank state.
torch's global generator, which a model's own randomness (Dropout) draws from, is seeded at every step from
``stream_seed(seed, "global", r, s)`` (nothing to save, on any number of ranks), and given back to the caller as
it was when :func:`fit` returns.

Checkpoint files (``out/checkpoint.pt``) hold the model's weights and :func:`otcfm.models.model_spec`, the EMA
weights, the optimiser and generator states, every step's loss, ``run`` (the settings a resume must match) and
whatever the caller adds (``record``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from otcfm import checkpoint as ckpt
from otcfm import distributed
from otcfm._args import check_count, check_flag, check_rate, check_seed
from otcfm._checks import first_nonfinite
from otcfm.models import model_spec
from otcfm.rundir import CHECKPOINT_NAME, RunDirectory
from otcfm.runlock import run_lock

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "Fitted",
    "LRSchedule",
    "LR_SCHEDULES",
    "PRECISIONS",
    "Schedule",
    "StepLoss",
    "fit",
    "learning_rate",
    "resolve_device",
    "schedule_from",
]

FORMAT_VERSION = 2

#: ``step_loss(net, step, generator) -> scalar loss``: ``net`` is the model (or its DDP / autocast wrapper).
StepLoss = Callable[[nn.Module, int, torch.Generator], Tensor]
Precision = Literal["fp32", "bf16"]
LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class Schedule:
    """How the engine optimises.

    Attributes:
        steps: total optimisation steps (a resumed run continues up to this count).
        lr: Adam learning rate, finite and > 0 (the peak rate under ``lr_schedule="cosine"``).
        lr_schedule: ``"constant"``, or ``"cosine"``: the rate of step ``k`` (from 0) is
            ``lr * (1 + cos(pi k / steps)) / 2``, decaying to 0 over the run (:func:`learning_rate`).
        seed: seed of the run's generator.
        ema_decay: decay of an exponential moving average of the weights, in ``[0, 1)`` (0: none).
        grad_clip: clip the gradient norm to this value (None: no clipping).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the model's forward pass; the coupling, the loss and
            the weights stay in float32).
        checkpoint_every: steps between checkpoints (when there is an output directory).
        warmup_steps: a linear warm-up: step ``k < warmup_steps`` (from 0) runs at
            ``lr * (k + 1) / warmup_steps``, then ``lr_schedule`` runs over the remaining steps (0: none).
    """

    steps: int
    lr: float = 1e-3
    seed: int = 0
    ema_decay: float = 0.0
    grad_clip: float | None = None
    precision: Precision = "fp32"
    checkpoint_every: int = 500
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_schedule(self)


def schedule_from(settings: object, **given: Any) -> Schedule:
    """A :class:`Schedule` whose fields are ``given`` or else the attributes of the same names of ``settings``
    (a :class:`otcfm.TrainConfig`, a :class:`otcfm.reflow.RunOptions`)."""
    fields = dataclasses.fields(Schedule)
    return Schedule(**{f.name: given[f.name] if f.name in given else getattr(settings, f.name) for f in fields})


def learning_rate(lr: float, lr_schedule: LRSchedule, step: int, steps: int, warmup_steps: int = 0) -> float:
    r"""The learning rate of step ``step`` (counted from 0) of a run of ``steps`` steps.

    A warm-up of :math:`W` = ``warmup_steps`` steps rises linearly: :math:`\mathrm{lr} \cdot (k + 1) / W` for
    :math:`k < W`. After it, ``"constant"``: ``lr``; ``"cosine"``: :math:`\mathrm{lr} \cdot (1 + \cos(\pi (k - W)
    / (K - W))) / 2` for step :math:`k` of :math:`K`, from ``lr`` down to nearly 0 at the last step. A function of
    the step alone, so a resumed run follows the same rates as an uninterrupted one.
    """
    _check_lr_schedule(lr_schedule)
    if not isinstance(steps, int) or steps < 1 or not 0 <= step < steps:
        raise ValueError(f"step, steps: expected 0 <= step < steps with steps >= 1, got step={step!r}, steps={steps!r}")
    _check_warmup(warmup_steps, steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))


def _check_warmup(warmup_steps: Any, steps: int) -> int:
    warmup_steps = check_count(warmup_steps, "warmup_steps", minimum=0)
    if warmup_steps and warmup_steps >= steps:
        raise ValueError(
            f"warmup_steps: expected fewer than steps={steps} (a warm-up that never ends), got {warmup_steps}"
        )
    return warmup_steps


def check_schedule(s: Any) -> None:
    """Validate the optimisation fields shared by :class:`Schedule` and ``TrainConfig``, and store numpy scalars
    among them as Python numbers (a checkpoint records plain values)."""
    plain = {
        "steps": check_count(s.steps, "steps"),
        "checkpoint_every": check_count(s.checkpoint_every, "checkpoint_every"),
        "seed": check_seed(s.seed),
        "lr": check_rate(s.lr, "lr"),
        "ema_decay": _check_decay(s.ema_decay),
        "grad_clip": None if s.grad_clip is None else check_rate(s.grad_clip, "grad_clip"),
    }
    plain["warmup_steps"] = _check_warmup(s.warmup_steps, plain["steps"])
    _check_lr_schedule(s.lr_schedule)
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision: unknown value {s.precision!r}; expected one of 'bf16', 'fp32'")
    for name, value in plain.items():
        object.__setattr__(s, name, value)


def _check_decay(value: Any) -> float:
    """An EMA decay: a real number in ``[0, 1)`` (numpy scalars count)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and 0.0 <= value < 1.0:
        return float(value)
    raise ValueError(f"ema_decay: expected a number in [0, 1), got {value!r}")


def _check_lr_schedule(value: Any) -> None:
    if value not in LR_SCHEDULES:
        expected = ", ".join(repr(name) for name in LR_SCHEDULES)
        raise ValueError(f"lr_schedule: unknown value {value!r}; expected one of {expected}")


@dataclass
class Fitted:
    """Outcome of :func:`fit`.

    Attributes:
        model: the trained model (raw weights, eval mode).
        ema: the moving-average copy, or None when ``ema_decay == 0``.
        losses: the loss of every step (the mean over ranks under torchrun), earlier runs included.
        start_step: the steps already done when this call began (0 unless resumed).
    """

    model: nn.Module
    ema: nn.Module | None
    losses: list[float]
    start_step: int


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` or ``"auto"``: ``cuda:LOCAL_RANK`` under torchrun with CUDA, else ``cuda`` if available, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return distributed.default_device() if distributed.world()[1] > 1 else torch.device("cuda")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from error
    if resolved.type == "meta":
        raise ValueError(f"device: {device!r} holds shapes without values; expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            built = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device: {device!r} asked for, but {built}; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device: {device!r} asked for, but only {count} CUDA device(s) are visible")
    return resolved


class _Autocast(nn.Module):
    """Runs ``net`` under bf16 autocast and returns float32, so the loss is computed in float32."""

    def __init__(self, net: nn.Module, device_type: str) -> None:
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, *args: Any) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(*args).float()


def fit(
    model: nn.Module,
    step_loss: StepLoss,
    schedule: Schedule,
    *,
    run: dict[str, Any],
    out: str | Path | RunDirectory | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    desc: str = "train",
    record: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    locked: bool = False,
) -> Fitted:
    """Train ``model`` in place on ``step_loss``; see the module docstring.

    Args:
        model: the network; moved to ``device``.
        step_loss: ``(net, step, generator) -> loss`` for step ``step`` (0-based).
        schedule: steps, learning rate, seed, EMA, clipping, precision, checkpoint period.
        run: JSON-like settings that identify the run; a resume must find the same (``steps`` excepted). The
            engine itself also refuses another ``lr_schedule``, and another ``steps`` under ``"cosine"``.
        out: directory of ``checkpoint.pt``; no checkpoints when None. A :class:`otcfm.rundir.RunDirectory` whose
            checkpoint the caller read already is resumed from that read.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        overwrite: replace a run already in ``out`` (otherwise an existing run there is an error).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/None (see :func:`resolve_device`).
        progress: show a progress bar.
        callback: ``callback(step, loss)`` after every step (``step`` counts finished steps).
        desc: the progress bar's label.
        record: extra entries written into every checkpoint, or a function returning them (called at each write).
        locked: the caller holds ``out``'s run lock already (:func:`otcfm.runlock.run_lock`, taken before work
            that precedes training, such as a semidiscrete fit), so ``fit`` does not take it again.

    Returns:
        a :class:`Fitted`.

    Raises:
        ValueError: ``resume`` without ``out``, an existing run without ``resume``/``overwrite``, a checkpoint of
            another run or with more steps than ``schedule.steps``; a model without parameters; a non-finite loss,
            or NaN/Inf weights at a checkpoint (raised before it is written, so the last good one stays).
        TypeError: a model that is not an ``nn.Module``, a callback that is not callable.
        KeyboardInterrupt: re-raised after the last finished step was saved.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
    check_run(model, resume, overwrite, callback, progress)
    path = check_out(out, resume, overwrite)
    rank = distributed.world()[0]
    with contextlib.ExitStack() as stack:
        if path is not None and rank == 0:
            if not check_flag(locked, "locked"):
                stack.enter_context(run_lock(path.parent))  # one writer per run directory
            ckpt.remove_stale_temporaries(path.parent, CHECKPOINT_NAME)  # left by a killed writer
            if overwrite and not resume and path.is_file():
                path.unlink()
        device = resolve_device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's state is kept
            directory = RunDirectory.of(out)
            output = _Output(path, directory, run, record, resume, progress, desc, callback)
            return _run(model, step_loss, schedule, device, output)


@dataclass(frozen=True)
class _Output:
    """What a run writes and how it reports: its checkpoint file (None: none) and directory (which a resume reads
    once), the settings that identify it, the extra entries of each checkpoint, whether it continues the file, and its
    progress bar and callback."""

    path: Path | None
    directory: RunDirectory | None
    run: dict[str, Any]
    record: dict[str, Any] | Callable[[], dict[str, Any]] | None
    resume: bool
    progress: bool
    desc: str
    callback: Callable[[int, float], None] | None


class _Training:
    """The state of one run: model, EMA, optimiser, generator and the losses of the finished steps."""

    def __init__(self, model: nn.Module, schedule: Schedule, device: torch.device, output: _Output) -> None:
        self.model, self.schedule, self.device, self.output = model.to(device), schedule, device, output
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if schedule.ema_decay > 0 else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=schedule.lr)
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self.losses: list[float] = []
        self.pending: list[Tensor] = []  # losses not yet read back (one host sync per flush, not per step)
        self.saved: int | None = None  # the step of the newest checkpoint on disk, if any
        self.bar: Any = None  # the progress bar, while the run goes

    def restore(self) -> None:
        """Continue the checkpoint in ``output.directory`` (checked to be this run's), read there once."""
        path, directory = self.output.path, self.output.directory
        state = directory.saved() if directory is not None else None
        if state is None:
            raise ValueError(f"resume: no checkpoint at {path}")
        directory.release()  # its tensors stay alive only as long as the model and optimiser need them
        if state.get("optimizer") is None or state.get("generator") is None:
            raise ValueError(f"resume: {path} holds weights without training state")
        _check_same_run(state, self.output.run, path)
        _check_same_schedule(state, self.schedule, path)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:  # torch's own message lists every mismatched tensor
            reason = " ".join(str(error).split())
            raise ValueError(
                f"resume: the weights in {path} do not fit the model (built with other arguments?): {reason[:500]}"
            ) from error
        for key in ("model", "ema"):
            bad = first_nonfinite(state.get(key) or {})
            if bad is not None:
                raise ValueError(f"resume: {path} holds NaN/Inf weights ({key} entry {bad!r}); it cannot be continued")
        self.generator.set_state(state["generator"])
        self.losses = list(state["losses"])
        if len(self.losses) > self.schedule.steps:
            raise ValueError(
                f"steps: the checkpoint already holds {len(self.losses)} steps, more than steps={self.schedule.steps}"
            )
        self.saved = len(self.losses) or None

    def flush(self) -> None:
        """Read the pending losses back (one host sync) and stop at the first non-finite one."""
        if self.pending:
            values = torch.stack(self.pending).tolist()
            self.pending.clear()
            bad = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(
                    f"loss: {values[bad]} at step {len(self.losses) + bad + 1}: the model's output or the data holds "
                    "NaN/Inf, or the learning rate is too high; the last checkpoint holds the steps before"
                )
            self.losses.extend(values)

    def save(self, generator_state: Tensor) -> None:
        """Write the finished steps (rank 0), after checking the weights on every rank."""
        self.flush()
        path, steps = self.output.path, len(self.losses)
        _check_weights(self.model, self.ema, steps, path, self.saved)  # every rank: DDP keeps the weights alike
        if path is None:
            return
        if distributed.world()[0] == 0:
            record = self.output.record() if callable(self.output.record) else self.output.record
            ckpt.atomic_save(
                {
                    "format": FORMAT_VERSION,
                    **(record or {}),
                    "run": self.output.run,
                    "model_spec": model_spec(self.model),
                    "model": self.model.state_dict(),
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                    "step": steps,
                    "lr_schedule": self.schedule.lr_schedule,
                    "warmup_steps": self.schedule.warmup_steps,
                    "planned_steps": self.schedule.steps,
                    "optimizer": self.optimizer.state_dict(),
                    "generator": generator_state,
                    "losses": self.losses,
                    "world_size": distributed.world()[1],
                },
                path,
            )
        self.saved = steps  # by rank 0, for every rank

    def step(self, net: nn.Module, step_loss: StepLoss, done: int) -> None:
        """Optimisation step ``done`` (0-based); its loss joins ``pending``. An interrupt saves the finished steps
        when it comes before the update began."""
        schedule, rank = self.schedule, distributed.world()[0]
        start_state = self.generator.get_state()
        updating = False
        try:
            if rank > 0:
                self.generator.manual_seed(distributed.stream_seed(schedule.seed, rank, done))
            # torch's global generator (a model's Dropout): a stream of this step and rank, as above
            _seed_global_rng(distributed.stream_seed(schedule.seed, "global", rank, done), self.device)
            loss = step_loss(net, done, self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            updating = True  # from here until the step is recorded, the state is mid-update
            if schedule.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), schedule.grad_clip)
            if schedule.lr_schedule != "constant" or schedule.warmup_steps:
                rate = learning_rate(schedule.lr, schedule.lr_schedule, done, schedule.steps, schedule.warmup_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = rate
            self.optimizer.step()
            if self.ema is not None:
                _ema_update(self.ema, self.model, schedule.ema_decay)
            self.pending.append(distributed.mean_over_ranks(loss.detach()).float())
        except KeyboardInterrupt:
            if not updating:  # the unfinished step left no trace: save the finished ones
                self.save(start_state)
            raise

    def after_step(self, done: int) -> None:
        """Checkpoint, progress and callback after ``done`` finished steps."""
        if done % self.schedule.checkpoint_every == 0 or done == self.schedule.steps:
            self.save(self.generator.get_state())
        callback = self.output.callback
        if callback is not None or done % 50 == 0:
            self.flush()
            self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", refresh=False)
        if callback is not None:
            try:
                callback(done, self.losses[-1])
            except KeyboardInterrupt:
                self.save(self.generator.get_state())
                raise


def _run(model: nn.Module, step_loss: StepLoss, schedule: Schedule, device: torch.device, output: _Output) -> Fitted:
    from tqdm.auto import tqdm

    training = _Training(model, schedule, device, output)
    if output.resume and output.path is not None and output.path.is_file():
        training.restore()
    start_step = len(training.losses)
    net = distributed.wrap(training.model, device)  # DDP averages the gradients over ranks
    if schedule.precision == "bf16":
        net = _Autocast(net, device.type)
    disable = not output.progress or distributed.world()[0] > 0
    training.bar = tqdm(total=schedule.steps, initial=start_step, disable=disable, desc=output.desc, unit="step")
    training.model.train()
    finished = start_step >= schedule.steps  # every step's collectives done: a failure from here on is shared
    try:
        while len(training.losses) + len(training.pending) < schedule.steps:
            done = len(training.losses) + len(training.pending)
            training.step(net, step_loss, done)
            finished = done + 1 == schedule.steps
            training.bar.update(1)
            training.after_step(done + 1)
        training.flush()
    except Exception as error:
        if finished:  # the other ranks wait in end_together below: tell them, instead of leaving them there
            distributed.end_together(error, device)
        raise
    finally:
        training.bar.close()
    training.model.eval()
    # rank 0's last checkpoint is on disk before any rank returns (and, say, resumes it), or every rank raises
    distributed.end_together(None, device)
    return Fitted(training.model, training.ema, training.losses, start_step)


def _check_weights(model: nn.Module, ema: nn.Module | None, steps: int, path: Path | None, saved: int | None) -> None:
    """Raise before a checkpoint (or the end of a run) when the weights hold NaN/Inf.

    A step can finish with a finite loss and still leave NaN weights (a gradient that overflowed to Inf makes
    Adam's update Inf / Inf); writing them would replace the last good checkpoint with one that cannot be used.
    """
    for name, module in (("model", model), ("ema", ema)):
        bad = None if module is None else first_nonfinite(module.state_dict())
        if bad is not None:
            kept = "no checkpoint was written" if path is None or saved is None else f"{path} keeps step {saved}"
            raise ValueError(
                f"{name}: the weights hold NaN/Inf after step {steps} ({bad!r}) although its loss was finite: the "
                f"run diverged (a gradient overflowed to Inf, or the learning rate is far too high); {kept}. "
                "Lower lr or set grad_clip"
            )


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed torch's global generator of the CPU (and of ``device`` when it is a GPU) for a step: a model's own
    randomness (Dropout) then follows the run's seed and step, not whatever the caller drew before."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for target, source in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if target.is_floating_point():
                target.mul_(decay).add_(source, alpha=1 - decay)
            else:
                target.copy_(source)


def _check_same_schedule(state: dict[str, Any], schedule: Schedule, path: Path) -> None:
    """A resume keeps the learning-rate schedule; under ``"cosine"`` also the run's length, which shapes the rates."""
    saved = state.get("lr_schedule")
    differing = None
    if saved != schedule.lr_schedule:
        differing = f"lr_schedule: checkpoint {saved!r} vs now {schedule.lr_schedule!r}"
    elif saved == "cosine" and state.get("planned_steps") != schedule.steps:
        differing = (
            f"steps: checkpoint {state.get('planned_steps')!r} vs now {schedule.steps!r} under lr_schedule 'cosine'"
        )
    elif state.get("warmup_steps") != schedule.warmup_steps:
        differing = f"warmup_steps: checkpoint {state.get('warmup_steps')!r} vs now {schedule.warmup_steps!r}"
    if differing is not None:
        raise ValueError(f"resume: the checkpoint {path} was made with another config ({differing})")


def check_out(out: str | Path | RunDirectory | None, resume: bool, overwrite: bool) -> Path | None:
    """``out/checkpoint.pt``, None without ``out``; refuses an ``out`` that is a file, or that holds a run when
    neither ``resume`` nor ``overwrite`` is set (checked before any work, and again by :func:`fit`)."""
    directory = RunDirectory.of(out)  # refuses an out that is no path, or ''
    path = directory.checkpoint_path if directory is not None else None
    if resume and path is None:
        raise ValueError("resume: needs out, the directory holding checkpoint.pt")
    if path is not None and path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file; expected a directory for the run")
    if path is not None and path.is_file() and not resume and not overwrite:
        raise ValueError(
            f"out: {path.parent} already holds a run ({CHECKPOINT_NAME}); resume it (resume=True, --resume) or "
            "replace it (overwrite=True, --overwrite)"
        )
    return path


def check_run_flags(resume: bool, overwrite: bool, progress: bool) -> None:
    """``resume``, ``overwrite`` and ``progress`` are flags (``True`` / ``False`` only: ``overwrite="False"`` must
    not replace a run), and at most one of ``resume`` and ``overwrite`` is set (continue a run, or replace it)."""
    resume, overwrite = check_flag(resume, "resume"), check_flag(overwrite, "overwrite")
    check_flag(progress, "progress")
    if resume and overwrite:
        raise ValueError("resume and overwrite: choose one (continue the run in out, or replace it)")


def check_run(
    model: nn.Module,
    resume: bool,
    overwrite: bool,
    callback: Callable[[int, float], None] | None,
    progress: bool = True,
) -> None:
    """The arguments of a training run that :func:`fit` and its callers check before any long work: the flags
    (:func:`check_run_flags`), ``model`` an ``nn.Module`` with parameters, ``callback`` None or callable."""
    check_run_flags(resume, overwrite, progress)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module called as model(x, t), got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("model: it has no parameters to train")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model: none of its parameters requires grad (an EMA copy, or a model after requires_grad_(False)); "
            "train a copy with model.requires_grad_(True)"
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a function callback(step, loss) or None, got {type(callback).__name__}")


def _check_same_run(state: dict[str, Any], run: dict[str, Any], path: Path) -> None:
    saved = state.get("run")
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {path} records no settings to compare with")
    missing = object()
    differing = []
    for key, value in run.items():
        if key == "steps":
            continue
        before = saved.get(key, missing)
        if before is missing:
            differing.append(f"{key}: not in the checkpoint, now {value!r}")
        elif before != value:
            differing.append(f"{key}: checkpoint {before!r} vs now {value!r}")
    if differing:
        raise ValueError(f"resume: the checkpoint was made with another config ({', '.join(differing)})")
