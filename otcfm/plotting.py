"""Figures of flows: samples and trajectories, written as PNG files (matplotlib, imported here only)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

__all__ = ["plot_flow"]


def plot_flow(trajectory: Tensor, target: Tensor, path: str | Path, title: str = "", max_lines: int = 300) -> Path:
    """Save a two-panel PNG: trajectories from source to samples, and samples beside the target.

    Only the first two coordinates are drawn.

    Args:
        trajectory: ``(T, N, d)`` states along the flow, ``d >= 2``.
        target: ``(M, d)`` reference target samples.
        path: output PNG file.
        title: figure title.
        max_lines: trajectories drawn (the first ones).

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = trajectory.detach().cpu().reshape(trajectory.shape[0], trajectory.shape[1], -1)[..., :2].numpy()
    ref = target.detach().cpu().reshape(target.shape[0], -1)[:, :2].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    ax = axes[0]
    lines = traj[:, :max_lines]
    ax.plot(lines[..., 0], lines[..., 1], color="olive", alpha=0.3, linewidth=0.7)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, color="black", alpha=0.6, label="source x0")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, color="tab:blue", alpha=0.6, label="generated x1")
    ax.set_title(f"trajectories ({traj.shape[0] - 1} steps)")
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
