"""Shared fixtures. Hypothesis runs derandomized, so every run draws the same examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

settings.register_profile("otcfm", deadline=None, derandomize=True, max_examples=40)
settings.load_profile("otcfm")


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)
