"""Figures of flows: samples and trajectories, written as PNG files (matplotlib, imported here only)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

__all__ = ["plot_flow"]


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
