"""``otcfm.train(...)``: flow matching on any data with any model, through the one training engine.

A run is described by a :class:`TrainConfig` (names and keyword options of the data, coupler, path, time
sampler and model, plus the optimisation settings) and, optionally, objects that have no name: a tensor, array,
``Dataset`` or sampler function as ``source``/``target``, an ``nn.Module`` as ``model``, coupler / path / time
sampler instances. The config records each object by a description (``"tensor(1000, 5)"``), and a checkpoint
records the data's content fingerprints, so ``resume=True`` refuses other data or settings.

One ``torch.Generator`` seeded from ``config.seed`` drives every draw (data, coupling, times, noise); the
built-in MLP is initialised from the same seed, so a run is a function of its config. Training itself
(checkpoints, resume, EMA, DDP under ``torchrun``, progress, device, bf16, clipping) is
:func:`otcfm.engine.fit`; see its module docstring for the checkpoint format and the per-rank seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch
from torch import nn

from otcfm import checkpoint as ckpt
from otcfm import distributed
from otcfm._args import check_count, check_flag, check_options
from otcfm._checks import all_finite, first_nonfinite, named_as_data
from otcfm._describe import describe
from otcfm._random import keeps_global_rng
from otcfm.batches import BatchSource, Draws, GlobalCoupling, Pools, WholeDataset, coupled_loss
from otcfm.couplers import SemidiscreteCoupler, get_coupler
from otcfm.data import DATASETS
from otcfm.data.sources import FILE_SUFFIXES, DataSource, as_source
from otcfm.engine import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    LRSchedule,
    Precision,
    Schedule,
    check_out,
    check_run,
    check_run_flags,
    check_schedule,
    fit,
    resolve_device,
    schedule_from,
)
from otcfm.flow import FlowMatcher
from otcfm.guidance import null_label_of
from otcfm.meanflow import MeanFlow, is_flow_map
from otcfm.models import MLP, model_spec, rebuild_model, unet
from otcfm.paths import get_path
from otcfm.rundir import RunDirectory
from otcfm.runlock import run_lock
from otcfm.solvers import check_output, check_velocity, first_call
from otcfm.timesteps import get_time_sampler

__all__ = ["CHECKPOINT_NAME", "TrainConfig", "TrainResult", "build_model", "load_model", "train", "write_checkpoint"]

_OBJECT_FIELDS = ("source", "target", "coupler", "path", "time_sampler")
#: Training objectives by name (``TrainConfig.objective``).
OBJECTIVES = ("flow_matching", "meanflow")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (JSON-like values only, so a checkpoint can record it).

    Attributes:
        source: ``x0``: a dataset name (``otcfm.data.DATASETS``), a ``.npy``/``.pt`` file, or ``"auto"``:
            ``"8gaussians"`` when the target is a built-in 2-D dataset (``"moons"``, ...), else a standard
            Gaussian of the target's sample shape (a user's own data, 2-D too). (Objects such as tensors are
            passed to :func:`train` and recorded here by a description.)
        target: ``x1``: a dataset name or a file, as ``source``.
        source_options, target_options: keyword options of a named dataset (``{"dim": 32}`` for ``"mixture"``).
        coupler: coupler name (``otcfm.couplers.COUPLERS``).
        coupler_options: its keyword options (``{"epsilon": 0.01}`` for ``"sinkhorn"``).
        path: path name (``otcfm.paths.PATHS``).
        sigma: the path's noise parameter (None: the path's default).
        path_options: other keyword options of the path (``{"beta_max": 20}`` for ``"diffusion"``).
        time_sampler: ``"uniform"``, ``"logit_normal"`` or ``"u_shaped"``.
        time_sampler_options: its keyword options (``{"std": 0.5}``).
        model: ``"mlp"`` (the built-in MLP of width ``hidden`` and ``depth`` hidden layers), ``"unet"`` (the
            built-in :class:`otcfm.models.UNet` for image data ``(C, H, W)``), or ``"package.module:factory"``,
            called as ``factory(**model_options)``.
        model_options: keyword options of the UNet (``{"preset": "cifar10"}``, ``{"base_channels": 64}``; see
            :func:`otcfm.models.unet`) or of a model factory.
        hidden: MLP width.
        depth: MLP hidden layers.
        steps: optimisation steps.
        batch_size: samples per batch on each side (per rank under torchrun).
        lr: Adam learning rate (the peak rate under ``lr_schedule="cosine"``).
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over ``steps``; :func:`otcfm.engine.learning_rate`).
        ema_decay: decay of an exponential moving average of the weights (0 disables it).
        grad_clip: clip the gradient norm to this value (None: no clipping).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the model's forward pass).
        seed: seed of the run's generator.
        checkpoint_every: steps between checkpoints (when an output directory is given).
        global_coupling: under torchrun, couple the batches of all ranks as one OT problem
            (:func:`otcfm.distributed.global_pairs`) instead of each rank its own; no effect in one process.
        warmup_steps: a linear learning-rate warm-up over the first steps (0: none;
            :func:`otcfm.engine.learning_rate`).
        conditional: train a class-conditional model ``model(x, t, y)`` on the target's labels, pairing within
            classes. None (auto): when the target carries labels and either they were given explicitly (a
            ``(data, labels)`` pair, ``target_labels=``) or the model takes them (``model="unet"``, a model with a
            ``null_label``); recorded as True or False.
        label_dropout: the fraction of pairs whose label the model sees as "no class", for classifier-free
            guidance (:mod:`otcfm.guidance`); None: 0.1 in a conditional run, 0 otherwise; recorded as a number.
        objective: ``"flow_matching"`` (a velocity ``model(x, t)``), or ``"meanflow"``: a flow map
            ``model(z, r, t)`` trained with :class:`otcfm.meanflow.MeanFlow` on the same couplers and paths (the
            built-in MLP and UNet are built with ``flow_map=True``); ``otcfm.integrate(model, x0, steps=1)`` is then
            its one-step sample.
        objective_options: keyword options of the objective (``{"flow_map_fraction": 0.25, "adaptive_p": 1.0}``).
        pool_size: couple ``pool_size`` samples per side at once (an OT pool, a multiple of ``batch_size``) and
            train on it for ``pool_size / batch_size`` steps, each pair once (:class:`otcfm.loader.PoolStream`;
            pool ``k`` of rank ``r`` is seeded from ``seed``, ``r`` and ``k``, so a resumed run is bit-exact).
    """

    source: str = "auto"
    target: str = "moons"
    source_options: dict[str, Any] = field(default_factory=dict)
    target_options: dict[str, Any] = field(default_factory=dict)
    coupler: str = "exact"
    coupler_options: dict[str, Any] = field(default_factory=dict)
    path: str = "linear"
    sigma: float | None = None
    path_options: dict[str, Any] = field(default_factory=dict)
    time_sampler: str = "uniform"
    time_sampler_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    hidden: int = 256
    depth: int = 3
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: LRSchedule = "constant"
    ema_decay: float = 0.0
    grad_clip: float | None = None
    precision: Precision = "fp32"
    seed: int = 0
    checkpoint_every: int = 500
    global_coupling: bool = False
    pool_size: int | None = None
    warmup_steps: int = 0
    conditional: bool | None = None
    label_dropout: float | None = None
    objective: str = "flow_matching"
    objective_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_schedule(self)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown value {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.conditional is not None:
            object.__setattr__(self, "conditional", check_flag(self.conditional, "conditional"))
        if self.label_dropout is not None:
            rate = self.label_dropout
            if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
                raise ValueError(f"label_dropout: expected a number in [0, 1) or None, got {rate!r}")
            if rate > 0 and self.conditional is False:
                raise ValueError(f"label_dropout: {rate} drops class labels, and conditional=False trains without any")
            object.__setattr__(self, "label_dropout", float(rate))
        object.__setattr__(self, "global_coupling", check_flag(self.global_coupling, "global_coupling"))
        for name in ("batch_size", "hidden", "depth"):
            object.__setattr__(self, name, check_count(getattr(self, name), name))
        if self.pool_size is not None:
            from otcfm.loader import check_pool_size

            check_pool_size(self.pool_size, self.batch_size)
            object.__setattr__(self, "pool_size", int(self.pool_size))
        if isinstance(self.sigma, numbers.Real) and not isinstance(self.sigma, bool):
            object.__setattr__(self, "sigma", float(self.sigma))  # the path checks its range
        for name in ("source", "target", "coupler", "path", "time_sampler", "model"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(
                    f"{name}: TrainConfig holds names; pass a {type(getattr(self, name)).__name__} to "
                    f"otcfm.train({name}=...) instead"
                )
        for name in (
            "source_options",
            "target_options",
            "coupler_options",
            "path_options",
            "time_sampler_options",
            "model_options",
            "objective_options",
        ):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name}: expected a dict of keyword options, got {value!r}")
            try:
                plain = json.loads(json.dumps(value))  # numpy floats become floats: a checkpoint holds plain values
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"{name}: expected JSON-like values (numbers, strings, lists), got {value!r}"
                ) from error
            object.__setattr__(self, name, plain)

    def flow_matcher(self) -> FlowMatcher:
        """The :class:`FlowMatcher` this config describes (names and options)."""
        return _flow_matcher(self, {})

    def schedule(self) -> Schedule:
        """The engine's optimisation settings of this config."""
        return schedule_from(self)

    def data_dim(self) -> int:
        """Number of features of one sample of ``target``."""
        return as_source(self.target, "target", self.target_options).features


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model (raw weights).
        ema: the moving-average copy, or None when ``ema_decay == 0``.
        losses: the loss of every step (the mean over ranks under torchrun), resumed runs included.
        config: the run's config (``source``/``target`` resolved; objects recorded by their description).
        start_step: steps already done when this call began (0 unless resumed); this call ran
            ``len(losses) - start_step`` steps.
    """

    model: nn.Module
    ema: nn.Module | None
    losses: list[float]
    config: TrainConfig
    start_step: int = 0

    @property
    def sampling_model(self) -> nn.Module:
        """The model to sample from: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.model


def _option_error(name: str, options: dict[str, Any], error: Exception) -> ValueError:
    return ValueError(f"{name}: invalid options {options} ({error})")


def _built(get: Callable[..., Any], value: Any, options: dict[str, Any], name: str) -> Any:
    """``get(value, **options)`` (:func:`otcfm.get_coupler` and the like); an error that the options cause is
    named ``<name>_options``, one of the name itself stays ``<name>: ...``."""
    try:
        return get(value, **options)
    except (TypeError, ValueError) as error:
        if not options or str(error).startswith(f"{name}: unknown value") or not isinstance(value, str):
            raise
        raise _option_error(f"{name}_options", options, error) from error


def _flow_matcher(config: TrainConfig, objects: dict[str, Any]) -> FlowMatcher | MeanFlow:
    """The objective of ``config`` (its coupler, path and time sampler built from their names and options, or the
    instances in ``objects``); settings that would be recorded and never used are refused."""
    for name in ("coupler", "path", "time_sampler"):
        options = getattr(config, f"{name}_options")
        if name in objects and options:
            raise ValueError(
                f"{name}_options: {options} are for a {name} given by name; set them on the {name} instance "
                f"({describe(objects[name])}) instead"
            )
    if "label_weight" in config.coupler_options and not config.conditional:
        raise ValueError(
            "coupler_options: label_weight weighs labels, which only a class-conditional run passes to the coupler "
            "(conditional=True)"
        )
    coupler = _built(get_coupler, objects.get("coupler", config.coupler), config.coupler_options, "coupler")
    try:
        path = get_path(objects.get("path", config.path), config.sigma, **config.path_options)
    except (TypeError, ValueError) as error:
        if not config.path_options or str(error).startswith(("path: unknown value", "path: expected", "sigma:")):
            raise
        raise _option_error("path_options", config.path_options, error) from error
    sampler = objects.get("time_sampler", config.time_sampler)
    time_sampler = _built(get_time_sampler, sampler, config.time_sampler_options, "time_sampler")
    fm = FlowMatcher(coupler=coupler, path=path, time_sampler=time_sampler)
    if config.objective == "flow_matching":
        if config.objective_options:
            raise ValueError(f"objective_options: {config.objective_options} are for objective='meanflow'")
        return fm
    try:
        return MeanFlow(fm.coupler, fm.path, None, fm.time_sampler, **config.objective_options)
    except (TypeError, ValueError) as error:
        raise _option_error("objective_options", config.objective_options, error) from error


def _recorded_source(config: TrainConfig, directory: RunDirectory) -> TrainConfig:
    """``source="auto"`` on resume: the source the run in ``directory`` recorded (what 'auto' chose, or a source
    named when it started), so that a resume need not name it again."""
    saved = (directory.saved() or {}).get("config")
    recorded = saved.get("source") if isinstance(saved, dict) else None
    nameable = isinstance(recorded, str) and (
        recorded in DATASETS
        or recorded.endswith(FILE_SUFFIXES)
        or (os.path.isabs(recorded) and Path(recorded).is_dir())
    )
    if not nameable or config.source_options:  # an object's description cannot be drawn from: left to the check
        return config
    return dataclasses.replace(config, source=saved["source"], source_options=saved.get("source_options", {}))


def _data(config: TrainConfig, objects: dict[str, Any], target_labels: Any = None) -> tuple[DataSource, DataSource]:
    target_data = objects.get("target", config.target)
    target = as_source(target_data, "target", config.target_options, labels=target_labels)
    source_data = objects.get("source", config.source)
    if isinstance(source_data, str) and source_data == "auto":  # the toy pairs of the benchmarks, else noise
        toy = isinstance(target_data, str) and target_data in DATASETS and target.shape == (2,)
        source_data = "8gaussians" if toy else "gaussian"
    source = as_source(source_data, "source", config.source_options, like=target)
    if source.shape != target.shape:
        raise ValueError(
            f"source and target: expected the same sample shape, got source {source.shape} ({source.spec}) and "
            f"target {target.shape} ({target.spec}); e.g. source='gaussian' takes the target's shape"
        )
    return source, target


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model: expected 'mlp', 'unet' or 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        raise ValueError(
            f"model: cannot import {spec!r} ({error}); the folder holding {top!r} must be on the import path: "
            "add it to PYTHONPATH (the otcfm command does not look in the current folder; python -m otcfm does)"
        ) from error
    except (ImportError, AttributeError) as error:
        raise ValueError(f"model: cannot import {spec!r} ({error})") from error
    if not callable(factory):
        raise TypeError(f"model: {spec!r} is not callable")
    return factory


def builds_a_module(spec: str) -> bool:
    """Whether the factory ``spec`` (``"package.module:factory"``) says it builds a model: an ``nn.Module``
    subclass, or a function whose return annotation is one.

    The CLI reuses a factory recorded in a checkpoint only when this holds, so a file cannot make otcfm call an
    arbitrary function (``subprocess:run`` with recorded options); naming the module imports it.

    Raises:
        ValueError: ``spec`` cannot be imported (as :func:`build_model`).
    """
    factory = _import_factory(spec)
    if isinstance(factory, type):
        return issubclass(factory, nn.Module)
    try:
        returned = get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: not declared
        return False
    return isinstance(returned, type) and issubclass(returned, nn.Module)


def build_model(
    config: TrainConfig,
    features: int | None = None,
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """The model of ``config``, initialised from ``config.seed`` without touching torch's global RNG.

    Args:
        config: ``model="mlp"`` builds :class:`otcfm.models.MLP` for ``features`` inputs (the target's when
            None); ``"unet"`` builds :func:`otcfm.models.unet` for samples of ``shape`` (the target's when None)
            with ``config.model_options``; ``"package.module:factory"`` calls ``factory(**config.model_options)``.
        features: values per sample (``C*H*W`` for images).
        shape: the sample shape ``(C, H, W)`` of a UNet.
        num_classes: classes of a conditional UNet (None: unconditional).
    """
    if config.model == "mlp" and config.model_options:
        raise ValueError(
            f"model_options: {config.model_options} are for a model factory ('package.module:factory'); the built-in "
            "MLP takes hidden and depth (--hidden, --depth)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        flow_map = config.objective == "meanflow"
        if config.model == "mlp":
            return MLP(features or config.data_dim(), hidden=config.hidden, depth=config.depth, flow_map=flow_map)
        if config.model == "unet":
            if shape is None:
                shape = as_source(config.target, "target", config.target_options).shape
            options = {k: v for k, v in config.model_options.items() if k != "num_classes"}
            options.setdefault("flow_map", flow_map)
            classes = num_classes if num_classes is not None else config.model_options.get("num_classes")
            try:
                return unet(shape, num_classes=classes, **options)
            except (TypeError, ValueError) as error:
                raise _option_error("model_options", config.model_options, error) from error
        factory = _import_factory(config.model)
        options = check_options(factory, config.model_options, "model_options")
        try:
            model = factory(**options)
        except TypeError as error:  # e.g. a factory that passes **options on to a class that refuses one
            raise TypeError(f"model: {config.model}(**{options}) raised TypeError ({error})") from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: {config.model!r} returned a {type(model).__name__}, expected an nn.Module")
    return model


def _resolve_conditional(config: TrainConfig, target: DataSource, explicit: bool, model: nn.Module | None) -> bool:
    """Whether the run is class-conditional (see ``TrainConfig.conditional``)."""
    if config.conditional is False:
        return False
    if config.conditional is True:
        if not target.has_labels:
            raise ValueError(
                f"conditional: the target {target.spec!r} carries no class labels; give them as target=(data, labels), "
                "target_labels=, a Dataset of (x, label) items, or a labelled dataset name ('digits', 'mnist')"
            )
        return True
    takes_labels = config.model == "unet" or (model is not None and null_label_of(model, None) is not None)
    conditional = target.has_labels and (explicit or takes_labels)
    if not conditional and config.label_dropout:
        raise ValueError(
            f"label_dropout: {config.label_dropout} drops class labels, and this run is unconditional (the target "
            "carries no labels, or the model takes none); set conditional=True for a conditional run"
        )
    return conditional


def _classes(config: TrainConfig, target: DataSource) -> int:
    """The number of classes of a conditional built-in model: the target's, or ``model_options["num_classes"]``."""
    found = target.num_classes
    given = config.model_options.get("num_classes")
    if given is None:
        return found
    if not isinstance(given, int) or isinstance(given, bool) or given < found:
        raise ValueError(f"model_options: num_classes={given!r}, but the target's labels run up to {found - 1}")
    return given


def _check_model_settings(config: TrainConfig, model: nn.Module | None) -> None:
    """Refuse ``model_options`` beside a built model: they are a factory's, and no factory is called (they would
    be recorded, and a later rebuild from the record would build another model)."""
    if model is not None and config.model_options:
        raise ValueError(
            f"model_options: {config.model_options} are for a model factory ('package.module:factory'); the "
            f"model given ({type(model).__name__}) is already built"
        )


def _split_objects(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move values that are not names (tensors, samplers, instances) out of the config overrides."""
    objects, names = {}, dict(overrides)
    for key in _OBJECT_FIELDS:
        if key in names and not isinstance(names[key], str):
            value = names.pop(key)
            if isinstance(value, Path):
                names[key] = str(value)
            else:
                objects[key] = value
    return objects, names


@keeps_global_rng
def train(
    config: TrainConfig | None = None,
    *,
    out: str | Path | RunDirectory | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model: nn.Module | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    target_labels: Any = None,
    **overrides: Any,
) -> TrainResult:
    """Train a velocity model with flow matching (with DDP when launched by torchrun).

    Example::

        otcfm.train(target=np.load("data.npy"), model=MyNet(), steps=5000, out="runs/mine")
        otcfm.train(target="mixture", target_options={"dim": 32}, coupler="sinkhorn",
                    coupler_options={"epsilon": 0.01})
        otcfm.train(target=(images, labels), model="unet", label_dropout=0.1)  # class-conditional, guidable

    Args:
        config: the run's settings; defaults when None. Keyword ``overrides`` replace fields
            (``train(steps=500, coupler="independent")``); ``source``, ``target``, ``coupler``, ``path`` and
            ``time_sampler`` also take objects: data as a tensor / array ``(N, ...)``, a ``Dataset`` or a sampler
            ``f(n, generator)``, and coupler / path / time-sampler instances.
        out: directory for ``checkpoint.pt``; no checkpoints when None. A :class:`otcfm.rundir.RunDirectory`
            whose checkpoint the caller read already (for its settings) is resumed from that read.
        resume: continue from ``out/checkpoint.pt`` if it exists (its config and data must match, except
            ``steps``, which may be raised under a constant learning rate, not under ``lr_schedule="cosine"``).
        overwrite: replace a run already in ``out``; without it (or ``resume``) an existing run is an error.
        model: an ``nn.Module`` called as ``model(x, t)`` with ``x: (B, *sample_shape)``, ``t: (B,)``, or a
            ``"package.module:factory"`` name; by default the config's MLP (which flattens images). A user
            model's class is recorded; :func:`load_model` needs an instance of it to load the weights into.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/None: CUDA when available. Data are drawn on
            the CPU from the run's generator and moved once per step; the coupler converts to its solver's
            device where it needs to (POT and scipy: the CPU).
        progress: show a progress bar.
        callback: called as ``callback(step, loss)`` after every step.
        target_labels: integer class labels ``(N,)`` of a tensor / array / file target (see ``conditional``).

    Returns:
        a :class:`TrainResult`.

    Raises:
        ValueError: invalid settings or data, an existing run in ``out`` without ``resume``/``overwrite``, or a
            checkpoint made with another config or other data.
        KeyboardInterrupt: re-raised after the last finished step was saved.
    """
    check_run_flags(resume, overwrite, progress)  # before anything reads them
    config, model, objects = _settings(config, model, overrides)
    directory = RunDirectory.of(out)  # a resume reads its checkpoint once, here or where a caller read it
    if resume and directory is not None and config.source == "auto" and "source" not in objects:
        config = _recorded_source(config, directory)
    source, target = _data(config, objects, target_labels)
    explicit = target_labels is not None or isinstance(objects.get("target"), tuple)
    conditional = _resolve_conditional(config, target, explicit, model)
    rate = config.label_dropout if config.label_dropout is not None else (0.1 if conditional else 0.0)
    config = dataclasses.replace(config, conditional=conditional, label_dropout=rate)
    described = {k: describe(v) for k, v in objects.items() if k in ("coupler", "path", "time_sampler")}
    if model is not None:
        described["model"] = f"object:{type(model).__module__}.{type(model).__qualname__}"
    config = dataclasses.replace(config, source=source.spec, target=target.spec, **described)
    fm = _flow_matcher(config, objects)
    global_coupling = config.global_coupling and distributed.world()[1] > 1
    classes = _classes(config, target) if conditional else None
    net_model = model if model is not None else build_model(config, target.features, target.shape, classes)
    device_ = resolve_device(device)
    check_run(net_model, resume, overwrite, callback, progress)  # the engine's checks, before the probe and any fit
    null = null_label_of(net_model, None) if conditional else None
    if config.label_dropout and null is None:
        raise ValueError(
            f"label_dropout: {config.label_dropout} replaces labels by a 'no class' label, and the model has no "
            "null_label attribute; give it one (the built-in UNet has), or set label_dropout=0"
        )
    _probe_model(net_model, config, source, conditional)
    semidiscrete = fm.coupler if fm.coupler.pairs_with_dataset else None
    _check_pools(config, semidiscrete is not None, conditional, global_coupling)
    check_out(directory, resume, overwrite)  # before the lock and any fit: an existing run is not touched
    lock = run_lock(directory) if directory is not None and distributed.world()[0] == 0 else contextlib.nullcontext()
    with lock:  # held from before a semidiscrete fit (which writes in out) to the end of the run
        if semidiscrete is not None:  # every rank pairs its batch with the whole dataset itself
            labels = target.all_labels().to(device_) if conditional else None
            dataset = _fit_semidiscrete(
                semidiscrete, config, source, target, directory, resume, overwrite, device_, progress, labels
            )
            batches: BatchSource = WholeDataset(source, dataset, config.batch_size, labels)
        else:
            batches = _batch_source(config, fm, source, target, device_, conditional, global_coupling)
        labelled: dict[str, Any] = {"label_dropout": config.label_dropout, "null_label": null} if conditional else {}

        def step_loss(net: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
            try:
                return coupled_loss(fm, net, batches(step, generator), generator, **labelled)
            except ValueError as error:  # the loss names its x0 / x1: the user passed source / target
                raise named_as_data(error, f"a batch drawn at step {step}") from error

        run = {
            "stage": "train",
            **dataclasses.asdict(config),
            "source_fingerprint": source.fingerprint,
            "target_fingerprint": target.fingerprint,
            **({"labels_fingerprint": target.labels_fingerprint} if conditional else {}),
        }
        fitted = fit(
            net_model,
            step_loss,
            config.schedule(),
            run=run,
            out=directory,
            resume=resume,
            overwrite=overwrite,
            device=device_,
            progress=progress,
            callback=callback,
            record=lambda: {
                "config": dataclasses.asdict(config),
                **({"semidiscrete": semidiscrete.state_dict()} if semidiscrete is not None else {}),
            },
            locked=directory is not None,
        )
        return TrainResult(fitted.model, fitted.ema, fitted.losses, config, fitted.start_step)


def _settings(
    config: TrainConfig | None, model: nn.Module | str | None, overrides: dict[str, Any]
) -> tuple[TrainConfig, nn.Module | None, dict[str, Any]]:
    """:func:`train`'s config with its keyword overrides, the model object (None for a named one), and the
    objects given in place of names (data, coupler, path, time sampler instances)."""
    objects, names = _split_objects(overrides)
    if isinstance(model, str):
        names["model"] = model
        model = None
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module or 'package.module:factory', got {type(model).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train: unknown settings {unknown}; valid settings are the fields of TrainConfig")
    config = dataclasses.replace(config or TrainConfig(), **names)  # TrainConfig checks each value
    _check_model_settings(config, model)
    return config, model, objects


def _probe_model(model: nn.Module, config: TrainConfig, source: DataSource, conditional: bool) -> None:
    """Call ``model`` once on two source draws as a step calls it (a flow map as ``model(z, r, t)``), before any
    work: a model of the wrong signature or output shape is named ``model``, NaN/Inf draws ``source``."""
    place = next(model.parameters()).device
    first = source(2, torch.Generator().manual_seed(0)).to(place)
    if not all_finite(first):  # blamed on the data, not on the model that it makes return NaN
        raise ValueError("source: a draw of 2 samples contains NaN or Inf")
    labels = torch.zeros(2, dtype=torch.int64, device=place) if conditional else None
    if (config.objective == "meanflow") != is_flow_map(model):
        wanted = "a flow map model(z, r, t) with flow_map = True" if config.objective == "meanflow" else "a velocity"
        raise ValueError(f"model: objective={config.objective!r} trains {wanted}; the model given is not one")
    with torch.autocast(place.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):  # as the steps run it
        if config.objective == "meanflow":  # z at r = 0 towards t = 0: the call a step makes, on two samples
            zero = torch.zeros(2, dtype=first.dtype, device=place)
            check_output(first_call(lambda x, t, *y: model(x, t, zero, *y), first, zero, "model", labels), first)
        else:
            check_velocity(model, first, "model", y=labels)


def _check_pools(config: TrainConfig, semidiscrete: bool, conditional: bool, global_coupling: bool) -> None:
    """``pool_size`` only where pools apply: not with the semidiscrete coupler, labels or a global coupling."""
    if semidiscrete and config.pool_size is not None:
        raise ValueError("pool_size: the semidiscrete coupler pairs with the whole dataset; pools are for others")
    if config.pool_size is not None and conditional:
        raise ValueError("pool_size: OT pools are coupled without labels; train a conditional model without pools")
    if config.pool_size is not None and global_coupling and not semidiscrete:
        raise ValueError("pool_size: pools couple each rank's own samples; leave global_coupling off with pools")


def _batch_source(
    config: TrainConfig,
    fm: FlowMatcher | MeanFlow,
    source: DataSource,
    target: DataSource,
    device: torch.device,
    conditional: bool,
    global_coupling: bool,
) -> BatchSource:
    """Where a step's coupled batch comes from (other than the semidiscrete coupler's whole dataset): draws
    coupled alone, OT pools, or a coupling across ranks."""
    if config.pool_size is not None:
        from otcfm.loader import PoolStream

        rank_seed = distributed.stream_seed(config.seed, "pools", distributed.world()[0])
        stream = PoolStream(source, target, fm.coupler, config.pool_size, config.batch_size, rank_seed)
        return Pools(stream, device)
    batches = Draws(source, target, config.batch_size, device, labels=conditional)
    return GlobalCoupling(batches, fm.coupler, config.seed) if global_coupling else batches


#: Where ``train`` keeps an unfinished semidiscrete fit in ``out`` (see :func:`_fit_semidiscrete`).
SEMIDISCRETE_FIT_NAME = "semidiscrete-fit.pt"


def _fit_semidiscrete(
    coupler: SemidiscreteCoupler,
    config: TrainConfig,
    source: DataSource,
    target: DataSource,
    out: RunDirectory | None,
    resume: bool,
    overwrite: bool,
    device: torch.device,
    progress: bool,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole target dataset on ``device``, with ``coupler``'s potentials fitted on it (or resumed, or checked);
    with ``labels`` (``(N,)`` on ``device``) the potentials pair within classes.

    With ``out``, the fit saves its state in ``out/semidiscrete-fit.pt`` as it goes, so an interrupted fit resumes
    where it stopped (a file of another problem is refused by the fit; ``overwrite`` starts it afresh)."""
    if target.rows is None:
        raise ValueError(
            f"coupler: 'semidiscrete' pairs with a whole finite dataset, but target {target.spec!r} is a sampler; "
            "give the target as a tensor, array, .npy/.pt file, TensorDataset or 'digits' (a synthetic set: draw "
            "it once, e.g. otcfm.data.sample('mixture', 20000, generator, dim=32))"
        )
    dataset = target.rows.to(device)
    saved = out.saved() if out is not None and resume else None
    if saved is not None:
        state = saved.get("semidiscrete")
        if state is not None:
            coupler.load_state_dict(state, dataset)
            return dataset
    if coupler.potentials is not None:
        coupler.check_dataset(dataset, labels)
        return dataset
    generator = torch.Generator().manual_seed(distributed.stream_seed(config.seed, "semidiscrete", 0))
    main = distributed.world()[0] == 0
    progress_file = Path(out) / SEMIDISCRETE_FIT_NAME if out is not None and main else None
    if progress_file is not None and overwrite and progress_file.exists():
        progress_file.unlink()
    if progress_file is not None:
        progress_file.parent.mkdir(parents=True, exist_ok=True)
    report = coupler.fit(
        source, dataset, generator=generator, y1=labels, progress=progress and main, checkpoint=progress_file
    )
    if progress and main:
        print(
            f"semidiscrete potentials: {report.steps} steps in {report.seconds:.1f} s, assignment error "
            f"{report.assignment_error:.3f} (sampling noise {report.noise_floor:.3f})"
        )
    return dataset


def write_checkpoint(
    path: str | Path, config: TrainConfig | None, model: nn.Module, ema: nn.Module | None = None, **state: Any
) -> Path:
    """Write a weights-only checkpoint that :func:`load_model` reads, atomically (no training state).

    ``state`` adds entries (e.g. how a Reflow student was made).
    """
    return ckpt.atomic_save(
        {
            "format": FORMAT_VERSION,
            "config": dataclasses.asdict(config) if config is not None else None,
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            **state,
        },
        path,
    )


def _config_from(saved: Any, path: Path) -> TrainConfig | None:
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint: {path} holds a config of type {type(saved).__name__}, expected a dict")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint: {path} holds an invalid config ({error})") from error


def load_model(
    path: str | Path, use_ema: bool = True, model: nn.Module | None = None
) -> tuple[nn.Module, TrainConfig | None]:
    """The trained model of a checkpoint written by :func:`train`, ``reflow`` or ``distill``.

    Args:
        path: ``checkpoint.pt`` or the directory holding it.
        use_ema: load the EMA weights when the run kept them.
        model: an instance to load the weights into; required for a user's own model (the checkpoint names
            its class), optional for the built-in MLP, which is rebuilt from the checkpoint's spec.

    Returns:
        ``(model in eval mode on the CPU, config)``; config is None for a checkpoint written without one
        (``reflow.train_on_pairs(..., out=...)`` from Python).

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: not an otcfm checkpoint, a user model without ``model=``, weights of other shapes or with
            NaN/Inf.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint file or its run directory, got {type(path).__name__}")
    check_flag(use_ema, "use_ema")
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    return model_from_checkpoint(ckpt.load(path), path, use_ema, model)


def model_from_checkpoint(
    state: dict[str, Any], path: Path, use_ema: bool = True, model: nn.Module | None = None
) -> tuple[nn.Module, TrainConfig | None]:
    """:func:`load_model` of a checkpoint's content ``state`` already read from ``path`` (named in errors)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint: {path} is not an otcfm training checkpoint (format {found!r})")
    config = _config_from(state.get("config"), path)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state.get("model")
    bad = first_nonfinite(weights) if isinstance(weights, dict) else None
    if bad is not None:  # a diverged run's weights, saved by another program
        raise ValueError(f"checkpoint: {path} holds NaN/Inf weights ({bad!r}); the run it comes from diverged")
    if model is None:
        spec = state.get("model_spec")
        if spec is None:
            raise ValueError(f"checkpoint: {path} does not describe its model; pass model=")
        try:
            model = rebuild_model(spec, weights)  # checked against the weights before anything is built
        except ValueError as error:
            raise ValueError(f"checkpoint: {path}: {error}") from error
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"checkpoint: the weights in {path} do not fit the model ({error})") from error
    return model.cpu().eval(), config
