"""Helpers shared by the benchmark scripts: timing, tables, writing a section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
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
    """Lay out, write and close a matplotlib figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
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
        f"{date.today().isoformat()}, {torch.get_num_threads()} torch threads on a {platform.machine()} CPU "
        f"({platform.processor() or 'unknown model'}), torch {torch.__version__}, Python {platform.python_version()}"
    )


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
    """``--docs PATH`` (the Markdown file a benchmark writes its section into) and ``--no-write`` (print only)."""
    parser.add_argument("--docs", type=Path, default=DOCS, help="Markdown file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch the docs")


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
