"""Threshold calibration: GPD fit, POT thresholds that hold their false-alarm rate, fallbacks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anomalyd.contract import Threshold
from anomalyd_train.calibration import (
    Calibration,
    GpdFit,
    calibrate_threshold,
    empirical_false_alarm_rate,
    fit_gpd,
    to_contract_threshold,
    training_quantile_threshold,
)

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def gpd_sample(rng: np.random.Generator, shape: float, scale: float, n: int) -> np.ndarray:
    """Inverse CDF of GPD(shape, scale): F^-1(u) = scale/shape · ((1-u)^-shape - 1)."""
    u = rng.random(n)
    if abs(shape) < 1e-12:  # the exponential limit (and scale/shape would overflow)
        return -scale * np.log1p(-u)
    # expm1 form of ((1-u)^-shape - 1): exact as shape → 0.
    return scale / shape * np.expm1(-shape * np.log1p(-u))


# n = 10,000: the MLE's standard error is about (1+γ)/sqrt(n) ≤ 0.02 for the shape and
# ~2 % for the scale, so ±0.06 and ±8 % are 3–4 standard errors (seeds are fixed).
@pytest.mark.parametrize(
    ("shape", "scale"),
    [(0.0, 2.0), (0.2, 1.0), (0.5, 0.5), (1.0, 3.0), (-0.2, 1.0), (-0.5, 4.0)],
)
def test_fit_gpd_recovers_known_parameters(shape: float, scale: float) -> None:
    rng = np.random.default_rng(12345)
    fit = fit_gpd(gpd_sample(rng, shape, scale, 10_000))
    assert fit.shape == pytest.approx(shape, abs=0.06)
    assert fit.scale == pytest.approx(scale, rel=0.08)


def test_fit_gpd_is_scale_equivariant() -> None:
    y = gpd_sample(np.random.default_rng(1), 0.3, 1.0, 2000)
    a, b = fit_gpd(y), fit_gpd(y * 1000.0)
    assert b.shape == pytest.approx(a.shape, abs=1e-6)
    assert b.scale == pytest.approx(a.scale * 1000.0, rel=1e-6)


def test_fit_gpd_on_uniform_excesses_finds_a_bounded_tail() -> None:
    # Uniform(0, 2) is GPD(shape=-1, scale=2): the edge of the allowed shapes.
    fit = fit_gpd(np.random.default_rng(2).uniform(0.0, 2.0, 5000))
    assert -1.0 <= fit.shape < -0.8
    assert fit.scale == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([1.0, 2.0], "at least 3"),
        ([1.0, np.nan, 2.0, 3.0], "NaN or infinite"),
        ([1.0, np.inf, 2.0, 3.0], "NaN or infinite"),
        ([1.0, -0.5, 2.0, 3.0], ">= 0"),
        ([0.0, 0.0, 0.0], "all zero"),
    ],
)
def test_fit_gpd_rejects_bad_excesses(bad: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_gpd(np.array(bad))


SAMPLERS: dict[str, Sampler] = {
    "exponential": lambda rng, n: rng.exponential(1.0, n),
    # Lomax(α=3): a Pareto tail, GPD shape 1/3 above any threshold.
    "pareto": lambda rng, n: (1.0 - rng.random(n)) ** (-1.0 / 3.0) - 1.0,
    "abs_student_t4": lambda rng, n: np.abs(rng.standard_t(4.0, n)),
    # What a 3-feature score looks like: mean of squared standard normals.
    "chi2_3_over_3": lambda rng, n: rng.chisquare(3.0, n) / 3.0,
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_pot_threshold_holds_the_target_rate_on_fresh_data(name: str) -> None:
    """Calibrate on 20k scores (400 peaks at q0=0.98), extrapolate to q=1e-3 (20 expected
    exceedances in calibration), then count alarms in 200k fresh samples (200 expected).
    Tolerance: the observed rate is within a factor 2 of the target."""
    sample = SAMPLERS[name]
    rng = np.random.default_rng(2017)
    q = 1e-3
    cal = calibrate_threshold(sample(rng, 20_000), q)
    assert cal.method == "pot", cal.note
    assert cal.n_peaks == 400
    assert cal.fit is not None
    rate = empirical_false_alarm_rate(sample(rng, 200_000), cal.threshold)
    assert q / 2 <= rate <= 2 * q, (rate, cal)


def test_pot_shape_reflects_the_tail() -> None:
    rng = np.random.default_rng(3)
    light = calibrate_threshold(SAMPLERS["exponential"](rng, 50_000), 1e-3)
    heavy = calibrate_threshold(SAMPLERS["pareto"](rng, 50_000), 1e-3)
    assert light.fit is not None
    assert heavy.fit is not None
    assert abs(light.fit.shape) < 0.1
    assert heavy.fit.shape == pytest.approx(1.0 / 3.0, abs=0.12)


def test_thin_tail_falls_back_to_empirical_quantile_with_a_note() -> None:
    scores = np.random.default_rng(4).exponential(1.0, 1000)  # 20 peaks above q0=0.98
    cal = calibrate_threshold(scores, 1e-3, min_peaks=30)
    assert cal.method == "empirical_quantile"
    assert cal.fit is None
    assert cal.n_peaks == 20
    assert "tail too thin" in cal.note
    assert "20 peaks" in cal.note
    # q·n = 1: at most one calibration score lies above it.
    assert cal.threshold == np.sort(scores)[-2]
    assert empirical_false_alarm_rate(scores, cal.threshold) <= 1e-3


def test_tiny_sample_notes_that_the_maximum_is_used() -> None:
    scores = np.arange(100.0)
    cal = calibrate_threshold(scores, 1e-3)
    assert cal.method == "empirical_quantile"
    assert cal.threshold == 99.0
    assert "sample maximum" in cal.note


def test_target_inside_the_body_uses_the_empirical_quantile() -> None:
    scores = np.random.default_rng(5).normal(size=10_000)
    cal = calibrate_threshold(scores, 0.05, initial_quantile=0.98)
    assert cal.method == "empirical_quantile"
    assert "at or below the initial threshold" in cal.note
    assert cal.initial_threshold is not None
    assert cal.threshold <= cal.initial_threshold
    assert empirical_false_alarm_rate(scores, cal.threshold) == pytest.approx(0.05, abs=1e-3)


def test_degenerate_scores_fall_back() -> None:
    scores = np.concatenate([np.zeros(5000), np.ones(100)])  # all 100 peaks equal: a fit but no tail
    cal = calibrate_threshold(scores, 1e-3, initial_quantile=0.9)
    assert math.isfinite(cal.threshold)
    assert cal.threshold >= 0.0


@pytest.mark.parametrize(
    ("scores", "q", "kwargs", "match"),
    [
        (np.array([]), 1e-3, {}, "scores: empty"),
        (np.array([1.0, np.nan, 2.0]), 1e-3, {}, "scores: 1 of 3 values are NaN or infinite"),
        (np.array([1.0, np.inf]), 1e-3, {}, "NaN or infinite"),
        (np.ones((10, 2)), 1e-3, {}, "1-D"),
        (np.ones(10), 0.0, {}, "target_false_alarm_rate"),
        (np.ones(10), 1.0, {}, "target_false_alarm_rate"),
        (np.ones(10), float("nan"), {}, "target_false_alarm_rate"),
        (np.ones(10), 1e-3, {"initial_quantile": 1.5}, "initial_quantile"),
        (np.ones(10), 1e-3, {"min_peaks": 0}, "min_peaks"),
    ],
)
def test_bad_input_raises_value_error(
    scores: np.ndarray, q: float, kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(scores, q, **kwargs)  # type: ignore[arg-type]


def test_empirical_false_alarm_rate_counts_strictly_above() -> None:
    assert empirical_false_alarm_rate(np.array([1.0, 2.0, 3.0, 4.0]), 2.0) == 0.5
    with pytest.raises(ValueError, match="threshold"):
        empirical_false_alarm_rate(np.array([1.0]), float("nan"))
    with pytest.raises(ValueError, match="empty"):
        empirical_false_alarm_rate(np.array([]), 1.0)


def test_contract_threshold_for_pot_and_fallback() -> None:
    rng = np.random.default_rng(6)
    pot = calibrate_threshold(rng.exponential(1.0, 20_000), 1e-3)
    t = to_contract_threshold(pot)
    assert isinstance(t, Threshold)
    assert t.method == "pot"
    assert t.value == pot.threshold
    assert t.target_false_alarm_rate == 1e-3
    assert t.n_calibration_windows == 20_000
    assert t.pot is not None
    assert pot.fit is not None
    assert t.pot.shape == pot.fit.shape
    assert t.pot.scale == pot.fit.scale
    assert t.pot.n_peaks == pot.n_peaks
    assert t.pot.initial_threshold == pot.initial_threshold

    emp = to_contract_threshold(calibrate_threshold(rng.exponential(1.0, 500), 1e-3))
    assert emp.method == "empirical_quantile"
    assert emp.pot is None
    assert "tail too thin" in emp.note

    broken = Calibration(threshold=1.0, method="pot", target_false_alarm_rate=0.01, n_scores=10)
    with pytest.raises(ValueError, match="needs fit"):
        to_contract_threshold(broken)
    assert GpdFit(0.1, 1.0).scale == 1.0


def test_training_quantile_threshold_is_factor_times_the_quantile() -> None:
    scores = np.random.default_rng(9).exponential(1.0, 1000)
    cal = training_quantile_threshold(scores, 0.9, 1.2)
    base = float(np.quantile(scores, 0.9))
    assert cal.threshold == pytest.approx(1.2 * base, rel=1e-12)
    assert cal.method == "training_quantile"
    assert cal.target_false_alarm_rate is None
    assert cal.n_scores == 1000
    assert cal.fit is None
    above = empirical_false_alarm_rate(scores, cal.threshold)
    assert 0.0 < above < 0.1
    assert f"{above:.2e} of them lie above it" in cal.note
    assert "1.2 x the 0.9 quantile" in cal.note
    assert "1000 training-data windows" in cal.note
    t = to_contract_threshold(cal)
    assert (t.method, t.value, t.target_false_alarm_rate, t.pot) == (
        "training_quantile",
        cal.threshold,
        None,
        None,
    )
    assert t.n_calibration_windows == 1000
    assert t.note == cal.note


@pytest.mark.parametrize(
    ("scores", "quantile", "factor", "match"),
    [
        (np.ones(10), 0.99, 0.0, "factor"),
        (np.ones(10), 0.99, -2.0, "factor"),
        (np.ones(10), 0.99, float("nan"), "factor"),
        (np.ones(10), 0.99, float("inf"), "factor"),
        (np.ones(10), 0.0, 2.0, "quantile"),
        (np.ones(10), 1.0, 2.0, "quantile"),
        (np.ones(10), float("nan"), 2.0, "quantile"),
        (np.array([]), 0.99, 2.0, "empty"),
        (np.array([1.0, float("nan")]), 0.99, 2.0, "NaN"),
        (np.ones((2, 2)), 0.99, 2.0, "1-D"),
    ],
)
def test_training_quantile_threshold_rejects_bad_input(
    scores: np.ndarray, quantile: float, factor: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        training_quantile_threshold(scores, quantile, factor)


@st.composite
def score_samples(draw: st.DrawFn) -> np.ndarray:
    """Either arbitrary floats (ties, clusters, negatives) or a seeded sample of a known
    distribution, shifted, scaled and sometimes rounded (so POT is exercised too)."""
    if draw(st.booleans()):
        return draw(
            arrays(
                np.float64,
                st.integers(50, 3000),
                elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
            )
        )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = SAMPLERS[draw(st.sampled_from(sorted(SAMPLERS)))](rng, draw(st.integers(200, 8000)))
    x = draw(st.floats(-100.0, 100.0)) + draw(st.floats(1e-3, 1e3)) * x
    decimals = draw(st.none() | st.integers(0, 3))
    return x if decimals is None else np.round(x, decimals)


@settings(max_examples=80, deadline=None)
@given(
    scores=score_samples(),
    log_q=st.floats(-5.0, -0.7),
    factor=st.floats(1.0, 50.0),
    q0=st.floats(0.8, 0.995),
)
def test_threshold_properties(scores: np.ndarray, log_q: float, factor: float, q0: float) -> None:
    """Above the initial threshold when the target is beyond it; non-increasing in q."""
    q = 10.0**log_q
    q2 = min(q * factor, 0.99)
    a = calibrate_threshold(scores, q, initial_quantile=q0)
    b = calibrate_threshold(scores, q2, initial_quantile=q0)
    for cal in (a, b):
        assert math.isfinite(cal.threshold)
        assert cal.threshold <= scores.max() or cal.method == "pot"
        assert cal.initial_threshold is not None
        if cal.target_false_alarm_rate * len(scores) < cal.n_peaks:
            assert cal.threshold >= cal.initial_threshold
        if cal.method == "empirical_quantile":
            assert empirical_false_alarm_rate(scores, cal.threshold) <= cal.target_false_alarm_rate
    assert a.threshold >= b.threshold


@settings(max_examples=30, deadline=None)
@given(
    shape=st.floats(-0.4, 0.8),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_fit_gpd_always_finite_on_gpd_data(shape: float, scale: float, seed: int) -> None:
    fit = fit_gpd(gpd_sample(np.random.default_rng(seed), shape, scale, 300))
    assert math.isfinite(fit.shape)
    assert fit.scale > 0
    assert fit.shape >= -1.0


def test_pot_threshold_is_monotone_over_a_grid_of_rates() -> None:
    scores = SAMPLERS["abs_student_t4"](np.random.default_rng(8), 20_000)
    cals = [calibrate_threshold(scores, q) for q in np.logspace(-6, -1.75, 30)]
    assert all(c.method == "pot" for c in cals)
    thresholds = np.array([c.threshold for c in cals])
    assert np.all(np.diff(thresholds) < 0)
    assert np.all(thresholds > cals[0].initial_threshold)
