"""The ``otcfm`` command's top level: its subcommands and their one-line help, built without importing torch (so
``otcfm --help`` answers at once); :mod:`otcfm.cli.options` adds each subcommand's options."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from otcfm import __version__

__all__ = ["COMMANDS", "Formatter", "Parser", "top_parser"]

#: The subcommands: ``name -> (one-line help, description)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "train a flow; save checkpoint, PNG and the W2 table",
        "Train a flow from SOURCE to TARGET (a dataset name or a .npy/.pt file of shape (N, ...)), save "
        "OUT/checkpoint.pt, OUT/samples.png and OUT/w2.json, and print W2 against the number of Euler steps.",
    ),
    "reflow": (
        "generate pairs with a trained run, train the 2-rectified flow on them",
        "generate pairs with a trained run, train the 2-rectified flow on them",
    ),
    "distill": (
        "generate pairs with a trained run, distill a one-step generator",
        "generate pairs with a trained run, distill a one-step generator",
    ),
    "sample": (
        "sample from a checkpoint",
        "Draw --n samples from a trained run (train, reflow or distill) by solving its flow from the run's source; "
        "with --class, samples of one class of a class-conditional run, guided by --guidance.",
    ),
}


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``otcfm train: error: ...``) and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def top_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``otcfm`` parser with its subcommands, and each subcommand's parser by name (still without options)."""
    parser = Parser(
        prog="otcfm", description="Flow matching with minibatch OT couplings and Reflow.", formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"otcfm {__version__}")
    commands: Any = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {
        name: commands.add_parser(name, help=helptext, description=description, formatter_class=Formatter)
        for name, (helptext, description) in COMMANDS.items()
    }
    return parser, subparsers
