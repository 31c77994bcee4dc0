"""``otcfm``'s entry: parse, run the subcommand, and turn a user's error or an interrupt into a one-line message
and an exit code. Without a subcommand (``otcfm --help``, ``--version``) nothing heavy is imported."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from otcfm.cli.parser import COMMANDS, top_parser

__all__ = ["main", "run"]

#: Errors that mean "the user asked for something that cannot be done": one line, exit code 2. Anything else is
#: a bug in otcfm or a dependency and keeps its traceback, which a bug report needs.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not set(argv) & set(COMMANDS):  # the top level's help or version, or the error of a missing command
        top_parser()[0].parse_args(argv)  # exits, before anything imports torch
    from otcfm import distributed
    from otcfm.cli.options import given, parser
    from otcfm.cli.pairs import pairs_command
    from otcfm.cli.sample import sample_command
    from otcfm.cli.train import train_command
    from otcfm.rundir import file_stamp

    args = parser().parse_args(argv)
    if args.command == "train":
        args.given = given(argv, args)
    commands = {"train": train_command, "sample": sample_command, "reflow": pairs_command, "distill": pairs_command}
    launched = distributed.init_from_env()  # under torchrun: one process group for the whole command
    code = None
    earlier = file_stamp(Path(args.out)) if args.command == "sample" else None  # a file --out held before, if any
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
            fresh = file_stamp(Path(args.out)) not in (None, earlier)
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


def _saved_work(out: Path) -> bool:
    """Whether ``out`` holds finished work a ``--resume`` continues: a checkpoint, a semidiscrete fit, pairs."""
    from otcfm.rundir import CHECKPOINT_NAME
    from otcfm.training import SEMIDISCRETE_FIT_NAME

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
