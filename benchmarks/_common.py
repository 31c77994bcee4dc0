"""Helpers shared by the benchmark scripts: timing, tables, figures, and -- only when a script is run with
``--docs`` -- writing its section of docs/benchmarks.md and its figures into docs/figures/."""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pyplot():  # noqa: ANN201
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out, write and close a matplotlib figure; returns ``path``.

    A figure without a layout engine of its own gets ``tight_layout``; the image is then cropped to everything
    drawn (``bbox_inches="tight"``), so a suptitle, legends outside the axes and the bottom tick labels are never
    cut off.
    """
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where a benchmark ran."""
    return (
        f"{date.today().isoformat()}, {_count(torch.get_num_threads(), 'torch thread')} on a {platform.machine()} CPU "
        f"({platform.processor() or 'unknown model'}), torch {torch.__version__}, Python {platform.python_version()}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none when it is missing); a last line cut short by an
    interruption is skipped, so a benchmark resumes from the rows it finished."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def add_docs_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--docs [PATH]``: write the benchmark's section into the Markdown file PATH (``docs/benchmarks.md``
    when no PATH is given) and its figures into ``figures/`` beside it.

    Without ``--docs`` a benchmark only prints and writes under its own output directory; nothing under docs/ is
    touched. After parsing, ``args.docs`` is the Markdown file to write (a ``Path``) when ``--docs`` was given,
    and ``None`` otherwise: ask ``args.docs is not None``. ``--no-write``, the opt-out of old command lines, is
    still accepted; it is now the default, sets ``args.docs`` to ``None`` and cannot be combined with ``--docs``.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--docs",
        nargs="?",
        type=Path,
        const=DOCS,
        default=None,
        metavar="PATH",
        help="also write this benchmark's section into the Markdown file PATH (docs/benchmarks.md when PATH is "
        "left out) and its figures into figures/ beside PATH; without it the benchmark only prints and writes under "
        "its own output directory (--out, where it has one)",
    )
    group.add_argument(
        "--no-write",
        dest="docs",
        action="store_const",
        const=None,
        default=argparse.SUPPRESS,  # so that argparse sees it given, and refuses it beside --docs
        help="do not touch the docs: the default now, accepted for old command lines",
    )


def rerun_command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reruns a benchmark with the same settings, for the "Command:" line of its section.

    ``python benchmarks/<script's file name>`` followed by the arguments it was given (``sys.argv[1:]`` when
    ``argv`` is None), shell-quoted, without ``--docs [PATH]``, ``--no-write`` and ``--resume``: options that
    change where results go, not what is measured. docs/benchmarks.md says once that a section is written by
    its command run with ``--docs``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    kept, k = [], 0
    while k < len(args):
        arg = args[k]
        if arg == "--docs":
            k += 2 if k + 1 < len(args) and not args[k + 1].startswith("-") else 1
            continue
        if not (arg.startswith("--docs=") or arg in ("--no-write", "--resume")):
            kept.append(arg)
        k += 1
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *kept])


def publish_figure(png: Path, docs: Path) -> Path:
    """Copy a figure written under a benchmark's output directory to ``figures/<same name>`` beside the Markdown
    file ``docs`` (so docs/figures/ for docs/benchmarks.md); returns the copy's path."""
    target = docs.parent / "figures" / png.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, target)
    return target


def write_section(name: str, body: str, path: Path = DOCS) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``, or append it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> int:
    """Reset this process's peak resident set size (Linux, ``/proc/self/clear_refs``); return the current size.

    ``peak_memory() - reset_peak_memory()`` around a computation is the extra memory it needed at its peak, not
    hidden by an earlier, higher peak of the process (which ``ru_maxrss`` would keep).
    """
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_bytes("VmRSS")


def peak_memory() -> int:
    """Peak resident set size of this process since the last :func:`reset_peak_memory`, in bytes."""
    return _status_bytes("VmHWM")
