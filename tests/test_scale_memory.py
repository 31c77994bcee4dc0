"""Exact couplings at every input scale (against scipy on the rescaled problem); memory checks before dense solves;
the semidiscrete fit and pairing within their memory budget beside the data.

``python tests/test_scale_memory.py`` measures the semidiscrete peak on 200,000 x 784 float32 data (627 MB) with a
16 MiB ``memory_budget``: a short fit and 100 pairings in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import otcfm._memory
from otcfm import metrics
from otcfm.couplers import ExactCoupler, HungarianCoupler, exact_plan

SCALES = [1e-20, 1e-10, 1e-8, 1e-4, 1.0, 1e4, 1e10, 1e20]
#: float64 only: squares of these over- or underflow, so the cost is computed on rescaled inputs
EXTREME_SCALES = [1e-300, 1e-160, 1e160, 1e300]


def _problem(n: int = 96, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two 2-D batches at unit scale and the optimal mean pair cost (scipy, float64)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 2, generator=g, dtype=dtype)
    x1 = torch.randn(n, 2, generator=g, dtype=dtype)
    cost = torch.cdist(x0.double(), x1.double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return x0, x1, float(cost[rows, cols].mean())


def _unit_cost(x0: torch.Tensor, x1: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> float:
    return float((x0.double()[i] - x1.double()[j]).square().sum(1).mean())


@pytest.mark.parametrize("scale", SCALES + EXTREME_SCALES)
@pytest.mark.parametrize(
    "coupler",
    [ExactCoupler(), ExactCoupler(solver="emd"), ExactCoupler(solver="lsa"), HungarianCoupler()],
    ids=["auto", "emd", "lsa", "hungarian"],
)
def test_exact_pairing_is_optimal_at_every_scale(coupler, scale: float) -> None:
    # the pairing of (scale * x0, scale * x1) must be optimal for (x0, x1): relative tolerance 1e-12
    x0, x1, optimum = _problem(n=256 if getattr(coupler, "solver", "") == "auto" else 96)
    i, j = coupler(x0 * scale, x1 * scale)
    assert torch.equal(torch.sort(j).values, torch.arange(x1.shape[0]))
    assert _unit_cost(x0, x1, i, j) == pytest.approx(optimum, rel=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_exact_pairing_float32_inputs_every_scale(scale: float) -> None:
    # float32 inputs of any scale square without overflow in float64: the network simplex path must stay optimal
    x0, x1, _ = _problem(n=256, dtype=torch.float32)
    i, j = ExactCoupler(solver="emd")(x0 * scale, x1 * scale)
    x0s, x1s = (x0 * scale).double() / scale, (x1 * scale).double() / scale  # the rounded inputs, back at unit scale
    rows, cols = linear_sum_assignment(torch.cdist(x0s, x1s).square().numpy())
    assert _unit_cost(x0s, x1s, i, j) == pytest.approx(
        _unit_cost(x0s, x1s, torch.as_tensor(rows), torch.as_tensor(cols)), rel=1e-9
    )


@pytest.mark.parametrize("scale", SCALES + EXTREME_SCALES)
def test_w2_is_exact_at_every_scale(scale: float) -> None:
    x0, x1, optimum = _problem()
    assert metrics.w2(x0 * scale, x1 * scale) == pytest.approx(scale * optimum**0.5, rel=1e-10)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_exact_plan_normalises_the_cost(scale: float) -> None:
    x0, x1, optimum = _problem(n=64)
    cost = torch.cdist(x0, x1).square().numpy()
    plan = exact_plan(cost * scale)
    assert float((plan * cost).sum()) == pytest.approx(optimum, rel=1e-12)


def test_hard_labels_stay_within_class_at_tiny_scale() -> None:
    # the hard label penalty is relative to the cost, so the normalised problem still sees the transport term
    x0, x1, _ = _problem(n=120)
    y = torch.arange(120) % 3
    pairs = [ExactCoupler(solver="emd")(x0 * s, x1 * s, y0=y, y1=y) for s in (1e-12, 1.0)]
    for i, j in pairs:
        assert torch.equal(y[i], y[j])
    assert torch.equal(pairs[0].j, pairs[1].j)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: ExactCoupler(solver="emd")(x, x),
        lambda x: ExactCoupler(solver="lsa")(x, x),
        lambda x: HungarianCoupler()(x, x),
        lambda x: metrics.w2(x, x),
    ],
    ids=["emd", "lsa", "hungarian", "w2"],
)
def test_a_solve_that_will_not_fit_raises_memory_error(monkeypatch, call) -> None:
    monkeypatch.setattr(otcfm._memory, "available_bytes", lambda: 10_000)
    with pytest.raises(MemoryError, match=r"64x64 batch needs about .* GiB"):
        call(torch.randn(64, 2))


def test_20000_samples_under_a_memory_limit_raise_memory_error_not_abort() -> None:
    # the probe's SIGABRT case (std::bad_alloc inside POT), under a 3 GiB address-space limit
    code = textwrap.dedent(
        """
        import resource, torch
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from otcfm.couplers import ExactCoupler
        try:
            ExactCoupler()(torch.randn(20000, 2), torch.randn(20000, 2))
        except MemoryError as error:
            print("MemoryError:", error)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "20000x20000 batch needs about 17.9 GiB" in out.stdout


#: Runs a short semidiscrete fit and some pairings in a fresh process; prints the resident memory above the
#: baseline taken once the data exist (the kernel's peak, VmHWM, reset through /proc/self/clear_refs).
SEMIDISCRETE_PEAK = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    torch.set_num_threads(1)
    from otcfm.couplers import SemidiscreteCoupler

    n, d, budget, steps, pairings, batch = (int(a) for a in sys.argv[1:7])
    screen = {"auto": None, "on": True, "off": False}[sys.argv[7]]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def run(data):
        coupler = SemidiscreteCoupler(memory_budget=budget, screen=screen)
        with warnings.catch_warnings(record=True):  # a fit this short is far from its noise floor, and says so
            warnings.simplefilter("always")
            coupler.fit("gaussian", data, steps=steps, batch_size=batch, eval_samples=batch,
                        generator=torch.Generator().manual_seed(0), progress=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(pairings):
            coupler(torch.randn(batch, d, generator=g), data)

    run(torch.randn(300, d, generator=torch.Generator().manual_seed(2)))  # imports, allocator pools: not counted
    data = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")
    baseline = status("VmRSS")
    run(data)
    peak = status("VmHWM")
    print(json.dumps({"data": data.numel() * data.element_size(), "baseline": baseline, "peak": peak,
                      "above": peak - baseline}))
    """
)


def semidiscrete_peak(
    n: int, d: int, budget: int, steps: int, pairings: int, batch: int, screen: str = "auto"
) -> dict[str, int]:
    """Bytes: the data's size, the process's resident memory once the data exist, its peak during a
    ``steps``-step fit and ``pairings`` pairings of ``batch`` samples (``screen``: ``"auto"``, ``"on"``, ``"off"``),
    and the peak above that baseline. glibc's malloc is told to map every allocation of 1 MiB or more on its own
    (``MALLOC_MMAP_THRESHOLD_``), so that a freed temporary leaves the resident set instead of staying in the heap:
    the peak then counts what was alive at once."""
    args = [str(v) for v in (n, d, budget, steps, pairings, batch, screen)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    command = [sys.executable, "-c", SEMIDISCRETE_PEAK, *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=3000, env=environment)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_semidiscrete_fit_and_pairing_copy_no_part_of_the_data() -> None:
    """50,000 x 256 float32 points (51 MB), a 1 MiB budget: the fit and the pairings stay below a third of the data
    above the baseline (a float32 copy of the data, its float64 or bfloat16 copy, or a temporary of its size in the
    squared norms or the warm start would exceed it; the allowance covers the (N,) vectors and the allocator)."""
    measured = semidiscrete_peak(50_000, 256, 2**20, steps=2, pairings=3, batch=32)
    assert measured["above"] <= measured["data"] / 3, measured


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_screen_copies_the_data_in_bfloat16_within_the_budget() -> None:
    """With ``screen=True`` and a 32 MiB budget that holds the screen's bfloat16 copy (26 MB) and its scores: no
    float32 copy or temporary of the data's size (51 MB) beside it."""
    measured = semidiscrete_peak(50_000, 256, 32 * 2**20, steps=2, pairings=3, batch=32, screen="on")
    assert measured["above"] <= 32 * 2**20 + measured["data"] / 3, measured


if __name__ == "__main__":
    found = semidiscrete_peak(200_000, 784, 16 * 2**20, steps=2, pairings=100, batch=64)
    mib = {key: round(value / 2**20, 1) for key, value in found.items()}
    print(f"MiB: {mib}; allowed above the baseline: data + 256 = {mib['data'] + 256}")
