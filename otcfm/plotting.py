"""Figures of flows, written as PNG files (matplotlib, imported here only): samples and trajectories of
low-dimensional flows, and grids of images."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["is_image_shape", "plot_flow", "plot_image_grid"]


def plot_flow(
    trajectory: Tensor,
    target: Tensor,
    path: str | Path,
    title: str = "",
    max_lines: int = 300,
    steps: int | None = None,
) -> Path:
    """Save a two-panel PNG: trajectories from source to samples, and samples beside the target.

    Only the first two coordinates are drawn. The image is cropped to everything drawn, so the title and the
    tick labels are never cut off.

    Args:
        trajectory: ``(T, N, ...)`` states along the flow, ``T >= 2`` (a one-step model: ``(2, N, ...)``, its
            source and its samples), at least 2 coordinates per sample.
        target: ``(M, ...)`` reference target samples, as many coordinates per sample as ``trajectory``.
        path: output PNG file.
        title: figure title.
        max_lines: trajectories drawn (the first ones).
        steps: the number of solver steps named in the trajectory panel's title; default ``T - 1``, right when
            the trajectory holds every step.

    Returns:
        the written path.

    Raises:
        ValueError: on a trajectory with fewer than 2 states or fewer than 2 coordinates, or a target whose
            samples do not have the trajectory's size.
    """
    if trajectory.dim() < 3 or trajectory.shape[0] < 2 or trajectory[0, 0].numel() < 2:
        raise ValueError(
            f"trajectory must be (T, N, ...) with T >= 2 and at least 2 coordinates; got {tuple(trajectory.shape)}"
        )
    if target.dim() < 2 or target[0].numel() != trajectory[0, 0].numel():
        raise ValueError(
            f"target must be (M, ...) with samples of the trajectory's size {tuple(trajectory.shape[2:])}; "
            f"got {tuple(target.shape)}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = trajectory.detach().cpu().reshape(trajectory.shape[0], trajectory.shape[1], -1)[..., :2].numpy()
    ref = target.detach().cpu().reshape(target.shape[0], -1)[:, :2].numpy()
    steps = traj.shape[0] - 1 if steps is None else steps
    # constrained layout makes room for the suptitle and keeps the equal-aspect panels' tick labels apart
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True, layout="constrained")
    ax = axes[0]
    lines = traj[:, :max_lines]
    ax.plot(lines[..., 0], lines[..., 1], color="olive", alpha=0.3, linewidth=0.7)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, color="black", alpha=0.6, label="source x0")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, color="tab:blue", alpha=0.6, label="generated x1")
    ax.set_title(f"trajectories ({steps} step{'' if steps == 1 else 's'})")
    ax.legend(loc="upper right", markerscale=4)
    ax = axes[1]
    ax.scatter(ref[:, 0], ref[:, 1], s=2, color="tab:orange", alpha=0.5, label="target")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, color="tab:blue", alpha=0.5, label="generated")
    ax.set_title("generated vs target")
    ax.legend(loc="upper right", markerscale=4)
    for ax in axes:
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` is one image's ``(C, H, W)``: ``C`` 1 (grey) or 3 (RGB), ``H, W >= 4`` (8x8 digits count)."""
    return len(shape) == 3 and shape[0] in (1, 3) and shape[1] >= 4 and shape[2] >= 4


def plot_image_grid(
    rows: Tensor | Mapping[str, Tensor],
    path: str | Path,
    title: str = "",
    max_columns: int = 16,
) -> Path:
    """Save a PNG grid of images: values in ``[-1, 1]`` shown as ``[0, 1]`` (clipped), grey or RGB.

    Args:
        rows: images ``(N, C, H, W)`` (``C`` 1 or 3), drawn row by row, at most 8 rows of ``max_columns``; or an
            ordered mapping ``label -> (N_i, C, H, W)``, one row per entry (its first ``max_columns`` images) with
            the label at the row's left, e.g. ``{"1 step": x1, "2 steps": x2}``. One ``(C, H, W)`` for all.
        path: output PNG file (its folder is created).
        title: figure title.
        max_columns: images per row, ``>= 1``.

    Returns:
        the written path.

    Raises:
        ValueError: ``rows`` empty, or not images ``(N, C, H, W)`` of one shape; ``max_columns < 1``.
        TypeError: ``rows`` neither a tensor nor a mapping of labels to tensors.
    """
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1:
        raise ValueError(f"max_columns: expected a positive integer, got {max_columns!r}")
    if isinstance(rows, Tensor):
        images = _grid_images(rows, "rows")
        shown = images[: 8 * max_columns]
        columns = min(len(shown), max_columns)
        grid = [shown[i : i + columns] for i in range(0, len(shown), columns)]
        labels: list[str] = []
    elif isinstance(rows, Mapping):
        if not rows:
            raise ValueError("rows: expected at least one entry label -> (N, C, H, W) images, got an empty mapping")
        grid = [_grid_images(images, f"rows[{label!r}]")[:max_columns] for label, images in rows.items()]
        labels = [str(label) for label in rows]
        shapes = {tuple(images.shape[1:]) for images in grid}
        if len(shapes) > 1:
            found = ", ".join(
                f"{label!r}: {tuple(images.shape[1:])}" for label, images in zip(labels, grid, strict=True)
            )
            raise ValueError(f"rows: expected images of one shape (C, H, W) in every entry, got {found}")
        columns = max(len(images) for images in grid)
    else:
        raise TypeError(f"rows: expected a tensor (N, C, H, W) or a mapping label -> tensor, got {type(rows).__name__}")
    mosaic = _mosaic(grid, columns)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels, height, width = grid[0].shape[1:]
    tile = 0.5 if max(height, width) <= 16 else 0.8  # inches per image
    label_width = 0.09 * max((len(label) for label in labels), default=0)
    figsize = (columns * tile + label_width + 0.2, len(grid) * tile * height / width + (0.4 if title else 0.1))
    fig, ax = plt.subplots(figsize=figsize)
    if channels == 1:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(height + _GAP) * i + height / 2 - 0.5 for i in range(len(labels))], labels)
    ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=max(100, math.ceil(1.2 * max(height, width) / tile)), bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path


#: Pixels between the images of a grid (white).
_GAP = 1


def _grid_images(images: object, name: str) -> Tensor:
    """``images`` must be a non-empty ``(N, C, H, W)`` tensor with ``(C, H, W)`` an image shape; a float32 copy."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] < 1 or not is_image_shape(tuple(images.shape[1:])):
        raise ValueError(
            f"{name}: expected images (N, C, H, W) with N >= 1, C 1 or 3, H and W >= 4, got {tuple(images.shape)}"
        )
    return images.detach().to(device="cpu", dtype=torch.float32)


def _mosaic(grid: list[Tensor], columns: int) -> np.ndarray:
    """Rows of images ``(n_i, C, H, W)`` in ``[-1, 1]`` as one ``(rows * (H + gap), columns * (W + gap), C)`` array
    in ``[0, 1]`` on a white background."""
    channels, height, width = grid[0].shape[1:]
    mosaic = np.ones((len(grid) * (height + _GAP) - _GAP, columns * (width + _GAP) - _GAP, channels), np.float32)
    for r, images in enumerate(grid):
        pixels = ((images.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
        for c, image in enumerate(pixels):
            top, left = r * (height + _GAP), c * (width + _GAP)
            mosaic[top : top + height, left : left + width] = image
    return mosaic
