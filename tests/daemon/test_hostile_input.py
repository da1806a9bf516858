"""Hostile input, property-tested: the decoders, topic parsing, timestamps and log lines.

The strategies and the invariants live in ``tests.helpers.hostile``, shared with
``scripts/fuzz_input.py``, which runs the same properties at 100,000 cases and more. Here
they run a few thousand cases; the examples below pin the cases that once went wrong.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from anomalyd.decode import Decoder, Reason
from anomalyd.logsetup import LINE_MAX_BYTES, JsonFormatter, TextFormatter, configure
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel, load_model
from anomalyd.pipeline import Pipeline
from tests.helpers import hostile
from tests.helpers.hostile import FEATURES, KNOWN_REASONS, NOW, Case, Harness, config, message, topic_of


def cases(n: int) -> settings:
    """CI runs a few thousand cases in all, seconds per property (the fuzz run: 100,000)."""
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with hostile.harness() as h:
        yield h


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> LoadedModel:
    return load_model(tiny_model(window_length=hostile.WINDOW, threshold=1.0))


@pytest.fixture
def make_pipeline(model: LoadedModel) -> Iterator[Callable[..., tuple[Pipeline, CollectorRegistry]]]:
    made: list[Pipeline] = []

    def make(**overrides: object) -> tuple[Pipeline, CollectorRegistry]:
        registry = CollectorRegistry()
        pipeline = Pipeline(config(**overrides), model, Metrics(registry))
        made.append(pipeline)
        return pipeline, registry

    yield make
    for p in made:
        p.close()


@contextmanager
def daemon_log(fmt: str) -> Iterator[io.StringIO]:
    """The daemon's own log setup (``logsetup.configure``) in ``fmt``, into a buffer meanwhile."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    configure("DEBUG", fmt, out)
    try:
        yield out
    finally:
        for h in [h for h in root.handlers if getattr(h, "_anomalyd", False)]:
            root.removeHandler(h)
        root.setLevel(level)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with daemon_log("json") as out:
        yield out


def decoder(**overrides: object) -> Decoder:
    """A decoder as the daemon builds it, from the configuration's defaults (and ``overrides``)."""
    cfg = config(**overrides)
    s = cfg.stream
    return Decoder(
        list(FEATURES),
        cfg.mqtt.topic_in,
        s.max_payload_bytes,
        s.max_readings_per_message,
        s.device_id_pattern,
        s.max_future_skew_s,
    )


def reading(ts: float | None, value: float = 0.1) -> bytes:
    doc: dict[str, object] = dict.fromkeys(FEATURES, value)
    if ts is not None:
        doc["ts"] = ts
    return orjson.dumps(doc)


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("anomalyd_rejected_total", {"reason": reason}) or 0.0


def accepted(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("anomalyd_readings_accepted_total") or 0.0


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


# --------------------------------------------------------------------------- properties


@given(hostile.cases())
@cases(1500)
def test_any_input_is_accepted_or_rejected_with_a_known_reason(harness: Harness, case: Case) -> None:
    # Labelled cases must get their one expected outcome; every case keeps every invariant,
    # through the decoder and the whole pipeline, and every log line on the way is bounded.
    harness.run(case)


@given(hostile.device_id_cases())
@cases(400)
def test_every_device_id_edge_gets_its_outcome(harness: Harness, case: Case) -> None:
    harness.run(case)


@given(hostile.timestamp_cases() | hostile.non_finite_cases())
@cases(400)
def test_timestamps_and_huge_numbers_get_their_reason(harness: Harness, case: Case) -> None:
    harness.run(case)


# Lone surrogates cannot come over MQTT (paho decodes topics strictly), but a formatter
# must not raise on them either: orjson refuses to write them.
_log_text = hostile.hostile_text | st.just("lone \ud800 surrogate")


@given(
    _log_text,
    _log_text,
    st.dictionaries(st.sampled_from(["device", "topic", "reason", "detail"]), _log_text),
    st.sampled_from([1.5, float("nan"), float("inf"), 2**70, None, True, np.float32(2.5), np.float64(0.25)]),
)
@cases(400)
def test_log_lines_stay_bounded_whatever_they_carry(
    topic: str, detail: str, fields: dict[str, str], score: object
) -> None:
    record = logging.makeLogRecord(
        {
            "name": "anomalyd.pipeline",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "rejected (%s) on %r: %s",
            "args": ("bad_topic", topic, detail),
            **fields,
            "score": score,
        }
    )
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert len(line.encode()) <= LINE_MAX_BYTES
        assert "\n" not in line
    doc = orjson.loads(JsonFormatter().format(record))
    assert set(fields) <= set(doc)
    if isinstance(score, np.floating):
        assert doc["score"] == float(score)


def test_a_traceback_is_kept_but_bounded() -> None:
    try:
        raise ValueError("lone \ud800 surrogate " + "x" * 100_000)
    except ValueError:
        record = logging.getLogger("anomalyd.test").makeRecord(
            "anomalyd.test", logging.ERROR, __file__, 1, "decoder failed", (), sys.exc_info()
        )
    doc = orjson.loads(JsonFormatter().format(record))
    assert "ValueError" in doc["exc"]
    assert "bytes cut" in doc["exc"]
    assert len(doc["exc"].encode()) < 17_000
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("decoder failed")
    assert "Traceback" in text
    assert len(text.encode()) < 18_000


# --------------------------------------------------------------------------- the known cases


def test_the_documented_reasons_are_the_metric_labels() -> None:
    assert {r.value for r in Reason} == KNOWN_REASONS


@pytest.mark.parametrize("pattern", [None, r".+", r"[^/]*", r"(?s).*"])
@pytest.mark.parametrize("device", [".", "..", "victim\n", "victim\r", "a\u2028b", "a\x1bb", "a\tb"])
def test_device_ids_refused_whatever_the_pattern(pattern: str | None, device: str) -> None:
    d = decoder(**({} if pattern is None else {"stream.device_id_pattern": pattern}))
    for _ in range(2):  # the second time from the topic cache
        batch = d.decode([message(topic_of(device), reading(NOW - 1))])
        assert [r.reason for r in batch.rejections] == [Reason.BAD_DEVICE_ID]
        assert batch.rejections[0].device == ""
    assert d.decode([message(topic_of("victim"), reading(NOW - 1))]).devices == ["victim"]


def test_one_future_reading_does_not_black_out_its_device(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]],
) -> None:
    pipeline, registry = make_pipeline()  # the default stream.max_future_skew_s
    topic = topic_of("pump-7")
    pipeline.ingest([message(topic, reading(NOW + 290), arrival=NOW)])
    assert rejected(registry, "future") == 1
    # The next 20 readings arrive in real time, one a second, stamped 50 ms before arrival.
    for i in range(1, 21):
        pipeline.ingest([message(topic, reading(NOW + i - 0.05), arrival=NOW + i)])
    assert accepted(registry) == 20
    assert rejected(registry, "out_of_order") == 0
    assert pipeline.buffers.readings("pump-7") == 20


def test_with_a_wide_skew_one_future_reading_holds_its_device_back(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]],
) -> None:
    # Why the default skew is small: a reading that gets in is the device's newest, and
    # every later one stamped before it is out of order, for as long as it is ahead.
    pipeline, registry = make_pipeline(**{"stream.max_future_skew_s": 300.0})
    topic = topic_of("pump-7")
    pipeline.ingest([message(topic, reading(NOW + 290), arrival=NOW)])
    for i in range(1, 21):
        pipeline.ingest([message(topic, reading(NOW + i - 0.05), arrival=NOW + i)])
    assert accepted(registry) == 1
    assert rejected(registry, "out_of_order") == 20


def test_a_reading_inside_the_skew_holds_its_device_back_at_most_the_skew(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]],
) -> None:
    pipeline, registry = make_pipeline()
    skew = pipeline.config.stream.max_future_skew_s
    topic = topic_of("pump-7")
    pipeline.ingest([message(topic, reading(NOW + skew - 0.01), arrival=NOW)])
    for i in range(1, 21):
        pipeline.ingest([message(topic, reading(NOW + i - 0.05), arrival=NOW + i)])
    held_back = rejected(registry, "out_of_order")
    assert 0 < held_back <= skew  # one reading a second: at most `skew` of them
    assert accepted(registry) == 1 + 20 - held_back


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"ts": 1, "temperature": 1e400, "pressure": 1, "vibration": 1}', "non_finite"),
        (b'{"temperature": -1e400, "pressure": 1, "vibration": 1}', "non_finite"),
        (b'[{"temperature": 1, "pressure": 1, "vibration": 1, "ts": 1e400}]', "non_finite"),
        (b'{"ts": 1e300, "temperature": 1, "pressure": 1, "vibration": 1}', "bad_timestamp"),
        (b'{"ts": -1e300, "temperature": 1, "pressure": 1, "vibration": 1}', "bad_timestamp"),
        (reading(NOW + 290), "future"),
    ],
)
def test_huge_numbers_get_their_reason_and_a_short_detail(payload: bytes, reason: str) -> None:
    d = decoder()
    batch = d.decode([message(topic_of("d1"), payload)])
    assert [str(r.reason) for r in batch.rejections] == [reason]
    assert len(batch.rejections[0].detail) < 100  # no 300-digit number in the log
    assert batch.rejections[0].device == "d1"


def test_json_rejection_lines_carry_reason_topic_and_device(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]], json_log: io.StringIO
) -> None:
    pipeline, _ = make_pipeline()
    topic = topic_of("d1")
    pipeline.ingest([message(topic, reading(NOW - 5))])
    pipeline.ingest([message(topic, reading(NOW - 5))])  # duplicate
    pipeline.ingest([message(topic, reading(NOW - 9))])  # out of order
    pipeline.ingest([message(topic, b'{"temperature": 1e400}')])
    pipeline.ingest([message(topic_of(".."), reading(NOW - 1))])
    found = {str(doc["reason"]): doc for doc in lines(json_log) if "reason" in doc}
    assert set(found) == {"duplicate", "out_of_order", "non_finite", "bad_device_id"}
    for reason in ("duplicate", "out_of_order", "non_finite"):
        assert (found[reason]["topic"], found[reason]["device"]) == (topic, "d1"), reason
    assert found["bad_device_id"]["topic"] == "sensors/../telemetry"
    assert found["bad_device_id"]["device"] == ""  # not a device id


def test_json_alert_lines_carry_device_and_score(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]], json_log: io.StringIO
) -> None:
    pipeline, _ = make_pipeline(**{"detector.k_enter": 1, "detector.smoothing": "none"})
    # The tiny model scores a window by its last reading: 3.0 everywhere is 9.0, over 1.0.
    n = hostile.WINDOW
    pipeline.ingest([message(topic_of("hot-1"), reading(NOW - n + i, 3.0)) for i in range(n)])
    pipeline.flush(force=True)
    alerts = [doc for doc in lines(json_log) if str(doc["message"]).startswith("alert raised")]
    assert len(alerts) == 1
    assert alerts[0]["device"] == "hot-1"
    assert alerts[0]["score"] == pytest.approx(9.0)


def test_a_2kb_hostile_topic_makes_bounded_lines_in_both_formats(
    make_pipeline: Callable[..., tuple[Pipeline, CollectorRegistry]],
) -> None:
    pipeline, _ = make_pipeline()
    nasty = ['"\\\n\x00😀\u2028' * 400, "x" * 70_000, "é" * 3000]
    for fmt in ("json", "text"):
        with daemon_log(fmt) as out:
            for text in nasty:
                pipeline.ingest([message(topic_of(text), reading(NOW - 1))])
                pipeline.ingest([message("sensors/d1/telemetry", text.encode())])
        written = out.getvalue().splitlines()
        assert len(written) == 2 * len(nasty), written  # one line per rejection, none split
        assert all(len(line.encode()) <= LINE_MAX_BYTES for line in written)
