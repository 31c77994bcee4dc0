"""Every Python block of README.md and docs/getting-started.md runs as written, each on its own in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: in the full suite, out of the quick subset

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/getting-started.md")


def _blocks() -> list[tuple[str, str]]:
    found = []
    for name in DOCUMENTS:
        text = (ROOT / name).read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{name}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


def test_the_documents_have_python_blocks() -> None:
    assert {label.split(":")[0] for label, _ in BLOCKS} == set(DOCUMENTS)
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[label for label, _ in BLOCKS])
def test_block_runs_in_a_fresh_folder(code: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small models: as fast on one thread, and no oversubscription
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
