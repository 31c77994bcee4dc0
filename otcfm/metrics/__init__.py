"""Metrics of samples, flows and couplings; definitions in docs/benchmarks.md."""

from otcfm.metrics.coupling import assignment_error, renormalised_entropy, transport_cost_ratio
from otcfm.metrics.frechet import DigitsFeatures, ImageFeatures, digits_features, frechet_distance, image_features
from otcfm.metrics.geometry import crossing_rate, swap_fraction
from otcfm.metrics.images import ImageScores, score_images
from otcfm.metrics.trajectory import FlowStatistics, flow_statistics, path_energy, straightness
from otcfm.metrics.variance import (
    GradientVariance,
    TargetVariance,
    coupled_pairs,
    gaussian_target_variance,
    gradient_variance,
    target_variance,
    target_variance_of_pairs,
)
from otcfm.metrics.w2 import w2, w2_by_steps

__all__ = [
    "DigitsFeatures",
    "FlowStatistics",
    "GradientVariance",
    "ImageScores",
    "ImageFeatures",
    "TargetVariance",
    "assignment_error",
    "coupled_pairs",
    "crossing_rate",
    "digits_features",
    "flow_statistics",
    "frechet_distance",
    "gaussian_target_variance",
    "gradient_variance",
    "image_features",
    "path_energy",
    "renormalised_entropy",
    "score_images",
    "straightness",
    "swap_fraction",
    "target_variance",
    "target_variance_of_pairs",
    "transport_cost_ratio",
    "w2",
    "w2_by_steps",
]
