"""Decoder: payload forms, every rejection reason, and hostile input that must never raise."""

from __future__ import annotations

import gc
import math
import sys
import tracemalloc

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalyd.config import StreamConfig
from anomalyd.decode import _TOPIC_CACHE_MAX_BYTES, MIN_TIMESTAMP, DecodedBatch, Decoder, RawMessage, Reason

FEATURES = ["temperature", "pressure", "vibration"]
NOW = 1_732_440_000.0
STREAM = StreamConfig()


def decoder(**kw: object) -> Decoder:
    args: dict[str, object] = {
        "feature_names": FEATURES,
        "topic_template": "sensors/{device}/telemetry",
        "max_payload_bytes": STREAM.max_payload_bytes,
        "max_readings_per_message": 10,
        "device_id_pattern": STREAM.device_id_pattern,
        "max_future_skew_s": STREAM.max_future_skew_s,
    }
    args.update(kw)
    return Decoder(**args)  # type: ignore[arg-type]


def msg(payload: object, device: str = "dev-1", topic: str | None = None, arrival: float = NOW) -> RawMessage:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return RawMessage(
        topic if topic is not None else f"sensors/{device}/telemetry", raw, arrival, arrival - NOW + 100.0
    )


def reading(ts: object = NOW - 1, **over: object) -> dict[str, object]:
    r: dict[str, object] = {"ts": ts, "temperature": 71.25, "pressure": 101.5, "vibration": 0.042}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def reasons(batch: DecodedBatch) -> list[Reason]:
    return [r.reason for r in batch.rejections]


def one(payload: object, **kw: object) -> DecodedBatch:
    return decoder().decode([msg(payload, **kw)])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- accepted forms


def test_object_is_decoded_in_feature_order() -> None:
    b = one({"vibration": 0.5, "pressure": 2, "temperature": 1.5, "ts": NOW - 3, "extra": "ignored"})
    assert b.devices == ["dev-1"]
    assert b.ts.dtype == np.float64
    assert b.values.dtype == np.float32
    assert b.ts.tolist() == [NOW - 3]
    assert b.values.tolist() == [[1.5, 2.0, 0.5]]
    assert b.arrival_mono.tolist() == [100.0]
    assert b.rejections == []


def test_array_is_a_batch_and_bad_items_are_rejected_alone() -> None:
    b = one([reading(NOW - 3), reading(NOW - 2, pressure="high"), reading(NOW - 1), 7])
    assert b.ts.tolist() == [NOW - 3, NOW - 1]
    assert reasons(b) == [Reason.NON_NUMERIC, Reason.MALFORMED_JSON]
    assert b.values.shape == (2, 3)


def test_missing_ts_means_arrival_and_iso_strings_are_accepted() -> None:
    b = one([reading(None), reading(ts=...), reading("2024-11-24T09:20:00Z"), reading("2024-11-24T09:20:00")])
    assert b.ts.tolist() == [NOW, NOW, 1_732_440_000.0, 1_732_440_000.0]


def test_senml_pack_is_grouped_by_time() -> None:
    pack = [
        {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": NOW - 10, "n": "temperature", "u": "Cel", "v": 20.5},
        {"n": "pressure", "v": 101.0},
        {"n": "vibration", "v": 0.1},
        {"n": "humidity", "v": 40},  # not a feature: ignored
        {"n": "temperature", "t": 1, "v": 21.0},
        {"n": "pressure", "t": 1, "v": 102.0},
        {"n": "vibration", "t": 1, "v": 0.2},
    ]
    b = one(pack)
    assert b.rejections == []
    assert b.ts.tolist() == [NOW - 10, NOW - 9]
    np.testing.assert_allclose(b.values, [[20.5, 101.0, 0.1], [21.0, 102.0, 0.2]], rtol=1e-6)


def test_senml_relative_time_and_name_in_base_name() -> None:
    pack = [
        {"bn": "dev/temperature", "v": 1.0},
        {"bn": "dev/pressure", "v": 2.0},
        {"bn": "dev/vibration", "v": 3},
    ]
    b = one(pack, arrival=NOW)
    assert b.ts.tolist() == [NOW]  # no time at all: "now", RFC 8428 §4.5.3
    assert b.values.tolist() == [[1.0, 2.0, 3.0]]


def test_senml_incomplete_group_and_bool_value() -> None:
    pack = [
        {"bt": NOW - 5, "n": "temperature", "v": 1.0},
        {"n": "pressure", "v": 2.0},
        {"n": "temperature", "t": 1, "v": 1.0},
        {"n": "pressure", "t": 1, "v": 2.0},
        {"n": "vibration", "t": 1, "vb": True},
    ]
    b = one(pack)
    assert len(b) == 0
    assert reasons(b) == [Reason.MISSING_FEATURE, Reason.NON_NUMERIC]


def test_several_messages_several_devices_keep_arrival_order() -> None:
    d = decoder()
    b = d.decode([msg(reading(NOW - 2), "a"), msg(b"{", "b"), msg([reading(NOW - 1), reading(NOW)], "c")])
    assert b.devices == ["a", "c", "c"]
    assert reasons(b) == [Reason.MALFORMED_JSON]
    assert b.rejections[0].topic == "sensors/b/telemetry"


def test_empty_input_gives_empty_arrays() -> None:
    b = decoder().decode([])
    assert len(b) == 0
    assert b.values.shape == (0, 3)
    assert b.ts.shape == (0,)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", Reason.MALFORMED_JSON),
        (b"\xff\xfe\x00garbage", Reason.MALFORMED_JSON),
        (b'"just a string"', Reason.MALFORMED_JSON),
        (b"[]", Reason.MALFORMED_JSON),
        (b"42", Reason.MALFORMED_JSON),
        (b"[" * 5000 + b"]" * 5000, Reason.MALFORMED_JSON),
        (b'{"ts": 1, "temperature": NaN, "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (b'{"temperature": Infinity, "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (b'{"temperature": 1e400, "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (b'{"temperature": -1e400, "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (b'{"ts": 1e400, "temperature": 1, "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (b'{"temperature": 1e400, "pressure": 1, "vibration": 1', Reason.MALFORMED_JSON),  # and cut short
        (b'{"temperature": NaN, "pressure": 1 "vibration": 1}', Reason.MALFORMED_JSON),  # and a comma short
        (reading(temperature=1e39), Reason.NON_FINITE),
        (b'{"temperature": 1' + b"0" * 60 + b', "pressure": 1, "vibration": 1}', Reason.NON_FINITE),
        (reading(pressure=...), Reason.MISSING_FEATURE),
        (reading(pressure="101.3"), Reason.NON_NUMERIC),
        (reading(pressure=True), Reason.NON_NUMERIC),
        (reading(pressure=None), Reason.NON_NUMERIC),
        (reading(pressure=[1.0]), Reason.NON_NUMERIC),
        (reading(pressure={"v": 1}), Reason.NON_NUMERIC),
        (reading(ts=True), Reason.BAD_TIMESTAMP),
        (reading(ts="yesterday"), Reason.BAD_TIMESTAMP),
        (reading(ts=[1]), Reason.BAD_TIMESTAMP),
        (reading(ts=12.5), Reason.BAD_TIMESTAMP),  # seconds since boot
        (reading(ts=MIN_TIMESTAMP - 1), Reason.BAD_TIMESTAMP),
        (reading(ts=NOW * 1000), Reason.BAD_TIMESTAMP),  # milliseconds
        (reading(ts=1e300), Reason.BAD_TIMESTAMP),
        (reading(ts=NOW + STREAM.max_future_skew_s + 1), Reason.FUTURE),
        (reading(ts=NOW + 290), Reason.FUTURE),
        (reading(ts="9999-12-31T23:59:59"), Reason.BAD_TIMESTAMP),
        (reading(ts="0001-01-01T00:00:00+14:00"), Reason.BAD_TIMESTAMP),
        (reading(ts=-1e308), Reason.BAD_TIMESTAMP),
        ([reading()] * 11, Reason.OVERSIZED),
        ([{"n": "temperature", "v": 1, "t": i} for i in range(50)], Reason.OVERSIZED),
        ([{"bn": 7, "n": "temperature", "v": 1}], Reason.MALFORMED_JSON),
        ([{"n": "temperature", "v": 1, "t": "soon"}], Reason.BAD_TIMESTAMP),
        ([{"n": "humidity", "v": 1}], Reason.MISSING_FEATURE),
        ([{"n": "temperature", "v": 1}, 5], Reason.MALFORMED_JSON),
    ],
)
def test_rejections_have_the_right_reason(payload: object, reason: Reason) -> None:
    b = one(payload)
    assert len(b) == 0
    assert reasons(b) == [reason]
    assert len(b.rejections[0].detail) <= 160


def test_ts_just_inside_future_skew_is_accepted() -> None:
    ahead = NOW + STREAM.max_future_skew_s - 0.5
    assert one(reading(ts=ahead)).ts.tolist() == [ahead]


def test_future_skew_is_configurable() -> None:
    d = decoder(max_future_skew_s=300.0)
    assert d.decode([msg(reading(ts=NOW + 290))]).ts.tolist() == [NOW + 290]
    assert reasons(d.decode([msg(reading(ts=NOW + 301))])) == [Reason.FUTURE]


def test_oversized_payload_is_not_parsed() -> None:
    d = decoder(max_payload_bytes=64)
    b = d.decode([msg(b"{" + b" " * 100)])  # would be malformed if it were parsed
    assert reasons(b) == [Reason.OVERSIZED]


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/dev/telemetry", Reason.BAD_TOPIC),
        ("sensors//telemetry", Reason.BAD_TOPIC),
        ("sensors/a/b/telemetry", Reason.BAD_TOPIC),
        ("sensors/dev/telemetry/extra", Reason.BAD_TOPIC),
        ("sensors/telemetry", Reason.BAD_TOPIC),
        ("", Reason.BAD_TOPIC),
        ("sensors/+/telemetry", Reason.BAD_DEVICE_ID),
        ("sensors/#/telemetry", Reason.BAD_DEVICE_ID),
        ("sensors/dev ice/telemetry", Reason.BAD_DEVICE_ID),
        ("sensors/dév/telemetry", Reason.BAD_DEVICE_ID),
        ("sensors/" + "x" * 65 + "/telemetry", Reason.BAD_DEVICE_ID),
        ("sensors/a\x00b/telemetry", Reason.BAD_DEVICE_ID),
    ],
)
def test_bad_topics(topic: str, reason: Reason) -> None:
    d = decoder()
    for _ in range(2):  # second time from the topic cache
        b = d.decode([msg(reading(), topic=topic)])
        assert reasons(b) == [reason]


def test_wildcards_rejected_even_if_the_pattern_allows_them() -> None:
    d = decoder(device_id_pattern=r".+")
    assert reasons(d.decode([msg(reading(), topic="sensors/a+b/telemetry")])) == [Reason.BAD_DEVICE_ID]
    assert d.decode([msg(reading(), topic="sensors/any thing/telemetry")]).devices == ["any thing"]


def test_topic_template_with_device_last() -> None:
    d = decoder(topic_template="plant/line1/{device}")
    assert d.decode([msg(reading(), topic="plant/line1/m7")]).devices == ["m7"]


def test_long_topic_is_truncated_in_the_rejection() -> None:
    b = one(reading(), topic="x/" * 5000)
    assert len(b.rejections[0].topic) <= 256


# --------------------------------------------------------------------------- properties

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(st.binary(max_size=512), st.text(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise(payload: bytes, device: str) -> None:
    b = decoder().decode([msg(payload, topic=f"sensors/{device}/telemetry")])
    assert len(b) + len(b.rejections) >= 1
    assert b.values.shape == (len(b), 3)
    assert np.isfinite(b.values).all()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["ts", *FEATURES, "n", "v", "bn", "bt", "t"]), inner, max_size=6)
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_never_raises(doc: object) -> None:
    b = one(orjson.dumps(doc))
    assert b.values.shape == (len(b), 3)
    assert np.isfinite(b.values).all()
    assert np.all(b.ts >= MIN_TIMESTAMP)


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=MIN_TIMESTAMP, max_value=NOW, allow_nan=False), finite32, finite32, finite32
        ),
        min_size=1,
        max_size=10,
    ),
    st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_valid_readings_round_trip(rows: list[tuple[float, float, float, float]], as_array: bool) -> None:
    docs = [{"ts": t, "temperature": a, "pressure": b, "vibration": c} for t, a, b, c in rows]
    payloads = [docs] if as_array else docs
    d = decoder()
    out = d.decode([msg(p) for p in payloads])
    assert out.rejections == []
    assert out.ts.tolist() == [r[0] for r in rows]
    assert out.values.tolist() == [list(r[1:]) for r in rows]  # float32 values survive exactly
    assert all(math.isfinite(x) for x in out.ts)


# --------------------------------------------------------------------------- memory


def _traced_after_gc() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_repeated_rejections_on_one_topic_do_not_grow_memory() -> None:
    # A device with a bad id keeps sending: each rejection must be a fresh value, so nothing
    # (no traceback, no frame, no batch of payloads) outlives the call to decode.
    d = decoder()
    filler = "x" * 1000  # ~1 KB payloads, so that anything a rejection keeps alive shows up

    def round_() -> None:
        batch = [msg(reading(note=filler), topic="sensors/pump 7/telemetry") for _ in range(10)]
        assert reasons(d.decode(batch)) == [Reason.BAD_DEVICE_ID] * 10

    tracemalloc.start()
    try:
        round_()  # warm-up: the topic cache entry, interned strings, ...
        before = _traced_after_gc()
        for _ in range(200):
            round_()
        grown = _traced_after_gc() - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"memory grew by {grown} bytes over 2,000 rejections"


def test_same_bad_topic_twice_gives_two_identical_rejections() -> None:
    d = decoder()
    m = msg(reading(), topic="sensors/pump 7/telemetry")
    first = d.decode([m, m]).rejections
    second = d.decode([m]).rejections  # from the topic cache
    assert len(first) == 2
    assert len(second) == 1
    assert first[0] == first[1] == second[0]
    assert first[0].reason is Reason.BAD_DEVICE_ID
    assert first[0].detail == "device id 'pump 7' does not match the pattern"


def _cache_bytes(d: Decoder) -> int:
    # Keys and values, as the decoder counts them (a refusal holds its detail text).
    topics = d._topics.items()
    return sum(
        sys.getsizeof(k) + sys.getsizeof(v) + sys.getsizeof(getattr(v, "detail", "")) for k, v in topics
    )


def test_many_long_topics_keep_the_topic_cache_small() -> None:
    d = decoder()
    pad = "x" * 60_000  # the broker allows topics up to 64 KiB
    for _ in range(2):  # devices resend
        for start in range(0, 2000, 100):
            batch = [msg(reading(), topic=f"sensors/{i}{pad}/telemetry") for i in range(start, start + 100)]
            assert reasons(d.decode(batch)) == [Reason.BAD_DEVICE_ID] * 100
    assert _cache_bytes(d) <= _TOPIC_CACHE_MAX_BYTES
    # Topics just short enough to be cached: the byte cap, not the entry cap, bounds them.
    pad = "x" * 990
    for start in range(0, 10_000, 1000):
        batch = [msg(reading(), topic=f"sensors/{i}{pad}/telemetry") for i in range(start, start + 1000)]
        assert reasons(d.decode(batch)) == [Reason.BAD_DEVICE_ID] * 1000
        assert _cache_bytes(d) <= _TOPIC_CACHE_MAX_BYTES
    assert 0 < len(d._topics) < 10_000
