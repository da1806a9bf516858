"""The cadence logic on its own: the band, the verdict rule, the resampling grid and line."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyd.cadence import grid_points, interpolate, judge, outside_band, period_band


def test_band_from_tolerance_alone() -> None:
    assert period_band(1.0, None, None, 0.25) == pytest.approx((0.75, 1.25))
    assert period_band(2.0, None, None, 0.1) == pytest.approx((1.8, 2.2))


def test_band_widened_by_the_training_spread_never_narrowed() -> None:
    # Wider spread than the tolerance on both sides: the spread wins.
    assert period_band(1.0, 0.5, 1.6, 0.25) == pytest.approx((0.5, 1.6))
    # Narrower spread (regular training data): the tolerance wins.
    assert period_band(1.0, 0.99, 1.01, 0.25) == pytest.approx((0.75, 1.25))
    # One side only.
    assert period_band(1.0, 0.6, None, 0.25) == pytest.approx((0.6, 1.25))
    assert period_band(1.0, None, 1.4, 0.25) == pytest.approx((0.75, 1.4))


def test_no_period_no_band() -> None:
    assert period_band(None, None, None, 0.25) is None


@pytest.mark.parametrize("tolerance", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_band_refuses_a_tolerance_outside_0_1(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        period_band(1.0, None, None, tolerance)


@pytest.mark.parametrize(
    ("period", "p05", "p95", "name"),
    [(0.0, None, None, "sample_period_s"), (float("inf"), None, None, "sample_period_s"),
     (1.0, -1.0, None, "p05"), (1.0, None, float("nan"), "p95")],
)  # fmt: skip
def test_band_refuses_bad_periods(period: float, p05: float | None, p95: float | None, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        period_band(period, p05, p95, 0.25)


def test_judge_decides_from_the_counts_unless_exactly_half_lie_on_one_side() -> None:
    below = np.array([5, 4, 9, 0, 3, 8, 0, 8], np.int64)
    above = np.array([0, 0, 0, 9, 3, 0, 8, 8], np.int64)
    n = np.array([9, 9, 16, 16, 7, 16, 16, 16], np.int64)
    outside, undecided = judge(below, above, n)
    # 5 of 9 below: the median is below. 4 of 9 below: it is not. 9 of 16 above: above.
    # 3 below and 3 above of 7: the median (the 4th step) is inside.
    # 8 of 16 on one side: the median is the mean of the 8th and 9th steps, only its value says.
    assert outside.tolist() == [True, False, True, True, False, False, False, False]
    assert undecided.tolist() == [False, False, False, False, False, True, True, True]
    outside, undecided = judge(below[2:4], above[2:4], 16)
    assert outside.tolist() == [True, True]
    assert not undecided.any()


def test_outside_band() -> None:
    assert outside_band(0.5, (0.75, 1.25))
    assert outside_band(3.0, (0.75, 1.25))
    assert not outside_band(0.75, (0.75, 1.25))  # the band's edges are inside
    assert not outside_band(1.25, (0.75, 1.25))


def test_grid_points_up_to_and_including_t1() -> None:
    # Grid 10, 11, 12, ...: after k=0 (t=10) and up to t1=13.5: k = 1, 2, 3.
    assert grid_points(10.0, 1.0, 0, 13.5, 100).tolist() == [1, 2, 3]
    # t1 exactly on the grid is included, also through rounding (0.1 is not exact in binary).
    assert grid_points(0.0, 0.1, 0, 0.3, 100).tolist() == [1, 2, 3]
    assert grid_points(10.0, 1.0, 3, 13.9, 100).tolist() == []
    assert grid_points(10.0, 1.0, 0, 20.0, 4).tolist() == [1, 2, 3, 4]  # capped


def test_interpolate_is_linear_in_time_and_never_extrapolates() -> None:
    v0 = np.array([0.0, 10.0], np.float32)
    v1 = np.array([4.0, 2.0], np.float32)
    out = interpolate(100.0, v0, 104.0, v1, np.array([101.0, 103.0, 104.0, 105.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.0, 8.0], [3.0, 4.0], [4.0, 2.0], [4.0, 2.0]])
    with pytest.raises(ValueError, match="after"):
        interpolate(5.0, v0, 5.0, v1, np.array([5.0]))
