"""Sample cadence: the model's sample period is part of its contract, checked per device.

A model learns what its features do over ``window_length`` *samples*. Fed the same device
at another rate, a window spans another stretch of time: at 0.2 Hz a 1 Hz model sees
five times the change it learned between neighbouring samples, at 2 Hz half of it, and
its scores mean nothing. So the daemon estimates each device's cadence from the
timestamps of its readings and refuses to score a device whose cadence is outside the
band the model was trained on (``anomalyd.cadence_tracker`` keeps the per-device state
for ``DeviceBuffers``; this module holds the pure logic).

**The estimate is the median of the device's recent steps** (time between consecutive
readings, in data time, the last ``RING_STEPS`` of them). Not the mean, and not readings
per unit of time: a reading lost on the way makes one step twice as long, a burst of
retransmissions makes steps near zero, and jitter spreads every step a little. Each of
these moves a mean or a rate, but not the median while they stay a minority, so a
healthy device is never judged on a few odd steps. A verdict needs ``MIN_STEPS`` steps.

**The band** (``period_band``) is the model's period widened by a relative tolerance,
and further by the spread of periods in the training data when the contract records it
(5th and 95th percentiles): a model trained on jittery data has seen those steps.

**The verdict**: a device is *mismatched* when its median step lies outside the band.
``CadenceTracker`` keeps two counts per device, steps below the band and steps above it,
up to date as steps enter and leave its ring, and ``judge`` decides from them alone
whenever it can: more than half of the steps on one side puts the median there; fewer
than half on both sides puts it inside. Only exactly half on one side (an even number of
steps, the median being the mean of a step outside on that side and one that is not)
needs the median itself, which is rare. So a device costs no sort per reading.

**Resampling** (``grid_points``, ``interpolate``), opt-in: a mismatched device's readings
are interpolated linearly onto the model's period grid, so the model sees what it was
trained on, up to the interpolation. Linear interpolation invents nothing between two
readings but a straight line: for a device much slower than the model, the windows are
smoother than real data at the model's rate, and the scores of fast transients are
lower than they would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MIN_STEPS",
    "RING_STEPS",
    "CadenceChange",
    "grid_points",
    "interpolate",
    "judge",
    "outside_band",
    "period_band",
]

#: Steps kept per device: a lasting change of cadence shows after a little over half as many.
RING_STEPS = 16
#: Steps needed before a device gets a verdict (until then it is scored as before).
MIN_STEPS = 8


@dataclass(frozen=True, slots=True)
class CadenceChange:
    """A device's cadence verdict changed (reported once per change)."""

    device: str
    mismatched: bool  # True: now outside the band; False: back inside it
    period_s: float  # the device's median step when the verdict changed
    expected_s: float  # the model's sample period
    ts: float  # data time of the reading that changed the verdict


def period_band(
    sample_period_s: float | None,
    p05: float | None,
    p95: float | None,
    tolerance: float,
) -> tuple[float, float] | None:
    """The band of acceptable median steps, in seconds; None when there is no period to check.

    ``[min(p05, P·(1 - tolerance)), max(p95, P·(1 + tolerance))]`` with ``P`` the model's
    sample period; a missing percentile leaves its side at ``P·(1 ∓ tolerance)``. A model
    without a recorded period (older training runs) gets no cadence check at all.
    """
    if not (0 < tolerance < 1):
        raise ValueError(f"tolerance must be between 0 and 1 (exclusive), got {tolerance!r}")
    if sample_period_s is None:
        return None
    for name, v in (("sample_period_s", sample_period_s), ("p05", p05), ("p95", p95)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    lo = sample_period_s * (1 - tolerance)
    hi = sample_period_s * (1 + tolerance)
    if p05 is not None:
        lo = min(lo, p05)
    if p95 is not None:
        hi = max(hi, p95)
    return lo, hi


def judge(
    n_below: npt.NDArray[np.int64], n_above: npt.NDArray[np.int64], n: npt.NDArray[np.int64] | int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Is the median of ``n`` steps outside the band? ``(outside, undecided)`` from the counts.

    Where ``undecided``, exactly half of the steps lie on one side and the answer depends
    on the median's value (``outside_band``); ``outside`` is False there.
    """
    twice_below = 2 * n_below
    twice_above = 2 * n_above
    outside = (twice_below > n) | (twice_above > n)
    undecided = (twice_below == n) | (twice_above == n)
    return outside, undecided


def outside_band(median_s: float, band: tuple[float, float]) -> bool:
    """The verdict from the median step itself."""
    return median_s < band[0] or median_s > band[1]


def grid_points(anchor: float, period: float, k_last: int, t1: float, cap: int) -> npt.NDArray[np.int64]:
    """Indices ``k > k_last`` of the grid times ``anchor + k·period`` that are ``<= t1``.

    At most ``cap`` of them (the first ones): a bound on the work one reading can cause.
    A grid time within a microsecond after ``t1`` counts as ``t1`` itself, so that a
    reading exactly on the grid is not lost to rounding.
    """
    k_end = math.floor((t1 - anchor) / period + 1e-6 / period)
    n = max(0, min(k_end - k_last, cap))
    return np.arange(k_last + 1, k_last + 1 + n, dtype=np.int64)


def interpolate(
    t0: float,
    v0: npt.NDArray[np.float32],
    t1: float,
    v1: npt.NDArray[np.float32],
    times: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """Values at ``times`` on the straight line from ``(t0, v0)`` to ``(t1, v1)``, shape (n, F).

    Times are clipped to ``[t0, t1]``: the line is never extrapolated.
    """
    if not t1 > t0:
        raise ValueError(f"t1 must be after t0, got t0={t0!r} t1={t1!r}")
    w = np.clip((times - t0) / (t1 - t0), 0.0, 1.0)[:, None]
    a = v0.astype(np.float64)[None, :]
    b = v1.astype(np.float64)[None, :]
    return (a + w * (b - a)).astype(np.float32)
