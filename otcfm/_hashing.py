"""Content hashes of tensors: what identifies a dataset in run records, pair sets and fitted potentials."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["content_hash"]


def content_hash(tensor: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and values, first 16 hex digits: identifies a dataset's content.

    A contiguous CPU tensor is hashed where it lies (no copy of a dataset that may be gigabytes)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:{data.dtype}".encode())
    if data.numel():
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]
