"""Publisher against a real Mosquitto: topics, payloads, retained alerts and status."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.config import MqttConfig, OutputConfig
from anomalyd.detector import Decision
from anomalyd.intake import MqttLink
from anomalyd.metrics import Metrics
from anomalyd.publisher import Publisher, last_will
from tests.broker import MosquittoBroker, Subscriber

FEATURES = ["temperature", "pressure", "vibration"]


def _decision(device: str, score: float, *, alert: bool = False, changed: bool = False) -> Decision:
    contributions = np.array([score / 2, score / 4, score / 4], dtype=np.float32)
    return Decision(
        device=device,
        ts=1_767_225_600.5,
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
def link(broker: MosquittoBroker) -> Iterator[MqttLink]:
    cfg = MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.5)
    link = MqttLink(cfg, will=last_will(OutputConfig()))
    yield link
    link.close(2.0)


def _publisher(link: MqttLink, registry: CollectorRegistry, **output: object) -> Publisher:
    return Publisher(
        link,
        OutputConfig.model_validate(output),
        Metrics(registry),
        feature_names=FEATURES,
        model_version="m-1",
    )


def test_scores_go_to_the_device_topic_as_json(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry
) -> None:
    pub = _publisher(link, registry)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        arrival = np.array([time.monotonic() - 0.05, time.monotonic()])
        pub.publish_decisions([_decision("pump-1", 0.5), _decision("pump-2", 3.0)], arrival)
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
        "model_version": "m-1",
    }
    assert registry.get_sample_value("anomalyd_published_total", {"kind": "score"}) == 2.0
    assert registry.get_sample_value("anomalyd_end_to_end_seconds_count") == 2.0
    assert registry.get_sample_value("anomalyd_end_to_end_seconds_sum") >= 0.05


def test_batched_scores_and_no_contributions(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry
) -> None:
    pub = _publisher(link, registry, publish_scores=False, batched_scores=True, include_contributions=False)
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
    assert [s["device"] for s in doc["scores"]] == ["a", "b", "c"]
    assert all("contributions" not in s and "model_version" not in s for s in doc["scores"])


def test_alert_changes_are_retained(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry
) -> None:
    pub = _publisher(link, registry)
    link.start()
    assert link.wait_connected(10)
    live = Subscriber(broker, ["anomaly/+/alert"])
    try:
        pub.publish_decisions(
            [_decision("pump-3", 5.0, alert=True, changed=True), _decision("pump-3", 5.0, alert=True)]
        )
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
    assert doc["score"] == 5.0
    assert registry.get_sample_value("anomalyd_published_total", {"kind": "alert"}) == 1.0


def test_status_online_on_connect_stopped_on_exit_offline_as_will(
    broker: MosquittoBroker, link: MqttLink, registry: CollectorRegistry
) -> None:
    pub = _publisher(link, registry)
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


def test_publishing_while_disconnected_counts_failures(link: MqttLink, registry: CollectorRegistry) -> None:
    pub = _publisher(link, registry)  # link never started: not connected
    pub.publish_decisions([_decision("x", 1.0)])
    assert registry.get_sample_value("anomalyd_publish_failures_total", {"kind": "score"}) == 1.0
    assert pub.stopped(timeout=0.1) is False
