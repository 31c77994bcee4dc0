"""The options of ``otcfm train``, ``reflow``, ``distill`` and ``sample``, on the subcommands of
:func:`otcfm.cli.parser.top_parser`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from otcfm._args import check_seed
from otcfm.cli.parser import top_parser
from otcfm.couplers import COUPLERS
from otcfm.data import DATASETS
from otcfm.engine import LR_SCHEDULES, PRECISIONS
from otcfm.paths import PATHS
from otcfm.solvers import METHODS
from otcfm.timesteps import TIME_SAMPLERS
from otcfm.training import OBJECTIVES, TrainConfig

__all__ = ["given", "parser"]


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


class _OldSpelling(argparse.Action):
    """Stores the value; given under its old spelling (``--train-steps``), also says that the new one is ``--steps``."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if option == "--train-steps":
            print(f"{parser.prog}: note: --train-steps is now spelled --steps, as in otcfm train", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_common(parser: argparse.ArgumentParser, old_spelling: bool = False) -> None:
    """Options every training command shares (the engine's: optimisation, device, output, evaluation), with the
    defaults of :class:`otcfm.TrainConfig`; ``old_spelling``: ``--steps`` is also accepted as ``--train-steps``
    (reflow and distill)."""
    defaults = TrainConfig()
    flags = ("--steps", "--train-steps") if old_spelling else ("--steps",)
    parser.add_argument(
        *flags,
        dest="steps",
        type=_positive_int,
        default=defaults.steps,
        help="training steps (total)",
        action=_OldSpelling,
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="samples per batch and side"
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=defaults.lr, help="Adam learning rate (peak rate of cosine)"
    )
    parser.add_argument(
        "--lr-schedule",
        default=defaults.lr_schedule,
        choices=list(LR_SCHEDULES),
        help="cosine: decay the rate from --lr to 0 over the steps",
    )
    parser.add_argument(
        "--ema-decay", type=_decay, default=defaults.ema_decay, help="EMA of the weights, in [0, 1); 0: none"
    )
    parser.add_argument(
        "--grad-clip",
        type=_positive_float,
        default=defaults.grad_clip,
        help="clip the gradient norm at this value (default: no clipping)",
    )
    parser.add_argument(
        "--precision", default=defaults.precision, choices=list(PRECISIONS), help="bf16: autocast forward"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument(
        "--seed", type=_seed, default=defaults.seed, help="seed of every draw and of the initial weights"
    )
    parser.add_argument(
        "--checkpoint-every", type=_positive_int, default=defaults.checkpoint_every, help="steps between checkpoints"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT (train: options not given take the run's own settings)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    parser.add_argument(
        "--warmup-steps",
        type=_count,
        default=defaults.warmup_steps,
        help="linear learning-rate warm-up over the first steps (0: none)",
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


def parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``train_defaults`` replaces defaults of ``otcfm train`` (see :func:`given`)."""
    top, commands = top_parser()
    _add_train(commands["train"], train_defaults)
    for name in ("reflow", "distill"):
        _add_pair_command(commands[name], name)
    _add_sample(commands["sample"])
    return top


def _add_key_values(parser: argparse.ArgumentParser, flag: str, helptext: str) -> None:
    """A repeatable ``flag KEY=VALUE`` option (``--coupler-option epsilon=0.01``), collected as a list of pairs."""
    parser.add_argument(flag, type=_key_value, action="append", default=[], metavar="KEY=VALUE", help=helptext)


def _add_train(tr: argparse.ArgumentParser, train_defaults: dict[str, Any] | None) -> None:
    """``otcfm train``'s options."""
    defaults = TrainConfig()
    names = ", ".join(sorted(DATASETS))
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
    _add_key_values(
        tr, "--coupler-option", "a coupler option, repeatable: epsilon=0.01, max_iter=5000, solver=lsa, replace=true"
    )
    tr.add_argument("--path", default=defaults.path, choices=sorted(PATHS), help="probability path")
    tr.add_argument(
        "--sigma", type=float, default=defaults.sigma, help="the path's noise parameter (default: the path's own)"
    )
    _add_key_values(tr, "--path-option", "a path option, repeatable: beta_max=20")
    tr.add_argument(
        "--time-sampler", default=defaults.time_sampler, choices=sorted(TIME_SAMPLERS), help="distribution of t"
    )
    _add_key_values(tr, "--time-sampler-option", "a time-sampler option, repeatable: std=0.5, a=2")
    _add_train_model(tr, defaults)
    if train_defaults:
        tr.set_defaults(**train_defaults)  # after every add_argument: those with a default keep theirs otherwise


def _add_train_model(tr: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """``otcfm train``'s model, objective, labels, scale-out and output options (and the shared ones)."""
    _add_key_values(
        tr,
        "--model-option",
        "a model option, repeatable: preset=cifar10, base_channels=64 for --model unet; a keyword of a --model factory",
    )
    tr.add_argument(
        "--objective",
        default=defaults.objective,
        choices=list(OBJECTIVES),
        help="meanflow: a flow map u(z, r, t) sampled in one step (otcfm sample --steps 1)",
    )
    _add_key_values(tr, "--objective-option", "an objective option, repeatable: flow_map_fraction=0.25, adaptive_p=1")
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
    _add_common(tr)


def _add_pair_command(rf: argparse.ArgumentParser, name: str) -> None:
    """The options of ``otcfm reflow`` or ``otcfm distill`` (``name``), which generate pairs with a teacher and
    train on them."""
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
    _add_common(rf, old_spelling=True)
    if name == "reflow":
        rf.add_argument("--time-sampler", default="uniform", choices=sorted(TIME_SAMPLERS), help="distribution of t")
    else:
        rf.add_argument("--loss", default="l2", choices=["l2", "pseudo_huber"], help="distillation loss")


def _add_sample(sa: argparse.ArgumentParser) -> None:
    """``otcfm sample``'s options."""
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


class _Unset(list):
    """The default :func:`given` gives every option: a list, so that ``append`` options can copy it."""


def given(argv: list[str], args: argparse.Namespace) -> set[str]:
    """The options of ``otcfm train`` that ``argv`` sets, by destination name (``coupler_option``, ``steps``)."""
    unset = _Unset()
    again = parser({name: unset for name in vars(args) if name != "command"}).parse_args(argv)
    return {name for name, value in vars(again).items() if value is not unset}
