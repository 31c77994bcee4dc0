r"""Frechet distance between feature distributions, and the digits classifier whose features it uses.

.. math::
    \mathrm{FD}(a, b) = \|\mu_a - \mu_b\|^2 + \mathrm{Tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a^{1/2} \Sigma_b
    \Sigma_a^{1/2})^{1/2}\big)

(the W2 distance between Gaussians fitted to the two feature sets; FID uses Inception features). For the
scikit-learn digits, :func:`digits_features` trains a small classifier once on the train split
(deterministically) and caches its weights under the user cache directory; its penultimate layer gives the
features, so no download is needed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from otcfm import checkpoint
from otcfm._checks import check_batch

__all__ = ["DigitsFeatures", "cache_dir", "digits_features", "frechet_distance"]


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features ``a: (N, k)`` and ``b: (M, k)`` (float64).

    Needs at least 2 rows on each side; with fewer rows than features the covariances are singular, which the
    formula handles, but the estimate is then strongly biased: compare figures only at equal sizes.
    """
    a, b = check_batch(a, "a"), check_batch(b, "b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a and b: expected (N, k) features with N >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b: expected one dtype, got {a.dtype} and {b.dtype}")
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return max(float(value), 0.0)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def cache_dir() -> Path:
    """``$OTCFM_CACHE``, else ``$XDG_CACHE_HOME/otcfm``, else ``~/.cache/otcfm``."""
    if os.environ.get("OTCFM_CACHE"):
        return Path(os.environ["OTCFM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "otcfm"


class _Classifier(nn.Module):
    def __init__(self, width: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass
class DigitsFeatures:
    """A classifier of the digits and the features of its penultimate layer.

    Attributes:
        model: the classifier (eval mode), ``model(x: (N, 1, 8, 8)) -> (N, 10)`` logits.
        accuracy: its accuracy on the held-out test split.
    """

    model: nn.Module
    accuracy: float

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Features ``(N, 64)`` of images ``x: (N, 1, 8, 8)`` (or ``(N, 64)``) in ``[-1, 1]``."""
        return self.model.body(x.reshape(x.shape[0], 64).to(torch.float32).cpu())

    def frechet_distance(self, x: Tensor, y: Tensor) -> float:
        """Frechet distance between the features of two image sets."""
        return frechet_distance(self(x), self(y))


_SETTINGS = {"width": 128, "features": 64, "epochs": 60, "batch": 64, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0}


def digits_features(cache: str | Path | None = None, retrain: bool = False) -> DigitsFeatures:
    """The digits classifier: trained once (about 5 s on a CPU core) and cached, then loaded.

    The cache file name carries a hash of the training settings, so changed settings train a new one.
    Training is deterministic (seeded, on the CPU).

    Args:
        cache: directory of the cached weights; :func:`cache_dir` when None.
        retrain: ignore a cached file.

    Returns:
        :class:`DigitsFeatures` with the test-split accuracy.
    """
    from otcfm.data.digits import load_digits

    key = hashlib.sha256(repr(sorted(_SETTINGS.items())).encode()).hexdigest()[:12]
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"digits-classifier-{key}.pt"
    model = _Classifier(_SETTINGS["width"], _SETTINGS["features"])
    if path.is_file() and not retrain:
        model.load_state_dict(checkpoint.load(path))
    else:
        model = _train_classifier(model, *load_digits("train"))
        checkpoint.atomic_save(model.state_dict(), path)
    model.eval()
    images, labels = load_digits("test")
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    return DigitsFeatures(model, accuracy)


def _train_classifier(model: nn.Module, images: Tensor, labels: Tensor) -> nn.Module:
    g = torch.Generator().manual_seed(_SETTINGS["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SETTINGS["seed"])
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_SETTINGS["lr"], weight_decay=_SETTINGS["weight_decay"])
    model.train()
    for _ in range(_SETTINGS["epochs"]):
        order = torch.randperm(images.shape[0], generator=g)
        for start in range(0, images.shape[0], _SETTINGS["batch"]):
            k = order[start : start + _SETTINGS["batch"]]
            loss = nn.functional.cross_entropy(model(images[k]), labels[k])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model
