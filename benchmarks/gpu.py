"""GPU check: training throughput of otcfm's ways of coupling, host synchronisation, memory and a short run.

    python benchmarks/gpu.py                        # CUDA: the "cifar10" UNet, batch 128 (at most ~8 minutes)
    python benchmarks/gpu.py --device cpu --quick   # a tiny UNet on the CPU in well under a minute; for tests

Runs unattended and offline and writes ONE JSON (``--json``, default runs/gpu/gpu.json), rewritten after every
section, so a run cut short keeps what finished; it prints a progress line as each part starts and ends.

Sections, in the order they run:

- ``sync_debug``: one training step (batch drawn and moved, ``FlowMatcher.loss``, backward, Adam step) with the
  ``"independent"`` and the ``"sinkhorn"`` coupler under ``torch.cuda.set_sync_debug_mode("error")``, after two
  warm-up steps outside it. Each phase of the step runs under the debug mode on its own, so a synchronisation is
  told apart as otcfm's (``data``, ``loss``) or torch's (``backward``, ``optimizer``); a phase that raises is
  recorded with its message and innermost frames, and run again outside the mode. CPU: ``"skipped (cpu)"``.
- ``throughput``: training steps per second, per way of getting coupled batches: the median over ``repeats``
  timed windows of ``steps`` steps each, after ``warmup`` steps (on CUDA ``torch.cuda.synchronize()`` before and
  after each window, nothing read on the host inside it), and the peak of ``torch.cuda.max_memory_allocated()``
  (reset before each way; null on the CPU). Every way trains a fresh copy of the same UNet (bf16 autocast of
  its forward pass on CUDA) with ``torch.optim.Adam(lr, capturable=False, foreach=True)``; a step is: draw the
  batch, move it with ``non_blocking=True``, ``FlowMatcher.loss``, backward, Adam step. The ways:

  - ``independent``: ``FlowMatcher(coupler="independent")`` on batches drawn in the loop;
  - ``exact (background loader)``: ``otcfm.loader.coupled_loader(..., "exact", num_workers=1)`` feeding
    ``FlowMatcher(coupler="paired")``;
  - ``sinkhorn``: ``FlowMatcher(coupler="sinkhorn")`` in the loop, on batches moved to the device;
  - ``semidiscrete (N = ...)``: ``get_coupler("semidiscrete")`` fitted on the whole dataset on the device,
    then ``fm.loss(model, x0, dataset)`` per step (each source sample paired with a point of the dataset);
    its fit's seconds and report are recorded too;
  - ``exact pools (...)``: ``otcfm.loader.PoolStream(..., "exact", pool_size)`` in the training process feeding
    ``FlowMatcher(coupler="paired")``; windows of whole pools when ``steps`` and ``warmup`` are multiples of
    ``pool_size / batch_size``.
- ``training``: ``otcfm.train(target=<the dataset>, model="unet", coupler="exact", ...)`` for ``train_steps``
  steps; the mean loss of the first and of the last ``window`` steps, and whether it fell.

Data: no dataset is read (the device machine has none, and no internet). The target is a fixed synthetic
tensor of CIFAR-shaped images ``(N, 3, 32, 32)`` in ``[-1, 1]``: smooth random colour fields (bicubic
upsamplings of uniform random 4x4 and 8x8 fields, mixed 0.7 / 0.3, clamped), drawn on the CPU from ``--seed``;
its sampler draws rows of it with the caller's generator (on the CPU, as the loader's worker needs). The source
is N(0, I), drawn on the CPU. Batches drawn in the training process are moved to the device with
``non_blocking=True``.

A section that fails is recorded in ``errors`` (with the end of its traceback) and the run goes on; the exit
status is then 1. ``--budget-s`` stops starting new parts once that many seconds have passed, and shortens the
training run to what the measured step rate leaves room for (both recorded).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, rerun_command  # noqa: E402

import otcfm  # noqa: E402
from otcfm.loader import PoolStream, coupled_loader  # noqa: E402

SHAPE = (3, 32, 32)
DATA_DESCRIPTION = (
    "synthetic CIFAR-shaped images (N, 3, 32, 32) in [-1, 1]: 0.7 x bicubic upsampling of uniform random 3x4x4 "
    "fields + 0.3 x of 3x8x8 fields, clamped to [-1, 1], drawn on the CPU from the seed; the target sampler draws "
    "rows of this fixed CPU tensor with the caller's generator; source N(0, I) drawn on the CPU"
)
#: The UNet of ``--quick``: two levels of 8 and 16 channels, no attention.
TINY_UNET: dict[str, Any] = {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": []}
Batches = Callable[[], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Settings:
    """What one run measures; :func:`settings` fills it from the command line.

    Attributes:
        device: where the model trains.
        quick: the tiny CPU-sized run.
        batch_size: pairs per training step.
        dataset_size: images in the synthetic target dataset (the semidiscrete coupler's ``N``).
        model_options: options of :func:`otcfm.models.unet` (``{"preset": "cifar10"}`` or :data:`TINY_UNET`).
        bf16: bf16 autocast of the model's forward pass (CUDA).
        lr: Adam's learning rate in the throughput and sync parts.
        warmup, steps, repeats: throughput timing: untimed steps, steps per timed window, windows.
        pool_size: samples per side of an exact OT pool.
        fit_steps, fit_batch_size, fit_eval_samples: the semidiscrete fit.
        train_steps, train_warmup_steps, train_lr, train_coupler: the ``otcfm.train`` run.
        budget_s: no new part starts after this many seconds.
        seed: seed of the data, the model's initial weights and every generator.
    """

    device: str
    quick: bool
    batch_size: int
    dataset_size: int
    model_options: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    lr: float = 2e-4
    warmup: int = 8
    steps: int = 24
    repeats: int = 5
    pool_size: int = 1024
    fit_steps: int = 300
    fit_batch_size: int = 1024
    fit_eval_samples: int = 100_000
    train_steps: int = 300
    train_warmup_steps: int = 20
    train_lr: float = 2e-4
    train_coupler: str = "exact"
    budget_s: float = 400.0
    seed: int = 0


def settings(device: torch.device, quick: bool, batch_size: int | None, budget_s: float, seed: int) -> Settings:
    """The settings of a full (CUDA) or ``quick`` (CPU-sized) run; ``batch_size`` None: 128, or 8 when quick."""
    if quick:
        b = 8 if batch_size is None else batch_size
        return Settings(
            device=str(device),
            quick=True,
            batch_size=b,
            dataset_size=max(512, 4 * b),
            model_options=dict(TINY_UNET),
            bf16=device.type == "cuda",
            lr=1e-3,
            warmup=4,
            steps=4,
            repeats=2,
            pool_size=4 * b,
            fit_steps=30,
            fit_batch_size=256,
            fit_eval_samples=2048,
            train_steps=20,
            train_warmup_steps=2,
            train_lr=1e-3,
            budget_s=budget_s,
            seed=seed,
        )
    b = 128 if batch_size is None else batch_size
    return Settings(
        device=str(device),
        quick=False,
        batch_size=b,
        dataset_size=50_000,
        model_options={"preset": "cifar10"},
        bf16=device.type == "cuda",
        pool_size=8 * b,
        budget_s=budget_s,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------------ data


def synthetic_images(n: int, seed: int) -> Tensor:
    """``(n, 3, 32, 32)`` float32 smooth random colour fields in ``[-1, 1]`` (see :data:`DATA_DESCRIPTION`)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, *SHAPE)
    for start in range(0, n, 4096):  # in blocks: the upsampling's temporaries stay small
        m = min(4096, n - start)
        coarse = torch.rand(m, 3, 4, 4, generator=g) * 2 - 1
        fine = torch.rand(m, 3, 8, 8, generator=g) * 2 - 1
        field = 0.7 * F.interpolate(coarse, size=SHAPE[1:], mode="bicubic", align_corners=False)
        field += 0.3 * F.interpolate(fine, size=SHAPE[1:], mode="bicubic", align_corners=False)
        out[start : start + m] = field.clamp_(-1.0, 1.0)
    return out


class Rows:
    """Sampler ``f(n, generator) -> (n, ...)``: rows of a fixed CPU tensor, drawn uniformly with replacement.

    A class rather than a closure, so that a ``DataLoader`` worker can receive it by any start method.

    Args:
        data: ``(N, ...)`` the rows to draw from, on the CPU.
    """

    def __init__(self, data: Tensor) -> None:
        if data.device.type != "cpu":
            raise ValueError(f"data: expected a CPU tensor (the loader's workers draw from it), got {data.device}")
        self.data = data

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.data[torch.randint(self.data.shape[0], (n,), generator=generator)]


class Noise:
    """Sampler ``f(n, generator) -> (n, *shape)``: standard normal draws on the CPU.

    Args:
        shape: the sample shape.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((n, *self.shape), generator=generator)


# ------------------------------------------------------------------------------------------------------ model


class BF16Forward(nn.Module):
    """Runs ``net`` under bf16 autocast on ``device_type`` and returns float32, so the loss is taken in float32.

    Args:
        net: the model, called as ``net(x, t)``.
        device_type: ``"cuda"`` or ``"cpu"``.
    """

    def __init__(self, net: nn.Module, device_type: str) -> None:
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x: (B, 3, 32, 32)``, ``t: (B,)`` -> ``(B, 3, 32, 32)`` float32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(x, t).float()


class Trainer:
    """Fresh copies of one UNet (the same initial weights each time) with their Adam optimisers.

    Args:
        config: the run's settings (model options, device, bf16, learning rate).
    """

    def __init__(self, config: Settings) -> None:
        self.config = config
        self.device = torch.device(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.base = otcfm.models.unet(SHAPE, **config.model_options)
        self.parameters = sum(p.numel() for p in self.base.parameters())

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A new copy of the model on the device (bf16-autocast wrapped when set) and its Adam."""
        net = copy.deepcopy(self.base).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=self.config.lr, capturable=False, foreach=True)
        model = BF16Forward(net, self.device.type) if self.config.bf16 else net
        return model, opt


def train_step(
    fm: otcfm.FlowMatcher,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x0: Tensor,
    x1: Tensor,
    generator: torch.Generator,
) -> None:
    """One step: ``fm.loss`` on ``x0: (B, ...)`` and ``x1: (B or N, ...)``, backward, Adam; nothing read back."""
    loss = fm.loss(model, x0, x1, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; a CPU-to-CUDA copy does not make the host wait."""
    return x.to(device, non_blocking=x.device.type == "cpu" and device.type == "cuda")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    """Drop unreachable tensors, give cached CUDA blocks back and reset the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` in bytes since the last reset; None off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def steps_per_second(step: Callable[[], None], device: torch.device, warmup: int, steps: int, repeats: int) -> list:
    """Steps per second of ``repeats`` timed windows of ``steps`` calls of ``step()``, after ``warmup`` calls.

    Each window is bracketed by a device synchronisation, so it holds all the device work of its steps and none
    of another's; nothing inside it waits for the device unless ``step`` itself does.
    """
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        rates.append(steps / (time.perf_counter() - start))
    return rates


# ------------------------------------------------------------------------------------------------------ report


class Report:
    """The JSON of a run, written again (atomically) after every part.

    Args:
        path: the JSON file.
        record: its initial content.
    """

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record, self.started = path, record, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def say(self, message: str) -> None:
        """A progress line, flushed at once (a run that is cut off still shows where it was)."""
        print(f"[gpu.py {self.elapsed():6.1f} s] {message}", flush=True)

    def write(self) -> None:
        """Write the record, with the wall seconds so far."""
        self.record["wall_seconds"] = round(self.elapsed(), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        os.replace(partial, self.path)

    def error(self, part: str, error: BaseException) -> None:
        """Record that ``part`` failed with ``error``, and say so."""
        self.record["errors"][part] = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": _tail(error)}
        self.say(f"{part}: FAILED ({type(error).__name__}: {str(error)[:300]})")


def _tail(error: BaseException, frames: int = 6) -> list[str]:
    """The innermost ``frames`` frames of ``error``'s traceback as ``file:line in function``."""
    summary = traceback.extract_tb(error.__traceback__)[-frames:]
    return [f"{_short(frame.filename)}:{frame.lineno} in {frame.name}" for frame in summary]


def _short(filename: str) -> str:
    """A file name from ``otcfm/``, ``torch/`` or ``benchmarks/`` on, where it has one of those."""
    parts = Path(filename).parts
    for anchor in ("otcfm", "torch", "benchmarks"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1 :])
    return filename


# ------------------------------------------------------------------------------------------------------ sync


def sync_check(coupler: str, trainer: Trainer, noise: Noise, target: Rows) -> dict[str, Any]:
    """One training step with ``coupler`` under ``torch.cuda.set_sync_debug_mode("error")``, phase by phase.

    Two warm-up steps run outside the mode first (first-batch checks, lazy optimiser state, library handles).
    The phases ``data`` (draw on the CPU, move to the device), ``loss`` (``FlowMatcher.loss``), ``backward`` and
    ``optimizer`` (``Adam.step``) each run under the mode on their own; one that raises is recorded and run again
    outside it, so the later phases are still checked. The mode is set back to 0 in any case.

    Returns:
        ``{"status": "no synchronisation" | "raised", "raised": [phases], "phases": {phase: {"raised", ...}}}``.
    """
    device, b = trainer.device, trainer.config.batch_size
    model, opt = trainer.fresh()
    fm = otcfm.FlowMatcher(coupler=coupler)
    g = torch.Generator().manual_seed(trainer.config.seed)

    def draw() -> tuple[Tensor, Tensor]:
        return to_device(noise(b, g), device), to_device(target(b, g), device)

    for _ in range(2):
        train_step(fm, model, opt, *draw(), g)
    synchronize(device)
    phases: dict[str, dict[str, Any]] = {}

    def attempt(name: str, run: Callable[[], Any]) -> Any:
        try:
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        except Exception as error:  # a synchronisation is a finding: recorded, then the phase runs without the mode
            phases[name] = {"raised": True, "message": f"{type(error).__name__}: {error}"[:1000], "where": _tail(error)}
            return None
        phases[name] = {"raised": False}
        return result

    batch = attempt("data", draw) or draw()
    loss = attempt("loss", lambda: fm.loss(model, *batch, g))
    if loss is None:
        loss = fm.loss(model, *batch, g)
    opt.zero_grad(set_to_none=True)
    attempt("backward", loss.backward)
    if phases["backward"]["raised"]:
        opt.zero_grad(set_to_none=True)  # a backward pass cut short may have freed part of the graph: redo the step
        fm.loss(model, *batch, g).backward()
    attempt("optimizer", opt.step)
    synchronize(device)
    raised = [name for name, phase in phases.items() if phase["raised"]]
    return {"status": "raised" if raised else "no synchronisation", "raised": raised, "phases": phases}


# ------------------------------------------------------------------------------------------------------ throughput


def measure(trainer: Trainer, fm: otcfm.FlowMatcher, batches: Batches) -> dict[str, Any]:
    """Steps per second of training a fresh model with ``fm`` on ``batches()`` (already on the device)."""
    config, device = trainer.config, trainer.device
    model, opt = trainer.fresh()
    g = torch.Generator().manual_seed(config.seed)
    rates = steps_per_second(
        lambda: train_step(fm, model, opt, *batches(), g), device, config.warmup, config.steps, config.repeats
    )
    return {
        "steps_per_s": statistics.median(rates),
        "steps_per_s_windows": rates,
        "batch_size": config.batch_size,
        "peak_memory_bytes": peak_memory(device),
    }


def in_loop(noise: Noise, target: Rows, batch_size: int, device: torch.device) -> Batches:
    """Batches drawn in the training process from a generator of their own and moved to ``device``."""
    g = torch.Generator().manual_seed(1)
    return lambda: (to_device(noise(batch_size, g), device), to_device(target(batch_size, g), device))


def run_independent(trainer: Trainer, noise: Noise, target: Rows) -> dict[str, Any]:
    fm = otcfm.FlowMatcher(coupler="independent")
    return measure(trainer, fm, in_loop(noise, target, trainer.config.batch_size, trainer.device))


def run_sinkhorn(trainer: Trainer, noise: Noise, target: Rows) -> dict[str, Any]:
    fm = otcfm.FlowMatcher(coupler="sinkhorn")
    return {
        **measure(trainer, fm, in_loop(noise, target, trainer.config.batch_size, trainer.device)),
        "coupler": repr(fm.coupler),
    }


def run_loader(trainer: Trainer, noise: Noise, target: Rows) -> dict[str, Any]:
    config, device = trainer.config, trainer.device
    loader = coupled_loader(noise, target, "exact", batch_size=config.batch_size, seed=0, num_workers=1)
    stream: Iterator[tuple[Tensor, Tensor]] = iter(loader)
    try:
        result = measure(
            trainer,
            otcfm.FlowMatcher(coupler="paired"),
            lambda: tuple(to_device(x, device) for x in next(stream)),  # type: ignore[return-value]
        )
    finally:
        stream.close()  # type: ignore[attr-defined]  # ends the DataLoader iterator and its worker
        gc.collect()
    return {**result, "num_workers": 1}


def run_pools(trainer: Trainer, noise: Noise, target: Rows) -> dict[str, Any]:
    config, device = trainer.config, trainer.device
    pools = PoolStream(noise, target, "exact", pool_size=config.pool_size, batch_size=config.batch_size, seed=0)
    counter = iter(range(1 << 62))

    def batches() -> tuple[Tensor, Tensor]:
        x0, x1 = pools.batch(next(counter))
        return to_device(x0, device), to_device(x1, device)

    result = measure(trainer, otcfm.FlowMatcher(coupler="paired"), batches)
    per_pool = pools.batches_per_pool
    whole = config.steps % per_pool == 0 and config.warmup % per_pool == 0
    return {**result, "pool_size": config.pool_size, "batches_per_pool": per_pool, "windows_of_whole_pools": whole}


def run_semidiscrete(trainer: Trainer, noise: Noise, data: Tensor) -> dict[str, Any]:
    """Fit the semidiscrete potentials on the whole ``data`` on the device, then time training with them."""
    config, device = trainer.config, trainer.device
    dataset = data.to(device)
    coupler = otcfm.get_coupler("semidiscrete")
    g = torch.Generator().manual_seed(config.seed)
    synchronize(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = coupler.fit(
            noise,
            dataset,
            steps=config.fit_steps,
            batch_size=config.fit_batch_size,
            generator=g,
            eval_samples=config.fit_eval_samples,
            progress=False,
        )
    synchronize(device)
    fit = {
        "seconds": time.perf_counter() - start,
        "report": asdict(report),
        "steps": config.fit_steps,
        "batch_size": config.fit_batch_size,
        "eval_samples": config.fit_eval_samples,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "peak_memory_bytes": peak_memory(device),
    }
    free_device_memory(device)  # the training's peak, apart from the fit's (the dataset stays on the device)
    fm = otcfm.FlowMatcher(coupler=coupler)
    drawn = torch.Generator().manual_seed(1)
    result = measure(trainer, fm, lambda: (to_device(noise(config.batch_size, drawn), device), dataset))
    return {**result, "dataset_size": int(data.shape[0]), "dataset_on_device": True, "fit": fit}


# ------------------------------------------------------------------------------------------------------ training


def training_run(config: Settings, data: Tensor, steps: int) -> dict[str, Any]:
    """``otcfm.train`` of the UNet on ``data`` for ``steps`` steps; the first and last window's mean losses."""
    started = time.perf_counter()
    result = otcfm.train(
        target=data,
        model="unet",
        model_options=dict(config.model_options),
        coupler=config.train_coupler,
        steps=steps,
        batch_size=config.batch_size,
        lr=config.train_lr,
        warmup_steps=min(config.train_warmup_steps, steps),
        precision="bf16" if config.bf16 else "fp32",
        seed=config.seed,
        device=config.device,
        progress=False,
    )
    losses = [float(v) for v in result.losses]
    window = max(1, min(20, len(losses) // 4))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return {
        "steps": len(losses),
        "coupler": config.train_coupler,
        "lr": config.train_lr,
        "warmup_steps": min(config.train_warmup_steps, steps),
        "precision": "bf16" if config.bf16 else "fp32",
        "window": window,
        "first_mean_loss": first,
        "last_mean_loss": last,
        "fell": bool(last < first and math.isfinite(last)),
        "seconds": time.perf_counter() - started,
        "losses_every_10": losses[::10],
    }


# ------------------------------------------------------------------------------------------------------ main


def resolve_device(name: str | None) -> torch.device:
    """``--device``: ``cuda`` (refused without CUDA), ``cpu``, or None: CUDA when available, else refused."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        asked = "--device cuda was given" if name == "cuda" else "no --device was given"
        raise SystemExit(
            f"gpu.py: {asked} and CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); for the CPU check run: python benchmarks/gpu.py --device cpu --quick"
        )
    return torch.device("cuda")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (refused without it)")
    parser.add_argument("--quick", action="store_true", help="tiny UNet, few steps: the CPU check of the tests")
    parser.add_argument("--json", type=Path, default=Path("runs/gpu/gpu.json"), help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 128; 8 with --quick)")
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="start no new part after this many seconds (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: expected a positive integer, got {args.batch_size}")
    device = resolve_device(args.device)
    config = settings(device, args.quick, args.batch_size, args.budget_s, args.seed)
    threads = torch.get_num_threads()
    if config.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a check, not a timing: one thread keeps it steady on a busy machine
    try:
        return run(config, args.json, rerun_command(__file__, argv))
    finally:
        torch.set_num_threads(threads)


def run(config: Settings, path: Path, command: str) -> int:
    """Run every part with ``config``, writing the JSON ``path`` after each; 0 when none failed, else 1."""
    device = torch.device(config.device)
    report = Report(
        path,
        {
            "script": "benchmarks/gpu.py",
            "command": command,
            "status": "running",
            "device": {
                "type": device.type,
                "name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "host": machine(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "torch_threads": torch.get_num_threads(),
            },
            "settings": asdict(config),
            "data": DATA_DESCRIPTION,
            "model": {"options": config.model_options},
            "sync_debug": {},
            "throughput": {},
            "training": None,
            "errors": {},
            "skipped": [],
        },
    )
    record = report.record
    report.say(f"device {record['device']['name']} ({device}), torch {torch.__version__}; writing {path}")

    data = synthetic_images(config.dataset_size, config.seed)
    noise, target = Noise(SHAPE), Rows(data)
    trainer = Trainer(config)
    record["model"]["parameters"] = trainer.parameters
    report.say(f"data {tuple(data.shape)}, UNet of {trainer.parameters:,} parameters")
    report.write()

    def part(section: str, name: str, work: Callable[[], Any]) -> Any:
        if report.elapsed() > config.budget_s:
            record["skipped"].append(f"{section}: {name} (time budget of {config.budget_s:g} s spent)")
            report.say(f"{section}: {name}: skipped (time budget)")
            return None
        report.say(f"{section}: {name} ...")
        free_device_memory(device)
        try:
            result = work()
        except Exception as error:  # a failure is a finding: recorded, and the other parts still run
            report.error(f"{section}: {name}", error)
            result = None
        else:
            report.say(f"{section}: {name}: {_summary(result)}")
        free_device_memory(device)
        report.write()
        return result

    for coupler in ("independent", "sinkhorn"):
        if device.type != "cuda":
            record["sync_debug"][coupler] = {"status": "skipped (cpu)"}
            continue
        record["sync_debug"][coupler] = part(
            "sync_debug", coupler, lambda c=coupler: sync_check(c, trainer, noise, target)
        )
    report.write()

    methods: dict[str, Callable[[], dict[str, Any]]] = {
        "independent": lambda: run_independent(trainer, noise, target),
        "exact (background loader)": lambda: run_loader(trainer, noise, target),
        "sinkhorn": lambda: run_sinkhorn(trainer, noise, target),
        f"semidiscrete (N = {config.dataset_size:,})": lambda: run_semidiscrete(trainer, noise, data),
        f"exact pools ({config.pool_size:,})": lambda: run_pools(trainer, noise, target),
    }
    for name, method in methods.items():
        result = part("throughput", name, method)
        if result is not None:
            record["throughput"][name] = result
            report.write()

    steps = config.train_steps
    rate = record["throughput"].get("independent", {}).get("steps_per_s")
    if rate:  # what the budget leaves room for, at the measured rate (with a margin for the in-loop exact coupling)
        room = int(rate * (config.budget_s + 40.0 - report.elapsed()) / 1.5)
        if room < steps:
            steps = max(min(steps, 40), room)
            record["skipped"].append(f"training: shortened from {config.train_steps} to {steps} steps (time budget)")
    record["training"] = part("training", f"otcfm.train, {steps} steps", lambda: training_run(config, data, steps))
    record["status"] = "complete" if not record["errors"] else "complete, with errors"
    report.write()
    report.say(f"done: {record['status']}; wrote {path}")
    return 0 if not record["errors"] else 1


def _cpu_name() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _summary(result: Any) -> str:
    """A one-line summary of a part's result for the progress lines."""
    if not isinstance(result, dict):
        return "done"
    if "steps_per_s" in result:
        memory = result["peak_memory_bytes"]
        extra = "" if memory is None else f", peak {memory / 2**30:.2f} GiB"
        fit = f", fit {result['fit']['seconds']:.1f} s" if "fit" in result else ""
        return f"{result['steps_per_s']:.2f} steps/s{extra}{fit}"
    if "first_mean_loss" in result:
        return f"loss {result['first_mean_loss']:.4f} -> {result['last_mean_loss']:.4f} (fell: {result['fell']})"
    if "status" in result:
        return f"{result['status']} {result.get('raised') or ''}".strip()
    return "done"


if __name__ == "__main__":
    sys.exit(main())
