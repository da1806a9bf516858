"""Hostile telemetry, and the invariants the daemon keeps whatever it receives.

Shared by the property tests (``tests/daemon/test_hostile_input.py``, a few thousand cases
in CI) and the fuzz run (``scripts/fuzz_input.py``, 100,000 cases and more): both draw
``cases()`` and hand each one to a ``Harness``, which raises ``InvariantViolationError`` when
the daemon breaks a promise:

* nothing a device sends makes the decoder or the pipeline raise;
* every message is accounted for: it yields accepted readings or rejections, each
  rejection with a reason from ``KNOWN_REASONS`` (the documented set, which is also the
  ``reason`` label set of ``anomalyd_rejected_total``);
* accepted readings are finite float32 values, stamped between 2000 and
  ``max_future_skew_s`` after arrival, from a device id that keeps the id rules;
* a *labelled* case (one message of a known input class) gets exactly its expected
  outcome, e.g. ``non_finite`` for ``1e400``, ``future`` for a reading 290 s ahead;
* every log line the pipeline writes on the way, in the JSON and the text format, is one
  line of at most ``LINE_MAX_BYTES`` bytes, and a rejection's JSON line carries its reason,
  topic and device as fields (topic and device never empty for out-of-order or duplicate
  readings).

Timestamps are judged against a fixed arrival time (``NOW``), so the cases do not depend on
the clock.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from anomalyd.config import Config, StreamConfig, load_config
from anomalyd.decode import MIN_TIMESTAMP, DecodedBatch, RawMessage, Reason
from anomalyd.logsetup import LINE_MAX_BYTES, JsonFormatter, TextFormatter
from anomalyd.metrics import Metrics
from anomalyd.model import load_model
from anomalyd.pipeline import Pipeline

FEATURES = ("temperature", "pressure", "vibration")
TEMPLATE = "sensors/{device}/telemetry"
NOW = 1_732_440_000.0  # every case arrives at this wall-clock time
WINDOW = 8
SKEW = StreamConfig().max_future_skew_s  # the default, which the harness runs with

#: The documented rejection reasons (docs/operations.md, docs/reliability.md); written out,
#: not derived from ``Reason``, so that a new reason cannot appear without its docs.
KNOWN_REASONS = frozenset(
    {
        "malformed_json",
        "missing_feature",
        "non_numeric",
        "non_finite",
        "bad_timestamp",
        "future",
        "oversized",
        "bad_device_id",
        "bad_topic",
        "foreign_partition",
        "partition_mismatch",
        "out_of_order",
        "duplicate",
        "device_limit",
        "queue_full",
    }
)
#: Reasons only later stages give (device windows, the intake queue), never the decoder.
_LATER_STAGE_REASONS = frozenset({"out_of_order", "duplicate", "device_limit", "queue_full"})
ACCEPTED = "accepted"

_F32_MAX = float(np.finfo(np.float32).max)
_NEVER_IN_ID = "+#/\x00"


class InvariantViolationError(AssertionError):
    """The daemon broke one of its promises on a case (the message says which)."""


def config(**overrides: object) -> Config:
    """The daemon's defaults, except: every rejection logged (no rate limit), no batching delay."""
    return load_config(
        None, {"logging.rejection_log_interval_s": 0.0, "batching.max_delay_ms": 0.0, **overrides}
    )


def device_id_ok(device: str, pattern: str) -> bool:
    """The device id rules, written out independently of the decoder's code."""
    return (
        device not in {".", ".."}
        and not any(c in device for c in _NEVER_IN_ID)
        and device.isprintable()
        and re.fullmatch(pattern, device) is not None
    )


# --------------------------------------------------------------------------- JSON with raw tokens


@dataclass(frozen=True)
class Raw:
    """A token written into the JSON as it is: NaN, Infinity, 1e400, a 400-digit integer."""

    text: str


def to_json(value: object) -> bytes:
    """``value`` as JSON, ``Raw`` tokens included (orjson cannot write them)."""
    if isinstance(value, Raw):
        return value.text.encode()
    if isinstance(value, dict):
        items = (orjson.dumps(str(k)) + b":" + to_json(v) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return str(value).encode()
    return orjson.dumps(value)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """Messages of one input class; ``expected`` is the one outcome of a labelled single message
    (ACCEPTED or a reason), None for an unlabelled batch (only the invariants hold)."""

    kind: str
    messages: list[RawMessage]
    expected: str | None = None

    def __repr__(self) -> str:  # payloads can be 64 KiB: show their start
        return f"Case({self.kind!r}, expected={self.expected!r}: {_describe(self.messages)})"


def message(topic: str, payload: bytes, arrival: float = NOW) -> RawMessage:
    return RawMessage(topic, payload, arrival, arrival - NOW + 1000.0)


def topic_of(device: str) -> str:
    return TEMPLATE.replace("{device}", device)


#: Device ids at every edge of the rules, with the outcome under the default pattern.
DEVICE_ID_EDGES: dict[str, str] = {
    "": Reason.BAD_TOPIC.value,  # no level at all
    ".": Reason.BAD_DEVICE_ID.value,
    "..": Reason.BAD_DEVICE_ID.value,
    "victim\n": Reason.BAD_DEVICE_ID.value,  # "$" of a search would let it through
    "victim\r\n": Reason.BAD_DEVICE_ID.value,
    "\n": Reason.BAD_DEVICE_ID.value,
    "a\x00b": Reason.BAD_DEVICE_ID.value,
    "a\tb": Reason.BAD_DEVICE_ID.value,
    "a\x7fb": Reason.BAD_DEVICE_ID.value,
    "a\u2028b": Reason.BAD_DEVICE_ID.value,  # a line separator to many log viewers
    "a\u200bb": Reason.BAD_DEVICE_ID.value,  # invisible: looks like "ab"
    "a/b": Reason.BAD_TOPIC.value,  # two levels
    "/": Reason.BAD_TOPIC.value,
    "+": Reason.BAD_DEVICE_ID.value,
    "#": Reason.BAD_DEVICE_ID.value,
    "a+b": Reason.BAD_DEVICE_ID.value,
    "dév": Reason.BAD_DEVICE_ID.value,  # not in the default pattern
    "пульт-7": Reason.BAD_DEVICE_ID.value,
    "😀": Reason.BAD_DEVICE_ID.value,
    "pump 7": Reason.BAD_DEVICE_ID.value,
    "x" * 64: ACCEPTED,
    "x" * 65: Reason.BAD_DEVICE_ID.value,
    "x" * 5000: Reason.BAD_DEVICE_ID.value,
    "...": ACCEPTED,  # only "." and ".." are path elements
    ".hidden": ACCEPTED,
    "pump-7": ACCEPTED,
    "plant1:line2:pump_7.a": ACCEPTED,
}
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"
#: Characters no device id may hold, whatever the pattern (mixed into otherwise valid ids).
_POISON = ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u200b", "\ufeff", "+", "#"]

valid_ids = st.text(_ID_ALPHABET, min_size=1, max_size=64).filter(lambda d: d not in {".", ".."})
finite32 = st.floats(min_value=-_F32_MAX, max_value=_F32_MAX, allow_nan=False, allow_infinity=False)
good_ts = st.floats(min_value=MIN_TIMESTAMP, max_value=NOW + SKEW - 0.01, allow_nan=False)
iso_ts = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2024, 11, 24)).map(
    lambda d: d.isoformat()
)


@st.composite
def readings(draw: st.DrawFn, ts: st.SearchStrategy[object] | None = None) -> dict[str, object]:
    """A valid reading object: every feature a float32, a good ``ts`` (or none), maybe extras."""
    doc: dict[str, object] = {f: draw(finite32) for f in FEATURES}
    stamp = draw(ts if ts is not None else st.one_of(good_ts, iso_ts, st.none(), st.just(...)))
    if stamp is not ...:
        doc["ts"] = stamp
    if draw(st.booleans()):
        extra = draw(st.text(max_size=10).filter(lambda k: k not in ("ts", "n", "bn", *FEATURES)))
        doc[extra] = draw(st.text(max_size=20))  # ignored ("n" or "bn" would make an array a SenML pack)
    # Keys may come in any order.
    keys = draw(st.permutations(list(doc)))
    return {k: doc[k] for k in keys}


def _one(kind: str, device: str, payload: bytes, expected: str) -> Case:
    return Case(kind, [message(topic_of(device), payload)], expected)


@st.composite
def accepted_cases(draw: st.DrawFn) -> Case:
    return _one("valid", draw(valid_ids), to_json(draw(readings())), ACCEPTED)


@st.composite
def device_id_cases(draw: st.DrawFn) -> Case:
    """Every device-id edge, and valid ids with a poison character put in somewhere."""
    if draw(st.booleans()):
        device = draw(st.sampled_from(sorted(DEVICE_ID_EDGES)))
        expected = DEVICE_ID_EDGES[device]
    else:
        base = draw(st.text(_ID_ALPHABET, min_size=0, max_size=40))
        at = draw(st.integers(0, len(base)))
        device = base[:at] + draw(st.sampled_from(_POISON)) + base[at:]
        expected = Reason.BAD_DEVICE_ID.value
    return _one("device_id", device, to_json(draw(readings())), expected)


#: Literals no double holds, or that JSON does not allow: the whole message is non_finite.
NON_FINITE_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e309", "1" + "0" * 400, "-9e99999"]


@st.composite
def non_finite_cases(draw: st.DrawFn) -> Case:
    doc: dict[str, object] = draw(readings())
    where = draw(st.sampled_from([*FEATURES, "ts"]))
    if where != "ts" and draw(st.booleans()):
        # A double, but beyond float32 (the model's input type).
        doc[where] = draw(st.floats(min_value=_F32_MAX * 1.01, max_value=1e308)) * draw(
            st.sampled_from([1, -1])
        )
    else:
        doc[where] = Raw(draw(st.sampled_from(NON_FINITE_TOKENS)))
    payload = to_json([doc] if draw(st.booleans()) else doc)
    return _one("non_finite", draw(valid_ids), payload, Reason.NON_FINITE.value)


@st.composite
def timestamp_cases(draw: st.DrawFn) -> Case:
    """Timestamps at every edge: ahead of arrival (future), not epoch seconds, wrong types."""
    skew = SKEW
    choice = draw(st.integers(0, 4))
    ts: object
    if choice == 0:  # a clock ahead: any amount past the skew, up to "not seconds"
        ts, expected = draw(st.floats(min_value=NOW + skew + 0.001, max_value=NOW * 99)), "future"
    elif choice == 1:  # too large to be seconds: milliseconds, 1e300, the largest double
        big = st.floats(min_value=NOW * 101, max_value=1.7e308) | st.sampled_from(
            [NOW * 1000, 1e300, 1.7e308]
        )
        ts, expected = draw(big), "bad_timestamp"
    elif choice == 2:  # before 2000: seconds since boot, negative, -1e300
        ts = draw(
            st.floats(min_value=-1.7e308, max_value=MIN_TIMESTAMP - 0.001) | st.sampled_from([0, -1e300])
        )
        expected = "bad_timestamp"
    elif choice == 3:  # not a number nor ISO 8601 text
        ts = draw(
            st.sampled_from([True, False, [], {}, "yesterday", "", "9999-12-31T23:59:59", "1e400"])
            | st.text(max_size=30).filter(lambda s: not _is_iso(s))
            | st.lists(st.integers(), max_size=3)
        )
        expected = "bad_timestamp"
    else:  # inside the window: accepted
        ts, expected = draw(st.floats(min_value=MIN_TIMESTAMP, max_value=NOW + skew - 0.001)), ACCEPTED
    doc = draw(readings(ts=st.just(ts)))
    return _one("timestamp", draw(valid_ids), to_json(doc), expected)


def _is_iso(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


wrong_types = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.lists(st.floats(allow_nan=False), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def wrong_type_cases(draw: st.DrawFn) -> Case:
    doc: dict[str, object] = draw(readings())
    name = draw(st.sampled_from(FEATURES))
    if draw(st.booleans()):
        doc[name] = draw(wrong_types)
        expected = Reason.NON_NUMERIC.value
    else:
        del doc[name]
        expected = Reason.MISSING_FEATURE.value
    return _one("wrong_type", draw(valid_ids), to_json(doc), expected)


@st.composite
def malformed_cases(draw: st.DrawFn) -> Case:
    """Not JSON, or JSON that is no reading: not UTF-8, cut short, nested past orjson's limit,
    a scalar, an empty array."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        payload = b"\xff" + draw(st.binary(max_size=64))
    elif choice == 1:
        whole = to_json(draw(readings()))
        payload = whole[: draw(st.integers(0, len(whole) - 1))]
    elif choice == 2:
        depth = draw(st.integers(1025, 12_000))  # 60 KB at most: parsed, not oversized
        payload = draw(st.sampled_from([b"[", b'{"a":'])) * depth
    else:
        payload = to_json(draw(st.one_of(st.just([]), st.integers(), st.text(max_size=10), st.none())))
    return _one("malformed_json", draw(valid_ids), payload, Reason.MALFORMED_JSON.value)


@st.composite
def oversized_cases(draw: st.DrawFn) -> Case:
    """Larger than stream.max_payload_bytes (64 KiB, never parsed), or more readings than
    stream.max_readings_per_message (1000) in an array."""
    if draw(st.booleans()):
        chunk = draw(st.binary(min_size=1, max_size=64))
        payload = chunk * (65536 // len(chunk) + 1)
    else:
        payload = to_json([dict.fromkeys(FEATURES, 1.0)] * draw(st.integers(1001, 1500)))
    return _one("oversized", draw(valid_ids), payload, Reason.OVERSIZED.value)


# ------------------------------------------------------------------ unlabelled: anything at all

hostile_text = st.one_of(
    st.text(max_size=80),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(sorted(DEVICE_ID_EDGES)),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["x", "\\", '"', "\n", "é", "😀", "\u2028"]), st.integers(0, 3000)
    ),
)
any_topic = st.one_of(
    hostile_text.map(topic_of),
    hostile_text,
    st.sampled_from(["", "sensors", "sensors/", "sensors//telemetry", "/sensors/a/telemetry", "x/" * 3000]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([Raw(t) for t in NON_FINITE_TOKENS]),
    st.text(max_size=20),
    st.sampled_from([NOW, NOW + 290, NOW * 1000, 1e300, MIN_TIMESTAMP - 1]),
)
json_keys = st.sampled_from(["ts", *FEATURES, "n", "v", "vb", "vs", "bn", "bt", "t"]) | st.text(max_size=8)
json_docs = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(json_keys, inner, max_size=8),
    max_leaves=40,
)
senml_records = st.fixed_dictionaries(
    {},
    optional={
        "bn": st.one_of(st.text(max_size=20), st.sampled_from(["dev/", "urn:dev:1:"]), json_scalars),
        "bt": json_scalars | st.floats(min_value=MIN_TIMESTAMP, max_value=NOW),
        "n": st.sampled_from([*FEATURES, "humidity", ""]) | json_scalars,
        "t": json_scalars | st.floats(min_value=-100, max_value=100),
        "v": json_scalars | finite32,
        "vb": st.booleans(),
    },
)
any_payload = st.one_of(
    st.binary(max_size=2048),
    json_docs.map(to_json),
    st.lists(senml_records, min_size=1, max_size=12).map(to_json),
    st.lists(readings(), min_size=1, max_size=5).map(to_json),
    st.builds(
        lambda open_, n: open_ * n + b"]" * n, st.sampled_from([b"[", b"[{}", b"[1,"]), st.integers(1, 3000)
    ),
)


@st.composite
def hostile_batches(draw: st.DrawFn) -> Case:
    """One to six messages of anything: any topic, any bytes, any JSON, any SenML. Most come
    from a few valid devices, so that payloads get parsed and the device windows see
    repeated, out-of-order and duplicate timestamps."""
    devices = draw(st.lists(valid_ids, min_size=1, max_size=3))
    topic = st.sampled_from([topic_of(d) for d in devices])
    n = draw(st.integers(1, 6))
    msgs = [
        message(
            draw(st.one_of(topic, topic, any_topic)),
            draw(any_payload),
            NOW + draw(st.floats(min_value=-10, max_value=10)),
        )
        for _ in range(n)
    ]
    return Case("hostile_batch", msgs)


def cases() -> st.SearchStrategy[Case]:
    """Every input class: labelled single messages and unlabelled hostile batches."""
    return st.one_of(
        accepted_cases(),
        device_id_cases(),
        non_finite_cases(),
        timestamp_cases(),
        wrong_type_cases(),
        malformed_cases(),
        oversized_cases(),
        hostile_batches(),
    )


# --------------------------------------------------------------------------- log lines


class LogLineCheck(logging.Handler):
    """Formats every record in both formats and notes each line that breaks the bounds."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.json = JsonFormatter()
        self.text = TextFormatter()
        self.problems: list[str] = []
        self.lines = 0
        self.longest = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._check(record)
        except Exception as exc:  # a formatter that raises is itself a violation
            self.problems.append(f"formatting {record.msg!r} raised {exc!r}")

    def _check(self, record: logging.LogRecord) -> None:
        js = self.json.format(record)
        tx = self.text.format(record)
        self.lines += 2
        for name, line in (("json", js), ("text", tx)):
            size = len(line.encode())
            self.longest = max(self.longest, size)
            if record.exc_info is None and size > LINE_MAX_BYTES:
                self.problems.append(f"{name} line of {size} bytes > {LINE_MAX_BYTES}: {line[:200]!r}")
            if record.exc_info is None and "\n" in line:
                self.problems.append(f"{name} line holds a newline: {line[:200]!r}")
        doc = orjson.loads(js)
        reason = doc.get("reason")
        if reason is not None:
            missing = [k for k in ("topic", "device") if k not in doc]
            if missing:
                self.problems.append(f"rejection line without {missing}: {js[:300]}")
            elif reason in ("out_of_order", "duplicate") and not (doc["topic"] and doc["device"]):
                self.problems.append(f"{reason} line with an empty topic or device: {js[:300]}")


@contextmanager
def checking_logs(check: LogLineCheck) -> Iterator[LogLineCheck]:
    """Route the daemon's log records (``anomalyd.*``, every level) to ``check`` only, meanwhile."""
    logger = logging.getLogger("anomalyd")
    saved = logger.level, logger.propagate
    logger.addHandler(check)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # nothing piles up in pytest's capture over thousands of cases
    try:
        yield check
    finally:
        logger.removeHandler(check)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# --------------------------------------------------------------------------- the harness


@dataclass
class Harness:
    """A real Pipeline (decoder, device windows, batcher, ONNX Runtime with a tiny model,
    detector, metrics; no MQTT) that every case goes through, and the counts of outcomes."""

    pipeline: Pipeline
    registry: CollectorRegistry
    logs: LogLineCheck = field(default_factory=LogLineCheck)
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    cases: int = 0

    def run(self, case: Case) -> None:
        """Put ``case`` through the decoder and the pipeline; InvariantViolationError if a promise breaks."""
        self.cases += 1
        self.kinds[case.kind] += 1
        decoder = self.pipeline.decoder
        try:
            batch = decoder.decode(case.messages)
        except Exception as exc:
            raise InvariantViolationError(f"decode raised {exc!r} on {case!r}") from exc
        outcomes = self._check_batch(case, batch)
        self.outcomes.update(outcomes)
        if case.expected is not None and outcomes != [case.expected]:
            raise InvariantViolationError(
                f"{case.kind}: expected [{case.expected}], got {outcomes} "
                f"({[r.detail for r in batch.rejections]}) for {case!r}"
            )
        before = len(self.logs.problems)
        try:
            with checking_logs(self.logs):
                self.pipeline.ingest(case.messages)
                self.pipeline.flush(force=True)
        except Exception as exc:
            raise InvariantViolationError(f"the pipeline raised {exc!r} on {case!r}") from exc
        if len(self.logs.problems) > before:
            raise InvariantViolationError(f"log lines for {case!r}: {self.logs.problems[before:]}")

    def pipeline_counts(self) -> dict[str, int]:
        """What the pipeline counted over every case: readings accepted into the device
        windows, and rejections by reason (the decoder's and the later stages')."""
        get = self.registry.get_sample_value
        counts = {"accepted": int(get("anomalyd_readings_accepted_total") or 0)}
        for reason in sorted(KNOWN_REASONS):
            n = int(get("anomalyd_rejected_total", {"reason": reason}) or 0)
            if n:
                counts[reason] = n
        return counts

    def _check_batch(self, case: Case, batch: DecodedBatch) -> list[str]:
        n = len(batch)
        cfg = self.pipeline.config.stream
        if not (len(batch.ts) == batch.values.shape[0] == len(batch.arrival_mono) == len(batch.topics) == n):
            raise InvariantViolationError(f"misaligned batch for {case!r}")
        if batch.values.shape[1:] != (len(FEATURES),) or batch.values.dtype != np.float32:
            raise InvariantViolationError(f"values of shape {batch.values.shape} {batch.values.dtype}")
        if n + len(batch.rejections) < len(case.messages):
            raise InvariantViolationError(
                f"a message vanished: {n} accepted, {len(batch.rejections)} rejected"
            )
        if not np.isfinite(batch.values).all():
            raise InvariantViolationError(f"non-finite value accepted from {case!r}")
        latest = max(m.arrival for m in case.messages) + cfg.max_future_skew_s
        for t in batch.ts.tolist():
            if not (math.isfinite(t) and MIN_TIMESTAMP <= t <= latest):
                raise InvariantViolationError(f"timestamp {t!r} accepted from {case!r}")
        for device in batch.devices:
            if not device_id_ok(device, cfg.device_id_pattern):
                raise InvariantViolationError(f"device id {device!r} accepted")
        outcomes = [ACCEPTED] * n
        for r in batch.rejections:
            reason = str(r.reason)
            if reason not in KNOWN_REASONS or reason in _LATER_STAGE_REASONS:
                raise InvariantViolationError(f"decoder rejection with reason {reason!r}")
            if len(r.topic) > 256 or len(r.detail) > 160:
                raise InvariantViolationError(f"rejection text too long: {len(r.topic)}, {len(r.detail)}")
            if r.device and not device_id_ok(r.device, cfg.device_id_pattern):
                raise InvariantViolationError(f"rejection names an invalid device {r.device!r}")
            outcomes.append(reason)
        return outcomes


def _describe(messages: list[RawMessage]) -> str:
    parts = [
        f"{m.topic[:80]!r} <- {m.payload[:120]!r}{'...' if len(m.payload) > 120 else ''}" for m in messages
    ]
    return "; ".join(parts)


@contextmanager
def harness() -> Iterator[Harness]:
    """A Harness with its own tiny model (in a temporary directory) and metric registry."""
    from tests.helpers.tiny_model import build_tiny_model  # needs onnx: test-only

    with tempfile.TemporaryDirectory(prefix="anomalyd-hostile-") as tmp:
        model = load_model(build_tiny_model(Path(tmp) / "tiny.onnx", window_length=WINDOW, threshold=1.0))
        registry = CollectorRegistry()
        pipeline = Pipeline(config(), model, Metrics(registry))
        try:
            yield Harness(pipeline, registry)
        finally:
            pipeline.close()
