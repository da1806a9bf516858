"""One device's detector state, and its form in a snapshot.

``DeviceState`` is what the detector (``anomalyd.detector``) keeps per device: smoothing,
hysteresis counters and alert, the adaptive threshold's statistics, and the published
alert state (``anomalyd.alerts``) with its overlays. A state may also be *adopted* from
the alert message the broker retains (``Detector.adopt``: a device that moved here from
another instance of a partitioned fleet); it then exists before the device has a window.
``state_to_dict`` / ``state_from_dict`` turn it into JSON-ready dicts and back for
``anomalyd.snapshot``; reading one back checks every field, so a damaged snapshot is
refused instead of half-restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import (
    ANOMALOUS,
    CADENCE_MISMATCH,
    NORMAL,
    OUT_OF_SERVICE,
    SHELVED,
    STATES,
    UNKNOWN,
    OperatorAction,
)

__all__ = ["DeviceState", "state_from_dict", "state_to_dict"]


@dataclass(slots=True)
class DeviceState:
    smoothed: float = math.nan
    above: int = 0  # consecutive anomalous windows
    below: int = 0  # consecutive normal windows
    alert: bool = False
    # adaptive threshold: windows learnt, mean and variance of log(smoothed)
    learnt: int = 0
    log_mean: float = 0.0
    log_var: float = 0.0
    adaptive: float = math.nan  # the device's threshold once warmed up; NaN before
    # published state (anomalyd.alerts)
    decided: bool = False  # a finite window was decided since the state (re)started
    published: str = UNKNOWN  # the state the device's alert message shows
    since: float = math.nan  # when that state began
    last_ts: float = math.nan  # data time of the newest decided window
    last_score: float = math.nan
    last_threshold: float = math.nan
    peak_score: float = math.nan  # highest score since the alert was raised
    peak_ts: float = math.nan
    peak_contributions: npt.NDArray[np.float32] | None = None
    # overlays: None, or the overlay state (out_of_service > shelved > cadence_mismatch)
    overlay: str | None = None
    shelved_until: float = math.nan  # UNIX time; NaN: not shelved
    out_of_service: bool = False
    operator: OperatorAction | None = None
    cadence: tuple[float, float] | None = None  # (measured, expected) period while mismatched
    rebaselining: bool = False  # no alert until the adaptive statistics warmed up again
    channel: npt.NDArray[np.float32] | None = None  # per-feature EWMA (smoothing = "channel_ewma")
    # Data time of the first window this process decided for a state it began itself; NaN
    # for a state restored from a snapshot or adopted from the broker (not in a snapshot:
    # after a restart the state is inherited memory). ``Detector.continue_alert`` uses it
    # to tell another instance's earlier raise of the same alert from one of its own.
    born: float = math.nan

    def condition(self) -> str:
        if not self.decided:
            return UNKNOWN
        return ANOMALOUS if self.alert else NORMAL

    def refresh_overlay(self) -> None:
        if self.out_of_service:
            self.overlay = OUT_OF_SERVICE
        elif not math.isnan(self.shelved_until):
            self.overlay = SHELVED
        elif self.cadence is not None:
            self.overlay = CADENCE_MISMATCH
        else:
            self.overlay = None


def _nullable(x: float) -> float | None:
    return None if math.isnan(x) else x


def state_to_dict(device: str, st: DeviceState) -> dict[str, Any]:
    """A device's state as a JSON-ready dict (NaN as None)."""
    op = st.operator
    return {
        "device": device,
        "smoothed": _nullable(st.smoothed),
        "above": st.above,
        "below": st.below,
        "alert": st.alert,
        "learnt": st.learnt,
        "log_mean": st.log_mean,
        "log_var": st.log_var,
        "adaptive": _nullable(st.adaptive),
        "decided": st.decided,
        "published": st.published,
        "since": _nullable(st.since),
        "last_ts": _nullable(st.last_ts),
        "last_score": _nullable(st.last_score),
        "last_threshold": _nullable(st.last_threshold),
        "peak_score": _nullable(st.peak_score),
        "peak_ts": _nullable(st.peak_ts),
        "peak_contributions": None
        if st.peak_contributions is None
        else [float(c) for c in st.peak_contributions],
        "shelved_until": _nullable(st.shelved_until),
        "out_of_service": st.out_of_service,
        "operator": None if op is None else [op.verb, op.by, op.why, op.at],
        "cadence": None if st.cadence is None else list(st.cadence),
        "rebaselining": st.rebaselining,
        "channel": None if st.channel is None else [float(c) for c in st.channel],
    }


def _number(x: object) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"expected a number or null, got {x!r}")
    return float(x)


def _count(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"expected a non-negative integer, got {x!r}")
    return x


def _flag(x: object) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"expected true or false, got {x!r}")
    return x


def _vector(x: object, n: int, what: str) -> npt.NDArray[np.float32] | None:
    """A per-feature list of ``n`` numbers (or null) as a float32 array."""
    if x is None:
        return None
    if not isinstance(x, list) or len(x) != n:
        raise ValueError(f"{what} must hold {n} numbers")
    return np.asarray([_number(c) for c in x], np.float32)


def state_from_dict(raw: object, n_features: int) -> tuple[str, DeviceState]:
    """(device, state) from what ``state_to_dict`` gave; ValueError naming what is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("device"), str):
        raise ValueError("each detector state needs a 'device' string")
    device = raw["device"]
    published = raw.get("published")
    if published not in STATES:
        raise ValueError(f"{device!r}: unknown published state {published!r}")
    peak = _vector(raw.get("peak_contributions"), n_features, f"{device!r}: peak_contributions")
    op = raw.get("operator")
    if op is not None and not (
        isinstance(op, list) and len(op) == 4 and all(isinstance(x, str) for x in op[:3])
    ):
        raise ValueError(f"{device!r}: malformed operator action {op!r}")
    channel = _vector(raw.get("channel"), n_features, f"{device!r}: channel")
    cadence = raw.get("cadence")
    if cadence is not None and not (isinstance(cadence, list) and len(cadence) == 2):
        raise ValueError(f"{device!r}: malformed cadence {cadence!r}")
    try:
        st = DeviceState(
            smoothed=_number(raw["smoothed"]),
            above=_count(raw["above"]),
            below=_count(raw["below"]),
            alert=_flag(raw["alert"]),
            learnt=_count(raw["learnt"]),
            log_mean=_number(raw["log_mean"]),
            log_var=_number(raw["log_var"]),
            adaptive=_number(raw["adaptive"]),
            decided=_flag(raw["decided"]),
            published=str(published),
            since=_number(raw["since"]),
            last_ts=_number(raw["last_ts"]),
            last_score=_number(raw["last_score"]),
            last_threshold=_number(raw["last_threshold"]),
            peak_score=_number(raw["peak_score"]),
            peak_ts=_number(raw["peak_ts"]),
            peak_contributions=peak,
            shelved_until=_number(raw["shelved_until"]),
            out_of_service=_flag(raw["out_of_service"]),
            operator=None if op is None else OperatorAction(op[0], op[1], op[2], _number(op[3])),
            cadence=None if cadence is None else (_number(cadence[0]), _number(cadence[1])),
            rebaselining=_flag(raw["rebaselining"]),
            channel=channel,
        )
    except KeyError as exc:
        raise ValueError(f"detector state of {device!r} lacks {exc}") from None
    st.refresh_overlay()
    return device, st
