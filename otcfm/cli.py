"""The ``otcfm`` command: ``otcfm train``, ``otcfm sample``, ``otcfm reflow`` and ``otcfm distill``."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from otcfm import __version__, distributed, reflow, report
from otcfm import checkpoint as ckpt
from otcfm._args import check_seed
from otcfm.couplers import COUPLERS
from otcfm.data import DATASETS
from otcfm.data.sources import FILE_SUFFIXES, DataSource, as_source
from otcfm.engine import CHECKPOINT_NAME, LR_SCHEDULES
from otcfm.paths import PATHS
from otcfm.plotting import is_image_shape
from otcfm.solvers import METHODS, solve
from otcfm.timesteps import TIME_SAMPLERS
from otcfm.training import (
    OBJECTIVES,
    SEMIDISCRETE_FIT_NAME,
    TrainConfig,
    build_model,
    builds_a_module,
    load_model,
    train,
)

__all__ = ["main", "run"]

#: Models otcfm builds itself (``--model``); a checkpoint rebuilds them from its own record.
BUILT_IN_MODELS = ("mlp", "unet")
#: Named datasets that take a ``dim`` option (``--dim``).
DIM_DATASETS = ("gaussian", "mixture")


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``0.01``, ``true``, ``[1, 2]``), else as a string;
    ``true``, ``false`` and ``null`` in any case (``False``, ``None``) are the booleans and None."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    words = {"true": True, "false": False, "null": None, "none": None}
    if value.lower() in words:
        return key, words[value.lower()]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _integer(text: str, minimum: int) -> int:
    """``text`` as an integer ``>= minimum``, else the argparse error that says what was expected."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _count(text: str) -> int:
    return _integer(text, 0)


def _seed(text: str) -> int:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {text!r}") from None


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default, and descriptions kept as written.

    The default is shown as ``(default: value)``, except where the help text says it itself (an option whose
    default is None says what leaving it out means), for flags (off unless given) and required options; a
    repeatable option shows ``(default: none)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if "default" in text or action.required or default is None or default is False:
            return text
        if isinstance(default, list) and not default:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``otcfm train: error: ...``) and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _OldSpelling(argparse.Action):
    """Stores the value; given under its old spelling (``--train-steps``), also says that the new one is ``--steps``."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if option == "--train-steps":
            print(f"{parser.prog}: note: --train-steps is now spelled --steps, as in otcfm train", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_common(parser: argparse.ArgumentParser, steps_default: int, old_spelling: bool = False) -> None:
    """Options every training command shares (the engine's: optimisation, device, output, evaluation);
    ``old_spelling``: ``--steps`` is also accepted as ``--train-steps`` (reflow and distill)."""
    flags = ("--steps", "--train-steps") if old_spelling else ("--steps",)
    parser.add_argument(
        *flags,
        dest="steps",
        type=_positive_int,
        default=steps_default,
        help="training steps (total)",
        action=_OldSpelling,
    )
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="samples per batch and side")
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (peak rate of cosine)")
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=list(LR_SCHEDULES),
        help="cosine: decay the rate from --lr to 0 over the steps",
    )
    parser.add_argument("--ema-decay", type=_decay, default=0.0, help="EMA of the weights, in [0, 1); 0: none")
    parser.add_argument(
        "--grad-clip",
        type=_positive_float,
        default=None,
        help="clip the gradient norm at this value (default: no clipping)",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast forward")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of every draw and of the initial weights")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT (train: options not given take the run's own settings)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    parser.add_argument(
        "--warmup-steps", type=_count, default=0, help="linear learning-rate warm-up over the first steps (0: none)"
    )
    parser.add_argument(
        "--eval-n",
        type=_positive_int,
        default=2000,
        help="samples per draw in the W2 table (image data: at most the held-out rows)",
    )
    parser.add_argument("--eval-draws", type=_positive_int, default=3, help="draws averaged in the W2 table")
    parser.add_argument(
        "--eval-guidance",
        type=float,
        default=2.0,
        help="guidance weight whose accuracy the table of a class-conditional image run reports (beside 0 and 1)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="mlp, unet (the built-in UNet, for images (C, H, W)), or 'package.module:factory' building the model "
        "(default: mlp); resume, reflow and distill reuse the checkpoint's factory when it is an nn.Module class "
        "or a function annotated to return one",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line; ``train_defaults`` replaces defaults of ``otcfm train`` (see :func:`_given`)."""
    parser = _Parser(
        prog="otcfm", description="Flow matching with minibatch OT couplings and Reflow.", formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"otcfm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(commands, train_defaults)
    _add_pair_commands(commands)
    _add_sample(commands)
    return parser


def _add_train(commands: Any, train_defaults: dict[str, Any] | None) -> None:
    """``otcfm train`` and its options."""
    defaults = TrainConfig()
    names = ", ".join(sorted(DATASETS))

    tr = commands.add_parser(
        "train",
        help="train a flow; save checkpoint, PNG and the W2 table",
        formatter_class=_Formatter,
        description="Train a flow from SOURCE to TARGET (a dataset name or a .npy/.pt file of shape (N, ...)), "
        "save OUT/checkpoint.pt, OUT/samples.png and OUT/w2.json, and print W2 against the number of Euler steps.",
    )
    tr.add_argument(
        "--source",
        default=defaults.source,
        help=f"x0: {names}, a .npy/.pt file, or auto (8gaussians for the built-in 2-D "
        "datasets, else a standard Gaussian of the target's shape)",
    )
    tr.add_argument("--target", default=defaults.target, help=f"x1: {names}, or a .npy/.pt file")
    tr.add_argument(
        "--dim",
        type=_positive_int,
        default=None,
        help="dimension of gaussian / mixture data (default: the dataset's own)",
    )
    tr.add_argument("--coupler", default=defaults.coupler, choices=sorted(COUPLERS), help="who is paired with whom")
    tr.add_argument(
        "--coupler-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a coupler option, repeatable: epsilon=0.01, max_iter=5000, solver=lsa, replace=true",
    )
    tr.add_argument("--path", default=defaults.path, choices=sorted(PATHS), help="probability path")
    tr.add_argument(
        "--sigma", type=float, default=defaults.sigma, help="the path's noise parameter (default: the path's own)"
    )
    tr.add_argument(
        "--path-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a path option, repeatable: beta_max=20",
    )
    tr.add_argument(
        "--time-sampler", default=defaults.time_sampler, choices=sorted(TIME_SAMPLERS), help="distribution of t"
    )
    tr.add_argument(
        "--time-sampler-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a time-sampler option, repeatable: std=0.5, a=2",
    )
    _add_train_model(tr, defaults)
    if train_defaults:
        tr.set_defaults(**train_defaults)  # after every add_argument: those with a default keep theirs otherwise


def _add_train_model(tr: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """``otcfm train``'s model, objective, labels, scale-out and output options (and the shared ones)."""
    tr.add_argument(
        "--model-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option, repeatable: preset=cifar10, base_channels=64 for --model unet; a keyword of a "
        "--model factory",
    )
    tr.add_argument(
        "--objective",
        default=defaults.objective,
        choices=list(OBJECTIVES),
        help="meanflow: a flow map u(z, r, t) sampled in one step (otcfm sample --steps 1)",
    )
    tr.add_argument(
        "--objective-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an objective option, repeatable: flow_map_fraction=0.25, adaptive_p=1",
    )
    tr.add_argument(
        "--conditional",
        default="auto",
        choices=["auto", "on", "off"],
        help="train a class-conditional model(x, t, y) on the target's labels (auto: with --model unet on labelled "
        "data such as digits or mnist)",
    )
    tr.add_argument(
        "--label-dropout",
        type=float,
        default=None,
        help="fraction of labels replaced by 'no class' for classifier-free guidance (default: 0.1 when conditional)",
    )
    tr.add_argument("--hidden", type=_positive_int, default=defaults.hidden, help="MLP width")
    tr.add_argument("--depth", type=_positive_int, default=defaults.depth, help="MLP hidden layers")
    tr.add_argument(
        "--global-coupling",
        action="store_true",
        help="under torchrun: couple the batches of all ranks as one OT problem (off: each rank its own)",
    )
    tr.add_argument(
        "--pool-size",
        type=_positive_int,
        default=None,
        help="couple this many samples per side at once (a multiple of --batch-size) and train on the pool for "
        "pool-size / batch-size steps, each pair once (default: each batch coupled alone)",
    )
    tr.add_argument("--out", default="runs/train", help="output directory")
    _add_common(tr, defaults.steps)


def _add_pair_commands(commands: Any) -> None:
    """``otcfm reflow`` and ``otcfm distill``, which generate pairs with a teacher and train on them."""
    for name, helptext in (
        ("reflow", "generate pairs with a trained run, train the 2-rectified flow on them"),
        ("distill", "generate pairs with a trained run, distill a one-step generator"),
    ):
        rf = commands.add_parser(name, help=helptext, description=helptext, formatter_class=_Formatter)
        rf.add_argument("--teacher", required=True, help="run directory or checkpoint.pt of the teacher")
        rf.add_argument("--pairs", type=_positive_int, default=20_000, help="number of (noise, sample) pairs")
        rf.add_argument("--out", required=True, help="output directory (pairs in OUT/pairs, resumable)")
        rf.add_argument("--solver-steps", type=_positive_int, default=100, help="teacher ODE steps per pair")
        rf.add_argument("--method", default="rk4", choices=METHODS, help="teacher ODE solver")
        rf.add_argument(
            "--guidance",
            type=float,
            default=1.0,
            help="a class-conditional teacher's guidance weight for the pairs (each pair of a uniformly drawn class; "
            "the student is conditional too)",
        )
        _add_common(rf, 2000, old_spelling=True)
        if name == "reflow":
            rf.add_argument(
                "--time-sampler", default="uniform", choices=sorted(TIME_SAMPLERS), help="distribution of t"
            )
        else:
            rf.add_argument("--loss", default="l2", choices=["l2", "pseudo_huber"], help="distillation loss")


def _add_sample(commands: Any) -> None:
    """``otcfm sample``."""
    sa = commands.add_parser(
        "sample",
        help="sample from a checkpoint",
        description="Draw --n samples from a trained run (train, reflow or distill) by solving its flow from the "
        "run's source; with --class, samples of one class of a class-conditional run, guided by --guidance.",
        formatter_class=_Formatter,
    )
    sa.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run directory")
    sa.add_argument("--n", type=_positive_int, default=2000, help="number of samples")
    sa.add_argument("--steps", type=_positive_int, default=100, help="solver steps")
    sa.add_argument("--method", default="euler", choices=METHODS, help="ODE solver")
    sa.add_argument("--seed", type=_seed, default=0, help="seed of the source draw")
    sa.add_argument(
        "--model",
        default=None,
        help="'package.module:factory' building the checkpoint's model (default: the checkpoint's own: mlp, unet, or "
        "a recorded factory that is an nn.Module class or annotated to return one)",
    )
    sa.add_argument(
        "--out",
        required=True,
        help="output file of the (n, ...) samples: .npy for numpy (np.load), else torch (torch.load)",
    )
    sa.add_argument(
        "--class",
        dest="label",
        type=_count,
        default=None,
        help="sample this class from a class-conditional run (default: unconditional samples)",
    )
    sa.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance weight with --class: 1 plain conditional, 0 unconditional, >1 stronger",
    )
    sa.add_argument(
        "--png",
        help="also save a PNG: a grid of the samples for image data, else trajectories and samples (default: none)",
    )


def _table_name(evaluation: dict[str, Any]) -> str:
    """``w2.json`` for the W2 table, ``fd.json`` for the table of image data."""
    return "w2.json" if evaluation.get("metric") == "w2" else "fd.json"


def _check_out(out: str, resume: bool, overwrite: bool) -> Path:
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


class _Unset(list):
    """The default :func:`_given` gives every option: a list, so that ``append`` options can copy it."""


def _given(argv: list[str], args: argparse.Namespace) -> set[str]:
    """The options of ``otcfm train`` that ``argv`` sets, by destination name (``coupler_option``, ``steps``)."""
    unset = _Unset()
    again = _parser({name: unset for name in vars(args) if name != "command"}).parse_args(argv)
    return {name for name, value in vars(again).items() if value is not unset}


#: TrainConfig fields set by options of another name.
_FIELD_OPTIONS = {
    "coupler_options": "coupler_option",
    "path_options": "path_option",
    "time_sampler_options": "time_sampler_option",
    "model_options": "model_option",
    "objective_options": "objective_option",
}
#: Settings a resumed run takes from its checkpoint by their own rules, below: the model (a recorded factory only
#: through :func:`_recorded_factory`) with its options, and the data's options, which follow the data and ``--dim``.
_NOT_FROM_CHECKPOINT = ("model", "model_options", "source_options", "target_options")


def _with_run_settings(config: TrainConfig, out: Path, given: set[str], dim: int | None) -> TrainConfig:
    """On ``--resume``: every setting the command line does not give takes the value the run in ``out``
    recorded, so ``otcfm train --out DIR --resume`` continues DIR as it was started (``--steps`` extends it);
    a recorded model factory is reused when :func:`_recorded_factory` accepts it (its ``--model-option`` values
    are the run's unless given).
    The options of the source and target are ``--dim`` where it is given (for the gaussian / mixture data among
    them), else the recorded ones of the recorded data. Without a run in ``out`` yet, the options given start one
    (a job that is restarted with the same command line), and a notice says so."""
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        if distributed.world()[0] == 0:
            print(
                f"otcfm train: --resume: no run in {out} yet (no {CHECKPOINT_NAME}); starting one with the "
                "options given",
                file=sys.stderr,
            )
        return config
    saved = ckpt.load(path).get("config")
    if not isinstance(saved, dict):
        return config
    recorded_model = saved.get("model", "mlp")
    if "model" not in given and str(recorded_model).startswith("object:"):
        raise ValueError(
            f"--resume: the run in {out} was made in Python with a model object ({recorded_model[7:]}); resume it "
            "there: otcfm.train(model=..., out=..., resume=True)"
        )
    if "model" not in given and recorded_model not in BUILT_IN_MODELS:
        config = dataclasses.replace(config, model=_recorded_factory(recorded_model, f"the run in {out}", "--resume"))
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


def _train(args: argparse.Namespace) -> int:
    if args.pool_size is not None and (args.pool_size < args.batch_size or args.pool_size % args.batch_size):
        raise ValueError(f"--pool-size: expected a multiple of --batch-size {args.batch_size}, got {args.pool_size}")
    mlp_only = sorted(name for name in ("hidden", "depth") if name in args.given)
    if args.model not in (None, "mlp") and mlp_only:
        raise ValueError(f"--{mlp_only[0]}: sets the built-in MLP; --model {args.model} builds the model")
    config = _config(args)
    out = _check_out(args.out, args.resume, args.overwrite)
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
        f"checkpoint: {out / CHECKPOINT_NAME}"
    )
    evaluation = report.evaluate(
        result.sampling_model.cpu(), result.config, args.eval_n, args.eval_draws, out, guidance=args.eval_guidance
    )
    evaluation["train_seconds"] = seconds
    (out / _table_name(evaluation)).write_text(json.dumps(evaluation, indent=2))
    report.print_table(evaluation, result.config)
    print(f"figure: {evaluation['png']}")
    return 0


def _recorded_factory(spec: str, where: str, argument: str) -> str:
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


def _load(checkpoint: str, factory: str | None, argument: str) -> tuple[torch.nn.Module, TrainConfig, DataSource, str]:
    """A checkpoint's model, config, source and stage (``""`` for ``otcfm train``'s runs, ``"reflow"``,
    ``"distill"``); a model built by a factory is rebuilt by the recorded factory (:func:`_recorded_factory`)
    unless ``--model`` is given, which is then the one used (its weights must fit)."""
    path = Path(checkpoint)
    state = ckpt.load(path / CHECKPOINT_NAME if path.is_dir() else path, argument)
    saved = state.get("config") if isinstance(state, dict) else None
    model = None
    if isinstance(saved, dict) and str(saved.get("model", "mlp")).startswith("object:") and factory is None:
        raise ValueError(
            f"{argument}: the model of {checkpoint!r} was a model object made in Python ({saved['model'][7:]}); "
            "pass --model with a 'package.module:factory' that builds it"
        )
    if isinstance(saved, dict) and saved.get("model", "mlp") not in BUILT_IN_MODELS and factory is None:
        factory = _recorded_factory(saved["model"], repr(checkpoint), argument)
    if isinstance(saved, dict) and factory is not None and factory not in BUILT_IN_MODELS:
        options = saved.get("model_options", {}) if saved.get("model") == factory else {}
        try:
            model = build_model(TrainConfig(model=factory, model_options=options, seed=saved.get("seed", 0)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"--model {factory}: {error}") from error
    try:
        model, config = load_model(path, model=model)
    except ValueError as error:
        if factory is None or "do not fit the model" not in str(error):
            raise
        raise ValueError(f"--model {factory}: {error}") from error
    if config is None:
        raise ValueError(f"{argument}: {checkpoint!r} records no training config (source and target unknown)")
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    stage = run.get("stage", "") if run.get("stage") in ("reflow", "distill") else ""
    return model, config, _recorded_source(config, run, argument), stage


def _nameable(spec: str) -> bool:
    """Whether a recorded source or target can be drawn from again: a dataset name, a file or a folder of images."""
    return spec in DATASETS or spec.endswith(FILE_SUFFIXES) or (os.path.isabs(spec) and Path(spec).is_dir())


def _recorded_source(config: TrainConfig, run: dict[str, Any], argument: str) -> DataSource:
    """The source of a run, also of one whose target was an object given in Python (a tensor, a sampler): a
    Gaussian source takes the sample shape its recorded fingerprint holds (``gaussian:{}:shape=(1, 28, 28)``)."""
    if _nameable(config.target):
        return report.data_of(config)[0]
    if not _nameable(config.source):
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


def _sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for name, value in (("--out", out), ("--png", Path(args.png) if args.png else None)):
        if value is not None and (value.is_dir() or (value.parent.exists() and not value.parent.is_dir())):
            raise ValueError(f"{name}: cannot write a file at {str(value)!r}")
    model, config, source, _ = _load(args.checkpoint, args.model, "--checkpoint")
    images = is_image_shape(source.shape)
    if args.png and not images and not _nameable(config.target):
        raise ValueError(
            f"--png: the run's target, {config.target}, was given in Python; there is no reference to draw beside "
            "the samples (leave --png out, or plot them with otcfm.plotting.plot_flow)"
        )
    if args.label is not None and not config.conditional:
        raise ValueError(f"--class: the run in {args.checkpoint} is not class-conditional (trained without labels)")
    if args.guidance != 1.0 and args.label is None:
        raise ValueError("--guidance: needs --class (guidance steers towards a class)")
    x0 = source(args.n, torch.Generator().manual_seed(args.seed))
    solution = solve(model, x0, args.steps, args.method, return_trajectory=True, y=args.label, guidance=args.guidance)
    trajectory = solution.trajectory
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":  # what the name promises: a numpy file (np.load), as train reads one
        np.save(out, trajectory[-1].numpy())
    else:
        torch.save(trajectory[-1], out)
    unit = "output time" if args.method == "dopri5" else "step"  # dopri5 picks its own steps
    steps = f"{args.steps} {unit}{'s' if args.steps != 1 else ''}"
    print(f"saved {args.n} samples ({args.method}, {steps}, {solution.nfe} network evaluations) to {out}")
    if args.png and images:
        from otcfm.plotting import plot_image_grid

        which = f"class {args.label}, guidance {args.guidance:g}, " if args.label is not None else ""
        title = f"{config.target}: {which}{args.method}, {steps}"
        print(f"figure: {plot_image_grid(trajectory[-1][:128], args.png, title=title)}")
    elif args.png:
        from otcfm.plotting import plot_flow

        reference = report.data_of(config)[1](args.n, torch.Generator().manual_seed(args.seed + 1))
        print(f"figure: {plot_flow(trajectory, reference, args.png)}")
    return 0


def _reflow(args: argparse.Namespace) -> int:
    """``otcfm reflow`` and ``otcfm distill``: pairs from the teacher, then the student's training."""
    teacher, config, source, teacher_stage = _load(args.teacher, args.model, "--teacher")
    if not _nameable(config.target):  # the W2 table draws reference samples from the teacher's target
        raise ValueError(
            f"--teacher: its target, {config.target}, was given in Python, and otcfm {args.command} evaluates "
            f"against it; run it in Python: otcfm.reflow.rectify(teacher, source) or generate_pairs + "
            f"{'train_on_pairs' if args.command == 'reflow' else 'distill'}"
        )
    classes = report.classes_of(teacher, config, report.data_of(config)[1]) if config.conditional else None
    if classes is None and args.guidance != 1.0:
        raise ValueError("--guidance: the teacher is not class-conditional (trained without labels)")
    out = _check_out(args.out, args.resume, args.overwrite)  # after the checks above: no folder left by them
    started = time.perf_counter()
    pairs = reflow.generate_pairs(
        teacher,
        source,
        args.pairs,
        args.solver_steps,
        args.method,
        out / "pairs",
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        classes=classes,
        guidance=args.guidance,
    )
    student = copy.deepcopy(teacher)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(reflow.RunOptions) if hasattr(args, f.name)}
    run = reflow.RunOptions(**{**given, "out": out, "record": {"config": dataclasses.asdict(config)}})
    common = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "progress": not args.no_progress,
        "run": run,
    }
    checkpoint = out / CHECKPOINT_NAME
    start = int(ckpt.load(checkpoint).get("step", 0)) if args.resume and checkpoint.is_file() else 0
    if args.command == "reflow":
        reflow.train_on_pairs(pairs, student, time_sampler=args.time_sampler, **common)
    else:
        reflow.distill(student, pairs, loss=args.loss, **common)
    seconds = time.perf_counter() - started
    if distributed.world()[0] > 0:
        return 0  # rank 0 evaluates and reports
    student = student.cpu()
    resumed = f" (resumed at step {start})" if start else ""
    print(
        f"{args.command}: {args.pairs} pairs and {args.steps - start} steps{resumed} in {seconds:.1f} s "
        f"({args.steps} in all); checkpoint: {checkpoint}"
    )
    plot_steps = 1 if args.command == "distill" else 100  # a one-step model is drawn as what it is
    evaluation = report.evaluate(
        student,
        config,
        args.eval_n,
        args.eval_draws,
        out,
        args.command,
        plot_steps,
        guidance=args.eval_guidance,
        teacher=teacher_stage,
    )
    evaluation["seconds"] = seconds
    (out / _table_name(evaluation)).write_text(json.dumps(evaluation, indent=2))
    report.print_table(evaluation, config)
    print(f"figure: {evaluation['png']}")
    return 0


#: Errors that mean "the user asked for something that cannot be done": one line, exit code 2. Anything else is
#: a bug in otcfm or a dependency and keeps its traceback, which a bug report needs.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 user error, 130 interrupted)."""
    args = _parser().parse_args(argv)
    if args.command == "train":
        args.given = _given(sys.argv[1:] if argv is None else argv, args)
    commands = {"train": _train, "sample": _sample, "reflow": _reflow, "distill": _reflow}
    launched = distributed.init_from_env()  # under torchrun: one process group for the whole command
    code = None
    earlier = _stamp(Path(args.out)) if args.command == "sample" else None  # a file --out held before, if any
    fresh_out = args.command != "sample" and not os.path.lexists(args.out)  # a run folder this command would make
    try:
        code = commands[args.command](args)
        return code
    except BrokenPipeError:  # `otcfm train ... | head`: the reader left; what was finished is saved
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # as a shell reports a command that SIGPIPE stopped: the command did not run to its end
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting gives no traceback
        if args.command == "sample":
            fresh = _stamp(Path(args.out)) not in (None, earlier)
            written = "samples written to --out, no figure" if fresh else "no samples written"
            print(f"otcfm: interrupted; {written}", file=sys.stderr)
        elif _saved_work(Path(args.out)):
            print(
                "otcfm: interrupted; finished work (steps, pairs, a semidiscrete fit) is saved in --out, rerun the "
                "command with --resume to continue",
                file=sys.stderr,
            )
        else:
            print(f"otcfm: interrupted before anything was saved in {args.out}; nothing to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if fresh_out:
            _remove_if_empty(Path(args.out))  # a failed start leaves no folder behind
        message = _in_flags(" ".join(str(error).split()) or type(error).__name__, args)
        print(f"otcfm: error: {message}", file=sys.stderr)
        return 2
    finally:
        if launched:  # ranks that finished wait for each other (rank 0 evaluates after the others return)
            distributed.shutdown(wait_for_all=code is not None)


#: Names in the library's messages that the command line sets with an option of another name, by command.
_RENAMED = {
    "train": {
        "coupler_options": "--coupler-option",
        "path_options": "--path-option",
        "time_sampler_options": "--time-sampler-option",
        "model_options": "--model-option",
        "objective_options": "--objective-option",
        "source_options": "--dim",
        "target_options": "--dim",
    },
    "reflow": {"n": "--pairs"},
    "distill": {"n": "--pairs"},
}
#: Names that stay as they are: the network (``model: returned NaN``), not the ``--model`` option; the pair data
#: (``pairs: x1 contains NaN``), not the ``--pairs`` count that argparse checks.
_KEPT = ("model", "pairs", "command", "given")


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with the names it starts with (``ema_decay: ...``, ``resume and overwrite: ...``) written as
    the options of ``args.command`` that set them (``--ema-decay``), so an error names what the user typed."""
    head, sep, rest = message.partition(": ")
    words = head.split(" ")
    if not sep or not words[0]:
        return message
    flags = {name: "--" + name.replace("_", "-") for name in vars(args) if name not in _KEPT}
    flags.update(_RENAMED.get(args.command, {}))
    if not all(word in flags or word == "and" for word in words) or words[0] == "and":
        return message
    return " ".join(flags.get(word, word) for word in words) + sep + rest


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder``, made by this command, if it holds nothing but the command's own released run lock."""
    from otcfm.runlock import LOCK_NAME

    try:
        if {entry.name for entry in folder.iterdir()} <= {LOCK_NAME}:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()  # refuses a folder that holds anything
    except OSError:
        pass


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime in ns)`` of a file, None where there is none: tells whether a command wrote it."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None


def _saved_work(out: Path) -> bool:
    """Whether ``out`` holds finished work a ``--resume`` continues: a checkpoint, a semidiscrete fit, pairs."""
    saved = (out / CHECKPOINT_NAME, out / SEMIDISCRETE_FIT_NAME)
    return any(path.is_file() for path in saved) or any((out / "pairs").glob("chunk-*.pt"))


def run() -> None:
    """The console entry point: ``sys.exit(main())``, but after Ctrl-C the process ends with ``os._exit(130)``.

    CPython ends a process by re-raising SIGINT on itself (exit status -2, no exit code) when a KeyboardInterrupt
    passed through code it ran as an embedded string, even though :func:`main` handled the interrupt and saved the
    run; leaving through ``os._exit`` after flushing keeps the documented exit code 130.
    """
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done and saved: nothing is left to interrupt
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
