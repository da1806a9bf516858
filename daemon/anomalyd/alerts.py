"""Alert states: what the retained ``anomaly/{device}/alert`` message says, and its payload.

Every device the daemon has heard of has exactly one published alert *state*:

``normal``          the detector's verdict on the device's newest window: no alert;
``anomalous``       the detector raised an alert (hysteresis: ``k_enter`` anomalous windows)
                    and has not cleared it (``k_exit`` normal ones);
``unknown``         the daemon has no verdict: it has not decided a full window of the device
                    yet, or it stopped tracking it. ``reason`` says why: ``no_state`` (the
                    broker held a state this daemon has no memory of, e.g. after a restart
                    without a snapshot), ``warming_up``, ``idle`` (silent for
                    ``stream.idle_evict_s``), ``evicted`` (its slot went to another device:
                    ``stream.max_devices``), ``model_changed`` (a new model with another window
                    or features), ``stopped`` (the daemon stopped and will not remember);
``cadence_mismatch`` the device's readings do not come at the model's sample period, so its
                    windows are not scored (``[stream]`` cadence check);
``shelved``         an operator suppressed its alerts until ``shelved_until`` (scores go on);
``out_of_service``  an operator took it out of service (scores go on, alerts do not, and
                    its normal behaviour is not learnt meanwhile).

The operator states and ``cadence_mismatch`` are overlays: underneath, the detector keeps
deciding, and ``condition`` in the payload says what it would report (``normal``,
``anomalous`` or ``unknown``). Precedence: out of service, shelved, cadence mismatch, then
the condition. ``alert`` is true exactly when ``state`` is ``anomalous``.

A state message is published (retained, ``output.alert_qos``) on every change of the
state, for every device on every (re)connect, and for devices the broker remembers and
the daemon does not (``unknown``/``no_state``); so what the broker retains is never a
stale ``anomalous``. ``RetainedStates`` collects what the broker retains under the
alert topic (the daemon subscribes to it) for ``Pipeline.reconcile``, as ``RetainedState``
records that keep enough of each message (since, peak, operator, shelving) for an
instance of a partitioned fleet (``[cluster]``) to *adopt* the alert of a device it just
took over instead of announcing ``unknown``: the retained message is the hand-over
between the device's old and new owner.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

__all__ = [
    "ANOMALOUS",
    "CADENCE_MISMATCH",
    "NORMAL",
    "OUT_OF_SERVICE",
    "SHELVED",
    "STATES",
    "UNKNOWN",
    "UNKNOWN_REASONS",
    "AlertRecord",
    "RetainedState",
    "RetainedStates",
    "alert_payload",
]

#: Retained states waiting for the pipeline thread; beyond this they wait for the next connect.
_RETAINED_MAX = 100_000

NORMAL: Final = "normal"
ANOMALOUS: Final = "anomalous"
UNKNOWN: Final = "unknown"
CADENCE_MISMATCH: Final = "cadence_mismatch"
SHELVED: Final = "shelved"
OUT_OF_SERVICE: Final = "out_of_service"
STATES: Final = (NORMAL, ANOMALOUS, UNKNOWN, CADENCE_MISMATCH, SHELVED, OUT_OF_SERVICE)

#: Why a device is ``unknown``.
UNKNOWN_REASONS: Final = ("no_state", "warming_up", "idle", "evicted", "model_changed", "stopped")


@dataclass(slots=True, frozen=True)
class OperatorAction:
    """Who did what to a device's alarm, and why (ISA-18.2 alarm handling)."""

    verb: str
    by: str
    why: str
    at: float  # UNIX time the daemon took the command


@dataclass(slots=True, frozen=True)
class AlertRecord:
    """One device's alert state, as published. Built by the detector, formatted here."""

    device: str
    state: str
    condition: str  # the detector's own verdict under any overlay: normal | anomalous | unknown
    since: float  # UNIX time the state began (data time of the deciding window, else the daemon's clock)
    ts: float  # UNIX time of what this message reports (a window's data time, or the event's)
    reason: str | None = None  # why unknown
    score: float | None = None  # the newest window's score and threshold
    threshold: float | None = None
    peak_score: float | None = None  # the highest score since the alert was raised
    peak_ts: float | None = None
    peak_contributions: npt.NDArray[np.float32] | None = None
    shelved_until: float | None = None
    operator: OperatorAction | None = None
    period_s: float | None = None  # cadence_mismatch: the device's measured and the model's period
    expected_period_s: float | None = None


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def alert_payload(record: AlertRecord, feature_names: list[str], model_version: str) -> dict[str, Any]:
    """The JSON document of a state message (``docs/operations.md`` lists its fields)."""
    doc: dict[str, Any] = {
        "device": record.device,
        "state": record.state,
        "alert": record.state == ANOMALOUS,
        "condition": record.condition,
        "since": record.since,
        "ts": record.ts,
        "duration_s": max(0.0, record.ts - record.since),
        "reason": record.reason,
        "score": _num(record.score),
        "threshold": _num(record.threshold),
        "peak_score": _num(record.peak_score),
        "peak_ts": record.peak_ts,
        "contributions": None,
        "model_version": model_version,
    }
    if record.peak_contributions is not None and len(record.peak_contributions) == len(feature_names):
        # float32 values, serialised as float32 (orjson with OPT_SERIALIZE_NUMPY)
        doc["contributions"] = dict(zip(feature_names, record.peak_contributions, strict=True))
    if record.shelved_until is not None:
        doc["shelved_until"] = record.shelved_until
    if record.operator is not None:
        op = record.operator
        doc["operator"] = {"verb": op.verb, "by": op.by, "why": op.why, "at": op.at}
    if record.period_s is not None:
        doc["period_s"] = _num(record.period_s)
        doc["expected_period_s"] = _num(record.expected_period_s)
    return doc


def _float(x: object) -> float:
    """A finite JSON number as a float; NaN for anything else (absent, null, text, bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    f = float(x)
    return f if math.isfinite(f) else math.nan


def _text(x: object) -> str | None:
    return x if isinstance(x, str) else None


def _contributions(x: object) -> dict[str, float] | None:
    if not isinstance(x, dict):
        return None
    out = {str(k): _float(v) for k, v in x.items()}
    return out if out and not any(math.isnan(v) for v in out.values()) else None


def _operator(x: object) -> OperatorAction | None:
    if not isinstance(x, dict):
        return None
    verb, by, why, at = x.get("verb"), x.get("by"), x.get("why"), _float(x.get("at"))
    if not (isinstance(verb, str) and isinstance(by, str) and isinstance(why, str)):
        return None
    return OperatorAction(verb, by, why, at)


@dataclass(slots=True, frozen=True)
class RetainedState:
    """One device's alert message as the broker retains it, as far as it could be read.

    ``state`` is the message's state (an older anomalyd's message without one: ``anomalous``
    if its ``alert`` is true, else ``normal``), or ``"?"`` when the payload is not a JSON
    object: not ours to read, but a claim about the device all the same. Every other field
    is NaN or None when the message lacks it or holds something unusable there, so a
    garbled message can never be adopted with a made-up ``since``.
    """

    device: str
    state: str
    since: float = math.nan
    ts: float = math.nan
    condition: str | None = None
    reason: str | None = None
    score: float = math.nan
    threshold: float = math.nan
    peak_score: float = math.nan
    peak_ts: float = math.nan
    contributions: dict[str, float] | None = None  # at the peak, by feature name
    shelved_until: float = math.nan
    operator: OperatorAction | None = None
    model_version: str | None = None

    @classmethod
    def parse(cls, device: str, payload: bytes) -> RetainedState:
        """The record of ``payload`` (any bytes) retained for ``device``."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            return cls(device, "?")
        # A message from an older anomalyd has "alert" but no "state": it is still a claim.
        state = str(doc.get("state", ANOMALOUS if doc.get("alert") else NORMAL))
        return cls(
            device,
            state,
            since=_float(doc.get("since")),
            ts=_float(doc.get("ts")),
            condition=_text(doc.get("condition")),
            reason=_text(doc.get("reason")),
            score=_float(doc.get("score")),
            threshold=_float(doc.get("threshold")),
            peak_score=_float(doc.get("peak_score")),
            peak_ts=_float(doc.get("peak_ts")),
            contributions=_contributions(doc.get("contributions")),
            shelved_until=_float(doc.get("shelved_until")),
            operator=_operator(doc.get("operator")),
            model_version=_text(doc.get("model_version")),
        )


class RetainedStates:
    """The alert states the broker retains, as it hands them over on subscribe (network
    thread, ``put``), for the pipeline thread to reconcile (``take``)."""

    def __init__(self, alert_topic: str, wake: Callable[[], None]) -> None:
        pre, _, post = alert_topic.partition("{device}")
        self._pre, self._post = pre, post
        self._wake = wake
        self._queue: collections.deque[RetainedState] = collections.deque()

    def put(self, topic: str, payload: bytes, retain: bool) -> None:
        """A message on the alert topic filter. Only retained ones are the broker's memory;
        live ones are publications (ours, in MQTT 3.1.1, which has no No Local option, or
        another instance's of a partitioned fleet) and say nothing new."""
        pre, post = self._pre, self._post
        if not retain or not payload or len(self._queue) >= _RETAINED_MAX:
            return
        if not (topic.startswith(pre) and topic.endswith(post)) or len(topic) <= len(pre) + len(post):
            return
        device = topic[len(pre) : len(topic) - len(post)]
        self._queue.append(RetainedState.parse(device, payload))
        self._wake()

    def take(self) -> list[RetainedState]:
        """Every retained state received since the previous call, oldest first."""
        queue = self._queue
        return [queue.popleft() for _ in range(len(queue))]
