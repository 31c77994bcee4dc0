"""A seeded run pinned bit for bit: refactors of the training layer must leave its weights unchanged.

The hash was taken from this run on the code before the refactors (otcfm 0.1.0 at 8bdaf29 and after, torch 2.13.0 on
an x86_64 CPU, one thread); another torch build or CPU may round differently, so the test runs only on that torch.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import otcfm

PINNED = "73d045818ecb8b16"


@pytest.mark.skipif(not torch.__version__.startswith("2.13.0"), reason="the hash was taken with torch 2.13.0")
def test_a_seeded_run_gives_the_pinned_weights() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = otcfm.train(
            target="moons",
            coupler="exact",
            steps=30,
            batch_size=64,
            hidden=32,
            depth=2,
            seed=7,
            ema_decay=0.9,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for weights in (run.model.state_dict(), run.ema.state_dict()):
        for name, tensor in sorted(weights.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest()[:16] == PINNED
