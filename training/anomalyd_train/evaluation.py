"""Detection-quality metrics: SKAB's point metrics, a NAB-style changepoint score, delays,
and the event-level metrics of the synthetic counterpart.

Everything here is a pure function of labels, timestamps and 0/1 decisions (numpy only).

**Point metrics** (SKAB's leaderboard definitions, pooled over every test row):
``F1 = TP / (TP + (FP + FN) / 2)``, ``FAR = FP / (FP + TN) · 100``,
``MAR = FN / (FN + TP) · 100``. Pool by adding ``Confusion`` counts, never by averaging
per-file ratios.

**NAB-style changepoint score** (Lavin & Ahmad 2015, the scoring of ``numenta/NAB``'s
``sweeper.py``; SKAB reports it for changepoint detection):

- each labelled changepoint ``c`` opens a window ``[c, c + window_s]`` to its right;
- the detections are the *alarm onsets*: rows whose decision is 1 while the previous row's
  is 0 (or the first row, if it is 1). An onset is what an operator sees; a long alarm is
  one detection, not one per row;
- a window's first onset at time ``t`` scores ``A_tp · σ(p) / σ(-1)`` with
  ``p = (t - (c + window_s)) / window_s`` in [-1, 0] and NAB's scaled sigmoid
  ``σ(p) = 2 / (1 + e^{5p}) - 1`` (earliest: ``A_tp``, at the window's end: 0); later onsets
  in the same window count nothing; a window without an onset scores ``-A_fn``;
- an onset in no window is a false positive scoring ``A_fp · σ(p)`` with ``p`` its distance
  after the end of the previous window in window lengths (3, i.e. σ = -1, when no window
  precedes it), so a late echo right after a window costs less than a stray alarm;
- ``normalised = 100 · (raw - null) / (perfect - null)`` with ``null = -A_fn · windows``
  (no detection at all) and ``perfect = A_tp · windows``. Raw scores add over files, as
  NAB sums them over its data files before normalising.

Profiles: ``STANDARD`` (A_tp 1, A_fp 0.11, A_fn 1), ``LOW_FP`` (A_fp 0.22),
``LOW_FN`` (A_fn 2), NAB's cost matrices.

**Detection delay**: for each labelled anomaly episode (a run of label 1), the time from its
first row to the first row inside it whose decision is 1; an episode without one is missed
(its delay is NaN and it is counted in ``missed``).

**Events** (synthetic counterpart): an injected event is *found* when some decision is 1
between its start and its end plus ``tolerance_s``; a *false alert* is an alert onset that
lies in no event's ``[start, end + tolerance_s]``; the false-alert rate is per device-hour
of stream. Onsets alone would let an alert that never clears look good, so the share of
normal rows (outside every such interval) spent in alert is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "LOW_FN",
    "LOW_FP",
    "STANDARD",
    "Confusion",
    "DelayResult",
    "EventResult",
    "NabProfile",
    "NabResult",
    "alarm_onsets",
    "confusion",
    "detection_delays",
    "episodes",
    "event_metrics",
    "nab_score",
]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


# ------------------------------------------------------------------------------ point metrics


@dataclass(frozen=True)
class Confusion:
    """Row counts: true/false positives and negatives. Add two to pool them."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def f1(self) -> float:
        """SKAB's F1: ``TP / (TP + (FP + FN) / 2)``; 0 when there is nothing to find or flag."""
        den = self.tp + (self.fp + self.fn) / 2
        return self.tp / den if den else 0.0

    @property
    def far(self) -> float:
        """False alarm rate in %: ``FP / (FP + TN) · 100``; NaN without a normal row."""
        den = self.fp + self.tn
        return 100.0 * self.fp / den if den else math.nan

    @property
    def mar(self) -> float:
        """Missed alarm rate in %: ``FN / (FN + TP) · 100``; NaN without an anomalous row."""
        den = self.fn + self.tp
        return 100.0 * self.fn / den if den else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the counts and F1, FAR, MAR (None where undefined)."""
        return {
            "TP": self.tp,
            "FP": self.fp,
            "FN": self.fn,
            "TN": self.tn,
            "F1": self.f1,
            "FAR": _nan_to_none(self.far),
            "MAR": _nan_to_none(self.mar),
        }


def _as_bool(a: npt.ArrayLike, name: str) -> BoolArray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name}: need a 1-D array, got shape {arr.shape}")
    return arr.astype(bool)


def confusion(labels: npt.ArrayLike, decisions: npt.ArrayLike) -> Confusion:
    """Count TP/FP/FN/TN of 0/1 ``decisions`` against 0/1 ``labels`` (same length)."""
    y = _as_bool(labels, "labels")
    p = _as_bool(decisions, "decisions")
    if y.shape != p.shape:
        raise ValueError(f"labels and decisions differ in length: {y.shape[0]} vs {p.shape[0]}")
    return Confusion(
        tp=int(np.count_nonzero(y & p)),
        fp=int(np.count_nonzero(~y & p)),
        fn=int(np.count_nonzero(y & ~p)),
        tn=int(np.count_nonzero(~y & ~p)),
    )


# ------------------------------------------------------------------------------ runs, onsets


def episodes(labels: npt.ArrayLike) -> list[tuple[int, int]]:
    """Runs of 1 in ``labels`` as ``(first, stop)`` row indices (``stop`` exclusive)."""
    y = _as_bool(labels, "labels").astype(np.int8)
    edges = np.diff(np.concatenate([[0], y, [0]]))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def alarm_onsets(decisions: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Row indices where an alarm starts: decision 1 after 0 (or 1 on the first row)."""
    return np.asarray([a for a, _ in episodes(decisions)], dtype=np.int64)


# ------------------------------------------------------------------------------------- NAB


@dataclass(frozen=True)
class NabProfile:
    """NAB's weights: reward of an early detection, cost of a false one and of a miss."""

    name: str
    a_tp: float
    a_fp: float
    a_fn: float


STANDARD = NabProfile("standard", 1.0, 0.11, 1.0)
LOW_FP = NabProfile("reward_low_FP_rate", 1.0, 0.22, 1.0)
LOW_FN = NabProfile("reward_low_FN_rate", 1.0, 0.11, 2.0)


def _scaled_sigmoid(p: float) -> float:
    """NAB's scaled sigmoid: 0.987 at p = -1, 0 at p = 0, -1 from p = 3 on."""
    if p >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * p)) - 1.0


@dataclass(frozen=True)
class NabResult:
    """A NAB score's parts; add results of several files, then read ``normalised``."""

    raw: float = 0.0
    windows: int = 0
    detected: int = 0  # windows with an onset
    false_positives: int = 0  # onsets in no window
    profile: NabProfile = STANDARD

    def __add__(self, other: NabResult) -> NabResult:
        if other.profile != self.profile:
            raise ValueError("cannot add NAB results of different profiles")
        return NabResult(
            self.raw + other.raw,
            self.windows + other.windows,
            self.detected + other.detected,
            self.false_positives + other.false_positives,
            self.profile,
        )

    @property
    def null(self) -> float:
        return -self.profile.a_fn * self.windows

    @property
    def perfect(self) -> float:
        return self.profile.a_tp * self.windows

    @property
    def normalised(self) -> float:
        """``100 · (raw - null) / (perfect - null)``: 0 = no detector, 100 = perfect; NaN without windows."""
        span = self.perfect - self.null
        return 100.0 * (self.raw - self.null) / span if span else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "score": _nan_to_none(self.normalised),
            "raw": self.raw,
            "windows": self.windows,
            "detected": self.detected,
            "false_positives": self.false_positives,
        }


def nab_score(
    ts: npt.ArrayLike,
    changepoints: npt.ArrayLike,
    decisions: npt.ArrayLike,
    window_s: float = 60.0,
    profile: NabProfile = STANDARD,
) -> NabResult:
    """NAB-style score of the alarm onsets in ``decisions`` against changepoint rows.

    ``ts`` (n,) are the rows' times in seconds, ``changepoints`` and ``decisions`` (n,) 0/1.
    See the module docstring for the rules.
    """
    t = np.asarray(ts, dtype=np.float64)
    cp = _as_bool(changepoints, "changepoints")
    if not (t.shape == cp.shape == np.shape(decisions)):
        raise ValueError("ts, changepoints and decisions must have the same length")
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    starts = t[cp]
    ends = starts + window_s
    onset_t = t[alarm_onsets(decisions)]
    raw = 0.0
    detected = 0
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        inside = onset_t[(onset_t >= lo) & (onset_t <= hi)]
        if inside.size:
            detected += 1
            p = (float(inside[0]) - hi) / window_s
            raw += profile.a_tp * _scaled_sigmoid(p) / _scaled_sigmoid(-1.0)
        else:
            raw -= profile.a_fn
    false_positives = 0
    for o in onset_t.tolist():
        if np.any((o >= starts) & (o <= ends)):
            continue
        false_positives += 1
        before = ends[ends < o]
        p = (o - float(before.max())) / window_s if before.size else 3.0
        raw += profile.a_fp * _scaled_sigmoid(p)
    return NabResult(raw, int(starts.size), detected, false_positives, profile)


# ----------------------------------------------------------------------------------- delays


@dataclass(frozen=True)
class DelayResult:
    """Per-episode delays (seconds; NaN when missed). Add results of several files."""

    delays: tuple[float, ...] = ()

    def __add__(self, other: DelayResult) -> DelayResult:
        return DelayResult(self.delays + other.delays)

    @property
    def episodes(self) -> int:
        return len(self.delays)

    @property
    def missed(self) -> int:
        return sum(1 for d in self.delays if math.isnan(d))

    @property
    def mean(self) -> float:
        """Mean delay over the detected episodes; NaN when none was detected."""
        found = [d for d in self.delays if not math.isnan(d)]
        return sum(found) / len(found) if found else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_s": _nan_to_none(self.mean),
            "episodes": self.episodes,
            "missed": self.missed,
            "delays_s": [_nan_to_none(d) for d in self.delays],
        }


def detection_delays(ts: npt.ArrayLike, labels: npt.ArrayLike, decisions: npt.ArrayLike) -> DelayResult:
    """For each labelled episode: seconds from its first row to its first row decided 1."""
    t = np.asarray(ts, dtype=np.float64)
    p = _as_bool(decisions, "decisions")
    if t.shape != p.shape or t.shape != np.shape(labels):
        raise ValueError("ts, labels and decisions must have the same length")
    delays: list[float] = []
    for a, b in episodes(labels):
        hit = np.flatnonzero(p[a:b])
        delays.append(float(t[a + hit[0]] - t[a]) if hit.size else math.nan)
    return DelayResult(tuple(delays))


# ----------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EventResult:
    """Event-level outcome of one or more streams; add results of several devices."""

    events: int = 0
    found: int = 0
    false_alerts: int = 0
    hours: float = 0.0
    kinds_found: tuple[tuple[str, int, int], ...] = ()  # (kind, found, total), sorted by kind
    normal_rows: int = 0  # rows outside every event interval
    normal_rows_in_alert: int = 0

    def __add__(self, other: EventResult) -> EventResult:
        kinds: dict[str, list[int]] = {}
        for kind, f, n in self.kinds_found + other.kinds_found:
            k = kinds.setdefault(kind, [0, 0])
            k[0] += f
            k[1] += n
        return EventResult(
            self.events + other.events,
            self.found + other.found,
            self.false_alerts + other.false_alerts,
            self.hours + other.hours,
            tuple((k, f, n) for k, (f, n) in sorted(kinds.items())),
            self.normal_rows + other.normal_rows,
            self.normal_rows_in_alert + other.normal_rows_in_alert,
        )

    @property
    def recall(self) -> float:
        """Share of events found; NaN without events."""
        return self.found / self.events if self.events else math.nan

    @property
    def normal_alert_share(self) -> float:
        """Share of normal rows spent in alert; NaN without normal rows."""
        return self.normal_rows_in_alert / self.normal_rows if self.normal_rows else math.nan

    @property
    def false_alerts_per_hour(self) -> float:
        """False alert onsets per device-hour; NaN for an empty stream."""
        return self.false_alerts / self.hours if self.hours > 0 else math.nan


def event_metrics(
    ts: npt.ArrayLike,
    decisions: npt.ArrayLike,
    alerts: npt.ArrayLike,
    events: list[tuple[float, float, str]],
    tolerance_s: float,
) -> EventResult:
    """Event recall from row ``decisions`` and false alerts from ``alerts`` for one stream.

    ``events`` are ``(start_ts, end_ts, kind)``. An event is found when a decision is 1 at a
    row with ``start <= ts <= end + tolerance_s``; an alert onset outside every such interval
    is a false alert. Stream hours are ``(ts[-1] - ts[0]) / 3600``.
    """
    t = np.asarray(ts, dtype=np.float64)
    p = _as_bool(decisions, "decisions")
    a = _as_bool(alerts, "alerts")
    if not (t.shape == p.shape == a.shape):
        raise ValueError("ts, decisions and alerts must have the same length")
    covered = np.zeros(t.shape, dtype=bool)
    found = 0
    kinds: dict[str, list[int]] = {}
    for start, end, kind in events:
        span = (t >= start) & (t <= end + tolerance_s)
        covered |= span
        hit = bool(np.any(p & span))
        found += hit
        k = kinds.setdefault(kind, [0, 0])
        k[0] += hit
        k[1] += 1
    onsets = alarm_onsets(a)
    false_alerts = int(np.count_nonzero(~covered[onsets])) if onsets.size else 0
    hours = float(t[-1] - t[0]) / 3600.0 if t.size > 1 else 0.0
    return EventResult(
        len(events),
        found,
        false_alerts,
        hours,
        tuple((k, f, n) for k, (f, n) in sorted(kinds.items())),
        int(np.count_nonzero(~covered)),
        int(np.count_nonzero(a & ~covered)),
    )
