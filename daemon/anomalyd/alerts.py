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
alert topic (the daemon subscribes to it) for ``Pipeline.reconcile``.
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


class RetainedStates:
    """The alert states the broker retains, as it hands them over on subscribe (network
    thread, ``put``), for the pipeline thread to reconcile (``take``)."""

    def __init__(self, alert_topic: str, wake: Callable[[], None]) -> None:
        pre, _, post = alert_topic.partition("{device}")
        self._pre, self._post = pre, post
        self._wake = wake
        self._queue: collections.deque[tuple[str, str]] = collections.deque()

    def put(self, topic: str, payload: bytes, retain: bool) -> None:
        """A message on the alert topic filter. Only retained ones are the broker's memory;
        live ones are publications (ours, in MQTT 3.1.1, which has no No Local option) and
        say nothing new."""
        pre, post = self._pre, self._post
        if not retain or not payload or len(self._queue) >= _RETAINED_MAX:
            return
        if not (topic.startswith(pre) and topic.endswith(post)) or len(topic) <= len(pre) + len(post):
            return
        device = topic[len(pre) : len(topic) - len(post)]
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        # A message from an older anomalyd has "alert" but no "state": it is still a claim.
        if isinstance(doc, dict):
            state = str(doc.get("state", ANOMALOUS if doc.get("alert") else NORMAL))
        else:
            state = "?"  # not ours to read, but a claim about the device all the same
        self._queue.append((device, state))
        self._wake()

    def take(self) -> list[tuple[str, str]]:
        """Every (device, state) received since the previous call."""
        queue = self._queue
        return [queue.popleft() for _ in range(len(queue))]
