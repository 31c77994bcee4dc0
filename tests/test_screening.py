"""The certified bfloat16 screen of the semidiscrete argmax: the same partners as the float32 / float64 argmax."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import otcfm
from otcfm.couplers import SemidiscreteCoupler
from otcfm.couplers.screening import MAX_DIM, Screen
from otcfm.couplers.semidiscrete.kernels import _partners_and_scores


def _offsets(data: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The score offsets ``h_j = g_j - |y_j|^2`` of potentials ``g``."""
    return g - (data * data).sum(1)


def _pair(screen: Screen, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupler's pairing through ``screen`` for potentials ``g``: its answer, or the float32 scores when it
    returns None."""
    return _partners_and_scores(x, screen.data, _offsets(screen.data, g), 0.0, 2**20, None, None, None, screen)


def _best_in_float64(x: torch.Tensor, data: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Scores ``2 x.y_j + g_j - |y_j|^2`` in float64: ``(B, N)``."""
    x, data, g = x.double(), data.double(), g.double()
    return 2 * x @ data.T + g[None] - (data * data).sum(1)[None]


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 700),
    d=st.sampled_from([1, 2, 3, 32, 100]),
    offset=st.sampled_from([0.0, 30.0, -1000.0]),
    spread=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_screened_partner_is_the_float64_argmax(seed: int, n: int, d: int, offset: float, spread: float) -> None:
    """Whatever the data's offset and the potentials' spread, the partner's float64 score is the row maximum up to
    float32 rounding of the rescoring (1e-5 of the scores' scale), and its returned score is that score."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, d, generator=g) * 3 + offset
    potentials = torch.randn(n, generator=g) * spread
    x = torch.randn(33, d, generator=g) * 2
    partner, best = _pair(Screen(data), x, potentials)
    scores = _best_in_float64(x, data, potentials)
    scale = scores.abs().amax(1) + 1.0
    chosen = scores.gather(1, partner[:, None])[:, 0]
    assert ((scores.amax(1) - chosen) <= 1e-5 * scale).all()
    assert ((best.double() - chosen).abs() <= 1e-5 * scale).all()


def test_screened_partners_equal_the_float32_ones_in_high_dimension() -> None:
    """784-d data (MNIST-sized rows) and generic potentials: exactly the partners of the float32 argmax."""
    g = torch.Generator().manual_seed(0)
    data, x = torch.rand(3000, 784, generator=g), torch.randn(64, 784, generator=g)
    potentials = torch.randn(3000, generator=g) * 10
    found = Screen(data).argmax(x, _offsets(data, potentials))
    assert found is not None  # screened, not the float32 fallback
    assert torch.equal(found[0], _best_in_float64(x, data, potentials).argmax(1))


def test_ties_and_near_ties_fall_back_and_take_the_first_index() -> None:
    """Identical points make every entry a candidate: the screen declines (None), the float32 scores decide and,
    as ``torch.max``, return the first of the tied points; a few ties are settled by the screen alike."""
    screen = Screen(torch.ones(2000, 4))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert screen.argmax(x, torch.full((2000,), -4.0)) is None and (screen.calls, screen.fallbacks) == (1, 1)
    assert torch.equal(_pair(screen, x, torch.zeros(2000))[0], torch.zeros(8, dtype=torch.long))
    two = torch.cat([torch.zeros(1, 3), torch.ones(30, 3)])  # points 1..30 tie: the first of them wins
    found = Screen(two).argmax(torch.full((5, 3), 10.0), _offsets(two, torch.zeros(31)))
    assert found is not None and torch.equal(found[0], torch.ones(5, dtype=torch.long))


@pytest.mark.parametrize(
    ("scale", "screened"), [(1e-19, False), (1e-15, False), (1e-12, True), (1e15, True), (1e19, True), (1e31, False)]
)
def test_tiny_and_huge_scales(scale: float, screened: bool) -> None:
    """Scores near the float32 subnormals (which bfloat16 products flush to zero) or rows whose bound is huge: the
    partners are those of the float32 scores without the screen (the screen scales rows by powers of two, or
    declines: bounds below 2^-90 or above 2^100), and in range."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(1000, 8, generator=g) * (scale if scale < 1 else 1.0)
    x = torch.randn(32, 8, generator=g) * scale
    potentials = (data * data).sum(1)
    screen = Screen(data)
    partner, _ = _pair(screen, x, potentials)
    plain, _ = _partners_and_scores(x, data, _offsets(data, potentials), 0.0, 2**20, None, None, None)
    assert (partner < 1000).all() and torch.equal(partner, plain)
    assert screen.fallbacks == (0 if screened else 1)


def test_inference_mode_and_an_outlier() -> None:
    """Inference tensors are screened like others; one far outlier widens the window (more candidates) but not the
    answer."""
    g = torch.Generator().manual_seed(4)
    data, x = torch.randn(3000, 16, generator=g), torch.randn(64, 16, generator=g)
    data[7] = 400.0
    potentials = torch.randn(3000, generator=g)
    screen = Screen(data)
    with torch.inference_mode():
        offsets = _offsets(data, potentials)
        partner, _ = _partners_and_scores(x, data, offsets, 0.0, 2**20, None, None, None, screen)
        again, _ = _partners_and_scores(x, data, offsets, 0.0, 2**20, None, None, None, screen)
    assert torch.equal(partner, again)
    assert torch.equal(partner, _best_in_float64(x, data, potentials).argmax(1))


def test_prepared_potentials_follow_new_offsets() -> None:
    """The bfloat16 copy of the score offsets is kept only while the tensor is the same object; changed offsets
    come as a new tensor (as the semidiscrete coupler derives them after every update)."""
    g = torch.Generator().manual_seed(1)
    data, x = torch.randn(500, 2, generator=g), torch.randn(16, 2, generator=g)
    potentials, screen = torch.zeros(500), Screen(data)
    offsets = _offsets(data, potentials)
    before, _ = _partners_and_scores(x, data, offsets, 0.0, 2**20, None, None, None, screen)
    assert screen._prepared is not None and screen._prepared[0]() is offsets
    potentials[before[0]] -= 1e4  # that point can no longer win
    offsets = offsets.clone()
    offsets[before[0]] -= 1e4
    after, _ = _partners_and_scores(x, data, offsets, 0.0, 2**20, None, None, None, screen)
    assert after[0] != before[0]
    assert torch.equal(after, _best_in_float64(x, data, potentials).argmax(1))
    for seed in range(3):  # fresh tensors, which may land at a freed one's address
        fresh = torch.randn(500, generator=torch.Generator().manual_seed(seed)) * 5
        assert torch.equal(_pair(screen, x, fresh)[0], _best_in_float64(x, data, fresh).argmax(1))


def test_screen_refuses_what_its_bound_does_not_cover() -> None:
    with pytest.raises(ValueError, match="data: expected a float32 tensor"):
        Screen(torch.zeros(10, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"D <= {MAX_DIM}"):
        Screen(torch.zeros(2, MAX_DIM + 1))
    with pytest.raises(ValueError, match="screen: expected True, False or None"):
        SemidiscreteCoupler(screen="yes")  # type: ignore[arg-type]


def _coupler(data: torch.Tensor, **options: object) -> SemidiscreteCoupler:
    coupler = SemidiscreteCoupler(**options)  # type: ignore[arg-type]
    coupler.fit("gaussian", data, steps=50, batch_size=256, generator=torch.Generator().manual_seed(0), progress=False)
    return coupler


def test_coupler_with_and_without_screen_pairs_alike() -> None:
    """``screen=True`` and ``screen=False`` give the same partners on a fitted problem, and the same fit."""
    data = otcfm.data.sample("mixture", 3000, torch.Generator().manual_seed(0), dim=8)
    on, off = _coupler(data, screen=True), _coupler(data, screen=False)
    assert torch.equal(on.potentials, off.potentials)
    x0 = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    prepared = on._screen[2]  # made by the fit, used by its evaluation and then by pairing: one per dataset
    assert torch.equal(on(x0, data)[1], off(x0, data)[1])
    assert on._screen[2] is prepared and off._screen is None
    assert pickle.loads(pickle.dumps(on))._screen is None  # the prepared dataset is not pickled


def test_screen_is_used_only_where_it_applies() -> None:
    """Never for entropic pairing, labels or float64 data; by default not for small datasets."""
    data = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert SemidiscreteCoupler(screen=True)._screens(data, 64, 0.0)
    assert not SemidiscreteCoupler(screen=True)._screens(data, 64, 0.5)
    assert not SemidiscreteCoupler(screen=True)._screens(data.double(), 64, 0.0)
    assert not SemidiscreteCoupler()._screens(data, 64, 0.0)  # 300 points: below SCREEN_MIN_POINTS


def test_the_screen_copy_counts_against_the_memory_budget() -> None:
    """The screen's bfloat16 copy of the dataset (2 (D + 2) bytes a padded point) and its ``(B, N)`` scores must fit
    ``memory_budget`` together; otherwise the float32 scores, in chunks, pair without a copy."""
    data = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    copy, scores = 2 * 3072 * 66, 2 * 64 * (3000 + 256)
    assert SemidiscreteCoupler(screen=True, memory_budget=copy + scores)._screens(data, 64, 0.0)
    assert not SemidiscreteCoupler(screen=True, memory_budget=copy + scores - 1)._screens(data, 64, 0.0)
    assert not SemidiscreteCoupler(screen=True, memory_budget=scores + 2**10)._screens(data, 64, 0.0)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_screened_coupler_at_extreme_scales_pairs_like_the_float32_scores(scale: float) -> None:
    """Data and source at 1e-30 or 1e30 (squares under- or overflow float32): the coupler scores in units of a power
    of two, so the screen sees the problem at scale 1: it decides (no fallback) and agrees with the float32 scores."""
    data = otcfm.data.sample("mixture", 3000, torch.Generator().manual_seed(0), dim=8) * scale

    def source(n: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(n, 8, generator=generator) * scale

    fitted = []
    for screen in (True, False):
        coupler = SemidiscreteCoupler(screen=screen)
        coupler.fit(source, data, steps=50, batch_size=256, generator=torch.Generator().manual_seed(0), progress=False)
        fitted.append(coupler)
    on, off = fitted
    assert torch.equal(on.potentials, off.potentials) and bool(torch.isfinite(on.potentials).all())
    x0 = source(256, torch.Generator().manual_seed(1))
    j = on(x0, data).j
    assert torch.equal(j, off(x0, data).j) and on._screen[2].fallbacks == 0
    h = on.potentials / on.unit**2 - ((data.double() / on.unit) ** 2).sum(1)
    best = (
        _best_in_float64(x0 / on.unit, data / on.unit, torch.zeros(3000))
        + h[None]
        + ((data.double() / on.unit) ** 2).sum(1)[None]
    )
    chosen = best.gather(1, j[:, None])[:, 0]
    assert ((best.amax(1) - chosen) <= 1e-5 * (best.abs().amax(1) + 1.0)).all()
