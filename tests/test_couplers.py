"""Couplers: permutations, optimal cost (against ot.emd2 in float64), reproducibility, errors."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from otcfm.couplers import (
    COUPLERS,
    Coupler,
    ExactCoupler,
    IndependentCoupler,
    exact_plan,
    get_coupler,
    squared_euclidean_cost,
)


def _batch(seed: int, n: int, shape: tuple[int, ...] = (2,), dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _is_permutation(idx: torch.Tensor, n: int) -> bool:
    return torch.equal(torch.sort(idx).values, torch.arange(n))


@pytest.mark.parametrize("name", sorted(COUPLERS))
@given(seed=st.integers(0, 2**16), n=st.integers(1, 16), d=st.integers(1, 4))
def test_equal_batches_give_a_permutation(name: str, seed: int, n: int, d: int) -> None:
    x0, x1 = _batch(seed, n, (d,)), _batch(seed + 1, n, (d,))
    i, j = get_coupler(name)(x0, x1, generator=torch.Generator().manual_seed(seed))
    assert i.dtype == j.dtype == torch.int64
    assert _is_permutation(i, n) and _is_permutation(j, n)


@pytest.mark.parametrize("name", sorted(COUPLERS))
def test_image_shaped_inputs(name: str) -> None:
    x0, x1 = _batch(0, 8, (1, 4, 4)), _batch(1, 8, (1, 4, 4))
    i, j = get_coupler(name)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert x0[i].shape == x1[j].shape == (8, 1, 4, 4)


@pytest.mark.parametrize("name", sorted(COUPLERS))
def test_unequal_batches_use_every_source_once(name: str) -> None:
    x0, x1 = _batch(0, 7), _batch(1, 5)
    i, j = get_coupler(name)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(7))
    assert j.shape == (7,) and int(j.min()) >= 0 and int(j.max()) < 5


@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), d=st.integers(1, 4))
def test_exact_pairing_cost_equals_emd2(seed: int, n: int, d: int) -> None:
    """The mean squared distance of the exact pairs equals ot.emd2 (float64, rel. tol 1e-9)."""
    x0, x1 = _batch(seed, n, (d,)), _batch(seed + 7, n, (d,))
    i, j = ExactCoupler()(x0, x1)
    paired = float(((x0[i] - x1[j]) ** 2).sum(1).mean())
    cost = ot.dist(x0.numpy(), x1.numpy())
    reference = ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), cost)
    assert paired == pytest.approx(reference, rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 2**16), n=st.integers(2, 16))
def test_exact_cost_never_exceeds_independent_cost(seed: int, n: int) -> None:
    x0, x1 = _batch(seed, n), _batch(seed + 3, n)
    g = torch.Generator().manual_seed(seed)

    def cost(c: Coupler) -> float:
        i, j = c(x0, x1, generator=g)
        return float(((x0[i] - x1[j]) ** 2).sum())

    assert cost(ExactCoupler()) <= cost(IndependentCoupler()) + 1e-9


def test_exact_on_unequal_batches_draws_partners_inside_the_plan() -> None:
    x0, x1 = _batch(2, 6), _batch(3, 4)
    plan = exact_plan(squared_euclidean_cost(x0, x1).numpy())
    for seed in range(5):
        i, j = ExactCoupler()(x0, x1, generator=torch.Generator().manual_seed(seed))
        assert (plan[i.numpy(), j.numpy()] > 0).all()


def test_exact_with_custom_cost() -> None:
    """An L1 cost gives the pairing cost of ot.emd2 on the L1 matrix."""
    x0, x1 = _batch(4, 10), _batch(5, 10)

    def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a.reshape(len(a), -1), b.reshape(len(b), -1), p=1)

    i, j = ExactCoupler(cost=l1)(x0, x1)
    paired = float((x0[i] - x1[j]).abs().sum(1).mean())
    reference = ot.emd2(np.full(10, 0.1), np.full(10, 0.1), l1(x0, x1).numpy())
    assert paired == pytest.approx(reference, rel=1e-9)


def test_exact_plan_reports_early_stop_as_error() -> None:
    cost = squared_euclidean_cost(_batch(6, 40), _batch(7, 40)).numpy()
    with pytest.raises(RuntimeError, match="num_iter_max"):
        exact_plan(cost, num_iter_max=3)


def test_exact_batch_of_one() -> None:
    i, j = ExactCoupler()(_batch(0, 1), _batch(1, 1))
    assert i.tolist() == [0] and j.tolist() == [0]


def test_independent_is_reproducible_from_a_seed() -> None:
    x0, x1 = _batch(0, 64), _batch(1, 64)
    first = IndependentCoupler()(x0, x1, generator=torch.Generator().manual_seed(42)).j
    again = IndependentCoupler()(x0, x1, generator=torch.Generator().manual_seed(42)).j
    other = IndependentCoupler()(x0, x1, generator=torch.Generator().manual_seed(43)).j
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_float32_inputs_work() -> None:
    i, j = ExactCoupler()(_batch(0, 16, dtype=torch.float32), _batch(1, 16, dtype=torch.float32))
    assert _is_permutation(j, 16)


def test_get_coupler_errors() -> None:
    with pytest.raises(ValueError, match="'exact'.*'independent'"):
        get_coupler("optimal")
    with pytest.raises(TypeError, match="coupler"):
        get_coupler(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="options"):
        get_coupler(ExactCoupler(), num_iter_max=10)
    assert isinstance(get_coupler("exact", num_iter_max=10**6), ExactCoupler)


@pytest.mark.parametrize("name", sorted(COUPLERS))
def test_bad_inputs_are_named(name: str) -> None:
    coupler = get_coupler(name)
    with pytest.raises(ValueError, match="same sample shape"):
        coupler(_batch(0, 4, (2,)), _batch(1, 4, (3,)))
    with pytest.raises(ValueError, match="x0: expected a non-empty batch"):
        coupler(_batch(0, 0), _batch(1, 4))
    bad = _batch(1, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x1: contains NaN or Inf"):
        coupler(_batch(0, 4), bad)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        coupler(torch.zeros(4, dtype=torch.float64), _batch(1, 4))
    with pytest.raises(TypeError, match="x0"):
        coupler(np.zeros((4, 2)), _batch(1, 4))  # type: ignore[arg-type]
