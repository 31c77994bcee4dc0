"""Global coupling over 2 CPU processes (gloo) equals the single-process coupling of the concatenated batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import otcfm
from otcfm.couplers import ExactCoupler
from otcfm.distributed import global_pairs

B = 48


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return otcfm.data.sample("8gaussians", 2 * B, g).double(), otcfm.data.sample("moons", 2 * B, g).double()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x0, x1 = _batches()
        mine = slice(rank * B, (rank + 1) * B)
        p0, p1 = global_pairs("exact", x0[mine], x1[mine])
        torch.save({"x0": p0, "x1": p1}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_exact_coupling_over_two_ranks_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x0, x1 = _batches()
    i, j = ExactCoupler()(x0, x1)
    order = torch.argsort(i)
    assert torch.equal(torch.cat([p["x0"] for p in parts]), x0[i[order]])
    assert torch.equal(torch.cat([p["x1"] for p in parts]), x1[j[order]])


def test_single_process_global_pairs_is_the_local_coupling() -> None:
    x0, x1 = _batches()
    p0, p1 = global_pairs("exact", x0, x1)
    i, j = ExactCoupler()(x0, x1)
    assert torch.equal(p0, x0[i]) and torch.equal(p1, x1[j])
