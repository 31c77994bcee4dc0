r"""Scores of generated images against held-out rows, by number of solver steps.

For each number of Euler steps ``k``: the Frechet distance (:func:`otcfm.metrics.frechet_distance`) between the
features of ``n`` samples and of the held-out images (:func:`otcfm.metrics.image_features`), and for a
class-conditional model the classifier's accuracy on samples of known labels, at each guidance weight ``w``
(:mod:`otcfm.guidance`; ``w = 0`` is the unconditional field, ``w = 1`` the plain conditional one):

.. math::
    \mathrm{acc}_w = \frac{1}{m} \sum_{i=1}^{m} \mathbb{1}\big[\arg\max_c f_c(\hat x_i) = y_i\big],
    \qquad \hat x_i = \mathrm{Euler}_k\big(v_w(\cdot \mid y_i), x_{0,i}\big)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from otcfm.metrics.frechet import ImageFeatures, frechet_distance
from otcfm.solvers import integrate

__all__ = ["ImageScores", "balanced_labels", "score_images"]


@dataclass
class ImageScores:
    """What :func:`score_images` measured.

    Attributes:
        fd: ``{k: FD}`` after ``k`` Euler steps (``w = 1`` for a conditional model), None without features.
        accuracy: ``{w: {k: accuracy}}`` of a conditional model, empty otherwise.
        samples: ``{k: (m, C, H, W)}`` the first samples of each step count (for a figure).
        n: samples per FD; reference: held-out rows compared with.
    """

    fd: dict[int, float] | None
    accuracy: dict[float, dict[int, float]] = field(default_factory=dict)
    samples: dict[int, Tensor] = field(default_factory=dict)
    n: int = 0
    reference: int = 0


def balanced_labels(n: int, classes: int) -> Tensor:
    """``(n,)`` labels ``0, 1, ..., classes - 1, 0, 1, ...``: every class as often as ``n`` allows."""
    return torch.arange(n) % classes


def score_images(
    model: Callable[..., Tensor],
    x0: Tensor,
    reference: Tensor,
    features: ImageFeatures | None,
    steps: Sequence[int] = (1, 2, 4, 8, 100),
    *,
    classes: int | None = None,
    guidance: Sequence[float] = (0.0, 1.0),
    accuracy_n: int = 500,
    keep: int = 16,
) -> ImageScores:
    """Score ``model``'s samples from ``x0: (n, C, H, W)`` after each number of Euler ``steps``.

    Args:
        model: the velocity model (``model(x, t, y)`` when ``classes`` is given).
        x0: source samples; all ``n`` for the FD, the first ``accuracy_n`` for the accuracies.
        reference: held-out images ``(M, C, H, W)``.
        features: the classifier whose features and predictions score the samples; None: samples only.
        steps: numbers of Euler steps.
        classes: the number of classes of a conditional model (labels :func:`balanced_labels`), None otherwise.
        guidance: the weights ``w`` whose accuracy is measured (conditional models only).
        accuracy_n: samples per accuracy.
        keep: samples kept per step count in :attr:`ImageScores.samples`.
    """
    labels = None if classes is None else balanced_labels(x0.shape[0], classes)
    reference_features = None if features is None else features(reference)
    scores = ImageScores(fd={} if features is not None else None, n=x0.shape[0], reference=reference.shape[0])
    for k in steps:
        x = integrate(model, x0, k, "euler", y=labels)
        scores.samples[k] = x[:keep]
        if features is not None and scores.fd is not None:
            scores.fd[k] = frechet_distance(features(x), reference_features)
        if labels is None or features is None:
            continue
        m = min(accuracy_n, x0.shape[0])
        for w in guidance:
            guided = x[:m] if w == 1.0 else integrate(model, x0[:m], k, "euler", y=labels[:m], guidance=w)
            correct = features.classify(guided) == labels[:m]
            scores.accuracy.setdefault(float(w), {})[k] = float(correct.float().mean())
    return scores
