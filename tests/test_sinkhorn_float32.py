"""The float32 path of SinkhornCoupler for large dense problems (pools): same plan as float64, and its fallbacks."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otcfm.couplers.sinkhorn as sinkhorn
from otcfm.couplers import SinkhornCoupler, sinkhorn_plan
from otcfm.couplers.cost import squared_euclidean_cost


def clouds(n: int, d: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g), scale * (torch.rand(n, d, generator=g) * 3 - 1)


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the float32 path from 64 x 64 entries on, so the tests stay small."""
    monkeypatch.setattr(sinkhorn, "FLOAT32_MIN_ENTRIES", 64 * 64)


def float32_plan(coupler: SinkhornCoupler, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    shape = (x0.shape[0], x1.shape[0])
    problem = coupler._float32_problem(x0, x1, None)
    assert problem is not None
    scaled = coupler._solve_float32(problem, torch.empty(shape), torch.empty(shape))
    return (scaled.u[:, None] * scaled.kernel * scaled.v[None, :]).double()


@pytest.mark.parametrize(("n", "d", "epsilon"), [(200, 2, 0.05), (256, 32, 0.05), (150, 64, 0.01), (128, 8, 0.002)])
def test_float32_plan_equals_the_float64_plan(n: int, d: int, epsilon: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinkhorn, "_FLOAT32_TOL", 1e-7)  # converge far, so that the comparison sees the rounding
    x0, x1 = clouds(n, d, seed=n + d)
    coupler = SinkhornCoupler(epsilon, tol=1e-7, max_iter=20000)
    reference = sinkhorn_plan(squared_euclidean_cost(x0.double(), x1.double()), epsilon, tol=1e-9, max_iter=20000)
    plan = float32_plan(coupler, x0, x1)
    # float32 rounding of the cost and potentials: entries within 1e-3 of the largest entry (measured: < 2e-4)
    assert (plan - reference.plan).abs().max() <= 1e-3 * reference.plan.max()
    assert torch.allclose(plan.sum(1), torch.full((n,), 1.0 / n, dtype=torch.float64), rtol=1e-5, atol=0)


def test_float32_path_is_taken_at_the_threshold_and_pairs_sensibly() -> None:
    n = 2048  # n * n == FLOAT32_MIN_ENTRIES
    x0, x1 = clouds(n, 4, seed=0)
    coupler = SinkhornCoupler(0.05)
    i, j = coupler(x0, x1, generator=torch.Generator().manual_seed(0))
    assert coupler._workspace._buffers is not None  # the float32 buffers were used and kept
    assert torch.equal(i, torch.arange(n)) and 0 <= int(j.min()) and int(j.max()) < n
    paired = (x0 - x1[j]).square().sum(1).mean()
    independent = (x0 - x1).square().sum(1).mean()
    assert paired < 0.5 * independent
    again = coupler(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.j, j)


@settings(max_examples=25, deadline=None)
@given(
    n0=st.integers(64, 160),
    n1=st.integers(64, 160),
    d=st.sampled_from([1, 2, 16]),
    epsilon=st.sampled_from([0.01, 0.05, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_float32_pairs_use_every_source_once(n0: int, n1: int, d: int, epsilon: float, seed: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sinkhorn, "FLOAT32_MIN_ENTRIES", 64 * 64)
        g = torch.Generator().manual_seed(seed)
        x0, x1 = torch.randn(n0, d, generator=g), torch.randn(n1, d, generator=g) + 1
        coupler = SinkhornCoupler(epsilon)
        first = coupler(x0, x1, generator=torch.Generator().manual_seed(seed))
        second = coupler(x0, x1, generator=torch.Generator().manual_seed(seed))
    assert coupler._workspace._buffers is not None
    assert torch.equal(first.i, torch.arange(n0))
    assert first.j.shape == (n0,) and 0 <= int(first.j.min()) and int(first.j.max()) < n1
    assert torch.equal(first.j, second.j)


@pytest.mark.usefixtures("small_threshold")
@pytest.mark.parametrize(
    ("x_dtype", "epsilon", "relative", "scale"),
    [
        (torch.float64, 0.05, True, 1.0),  # float64 inputs stay float64
        (torch.float32, 1e-4, True, 1.0),  # below FLOAT32_MIN_EPSILON of the mean cost
        (torch.float32, 3e-3, False, 1.0),  # an absolute epsilon below it (the mean cost is about 6)
        (torch.float32, 0.05, True, 1e20),  # float32 squares overflow
        (torch.float32, 0.05, True, 1.5e19),  # squares finite, but the costs would overflow
        (torch.float32, 0.05, True, 1e-25),  # float32 squares underflow
    ],
)
def test_problems_float32_cannot_hold_go_to_float64(
    x_dtype: torch.dtype, epsilon: float, relative: bool, scale: float
) -> None:
    x0, x1 = clouds(96, 3, seed=1, scale=scale)
    x0, x1 = x0.to(x_dtype), x1.to(x_dtype)
    coupler = SinkhornCoupler(epsilon, relative=relative, tol=1e-3)  # routing, not convergence, is tested
    check_routed_to_float64(coupler, x0, x1)


@pytest.mark.usefixtures("small_threshold")
def test_a_tolerance_float32_cannot_meet_goes_to_float64() -> None:
    x0, x1 = clouds(96, 3, seed=1)
    check_routed_to_float64(SinkhornCoupler(0.05, tol=1e-8), x0, x1)  # float32 stalls near 1e-8 here


def check_routed_to_float64(coupler: SinkhornCoupler, x0: torch.Tensor, x1: torch.Tensor) -> None:
    """``coupler`` pairs ``x0``, ``x1`` on the float64 path, without taking float32 buffers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sinkhorn, "pairs_from_plan", lambda *args: pytest.fail("float64 path not taken"))
        with pytest.raises(pytest.fail.Exception, match="float64 path not taken"):
            coupler(x0, x1, generator=torch.Generator().manual_seed(0))
    pairs = coupler(x0, x1, generator=torch.Generator().manual_seed(0))  # and the float64 path pairs them
    assert torch.equal(pairs.i, torch.arange(96)) and int(pairs.j.max()) < x1.shape[0]
    assert coupler._workspace._buffers is None


@pytest.mark.usefixtures("small_threshold")
def test_float32_path_errors_and_warnings() -> None:
    x0, x1 = clouds(96, 3, seed=2)
    bad = x0.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="x0"):
        SinkhornCoupler(0.05)(bad, x1)
    with pytest.warns(sinkhorn.ConvergenceWarning, match="did not converge"):
        SinkhornCoupler(0.05, max_iter=1)(x0, x1, generator=torch.Generator().manual_seed(0))


def test_rows_then_columns_split_across_threads_matches_two_products() -> None:
    g = torch.Generator().manual_seed(3)
    kernel = torch.rand(4096, 1024, generator=g)  # 4 MiB blocks of 1024 rows: 4 blocks, split in two halves
    v, a = torch.rand(1024, generator=g) + 0.5, torch.full((4096,), 1 / 4096)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            u, column = sinkhorn._rows_then_columns(kernel, v, a)
            expected_u = a / (kernel.double() @ v.double())
            assert torch.allclose(u.double(), expected_u, rtol=1e-5, atol=0)
            assert torch.allclose(column.double(), kernel.double().T @ u.double(), rtol=1e-5, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_a_failure_in_the_helper_thread_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(*args: object) -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("helper failed")

    monkeypatch.setattr(sinkhorn, "_pass", failing)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(RuntimeError, match="helper failed"):
        sinkhorn._rows_then_columns(torch.rand(4096, 1024), torch.rand(1024), torch.rand(4096))
    assert len(calls) == 2


@pytest.mark.usefixtures("small_threshold")
def test_workspace_is_reused_private_to_a_call_and_not_pickled() -> None:
    x0, x1 = clouds(96, 3, seed=4)
    coupler = SinkhornCoupler(0.05)
    coupler(x0, x1)
    buffers = coupler._workspace._buffers
    assert buffers is not None
    coupler(x0, x1)
    assert coupler._workspace._buffers is buffers  # same shape: reused
    with coupler._workspace.lease(96, 96, x0.device) as leased:  # held by another call: a fresh pair
        with coupler._workspace.lease(96, 96, x0.device) as fresh:
            assert fresh[0].data_ptr() not in (leased[0].data_ptr(), leased[1].data_ptr())
    coupler(x0[:80], x1)
    assert coupler._workspace._buffers[0].shape == (80, 96)
    copy = pickle.loads(pickle.dumps(coupler))
    assert copy._workspace._buffers is None and copy.epsilon == coupler.epsilon
    assert torch.equal(
        copy(x0, x1, generator=torch.Generator().manual_seed(1)).j,
        coupler(x0, x1, generator=torch.Generator().manual_seed(1)).j,
    )


@pytest.mark.usefixtures("small_threshold")
def test_workspace_does_not_keep_buffers_above_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinkhorn, "_KEPT_ENTRIES", 95 * 96)
    x0, x1 = clouds(96, 3, seed=5)
    coupler = SinkhornCoupler(0.05)
    pairs = coupler(x0, x1, generator=torch.Generator().manual_seed(0))
    assert coupler._workspace._buffers is None and torch.equal(pairs.i, torch.arange(96))


@pytest.mark.usefixtures("small_threshold")
def test_inputs_that_require_grad_and_inference_mode() -> None:
    x0, x1 = clouds(96, 3, seed=6)
    coupler = SinkhornCoupler(0.05)
    expected = coupler(x0, x1, generator=torch.Generator().manual_seed(2))
    with_grad = coupler(x0.requires_grad_(), x1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(with_grad.j, expected.j)
    fresh = SinkhornCoupler(0.05)
    with torch.inference_mode():  # buffers made here must serve later calls outside inference mode
        inside = fresh(x0.detach(), x1, generator=torch.Generator().manual_seed(2))
    outside = fresh(x0.detach(), x1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(inside.j, expected.j) and torch.equal(outside.j, expected.j)
