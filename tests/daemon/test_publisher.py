"""Publisher against a real Mosquitto: topics, payloads, retained alerts and status."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.alerts import AlertRecord
from anomalyd.config import MqttConfig, OutputConfig
from anomalyd.detector import Decision
from anomalyd.metrics import Metrics
from anomalyd.mqtt import MqttLink
from anomalyd.publisher import Publisher, last_will
from tests.broker import MosquittoBroker, Subscriber, wait_for

FEATURES = ["temperature", "pressure", "vibration"]


def _decision(
    device: str, score: float, *, alert: bool = False, changed: bool = False, ts: float = 1_767_225_600.5
) -> Decision:
    contributions = np.array([score / 2, score / 4, score / 4], dtype=np.float32)
    return Decision(
        device=device,
        ts=ts,
        score=score,
        smoothed=score,
        threshold=2.0,
        anomaly=score > 2.0,
        alert=alert,
        alert_changed=changed,
        contributions=contributions,
        padded=False,
    )


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture
def link(broker: MosquittoBroker, metrics: Metrics) -> Iterator[MqttLink]:
    # The link counts what it publishes (and what the broker refuses), so it gets the
    # publisher's metrics.
    cfg = MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.5)
    link = MqttLink(cfg, will=last_will(OutputConfig()), metrics=metrics)
    yield link
    link.close(2.0)


def _publisher(link: MqttLink, metrics: Metrics, **output: object) -> Publisher:
    return Publisher(
        link,
        OutputConfig.model_validate(output),
        metrics,
        feature_names=FEATURES,
        model_version="m-1",
    )


def test_scores_go_to_the_device_topic_as_json(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        arrival = np.array([time.monotonic() - 0.05, time.monotonic()])
        pub.publish_decisions([_decision("pump-1", 0.5), _decision("pump-2", 3.0)], arrival)
        pub.flush_scores()
        sub.wait_until(lambda ms: len(ms) == 2, 10, "two scores")
        by_topic = {m.topic: orjson.loads(m.payload) for m in sub.snapshot()}
    finally:
        sub.close()
    assert set(by_topic) == {"anomaly/pump-1/score", "anomaly/pump-2/score"}
    doc = by_topic["anomaly/pump-2/score"]
    assert doc == {
        "device": "pump-2",
        "ts": 1_767_225_600.5,
        "score": 3.0,
        "smoothed": 3.0,
        "threshold": 2.0,
        "anomaly": True,
        "alert": False,
        "padded": False,
        "contributions": {"temperature": 1.5, "pressure": 0.75, "vibration": 0.75},
        "max_score": 3.0,
        "windows": 1,
        "anomalous_windows": 1,
        "model_version": "m-1",
    }
    # QoS 0 scores are counted once the canary (this pass's first message, at QoS 1) is acked
    wait_for(lambda: registry.get_sample_value("anomalyd_published_total", {"kind": "score"}) == 2.0, 10)
    assert registry.get_sample_value("anomalyd_end_to_end_seconds_count") == 2.0
    assert registry.get_sample_value("anomalyd_end_to_end_seconds_sum") >= 0.05


def test_batched_scores_and_no_contributions(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics, publish_scores=False, batched_scores=True, include_contributions=False)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/#"])
    try:
        pub.publish_decisions([_decision("a", 0.1), _decision("b", 0.2), _decision("c", 0.3)])
        sub.wait_until(lambda ms: any(m.topic == "anomaly/scores" for m in ms), 10, "batch")
        msgs = [m for m in sub.snapshot() if m.topic != "anomaly/status"]
    finally:
        sub.close()
    assert [m.topic for m in msgs] == ["anomaly/scores"]  # no per-window messages
    doc = orjson.loads(msgs[0].payload)
    assert doc["model_version"] == "m-1"
    assert doc["device"] == ["a", "b", "c"]
    assert doc["score"] == pytest.approx([0.1, 0.2, 0.3])
    assert doc["anomaly"] == [False, False, False]
    assert len(doc["ts"]) == len(doc["threshold"]) == len(doc["alert"]) == len(doc["padded"]) == 3
    assert "contributions" not in doc


def test_batch_message_has_every_window_and_its_contributions(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics, publish_scores=False, batched_scores=True)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/scores"])
    try:
        pub.publish_decisions([_decision("a", 1.0, ts=10.0 + i) for i in range(5)])
        sub.wait_until(lambda ms: len(ms) == 1, 10, "batch")
        doc = orjson.loads(sub.snapshot()[0].payload)
    finally:
        sub.close()
    assert doc["features"] == FEATURES
    assert doc["ts"] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert doc["contributions"] == [[0.5, 0.25, 0.25]] * 5


def test_scores_are_rate_limited_per_device_in_data_time(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    """One message per device per pass, and only once score_interval_s of data time has
    passed since the window the previous message reported; it summarises every window."""
    pub = _publisher(link, metrics, score_interval_s=10.0)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])
    t0 = 1_767_225_600.0
    try:
        # Flush 1: 20 windows of "a" (1 s apart, one anomalous) and one of "b".
        # Pass 1: two batches, 20 windows of "a" (1 s apart, one anomalous) and one of "b".
        first = [_decision("a", 1.0 + (i == 7) * 4.0, ts=t0 + i) for i in range(20)]
        pub.publish_decisions(first[:10])
        pub.publish_decisions([*first[10:], _decision("b", 0.5, ts=t0)])
        assert registry.get_sample_value("anomalyd_published_total", {"kind": "score"}) == 0.0
        pub.flush_scores()
        sub.wait_until(lambda ms: len(ms) == 2, 10, "one message per device")
        # Pass 2: 5 s later in data time, within the interval: nothing for "a".
        pub.publish_decisions([_decision("a", 0.2, ts=t0 + 19 + k) for k in range(1, 6)])
        pub.flush_scores()
        # Pass 3: 10 s after the reported window: one message covering passes 2 and 3.
        pub.publish_decisions([_decision("a", 0.3, ts=t0 + 29)])
        pub.flush_scores()
        sub.wait_until(lambda ms: len(ms) == 3, 10, "a's second message")
        time.sleep(0.2)
        msgs = [(m.topic, orjson.loads(m.payload)) for m in sub.snapshot()]
    finally:
        sub.close()
    a = [doc for topic, doc in msgs if topic == "anomaly/a/score"]
    assert len(a) == 2, msgs
    assert a[0]["ts"] == t0 + 19  # the newest window of the flush
    assert (a[0]["windows"], a[0]["anomalous_windows"], a[0]["max_score"]) == (20, 1, 5.0)
    assert a[1]["ts"] == t0 + 29
    assert (a[1]["windows"], a[1]["anomalous_windows"]) == (6, 0)
    assert a[1]["max_score"] == pytest.approx(0.3)
    assert registry.get_sample_value("anomalyd_published_total", {"kind": "score"}) == 3.0


def test_score_interval_zero_publishes_every_window(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics, score_interval_s=0.0)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        pub.publish_decisions([_decision("a", 1.0, ts=100.0 + i * 0.01) for i in range(7)])
        sub.wait_until(lambda ms: len(ms) == 7, 10, "seven scores")
        docs = [orjson.loads(m.payload) for m in sub.snapshot()]
    finally:
        sub.close()
    assert [d["windows"] for d in docs] == [1] * 7
    assert [d["ts"] for d in docs] == [100.0 + i * 0.01 for i in range(7)]


def test_forgotten_devices_start_a_fresh_summary(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics, score_interval_s=60.0)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        pub.publish_decisions([_decision("a", 1.0, ts=100.0)])
        pub.flush_scores()
        pub.publish_decisions([_decision("a", 1.0, ts=101.0)])  # within the interval
        pub.flush_scores()
        pub.forget(["a"])
        pub.publish_decisions([_decision("a", 1.0, ts=102.0)])  # a new device to the publisher
        pub.flush_scores()
        sub.wait_until(lambda ms: len(ms) == 2, 10, "two messages")
        docs = [orjson.loads(m.payload) for m in sub.snapshot()]
    finally:
        sub.close()
    assert [(d["ts"], d["windows"]) for d in docs] == [(100.0, 1), (102.0, 1)]


def test_overloaded_status_is_retained_and_cleared(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics)
    link.add_connect_listener(pub.online)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/status"])
    try:
        sub.wait_until(lambda ms: bool(ms) and ms[-1].payload == b"online", 10, "online")
        pub.set_overloaded(True)
        sub.wait_until(lambda ms: ms[-1].payload == b"overloaded", 10, "overloaded")
        pub.set_overloaded(True)  # no change, no message
        pub.set_overloaded(False)
        sub.wait_until(lambda ms: ms[-1].payload == b"online", 10, "online again")
        payloads = [m.payload for m in sub.snapshot()]
    finally:
        sub.close()
    assert payloads[-3:] == [b"online", b"overloaded", b"online"]


def test_alert_states_are_retained(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics)
    link.start()
    assert link.wait_connected(10)
    live = Subscriber(broker, ["anomaly/+/alert"])
    record = AlertRecord(
        "pump-3",
        "anomalous",
        "anomalous",
        since=100.0,
        ts=130.0,
        score=5.0,
        threshold=2.0,
        peak_score=7.0,
        peak_ts=120.0,
        peak_contributions=np.array([3.5, 1.75, 1.75], np.float32),
    )
    try:
        pub.publish_states([record])
        live.wait_until(lambda ms: len(ms) == 1, 10, "alert")  # the broker has it now
    finally:
        live.close()
    # A subscriber that arrives later still learns the current alert state.
    late = Subscriber(broker, ["anomaly/+/alert"])
    try:
        late.wait_until(lambda ms: len(ms) == 1, 10, "retained alert")
        (msg,) = late.snapshot()
    finally:
        late.close()
    assert msg.topic == "anomaly/pump-3/alert"
    assert msg.retain
    doc = orjson.loads(msg.payload)
    assert doc["state"] == "anomalous"
    assert doc["alert"] is True
    assert doc["duration_s"] == 30.0
    assert doc["peak_score"] == 7.0
    assert doc["contributions"] == {"temperature": 3.5, "pressure": 1.75, "vibration": 1.75}
    assert doc["model_version"] == "m-1"
    wait_for(lambda: registry.get_sample_value("anomalyd_published_total", {"kind": "alert"}) == 1.0, 10)


def test_status_online_on_connect_stopped_on_exit_offline_as_will(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics)
    link.add_connect_listener(pub.online)
    link.start()
    assert link.wait_connected(10)
    # `online` goes out from the connect callback, so a subscriber that joins right now may
    # get it live (retain flag off). Wait until the broker has it, then a newcomer must be
    # handed the retained copy.
    first = Subscriber(broker, ["anomaly/status"])
    try:
        first.wait_until(lambda ms: [m.payload for m in ms] == [b"online"], 10, "online")
    finally:
        first.close()
    sub = Subscriber(broker, ["anomaly/status"])
    try:
        sub.wait_until(lambda ms: [m.payload for m in ms] == [b"online"], 10, "online")
        assert sub.snapshot()[0].retain
        assert pub.stopped(timeout=5)
        sub.wait_until(lambda ms: ms[-1].payload == b"stopped", 10, "stopped")
    finally:
        sub.close()
    will = last_will(OutputConfig())
    assert (will.topic, will.payload, will.retain) == ("anomaly/status", b"offline", True)


def test_publishing_while_disconnected_counts_failures(
    link: MqttLink, registry: CollectorRegistry, metrics: Metrics
) -> None:
    pub = _publisher(link, metrics)  # link never started: not connected
    pub.publish_decisions([_decision("x", 1.0)])
    pub.flush_scores()
    assert (
        registry.get_sample_value(
            "anomalyd_publish_failures_total", {"kind": "score", "reason": "not_connected"}
        )
        == 1.0
    )
    assert pub.stopped(timeout=0.1) is False
