"""Shared fixtures. Hypothesis runs derandomized, so every run draws the same examples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

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
