"""Score-threshold calibration to a target false-alarm rate, by extreme-value theory.

Peaks over threshold as in Siffer et al., "Anomaly Detection in Streams with Extreme Value
Theory", KDD 2017 (SPOT, its batch initialisation step):

1. initial threshold ``t``: the empirical ``initial_quantile`` of the held-out normal scores
   (as an order statistic: the smallest score with at most ``floor((1 - q0)·n)`` above it);
2. the ``N_t`` peaks above ``t`` give excesses ``Y = s - t``, fitted with a generalised Pareto
   distribution GPD(shape γ, scale σ) by maximum likelihood;
3. the threshold for a false-alarm rate ``q`` per window is
   ``z_q = t + σ/γ · ((q·n/N_t)^(-γ) - 1)``, or ``t - σ·ln(q·n/N_t)`` when γ = 0.

The GPD fit (``fit_gpd``) uses Grimshaw's reduction to one dimension, as the paper does, but
instead of hunting the roots of the likelihood equation it maximises the profile
log-likelihood directly: for ``x = γ/σ`` the MLE of γ is ``mean(log(1 + x·Y))`` and the
profile log-likelihood is ``-n·log(γ/x) - n·(1 + γ)``. A log-spaced grid over both signs of
``x`` (plus the exponential limit ``x → 0``) followed by golden-section refinement finds the
global maximum without derivatives or starting points. γ is restricted to ``[-1, ∞)``: below
-1 the GPD likelihood is unbounded and the MLE does not exist.

When POT is not used, the threshold is the empirical upper order statistic: the smallest
score such that at most ``floor(q·n)`` calibration scores lie strictly above it. This happens
(and ``Calibration.note`` says why) when

- fewer than ``min_peaks`` scores exceed ``t`` (the tail is too thin to fit);
- the fit fails or gives a non-finite threshold;
- ``q·n >= N_t``: the target lies at or below ``t``, inside the body of the distribution,
  where the empirical quantile is well estimated and POT has nothing to add.

Whenever the target lies above ``t`` POT is kept, even if ``q·n`` is large: the fitted tail is
then a smoothed estimate of the same quantile, not an extrapolation. With this rule the
threshold is monotone non-increasing in ``q``, and at least ``t`` whenever ``q·n < N_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from anomalyd.contract import PotFit, Threshold

FloatArray = npt.NDArray[np.float64]

_MIN_EXCESSES = 3
#: Grid of x·mean(Y) for x > 0: covers shapes from ~1e-6 up to very heavy tails.
_POS_GRID = np.logspace(-6.0, 6.0, 193)
#: Grid of s in x·max(Y) = -(1 - s) for x < 0, from next to the support bound to next to 0.
_NEG_GRID = np.logspace(-12.0, math.log10(1.0 - 1e-7), 193)
_GOLDEN_ITERATIONS = 80
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class GpdFit:
    """Generalised Pareto distribution of excesses: shape γ (ξ), scale σ > 0."""

    shape: float
    scale: float


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and how it was obtained."""

    threshold: float
    method: Literal["pot", "empirical_quantile", "training_quantile"]
    target_false_alarm_rate: float | None  # None: "training_quantile" targets no rate
    n_scores: int
    initial_quantile: float | None = None
    initial_threshold: float | None = None
    fit: GpdFit | None = None
    n_peaks: int = 0
    note: str = ""  # why the fallback happened, if it did


def _profile(y: FloatArray, x: float) -> tuple[float, float]:
    """(profile log-likelihood / n, γ̂) at x = γ/σ, for excesses y; -inf where undefined."""
    gamma = float(np.mean(np.log1p(x * y)))
    if not math.isfinite(gamma) or gamma < -1.0 or gamma / x <= 0.0:
        return -math.inf, gamma
    return -math.log(gamma / x) - 1.0 - gamma, gamma


def _golden_max(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Argmax of a unimodal-looking f on [lo, hi] by golden-section search."""
    c, d = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(_GOLDEN_ITERATIONS):
        if fc >= fd:
            hi, d, fd = d, c, fc
            c = hi - _INV_PHI * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + _INV_PHI * (hi - lo)
            fd = f(d)
    return c if fc >= fd else d


def fit_gpd(excesses: npt.ArrayLike) -> GpdFit:
    """Maximum-likelihood GPD fit to non-negative excesses (see the module docstring).

    Raises ``ValueError`` for fewer than 3 excesses, negative or non-finite values, all-zero
    excesses, or a fit that does not come out finite.
    """
    y_raw = np.asarray(excesses, dtype=np.float64).ravel()
    if y_raw.size < _MIN_EXCESSES:
        raise ValueError(f"excesses: need at least {_MIN_EXCESSES} values, got {y_raw.size}")
    if not np.all(np.isfinite(y_raw)):
        raise ValueError("excesses: contain NaN or infinite values")
    if np.any(y_raw < 0):
        raise ValueError("excesses: must be >= 0 (they are scores minus the initial threshold)")
    mean = float(np.mean(y_raw))
    if not mean > 0.0:
        raise ValueError("excesses: all zero, nothing to fit")
    # Work scale-free: y has mean 1, and x below is x·mean(Y).
    y = y_raw / mean
    y_max = float(np.max(y))

    def pos_x(u: float) -> float:
        return math.exp(u)

    def neg_x(u: float) -> float:
        return -(1.0 - math.exp(u)) / y_max

    best_ll, best_x = -1.0, 0.0  # the exponential limit x → 0: log-likelihood/n = -1
    # Each branch is searched in a log coordinate u; to_x maps it back to x.
    for grid, to_x in ((np.log(_POS_GRID), pos_x), (np.log(_NEG_GRID), neg_x)):
        ll = np.array([_profile(y, to_x(float(u)))[0] for u in grid])
        i = int(np.argmax(ll))
        if not math.isfinite(ll[i]):
            continue

        def objective(u: float, to_x: Callable[[float], float] = to_x) -> float:
            return _profile(y, to_x(u))[0]

        u_star = _golden_max(objective, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.size - 1)]))
        for ll_c, u_c in ((float(ll[i]), float(grid[i])), (objective(u_star), u_star)):
            if ll_c > best_ll:
                best_ll, best_x = ll_c, to_x(u_c)

    if best_x == 0.0:
        shape, scale = 0.0, mean
    else:
        gamma = _profile(y, best_x)[1]
        shape, scale = gamma, gamma / best_x * mean
    if not (math.isfinite(shape) and math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"excesses: GPD fit did not converge (shape={shape}, scale={scale})")
    return GpdFit(shape=float(shape), scale=float(scale))


def _check_scores(scores: npt.ArrayLike) -> FloatArray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores: need a 1-D array, got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores: empty")
    bad = int(np.count_nonzero(~np.isfinite(s)))
    if bad:
        raise ValueError(f"scores: {bad} of {s.size} values are NaN or infinite")
    return s


def _check_rate(v: float, name: str) -> float:
    f = float(v)
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise ValueError(f"{name}: need a number strictly between 0 and 1, got {v!r}")
    return f


def _upper_order_stat(sorted_scores: FloatArray, rate: float) -> float:
    """Smallest sample value with at most floor(rate·n) values strictly above it."""
    n = sorted_scores.size
    k = min(math.floor(rate * n), n - 1)
    return float(sorted_scores[n - 1 - k])


def calibrate_threshold(
    scores: npt.ArrayLike,
    target_false_alarm_rate: float,
    initial_quantile: float = 0.98,
    min_peaks: int = 30,
) -> Calibration:
    """Threshold with false-alarm rate ``target_false_alarm_rate`` per window on normal scores.

    POT with a GPD tail where the tail is rich enough, else the empirical quantile (see the
    module docstring for the rules). Raises ``ValueError`` on empty, non-1-D, NaN or infinite
    scores, rates outside (0, 1), or ``min_peaks < 1``.
    """
    s = np.sort(_check_scores(scores))
    q = _check_rate(target_false_alarm_rate, "target_false_alarm_rate")
    q0 = _check_rate(initial_quantile, "initial_quantile")
    if isinstance(min_peaks, bool) or not isinstance(min_peaks, int) or min_peaks < 1:
        raise ValueError(f"min_peaks: need an integer >= 1, got {min_peaks!r}")
    n = s.size
    t = _upper_order_stat(s, 1.0 - q0)
    peaks = s[s > t] - t
    n_t = int(peaks.size)

    def empirical(note: str) -> Calibration:
        if q * n < 1.0:
            note += (
                f"; q·n = {q * n:.3g} < 1, so the threshold is the sample maximum and the true "
                "false-alarm rate may exceed the target"
            )
        return Calibration(
            threshold=_upper_order_stat(s, q),
            method="empirical_quantile",
            target_false_alarm_rate=q,
            n_scores=n,
            initial_quantile=q0,
            initial_threshold=t,
            n_peaks=n_t,
            note=note,
        )

    if q * n >= n_t:
        return empirical(
            f"target rate q={q:g} lies at or below the initial threshold (q·n = {q * n:.4g} >= "
            f"{n_t} peaks): the empirical quantile is reliable there"
        )
    if n_t < min_peaks:
        return empirical(f"tail too thin for POT: {n_t} peaks above the initial threshold, need {min_peaks}")
    try:
        fit = fit_gpd(peaks)
    except ValueError as exc:
        return empirical(f"GPD fit failed ({exc})")
    ratio = q * n / n_t  # < 1 here, so z >= t for every shape
    if fit.shape == 0.0:
        z = t - fit.scale * math.log(ratio)
    else:
        # expm1 keeps the γ → 0 limit accurate.
        z = t + fit.scale / fit.shape * math.expm1(-fit.shape * math.log(ratio))
    if not math.isfinite(z):
        return empirical(f"POT threshold is not finite (shape={fit.shape:.4g}, scale={fit.scale:.4g})")
    return Calibration(
        threshold=max(z, t),  # rounding must not take it below t
        method="pot",
        target_false_alarm_rate=q,
        n_scores=n,
        initial_quantile=q0,
        initial_threshold=t,
        fit=fit,
        n_peaks=n_t,
    )


def training_quantile_threshold(scores: npt.ArrayLike, quantile: float, factor: float) -> Calibration:
    """``factor`` × the ``quantile`` of ``scores`` (every window of the training data).

    For data too short to hold out a tail worth fitting (SKAB's 400 rows give about 30
    held-out windows): the quantile of a few hundred in-sample windows is stable, and
    ``factor`` puts the threshold as far above it as out-of-sample scores tend to sit.
    Raises ``ValueError`` on bad scores, a quantile outside (0, 1) or a factor <= 0.
    """
    s = _check_scores(scores)
    q = _check_rate(quantile, "quantile")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: need a positive number, got {factor!r}")
    base = float(np.quantile(s, q))
    threshold = factor * base
    return Calibration(
        threshold=threshold,
        method="training_quantile",
        target_false_alarm_rate=None,
        n_scores=int(s.size),
        note=(
            f"{factor:g} x the {q:g} quantile ({base:.6g}) of {s.size} training-data windows; "
            f"{empirical_false_alarm_rate(s, threshold):.2e} of them lie above it"
        ),
    )


def empirical_false_alarm_rate(scores: npt.ArrayLike, threshold: float) -> float:
    """Fraction of ``scores`` strictly above ``threshold`` (an alarm is ``score > threshold``)."""
    s = _check_scores(scores)
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold: need a finite number, got {threshold!r}")
    return float(np.count_nonzero(s > threshold)) / s.size


def to_contract_threshold(cal: Calibration) -> Threshold:
    """The contract's ``Threshold`` for a calibration (POT parameters included when used)."""
    pot = None
    if cal.method == "pot":
        if cal.fit is None or cal.initial_quantile is None or cal.initial_threshold is None:
            raise ValueError("calibration: method 'pot' needs fit, initial_quantile and initial_threshold")
        pot = PotFit(
            initial_quantile=cal.initial_quantile,
            initial_threshold=cal.initial_threshold,
            shape=cal.fit.shape,
            scale=cal.fit.scale,
            n_peaks=cal.n_peaks,
        )
    return Threshold(
        value=cal.threshold,
        method=cal.method,
        target_false_alarm_rate=cal.target_false_alarm_rate,
        n_calibration_windows=cal.n_scores,
        pot=pot,
        note=cal.note,
    )
