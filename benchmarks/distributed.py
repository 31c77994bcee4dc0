"""DDP on CPU (gloo): 1 vs 2 processes, local vs global coupling; target variance of local vs global coupling.

For each setting the script spawns the processes (one torch thread each, so 2 processes use the 2 cores),
times the coupling of one step (local: each rank its own batch; global: gather + one OT problem on rank 0 +
broadcast, see ``otcfm.distributed.global_pairs``) and the all-gather alone, then trains with ``otcfm.train``
and reports steps and samples per second.

    python benchmarks/distributed.py            # about a minute on 2 CPU cores; prints only
    python benchmarks/distributed.py --docs     # the same, then its section of docs/benchmarks.md
    python benchmarks/distributed.py --quick    # seconds; for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_docs_options,
    machine,
    markdown_table,
    median_ms,
    rerun_command,
    write_section,
)

import otcfm  # noqa: E402
from otcfm import distributed  # noqa: E402
from otcfm.metrics import target_variance  # noqa: E402


def _worker(rank: int, world_size: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    finished = False
    try:
        config = otcfm.TrainConfig(**settings["config"])
        coupler = otcfm.get_coupler(config.coupler)
        g = torch.Generator().manual_seed(distributed.stream_seed(config.seed, rank, "bench"))
        x0 = otcfm.data.sample(config.source, config.batch_size, g)
        x1 = otcfm.data.sample(config.target, config.batch_size, g)
        repeats = settings["repeats"]
        if config.global_coupling:
            coupling = median_ms(lambda: distributed.global_pairs(coupler, x0, x1), repeats)
        else:
            coupling = median_ms(lambda: coupler(x0, x1), repeats)
        gather = median_ms(lambda: (distributed.gather_batch(x0), distributed.gather_batch(x1)), repeats)
        distributed.barrier()
        started = time.perf_counter()
        otcfm.train(config, progress=False)
        seconds = time.perf_counter() - started
        if rank == 0:
            result = {"coupling_ms": coupling, "gather_ms": gather, "train_seconds": seconds}
            Path(out).write_text(json.dumps(result))
        finished = True
    finally:  # a barrier first on success, so the ranks tear gloo down together (a rank that left early aborted)
        distributed.shutdown(wait_for_all=finished)
    distributed.exit_worker()  # the result is on disk: no interpreter finalisation, where gloo can abort a rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world_size: int, config: otcfm.TrainConfig, repeats: int) -> dict[str, float]:
    """Spawn ``world_size`` gloo processes running ``config``; rank 0's timings."""
    settings = {"config": dataclasses.asdict(config), "repeats": repeats}
    with TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world_size, _free_port(), settings, out), nprocs=world_size, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--source", default="8gaussians")
    parser.add_argument("--target", default="moons")
    parser.add_argument("--coupler", default="exact")
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    add_docs_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats = 32, 10, 3
    started = time.perf_counter()
    base = otcfm.TrainConfig(
        source=args.source,
        target=args.target,
        coupler=args.coupler,
        batch_size=args.batch_size,
        steps=args.steps,
        seed=args.seed,
    )
    rows, single = [], None
    for world_size, global_coupling in ((1, False), (2, False), (2, True)):
        config = dataclasses.replace(base, global_coupling=global_coupling)
        result = run(world_size, config, args.repeats)
        steps_per_s = args.steps / result["train_seconds"]
        samples_per_s = steps_per_s * world_size * args.batch_size
        single = single or samples_per_s
        ot_batch = args.batch_size * (world_size if global_coupling else 1)
        rows.append(
            [
                world_size,
                "global" if global_coupling else "local",
                ot_batch,
                f"{result['coupling_ms']:.2f}",
                f"{result['gather_ms']:.3f}" if world_size > 1 else "-",
                f"{steps_per_s:.1f}",
                f"{samples_per_s:.0f}",
                f"{samples_per_s / single:.2f}x",
            ]
        )
        print(rows[-1])
    header = ["processes", "coupling", "OT batch", "coupling ms", "all-gather ms", "steps/s", "samples/s", "vs 1 proc"]
    throughput = markdown_table(header, rows)
    print(throughput)

    # Global coupling over W ranks of per-rank batch B is the coupling of one batch of W * B samples
    # (tests/test_distributed.py checks the pairs); its target variance is that of an OT batch of W * B.
    g = torch.Generator().manual_seed(args.seed)
    variance_rows = []
    # the estimator settings of benchmarks/variance.py, so the figures line up with its table
    n_pool, n_eval, times = (512, 256, (0.25, 0.75)) if args.quick else (2048, 512, (0.1, 0.3, 0.5, 0.7, 0.9))
    for label, coupler, batch in (
        ("independent", "independent", args.batch_size),
        ("local (each rank)", args.coupler, args.batch_size),
        ("global, 2 ranks", args.coupler, 2 * args.batch_size),
        ("global, 4 ranks", args.coupler, 4 * args.batch_size),
    ):
        fm = otcfm.FlowMatcher(coupler=coupler)
        estimate = target_variance(fm, args.source, args.target, batch, times, n_pool, n_eval, generator=g)
        value = estimate.total
        variance_rows.append([label, batch, f"{value:.3f}"])
    variance = markdown_table(["coupling", "OT batch", "target variance"], variance_rows)
    print(variance)
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s")
    if args.docs is not None:
        body = f"""## Distributed training (DDP, gloo on CPU)

Command: `{rerun_command(__file__, argv)}` ({seconds:.0f} s). Measured {machine()}; every process runs with one
torch thread, so 2 processes use the 2 cores. Task {args.source} -> {args.target}, coupler `{args.coupler}`, per-rank
batch {args.batch_size}, MLP 3x256, {args.steps} training steps (`otcfm.train`, checkpoints off). Coupling ms: median
of {args.repeats} couplings of one step on rank 0 (global: all-gather + OT on rank 0 + broadcast); all-gather ms:
gathering `x0` and `x1` alone.

{throughput}

Target variance (the estimator and settings of the variance section; an upper bound), per-rank batch
{args.batch_size}: a global coupling over W ranks is the coupling of one OT batch of W x {args.batch_size} samples
(tested pair for pair), so it lowers the variance as a larger batch does:

{variance}
"""
        print(f"written to {write_section('distributed', body, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
