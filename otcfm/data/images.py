"""A folder of PNG images as one tensor ``(N, C, H, W)`` in ``[-1, 1]`` (read with matplotlib, imported here only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_image_folder"]


def load_image_folder(path: str | os.PathLike) -> Tensor:
    """Every ``*.png`` file directly in a folder, sorted by name, as one tensor.

    Pixels are read as floats in ``[0, 1]`` (``matplotlib.image.imread``) and scaled to ``[-1, 1]`` by ``2 x - 1``.
    A grayscale image ``(H, W)`` gives 1 channel (grayscale with alpha: the grey channel); an RGB or RGBA image
    ``(H, W, 3 | 4)`` gives 3 channels (the alpha channel is dropped).

    Args:
        path: the folder (subfolders are not read).

    Returns:
        float32 ``(N, C, H, W)`` with ``C`` 1 or 3.

    Raises:
        NotADirectoryError: ``path`` is not a folder.
        FileNotFoundError: the folder holds no PNG file.
        ValueError: an image of another shape than the first (names both files and shapes), or one that is not
            grayscale, RGB or RGBA.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path (str or os.PathLike), got {path!r:.80}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"path: {str(path)!r} is not a folder")
    files = sorted(file for file in folder.iterdir() if file.suffix.lower() == ".png" and file.is_file())
    if not files:
        raise FileNotFoundError(f"path: no .png file in {str(path)!r}")
    from matplotlib import image as mpimg

    images: list[np.ndarray] = []
    for file in files:
        try:
            pixels = mpimg.imread(file)
        except Exception as error:  # any unreadable file: one message naming it
            raise ValueError(f"path: {file} is not a readable PNG image ({error})") from error
        pixels = _channels_first(np.asarray(pixels), file)
        if images and pixels.shape != images[0].shape:
            raise ValueError(
                f"path: images of different shapes (C, H, W): {files[0].name} is {images[0].shape}, "
                f"{file.name} is {pixels.shape}; every image in {str(path)!r} must have the same size and channels"
            )
        images.append(pixels)
    return torch.from_numpy(np.stack(images)).to(torch.float32) * 2.0 - 1.0


def _channels_first(pixels: np.ndarray, file: Path) -> np.ndarray:
    """``(H, W)`` and ``(H, W, 2)`` (grey, alpha) -> ``(1, H, W)``; ``(H, W, 3 | 4)`` (RGB, RGBA) -> ``(3, H, W)``."""
    if pixels.ndim == 2:
        return pixels[None]
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        return pixels[None, :, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        return np.moveaxis(pixels[:, :, :3], 2, 0)
    raise ValueError(
        f"path: {file} has pixels of shape {pixels.shape}; expected grayscale (H, W) or RGB(A) (H, W, 3|4)"
    )
