"""Decoding raw MQTT messages into readings, in bulk, on the pipeline thread.

The network thread only stamps arrival times (``RawMessage``); this module turns a list
of them into one ``DecodedBatch`` of numpy arrays (built once per batch, not per
message) plus a ``Rejection`` per bad message or reading. Nothing a device sends can
make ``decode`` raise: every failure is a ``Rejection`` with a ``Reason``.

Accepted payloads (field names are the model's feature names; other fields are ignored):

* a JSON object ``{"ts": 1732440000.5, "temperature": 71.2, ...}``;
* a JSON array of such objects (a batch; each reading is accepted or rejected alone);
* a SenML pack (RFC 8428): an array of records with ``bn``/``bt``/``n``/``v``/``t``;
  records are grouped by resolved time into readings, the record name (after the base
  name) is the feature name.

``ts`` is epoch seconds (number) or an ISO 8601 string (no zone: UTC); absent or null
means the arrival time. Booleans are not numbers here (``true`` is not a reading), and
numbers must fit float32, the model's input type.

A reading stamped more than ``max_future_skew_s`` after its arrival is rejected as
``future``: the device's clock is ahead. Keep that skew small (seconds): a reading that
gets in is the device's newest, and its later readings stamped before it are out of order
until real time catches up, so the skew is also the longest one bad timestamp can keep a
device's real readings out.

A device id is the topic level at ``{device}``; the whole of it must match the configured
pattern, and whatever the pattern says it may not be ``.`` or ``..`` nor hold an MQTT
wildcard, a separator, or a control or other non-printable character (it becomes a level
of the output topics, and appears in logs).

In a partitioned fleet (``[cluster]``), the broker appends the device's partition to the
topic (``sensors/<device>/telemetry/<p>``): the template plus one last level, ``p`` written
as the broker writes it (decimal, no leading zero) in ``0 .. partitions-1``, else
``bad_topic``. A reading is this instance's only when ``p`` is the device's own partition
(``anomalyd.partitions.nats_partition``) and this instance owns it: see ``_partition_verdict``
for the two rejections, ``foreign_partition`` and ``partition_mismatch``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from anomalyd.partitions import Partitioning, nats_partition

if TYPE_CHECKING:
    from anomalyd.config_cluster import ClusterConfig

__all__ = ["MIN_TIMESTAMP", "DecodedBatch", "Decoder", "RawMessage", "Reason", "Rejection"]

#: Readings stamped before 2000-01-01 are rejected: a device that sends seconds since boot
#: (no real-time clock) would otherwise look like a valid, very old, reading.
MIN_TIMESTAMP = 946_684_800.0
#: SenML (RFC 8428 §4.5.3): a resolved time below 2**28 is relative to "now".
_SENML_RELATIVE = 2.0**28
_F32_MAX = float(np.finfo(np.float32).max)
_DETAIL_MAX = 160
_TOPIC_MAX = 256
# Characters that can never be part of a device id, whatever the configured pattern says:
# the id becomes a level of the output topics, where they are wildcards or separators.
# Plain substring tests: far faster than a regex, and a long topic is parsed on every message.
_NEVER_IN_ID = ("+", "#", "/", "\x00")
# Never a device id either: relative path elements, for whoever maps topics onto paths or URLs.
_NEVER_AN_ID = frozenset({".", ".."})
#: A timestamp above this many times the arrival time is not epoch seconds at all (milliseconds
#: are 1000 times as large): ``bad_timestamp``, where a plausible one too far ahead is ``future``.
_NOT_SECONDS_FACTOR = 100.0
# The topic -> verdict cache is bounded by entries and by bytes: a flood of distinct topics
# (a misconfigured fleet, or someone probing the broker) must not grow memory, and the broker
# allows topics up to 64 KiB, so an entry count alone could still pin gigabytes of keys.
_TOPIC_CACHE_MAX = 65536
_TOPIC_CACHE_MAX_BYTES = 8 * 2**20
# Longer topics are parsed on every message, never cached: no real device topic is this long,
# and one such entry would cost as much as hundreds of ordinary ones.
_TOPIC_CACHE_KEY_MAX = 1024


class Reason(StrEnum):
    """Why a message or reading was rejected (the ``reason`` label of the rejection metric)."""

    MALFORMED_JSON = "malformed_json"
    MISSING_FEATURE = "missing_feature"
    NON_NUMERIC = "non_numeric"
    NON_FINITE = "non_finite"
    BAD_TIMESTAMP = "bad_timestamp"
    OVERSIZED = "oversized"
    BAD_DEVICE_ID = "bad_device_id"
    BAD_TOPIC = "bad_topic"
    FOREIGN_PARTITION = "foreign_partition"
    PARTITION_MISMATCH = "partition_mismatch"
    FUTURE = "future"
    OUT_OF_ORDER = "out_of_order"
    DUPLICATE = "duplicate"
    DEVICE_LIMIT = "device_limit"
    QUEUE_FULL = "queue_full"


@dataclass(slots=True)
class RawMessage:
    """One MQTT message as the network thread hands it over (it does nothing else)."""

    topic: str
    payload: bytes
    arrival: float  # time.time(): fallback timestamp and future-skew reference
    arrival_mono: float  # time.monotonic(): latency measurement and batching deadlines
    retained: bool = False  # a broker's stored copy, delivered on subscribe (not live)


@dataclass
class Rejection:
    """A rejected message or reading; ``detail`` is short, for a rate-limited log line.

    ``device`` is the device id when it is known and valid, else empty (a refused topic).
    """

    reason: Reason
    topic: str
    detail: str
    device: str = ""


@dataclass
class DecodedBatch:
    """Accepted readings of a list of messages, in arrival order, as numpy arrays.

    ``topics`` holds each reading's MQTT topic, so that a later stage's rejection (out of
    order, duplicate) can name it; it is empty for readings that did not come over MQTT
    (replay).
    """

    devices: list[str]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float32]
    arrival_mono: npt.NDArray[np.float64]
    rejections: list[Rejection] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.devices)

    def topic_of(self, i: int) -> str:
        """The topic of reading ``i`` (cut short like a rejection's), or "" if not known."""
        return self.topics[i][:_TOPIC_MAX] if i < len(self.topics) else ""

    @classmethod
    def empty(cls, n_features: int) -> DecodedBatch:
        return cls(
            [],
            np.empty(0, np.float64),
            np.empty((0, n_features), np.float32),
            np.empty(0, np.float64),
        )


class _RejectError(Exception):
    """Internal: a reading or message is bad. Never leaves this module.

    Raised fresh and caught at once; it is never stored or raised again. Whatever outlives
    the ``except`` clause is a ``_Refusal``: an exception carries its traceback, whose frames
    hold the whole message batch, and every raise of a kept instance adds to that traceback.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Internal: why a message or reading is rejected, as a plain immutable value."""

    reason: Reason
    detail: str
    device: str = ""  # the valid device id a refused topic names (partition refusals)

    def rejection(self, topic: str, device: str = "") -> Rejection:
        return Rejection(self.reason, topic[:_TOPIC_MAX], self.detail[:_DETAIL_MAX], device or self.device)


_NOT_THE_TEMPLATE = _Refusal(Reason.BAD_TOPIC, "topic does not match the template")
_SEVERAL_LEVELS = _Refusal(Reason.BAD_TOPIC, "device level spans several topic levels")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object, what: str) -> float:
    """A JSON number as float, or ``_RejectError``. Booleans and strings are not numbers."""
    # `type() is` on purpose: bool is a subclass of int, and True is not a reading.
    t = type(value)
    if t is float or t is int:
        x = float(value)  # type: ignore[arg-type]
        if not math.isfinite(x) or abs(x) > _F32_MAX:
            raise _RejectError(Reason.NON_FINITE, f"{what} {_short(value)} does not fit float32")
        return x
    raise _RejectError(Reason.NON_NUMERIC, f"{what} is {type(value).__name__} {_short(value)}, not a number")


class Decoder:
    """Turns ``RawMessage`` lists into ``DecodedBatch`` es for one model's feature list."""

    def __init__(  # noqa: PLR0917 - positional signature kept for existing callers
        self,
        feature_names: list[str],
        topic_template: str,
        max_payload_bytes: int,
        max_readings_per_message: int,
        device_id_pattern: str,
        max_future_skew_s: float,
        *,
        cluster: ClusterConfig | None = None,
    ) -> None:
        """``cluster``: this daemon is one instance of a partitioned fleet, and topics carry
        the partition as a last level (see the module docstring)."""
        if topic_template.count("{device}") != 1:
            raise ValueError(f"topic template needs exactly one '{{device}}': {topic_template!r}")
        self.feature_names = list(feature_names)
        self.n_features = len(self.feature_names)
        self._features = tuple(self.feature_names)
        self._prefix, self._suffix = topic_template.split("{device}")
        self.max_payload_bytes = max_payload_bytes
        self.max_readings = max_readings_per_message
        self._id_pattern = re.compile(device_id_pattern)
        self.max_future_skew_s = max_future_skew_s
        # topic -> device id, or the refusal for it: devices repeat, regexes are not free.
        self._topics: dict[str, str | _Refusal] = {}
        self._topic_bytes = 0  # rough size of ``_topics``' keys and values
        self._partitioning = Partitioning(cluster, topic_template) if cluster is not None else None
        # The partition levels the broker writes, and their numbers: a dict lookup checks
        # "decimal, canonical, in range" at once, and never runs int() on a hostile level.
        n = self._partitioning.partitions if self._partitioning is not None else 0
        self._partition_levels = {str(p): p for p in range(n)}
        self._no_partition = _Refusal(
            Reason.BAD_TOPIC, f"topic has no partition level 0..{n - 1} after the template"
        )

    # ------------------------------------------------------------------ topics

    def _device_of(self, topic: str) -> str | _Refusal:
        """The device id in ``topic``, or why the topic is refused (BAD_TOPIC, BAD_DEVICE_ID;
        in a partitioned fleet also FOREIGN_PARTITION, PARTITION_MISMATCH)."""
        hit = self._topics.get(topic)
        if hit is not None:
            return hit
        hit = self._parse_topic(topic)
        if len(topic) > _TOPIC_CACHE_KEY_MAX:
            return hit
        size = sys.getsizeof(topic) + sys.getsizeof(hit)
        if isinstance(hit, _Refusal):
            size += sys.getsizeof(hit.detail)
        if len(self._topics) >= _TOPIC_CACHE_MAX or self._topic_bytes + size > _TOPIC_CACHE_MAX_BYTES:
            # Start over rather than evict one entry at a time: a full cache means a flood of
            # distinct topics, which a cache cannot help with; no per-hit bookkeeping is needed;
            # and real devices cost one parse each to come back.
            self._topics.clear()
            self._topic_bytes = 0
        self._topics[topic] = hit
        self._topic_bytes += size
        return hit

    def _parse_topic(self, topic: str) -> str | _Refusal:
        if self._partitioning is None:
            return self._parse_device(topic)
        base, slash, level = topic.rpartition("/")
        partition = self._partition_levels.get(level) if slash else None
        if partition is None:
            return self._no_partition
        device = self._parse_device(base)
        if isinstance(device, _Refusal):
            return device
        return self._partition_verdict(device, partition, self._partitioning)

    @staticmethod
    def _partition_verdict(device: str, partition: int, partitioning: Partitioning) -> str | _Refusal:
        """``device`` if a reading of it on ``partition`` is this instance's to score.

        The device's own partition is the hash the broker's mapping computes
        (``nats_partition``); a reading is taken only when the topic's partition is that one
        and this instance owns it:

        - ``foreign_partition``: the topic's partition, or the device's own, belongs to
          another instance. Scoring it here as well would score the device in two places
          (two windows, two alert states fighting over one retained topic), and the owner
          by hash is the one whose warm-up and alert hand-over hold the device. In practice
          it is a client publishing straight to a partition topic of the wrong instance:
          the subscriptions only ever ask for owned partitions.
        - ``partition_mismatch``: both are this instance's, but differ. Scoring it here
          would work for now, but the topic cannot be trusted: the broker's mapping and
          ``cluster.partitions`` disagree (another P hashes the device elsewhere), or a
          client bypasses the mapping, and the device would end up with the wrong instance
          at the next change of the fleet. A reason of its own, so that such a
          misconfiguration stands out instead of hiding among foreign readings.
        """
        home = nats_partition(device, partitioning.partitions)
        owned = partitioning.owned
        if partition not in owned:
            return _Refusal(
                Reason.FOREIGN_PARTITION,
                f"partition {partition} is not one of instance {partitioning.name}'s",
                device,
            )
        if home not in owned:
            return _Refusal(
                Reason.FOREIGN_PARTITION,
                f"device {_short(device)} is in partition {home}, not this instance's "
                f"(the topic says {partition})",
                device,
            )
        if home != partition:
            return _Refusal(
                Reason.PARTITION_MISMATCH,
                f"device {_short(device)} is in partition {home} but came on {partition}: "
                "the broker's mapping and cluster.partitions disagree?",
                device,
            )
        return device

    def _parse_device(self, topic: str) -> str | _Refusal:
        p, s = self._prefix, self._suffix
        if len(topic) <= len(p) + len(s) or not topic.startswith(p) or not topic.endswith(s):
            return _NOT_THE_TEMPLATE
        device = topic[len(p) : len(topic) - len(s)]
        if "/" in device:
            return _SEVERAL_LEVELS
        if device in _NEVER_AN_ID:
            return _Refusal(Reason.BAD_DEVICE_ID, f"device id {device!r} is a relative path element")
        # isprintable: no newline (a forged log line), NUL, other control or invisible character.
        if any(c in device for c in _NEVER_IN_ID) or not device.isprintable():
            what = "a wildcard, separator or non-printable character"
            return _Refusal(Reason.BAD_DEVICE_ID, f"device id {_short(device)} holds {what}")
        # fullmatch, not search: with search, "$" also matches before a final newline.
        if not self._id_pattern.fullmatch(device):
            return _Refusal(Reason.BAD_DEVICE_ID, f"device id {_short(device)} does not match the pattern")
        return device

    # ------------------------------------------------------------------ payloads

    def _timestamp(self, value: object, arrival: float) -> float:
        if value is None:
            return arrival
        if isinstance(value, str):
            try:
                dt = datetime.fromisoformat(value)
            except ValueError:
                raise _RejectError(Reason.BAD_TIMESTAMP, f"ts {_short(value)} is not ISO 8601") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            try:
                ts = dt.timestamp()
            except (OverflowError, OSError, ValueError):
                raise _RejectError(Reason.BAD_TIMESTAMP, f"ts {_short(value)} is out of range") from None
        else:
            t = type(value)
            if t is not float and t is not int:
                raise _RejectError(Reason.BAD_TIMESTAMP, f"ts is {t.__name__}, not a number or ISO 8601 text")
            ts = float(value)  # type: ignore[arg-type]
        return self._check_time(ts, arrival)

    def _check_time(self, ts: float, arrival: float) -> float:
        if not math.isfinite(ts):
            raise _RejectError(Reason.BAD_TIMESTAMP, f"ts {ts!r} is not finite")
        if ts < MIN_TIMESTAMP:
            raise _RejectError(Reason.BAD_TIMESTAMP, f"ts {ts!r} is before 2000 (not epoch seconds?)")
        if ts > arrival + self.max_future_skew_s:
            if ts > arrival * _NOT_SECONDS_FACTOR:
                why = f"ts {ts!r} is not epoch seconds (milliseconds?): arrival was {arrival:.0f}"
                raise _RejectError(Reason.BAD_TIMESTAMP, why)
            # Bounded above by the test before: at most a dozen digits.
            raise _RejectError(Reason.FUTURE, f"ts {ts!r} is {ts - arrival:.1f} s ahead of its arrival")
        return ts

    def _object(self, obj: dict[str, Any], arrival: float, out: list[float]) -> float:
        """Append the features of a reading object to ``out``; return its timestamp."""
        ts = self._timestamp(obj.get("ts"), arrival)
        row = []
        for name in self._features:
            if name not in obj:
                raise _RejectError(Reason.MISSING_FEATURE, f"no field {name!r}")
            row.append(_number(obj[name], name))
        out.extend(row)
        return ts

    def _senml(self, records: list[Any], arrival: float) -> list[tuple[float, list[float] | _Refusal]]:
        """Group a SenML pack's records by resolved time; one entry per reading, time-ordered."""
        base_name, base_time = "", 0.0
        groups: dict[float, dict[str, Any]] = {}
        for rec in records:
            if not isinstance(rec, dict):
                raise _RejectError(Reason.MALFORMED_JSON, "SenML record is not an object")
            if "bn" in rec:
                if not isinstance(rec["bn"], str):
                    raise _RejectError(Reason.MALFORMED_JSON, "SenML 'bn' is not a string")
                base_name = rec["bn"]
            if "bt" in rec:
                base_time = self._senml_time(rec["bt"], "bt")
            name = rec.get("n", "")
            if not isinstance(name, str):
                raise _RejectError(Reason.MALFORMED_JSON, "SenML 'n' is not a string")
            if not name:
                # A full name in "bn" ("urn:dev:x:temperature"): the feature is its last part.
                name = re.split(r"[:/]", base_name)[-1]
            if name not in self._features:
                continue  # not one of ours (extra fields are ignored)
            t = base_time + (self._senml_time(rec["t"], "t") if "t" in rec else 0.0)
            if abs(t) < _SENML_RELATIVE:
                t += arrival
            value: Any = rec["v"] if "v" in rec else rec.get("vb", rec.get("vs", rec.get("vd")))
            groups.setdefault(t, {})[name] = value
        if not groups:
            raise _RejectError(Reason.MISSING_FEATURE, "SenML pack has no record for any feature")
        if len(groups) > self.max_readings:
            raise _RejectError(Reason.OVERSIZED, f"{len(groups)} readings > {self.max_readings}")
        result: list[tuple[float, list[float] | _Refusal]] = []
        for t in sorted(groups):
            fields = groups[t]
            try:
                ts = self._check_time(t, arrival)
                missing = [n for n in self._features if n not in fields]
                if missing:
                    raise _RejectError(Reason.MISSING_FEATURE, f"no record for {missing[0]!r} at t={t!r}")
                result.append((ts, [_number(fields[n], n) for n in self._features]))
            except _RejectError as rej:
                result.append((t, _Refusal(rej.reason, rej.detail)))
        return result

    @staticmethod
    def _senml_time(value: object, what: str) -> float:
        t = type(value)
        if (t is not float and t is not int) or not math.isfinite(float(value)):  # type: ignore[arg-type]
            raise _RejectError(Reason.BAD_TIMESTAMP, f"SenML {what!r} is not a finite number")
        return float(value)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ bulk

    def decode(self, messages: list[RawMessage]) -> DecodedBatch:
        """Decode many messages at once. Never raises on message content."""
        devices: list[str] = []
        ts: list[float] = []
        flat: list[float] = []
        arrivals: list[float] = []
        topics: list[str] = []
        rejections: list[Rejection] = []
        for msg in messages:
            topic = msg.topic
            device: str | _Refusal = ""
            try:
                device = self._device_of(topic)
                if isinstance(device, _Refusal):
                    rejections.append(device.rejection(topic))
                    continue
                if len(msg.payload) > self.max_payload_bytes:
                    raise _RejectError(
                        Reason.OVERSIZED, f"payload {len(msg.payload)} bytes > {self.max_payload_bytes}"
                    )
                doc = self._parse(msg.payload)
                if isinstance(doc, dict):
                    ts.append(self._object(doc, msg.arrival, flat))
                    devices.append(device)
                    arrivals.append(msg.arrival_mono)
                    topics.append(topic)
                    continue
                if not isinstance(doc, list) or not doc:
                    raise _RejectError(
                        Reason.MALFORMED_JSON, "payload is not a JSON object or non-empty array"
                    )
                if any(isinstance(r, dict) and ("n" in r or "bn" in r) for r in doc):
                    if len(doc) > self.max_readings * (self.n_features + 1):
                        raise _RejectError(Reason.OVERSIZED, f"SenML pack of {len(doc)} records")
                    readings = self._senml(doc, msg.arrival)
                else:
                    if len(doc) > self.max_readings:
                        raise _RejectError(Reason.OVERSIZED, f"{len(doc)} readings > {self.max_readings}")
                    readings = [self._array_item(item, msg.arrival) for item in doc]
                for t, row in readings:
                    if isinstance(row, _Refusal):
                        rejections.append(row.rejection(topic, device))
                        continue
                    ts.append(t)
                    flat.extend(row)
                    devices.append(device)
                    arrivals.append(msg.arrival_mono)
                    topics.append(topic)
            except _RejectError as rej:
                known = device if isinstance(device, str) else ""
                rejections.append(Rejection(rej.reason, topic[:_TOPIC_MAX], rej.detail[:_DETAIL_MAX], known))
            except Exception as exc:  # pragma: no cover - belt and braces: input must never kill us
                rejections.append(
                    Rejection(Reason.MALFORMED_JSON, topic[:_TOPIC_MAX], f"unexpected: {exc!r}"[:_DETAIL_MAX])
                )
        n = len(devices)
        return DecodedBatch(
            devices,
            np.array(ts, dtype=np.float64),
            np.array(flat, dtype=np.float32).reshape(n, self.n_features),
            np.array(arrivals, dtype=np.float64),
            rejections,
            topics,
        )

    def _array_item(self, item: object, arrival: float) -> tuple[float, list[float] | _Refusal]:
        if not isinstance(item, dict):
            return arrival, _Refusal(Reason.MALFORMED_JSON, "array item is not a JSON object")
        row: list[float] = []
        try:
            return self._object(item, arrival, row), row
        except _RejectError as rej:
            return arrival, _Refusal(rej.reason, rej.detail)

    @staticmethod
    def _parse(payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson refuses NaN/Infinity literals and numbers beyond a double (1e400) as
            # invalid JSON; say so when that is all that is wrong with the payload.
            if _non_finite_only(payload):
                raise _RejectError(Reason.NON_FINITE, "NaN, Infinity or a number beyond a double") from None
            raise _RejectError(Reason.MALFORMED_JSON, str(exc)) from None


def _non_finite_only(payload: bytes) -> bool:
    """Whether ``payload`` is JSON once NaN, Infinity and out-of-range numbers are allowed,
    and holds one of those: the standard library's parser admits them, and its hooks see them.

    Runs only for payloads orjson refused, so it costs nothing on the normal path; and a
    payload is at most ``max_payload_bytes``. Deep nesting raises RecursionError: refused.
    """
    seen = False

    def constant(_text: str) -> float:
        nonlocal seen
        seen = True
        return 0.0

    def number(text: str) -> float:
        nonlocal seen
        # float(), never int(): a 5000-digit integer must not cost a big-number conversion.
        if not math.isfinite(float(text)):
            seen = True
        return 0.0

    try:
        json.loads(payload.decode("utf-8"), parse_constant=constant, parse_float=number, parse_int=number)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return seen
