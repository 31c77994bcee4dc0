"""The scikit-learn digits, the Frechet distance and the digits feature classifier.

Skipped without scikit-learn (the 'digits' extra), except in CI, which installs it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import otcfm
from otcfm.metrics import DigitsFeatures, digits_features, frechet_distance

if not os.environ.get("CI"):
    pytest.importorskip("sklearn", reason="the digits need the 'digits' extra (scikit-learn)")


@pytest.fixture
def features(digits_cache: Path) -> DigitsFeatures:
    return digits_features(cache=digits_cache)  # loads the session's cached classifier


def test_digits_splits_are_disjoint_scaled_and_fixed() -> None:
    train, train_labels = otcfm.data.load_digits("train")
    test, test_labels = otcfm.data.load_digits("test")
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    assert train.min() == -1.0 and train.max() == 1.0
    assert set(test_labels.tolist()) == set(range(10)) and len(train_labels) == 1437
    everything, _ = otcfm.data.load_digits("all")
    assert torch.equal(torch.cat([test, train]), everything)  # the split partitions the data set
    g = torch.Generator().manual_seed(0)
    drawn = otcfm.data.sample("digits", 5, g)
    assert drawn.shape == (5, 1, 8, 8)
    assert all(any(torch.equal(d, t) for t in train) for d in drawn)  # drawn from the train split


def test_frechet_distance_of_gaussians_matches_the_closed_form() -> None:
    """FD of two large Gaussian samples ~ ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2 (diagonal)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * 3.0 + 1.0
    exact = 3 * 1.0 + sum((s - 3.0) ** 2 for s in (1.0, 2.0, 0.5))
    assert math.isclose(frechet_distance(a, b), exact, rel_tol=0.01)
    assert frechet_distance(a, a) < 1e-9
    with pytest.raises(ValueError, match="a and b"):
        frechet_distance(a[:1], b[:1])


def test_classifier_is_accurate_cached_and_deterministic(features: DigitsFeatures, tmp_path: Path) -> None:
    assert features.accuracy >= 0.95
    test, _ = otcfm.data.load_digits("test")
    assert features(test).shape == (360, 64)
    again = digits_features(cache=tmp_path)  # trained anew in another directory: same weights
    for x, y in zip(features.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    train, _ = otcfm.data.load_digits("train")
    noise = torch.randn(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert features.frechet_distance(train, test) < 0.05 * features.frechet_distance(noise, test)
