"""Shared fixtures. Hypothesis runs derandomized, so every run draws the same examples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import otcfm
import otcfm.couplers

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (pytest -n 2): one torch thread each, not two apiece
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and so the processes a test starts (CLI runs, torchrun, docs)

settings.register_profile("otcfm", deadline=None, derandomize=True, max_examples=40)
settings.load_profile("otcfm")


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the digits feature classifier, trained once per test session (about 8 s)."""
    from otcfm.metrics import digits_features

    if not os.environ.get("CI"):  # CI installs the 'digits' extra and must not skip
        pytest.importorskip("sklearn", reason="the digits need the 'digits' extra (scikit-learn)")
    directory = tmp_path_factory.mktemp("digits-cache")
    digits_features(cache=directory)
    return directory


def _ready_coupler(name: str, x1: torch.Tensor, y1: torch.Tensor | None = None, **options: object) -> object:
    """``get_coupler(name)``; a semidiscrete coupler is first fitted (briefly) on the dataset ``x1``."""
    coupler = otcfm.get_coupler(name, **options)
    if isinstance(coupler, otcfm.couplers.SemidiscreteCoupler):
        shape = tuple(x1.shape[1:])

        def source(n: int, g: torch.Generator | None) -> torch.Tensor:
            return torch.randn((n, *shape), generator=g, dtype=x1.dtype)

        coupler.fit(
            source,
            x1,
            steps=5,
            batch_size=32,
            y1=y1,
            eval_samples=8,
            progress=False,
            generator=torch.Generator().manual_seed(0),
        )
    return coupler


@pytest.fixture(scope="session")
def ready() -> object:
    """A function ``ready(name, x1, y1=None, **options)``: a coupler by name, fitted on ``x1`` if it needs a fit."""
    return _ready_coupler
