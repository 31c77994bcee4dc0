"""What the subcommands share about runs: the output folder, the result table's name, and the model, config
and source of a recorded run (a teacher, a checkpoint to sample)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otcfm import checkpoint as ckpt
from otcfm import distributed, report
from otcfm.data import DATASETS
from otcfm.data.sources import FILE_SUFFIXES, DataSource, as_source
from otcfm.engine import CHECKPOINT_NAME
from otcfm.training import TrainConfig, build_model, builds_a_module, model_from_checkpoint

__all__ = ["BUILT_IN_MODELS", "DIM_DATASETS", "check_out", "load_run", "nameable", "recorded_factory", "table_name"]

#: Models otcfm builds itself (``--model``); a checkpoint rebuilds them from its own record.
BUILT_IN_MODELS = ("mlp", "unet")
#: Named datasets that take a ``dim`` option (``--dim``).
DIM_DATASETS = ("gaussian", "mixture")


def table_name(evaluation: dict[str, Any]) -> str:
    """``w2.json`` for the W2 table, ``fd.json`` for the table of image data."""
    return "w2.json" if evaluation.get("metric") == "w2" else "fd.json"


def check_out(out: str, resume: bool, overwrite: bool) -> Path:
    """OUT must name a directory; an existing run there needs --resume or --overwrite (checked before work)."""
    if not out.strip():
        raise ValueError("--out: expected a directory, got ''")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: {out!r} exists and is not a directory")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    if (path / CHECKPOINT_NAME).is_file() and not (resume or overwrite):
        raise ValueError(
            f"--out: {out!r} already holds a run; add --resume to continue it or --overwrite to replace it"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)  # fail now, not after training
    except OSError as error:
        raise ValueError(f"--out: cannot create the directory {out!r} ({error.strerror or error})") from error
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out: the directory {out!r} is not writable")
    return path


def recorded_factory(spec: str, where: str, argument: str) -> str:
    """The model factory ``spec`` recorded by ``where``, to be reused without ``--model``: only one that declares it
    builds a model (an ``nn.Module`` subclass, or a function annotated to return one;
    :func:`otcfm.training.builds_a_module`), so that a file never makes otcfm call an arbitrary function. A notice on
    stderr names it."""
    try:
        declared = builds_a_module(spec)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{argument}: {where} was made with --model {spec}, which cannot be used here ({error}); pass --model"
        ) from error
    if not declared:
        raise ValueError(
            f"{argument}: {where} was made with --model {spec}, which is neither an nn.Module class nor a function "
            "annotated to return one (-> nn.Module); otcfm calls a factory named in a file only then: pass --model "
            "again, or annotate the factory"
        )
    if distributed.world()[0] == 0:
        print(f"otcfm: using --model {spec}, recorded by {where}", file=sys.stderr)
    return spec


def load_run(checkpoint: str, factory: str | None, argument: str) -> tuple[nn.Module, TrainConfig, DataSource, str]:
    """A checkpoint's model, config, source and stage (``""`` for ``otcfm train``'s runs, ``"reflow"``,
    ``"distill"``); a model built by a factory is rebuilt by the recorded factory (:func:`recorded_factory`)
    unless ``--model`` is given, which is then the one used (its weights must fit)."""
    path = Path(checkpoint)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    state = ckpt.load(path, argument)  # read once: the settings below and the weights
    saved = state.get("config") if isinstance(state, dict) else None
    model = None
    if isinstance(saved, dict) and str(saved.get("model", "mlp")).startswith("object:") and factory is None:
        raise ValueError(
            f"{argument}: the model of {checkpoint!r} was a model object made in Python ({saved['model'][7:]}); "
            "pass --model with a 'package.module:factory' that builds it"
        )
    if isinstance(saved, dict) and saved.get("model", "mlp") not in BUILT_IN_MODELS and factory is None:
        factory = recorded_factory(saved["model"], repr(checkpoint), argument)
    if isinstance(saved, dict) and factory is not None and factory not in BUILT_IN_MODELS:
        options = saved.get("model_options", {}) if saved.get("model") == factory else {}
        try:
            model = build_model(TrainConfig(model=factory, model_options=options, seed=saved.get("seed", 0)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"--model {factory}: {error}") from error
    try:
        model, config = model_from_checkpoint(state, path, model=model)
    except ValueError as error:
        if factory is None or "do not fit the model" not in str(error):
            raise
        raise ValueError(f"--model {factory}: {error}") from error
    if config is None:
        raise ValueError(f"{argument}: {checkpoint!r} records no training config (source and target unknown)")
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    stage = run.get("stage", "") if run.get("stage") in ("reflow", "distill") else ""
    return model, config, _recorded_source(config, run, argument), stage


def nameable(spec: str) -> bool:
    """Whether a recorded source or target can be drawn from again: a dataset name, a file or a folder of images."""
    return spec in DATASETS or spec.endswith(FILE_SUFFIXES) or (os.path.isabs(spec) and Path(spec).is_dir())


def _recorded_source(config: TrainConfig, run: dict[str, Any], argument: str) -> DataSource:
    """The source of a run, also of one whose target was an object given in Python (a tensor, a sampler): a
    Gaussian source takes the sample shape its recorded fingerprint holds (``gaussian:{}:shape=(1, 28, 28)``)."""
    if nameable(config.target):
        return report.data_of(config)[0]
    if not nameable(config.source):
        raise ValueError(
            f"{argument}: the run drew its source from {config.source}, an object given in Python; sample it there "
            "(otcfm.integrate(model, x0))"
        )
    fingerprint = str(run.get("source_fingerprint", ""))
    _, marker, shape = fingerprint.partition(":shape=")
    like = None
    if marker:
        dims = tuple(int(k) for k in shape.strip("()").split(",") if k.strip())
        like = DataSource(lambda n, g: torch.empty(0), dims, "recorded", fingerprint)
    return as_source(config.source, "source", config.source_options, like=like)
