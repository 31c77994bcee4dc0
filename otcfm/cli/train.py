"""``otcfm train``: the config of its options, a resumed run's own settings, the run and its report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from otcfm import distributed, report
from otcfm.cli.runs import BUILT_IN_MODELS, DIM_DATASETS, check_out, recorded_factory, table_name
from otcfm.rundir import CHECKPOINT_NAME, RunDirectory
from otcfm.training import TrainConfig, train

__all__ = ["train_command"]

#: TrainConfig fields set by options of another name.
_FIELD_OPTIONS = {
    "coupler_options": "coupler_option",
    "path_options": "path_option",
    "time_sampler_options": "time_sampler_option",
    "model_options": "model_option",
    "objective_options": "objective_option",
}
#: Settings a resumed run takes from its checkpoint by their own rules, below: the model (a recorded factory only
#: through :func:`otcfm.cli.runs.recorded_factory`) with its options, and the data's options, which follow the
#: data and ``--dim``.
_NOT_FROM_CHECKPOINT = ("model", "model_options", "source_options", "target_options")


def _config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``otcfm train``'s options: each field from the option of its name
    (``_FIELD_OPTIONS`` for the repeatable ``--*-option``), the data's options from ``--dim``."""
    dim = {"dim": args.dim} if args.dim is not None else {}
    special = {
        "source_options": dim if args.source in DIM_DATASETS else {},
        "target_options": dim if args.target in DIM_DATASETS else {},
        "model": args.model or "mlp",
        "conditional": {"auto": None, "on": True, "off": False}[args.conditional],
    }
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = (
            special[field.name] if field.name in special else getattr(args, _FIELD_OPTIONS.get(field.name, field.name))
        )
        values[field.name] = dict(value) if field.name in _FIELD_OPTIONS else value
    return TrainConfig(**values)


def _with_run_settings(config: TrainConfig, out: RunDirectory, given: set[str], dim: int | None) -> TrainConfig:
    """On ``--resume``: every setting the command line does not give takes the value the run in ``out``
    recorded, so ``otcfm train --out DIR --resume`` continues DIR as it was started (``--steps`` extends it);
    a recorded model factory is reused when :func:`recorded_factory` accepts it (its ``--model-option`` values
    are the run's unless given).
    The options of the source and target are ``--dim`` where it is given (for the gaussian / mixture data among
    them), else the recorded ones of the recorded data. Without a run in ``out`` yet, the options given start one
    (a job that is restarted with the same command line), and a notice says so."""
    state = out.saved()  # the one read of the checkpoint: train resumes from it
    if state is None:
        if distributed.world()[0] == 0:
            print(
                f"otcfm train: --resume: no run in {out} yet (no {CHECKPOINT_NAME}); starting one with the "
                "options given",
                file=sys.stderr,
            )
        return config
    saved = state.get("config")
    if not isinstance(saved, dict):
        return config
    recorded_model = saved.get("model", "mlp")
    if "model" not in given and str(recorded_model).startswith("object:"):
        raise ValueError(
            f"--resume: the run in {out} was made in Python with a model object ({recorded_model[7:]}); resume it "
            "there: otcfm.train(model=..., out=..., resume=True)"
        )
    if "model" not in given and recorded_model not in BUILT_IN_MODELS:
        config = dataclasses.replace(config, model=recorded_factory(recorded_model, f"the run in {out}", "--resume"))
    taken = {
        field.name: saved[field.name]
        for field in dataclasses.fields(TrainConfig)
        if field.name in saved
        and field.name not in _NOT_FROM_CHECKPOINT
        and _FIELD_OPTIONS.get(field.name, field.name) not in given
    }
    if "model" not in given and recorded_model in BUILT_IN_MODELS:
        taken["model"] = recorded_model
    if taken.get("model", config.model) == recorded_model and "model_option" not in given:
        taken["model_options"] = saved.get("model_options", {})
    for side in ("source", "target"):
        data = taken.get(side, getattr(config, side))
        if dim is not None:
            taken[f"{side}_options"] = {"dim": dim} if data in DIM_DATASETS else {}
        elif data == saved.get(side):
            taken[f"{side}_options"] = saved.get(f"{side}_options", {})
    return dataclasses.replace(config, **taken)


def train_command(args: argparse.Namespace) -> int:
    if args.pool_size is not None and (args.pool_size < args.batch_size or args.pool_size % args.batch_size):
        raise ValueError(f"--pool-size: expected a multiple of --batch-size {args.batch_size}, got {args.pool_size}")
    mlp_only = sorted(name for name in ("hidden", "depth") if name in args.given)
    if args.model not in (None, "mlp") and mlp_only:
        raise ValueError(f"--{mlp_only[0]}: sets the built-in MLP; --model {args.model} builds the model")
    config = _config(args)
    out = RunDirectory(check_out(args.out, args.resume, args.overwrite))
    if args.resume:
        config = _with_run_settings(config, out, args.given, args.dim)
    if args.dim is not None and not ({config.source, config.target} & set(DIM_DATASETS)):
        raise ValueError(f"--dim: applies to {' and '.join(DIM_DATASETS)} data; neither --source nor --target is")
    started = time.perf_counter()
    result = train(
        config, out=out, resume=args.resume, overwrite=args.overwrite, device=args.device, progress=not args.no_progress
    )
    seconds = time.perf_counter() - started
    if distributed.world()[0] > 0:
        return 0  # rank 0 evaluates and reports
    done = len(result.losses) - result.start_step
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    print(
        f"trained {done} steps{resumed} in {seconds:.1f} s ({len(result.losses)} in all); "
        f"checkpoint: {out.checkpoint_path}"
    )
    evaluation = report.evaluate(
        result.sampling_model.cpu(), result.config, args.eval_n, args.eval_draws, out.path, guidance=args.eval_guidance
    )
    evaluation["train_seconds"] = seconds
    (out.path / table_name(evaluation)).write_text(json.dumps(evaluation, indent=2))
    report.print_table(evaluation, result.config)
    print(f"figure: {evaluation['png']}")
    return 0
