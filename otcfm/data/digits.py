"""scikit-learn's handwritten digits (1797 images of 8x8 pixels, shipped with scikit-learn: no download).

Pixels (integers 0 to 16) are scaled to ``[-1, 1]`` by ``x / 8 - 1``. A fixed split (a permutation seeded with
0) holds out 360 images (20%) as the test split; the rest (1437) is the train split. scikit-learn is the
optional extra ``otcfm[digits]``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from otcfm._checks import check_choice

__all__ = ["TEST_SIZE", "digits", "load_digits"]

#: Images held out as the test split.
TEST_SIZE = 360


@lru_cache(maxsize=1)
def _all() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'otcfm[digits]'") from error
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 8.0 - 1.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    return images[order].unsqueeze(1), labels[order]


def load_digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """The images and labels of a split.

    Args:
        split: ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` and int64 ``(N,)``; copies.
    """
    check_choice(split, ("train", "test", "all"), "split")
    images, labels = _all()
    if split == "train":
        images, labels = images[TEST_SIZE:], labels[TEST_SIZE:]
    elif split == "test":
        images, labels = images[:TEST_SIZE], labels[:TEST_SIZE]
    return images.clone(), labels.clone()


def digits(n: int, generator: torch.Generator | None = None, split: str = "train") -> Tensor:
    """``n`` images drawn uniformly with replacement from a split: ``(n, 1, 8, 8)`` in ``[-1, 1]``."""
    images, _ = load_digits(split)
    return images[torch.randint(images.shape[0], (n,), generator=generator)]
