"""The training loop used by the CLI and the benchmarks: ``otcfm.train(...)``.

One ``torch.Generator`` seeded from ``config.seed`` drives every draw (data,
coupling, times, noise) and the model's initialisation, so a run is a
function of its config. Checkpoints are written atomically every
``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues from the
last one to the same parameters an uninterrupted run reaches.

Under ``torchrun`` (an initialised ``torch.distributed`` group) the same call
trains with DDP: every rank draws ``batch_size`` pairs, gradients are averaged
over ranks, and rank 0 writes the checkpoints. Rank 0 draws from the run's
generator (a one-process run is the one-rank case); rank ``r > 0`` draws step
``s`` from a generator seeded with ``stream_seed(seed, r, s)``, so resuming on
any number of ranks needs no per-rank state, and resuming on the same number
continues bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otcfm import checkpoint as ckpt
from otcfm import distributed
from otcfm.data import sample
from otcfm.flow import FlowMatcher
from otcfm.models import MLP

__all__ = ["TrainConfig", "TrainResult", "build_model", "load_model", "train", "write_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        source: dataset name of ``x0`` (see ``otcfm.data.DATASETS``).
        target: dataset name of ``x1``.
        coupler: coupler name.
        path: path name.
        sigma: the path's noise parameter (None: the path's default).
        time_sampler: ``"uniform"`` or ``"logit_normal"``.
        steps: optimisation steps.
        batch_size: samples per batch on each side (per rank under torchrun).
        lr: Adam learning rate.
        hidden: MLP width.
        depth: MLP hidden layers.
        ema_decay: decay of an exponential moving average of the weights (0 disables it).
        seed: seed of the run's generator.
        checkpoint_every: steps between checkpoints (when an output directory is given).
        global_coupling: under torchrun, couple the batches of all ranks as one OT problem
            (:func:`otcfm.distributed.global_pairs`) instead of each rank its own; no effect in one process.
    """

    source: str = "8gaussians"
    target: str = "moons"
    coupler: str = "exact"
    path: str = "linear"
    sigma: float | None = None
    time_sampler: str = "uniform"
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 256
    depth: int = 3
    ema_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    global_coupling: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "depth", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay}")

    def flow_matcher(self) -> FlowMatcher:
        """The :class:`FlowMatcher` this config describes."""
        return FlowMatcher(coupler=self.coupler, path=self.path, sigma=self.sigma, time_sampler=self.time_sampler)

    def data_dim(self) -> int:
        """Number of features of one sample of ``target``."""
        return sample(self.target, 1).shape[1]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model (raw weights).
        ema: the moving-average copy, or None when ``ema_decay == 0``.
        losses: the loss of every step (the mean over ranks under torchrun), resumed runs included.
        config: the run's config.
    """

    model: nn.Module
    ema: nn.Module | None
    losses: list[float]
    config: TrainConfig

    @property
    def sampling_model(self) -> nn.Module:
        """The model to sample from: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.model


def build_model(config: TrainConfig) -> MLP:
    """The MLP of ``config``, initialised from ``config.seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MLP(config.data_dim(), hidden=config.hidden, depth=config.depth)


def train(
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a velocity model with flow matching (with DDP when launched by torchrun; see the module docstring).

    Args:
        config: the run's settings; defaults when None. Keyword ``overrides``
            replace fields (``train(steps=500, coupler="independent")``).
        out: directory for ``checkpoint.pt``; no checkpoints when None.
        resume: continue from ``out/checkpoint.pt`` if it exists (its config
            must match, except ``steps``, which may be raised).
        model: a velocity model ``model(x, t)``; the config's MLP when None.
        device: where to train; by default the CPU, or ``cuda:LOCAL_RANK`` under torchrun with CUDA.
            Data is drawn on the CPU.
        progress: show a progress bar.
        callback: called as ``callback(step, loss)`` after every step.

    Returns:
        a :class:`TrainResult`.

    Raises:
        ValueError: invalid settings, or a checkpoint made with another config.
        KeyboardInterrupt: re-raised after the last finished step was saved.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    if resume and out is None:
        raise ValueError("resume: needs out, the directory holding checkpoint.pt")
    rank, world_size = distributed.world()
    device = torch.device(device) if device is not None else distributed.default_device()
    fm = config.flow_matcher()
    global_coupling = config.global_coupling and world_size > 1
    paired = FlowMatcher(coupler="paired", path=fm.path, time_sampler=fm.time_sampler) if global_coupling else fm
    model = (model if model is not None else build_model(config)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema_decay > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    path = Path(out) / CHECKPOINT_NAME if out is not None else None

    if resume and path is not None and path.is_file():
        state = ckpt.load(path)
        if state.get("optimizer") is None or state.get("generator") is None:
            raise ValueError(f"resume: {path} holds weights without training state (e.g. from otcfm reflow/distill)")
        _check_same_run(state["config"], config)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        losses = list(state["losses"])
        if len(losses) > config.steps:
            raise ValueError(f"steps: the checkpoint already holds {len(losses)} steps, more than steps={config.steps}")
    net = distributed.wrap(model, device)  # DDP averages the gradients over ranks

    def save(generator_state: torch.Tensor) -> None:
        if path is not None and rank == 0:
            write_checkpoint(
                path,
                config,
                model,
                ema=ema,
                step=len(losses),
                optimizer=optimizer.state_dict(),
                generator=generator_state,
                losses=losses,
                world_size=world_size,
            )

    def step_loss(step: int) -> torch.Tensor:
        if rank > 0:
            generator.manual_seed(distributed.stream_seed(config.seed, rank, step))
        x0 = sample(config.source, config.batch_size, generator, device)
        x1 = sample(config.target, config.batch_size, generator, device)
        if not global_coupling:
            return fm.loss(net, x0, x1, generator)
        shared = torch.Generator().manual_seed(distributed.stream_seed(config.seed, "coupling", step))
        x0, x1, _, _ = distributed.global_pairs(fm.coupler, x0, x1, generator=shared)
        return paired.loss(net, x0, x1, generator)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=len(losses), disable=not progress or rank > 0, desc="train", unit="step")
    model.train()
    try:
        while len(losses) < config.steps:
            start_state = generator.get_state()
            updating = False
            try:
                loss = step_loss(len(losses))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                updating = True  # from here until the step is recorded, the state is mid-update
                optimizer.step()
                if ema is not None:
                    _ema_update(ema, model, config.ema_decay)
                losses.append(distributed.mean_over_ranks(loss.detach()).item())
                updating = False
            except KeyboardInterrupt:
                if not updating:  # the unfinished step left no trace: save the finished ones
                    save(start_state)
                raise
            step = len(losses)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save(generator.get_state())
            if callback is not None:
                try:
                    callback(step, losses[-1])
                except KeyboardInterrupt:
                    save(generator.get_state())
                    raise
    finally:
        bar.close()
    model.eval()
    return TrainResult(model, ema, losses, config)


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for target, source in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if target.is_floating_point():
                target.mul_(decay).add_(source, alpha=1 - decay)
            else:
                target.copy_(source)


def _check_same_run(saved: dict[str, Any], config: TrainConfig) -> None:
    current, defaults = dataclasses.asdict(config), dataclasses.asdict(TrainConfig())
    # a field added after the checkpoint was written had its default then
    differing = [k for k in current if k != "steps" and saved.get(k, defaults[k]) != current[k]]
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in differing)
        raise ValueError(f"resume: the checkpoint was made with another config ({details})")


def write_checkpoint(
    path: str | Path, config: TrainConfig, model: nn.Module, ema: nn.Module | None = None, **state: Any
) -> Path:
    """Write the checkpoint format :func:`load_model` reads, atomically.

    ``state`` adds entries: the training loop stores ``step``, ``optimizer``, ``generator`` and ``losses``
    (what ``resume`` needs); Reflow stores how its student was made.
    """
    return ckpt.atomic_save(
        {
            "format": FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            **state,
        },
        path,
    )


def load_model(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the MLP of a checkpoint written by :func:`train`.

    Args:
        path: ``checkpoint.pt`` or the directory holding it.
        use_ema: load the EMA weights when the run kept them.

    Returns:
        ``(model in eval mode on the CPU, config)``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = ckpt.load(path)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {path} is not an otcfm training checkpoint (format {state.get('format')!r})")
    config = TrainConfig(**state["config"])
    model = build_model(config)
    weights = state["ema"] if use_ema and state["ema"] is not None else state["model"]
    model.load_state_dict(weights)
    return model.eval(), config
