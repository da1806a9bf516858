"""Intake against a real Mosquitto: connect, subscribe in on_connect, reconnect with
backoff, refuse bad credentials, TLS, and the bounded queue."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from anomalyd.config import MqttConfig, TlsConfig
from anomalyd.decode import RawMessage, Reason
from anomalyd.errors import BrokerError
from anomalyd.intake import IntakeQueue
from anomalyd.metrics import Metrics
from anomalyd.mqtt import MqttLink, Will, backoff_delay, subscription_filter
from tests.broker import MosquittoBroker, Subscriber, TlsFiles, publish_many, wait_for


def _cfg(broker: MosquittoBroker, **kw: object) -> MqttConfig:
    base: dict[str, object] = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05}
    base["reconnect_max_s"] = 0.5
    base.update(kw)
    return MqttConfig.model_validate(base)


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.close(2.0)


def _link(
    links: list[MqttLink],
    cfg: MqttConfig,
    queue: IntakeQueue | None = None,
    on_connect: Callable[[], None] | None = None,
    **kw: object,
) -> MqttLink:
    link = MqttLink(cfg, queue=queue, **kw)  # type: ignore[arg-type]
    links.append(link)
    if on_connect is not None:
        # Before start(): a listener added later can miss the first connection.
        link.add_connect_listener(on_connect)
    link.start()
    return link


def _wait_queue(queue: IntakeQueue, n: int, timeout: float = 10.0) -> list[RawMessage]:
    got: list[RawMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} messages arrived"
        queue.wait(0.1)
        got += queue.drain(10_000)
    return got


# --------------------------------------------------------------------------- pure parts


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        upper = min(30.0, 0.5 * 2**attempt)
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= upper for d in draws)
        # full jitter: spread over the whole range, not a fixed delay
        assert max(draws) - min(draws) > upper / 2
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0


def test_subscription_filter() -> None:
    assert subscription_filter("sensors/{device}/telemetry") == "sensors/+/telemetry"
    assert subscription_filter("plant/a/{device}") == "plant/a/+"


def test_queue_is_bounded_and_fifo() -> None:
    q = IntakeQueue(3)
    msgs = [RawMessage(f"t/{i}", b"x", 0.0, 0.0) for i in range(4)]
    assert [q.put(m) for m in msgs] == [True, True, True, False]
    assert len(q) == 3
    assert [m.topic for m in q.drain(2)] == ["t/0", "t/1"]
    assert q.wait(0) is True  # still non-empty: stays signalled
    assert [m.topic for m in q.drain(10)] == ["t/2"]
    assert q.wait(0) is False
    q.wake()
    assert q.wait(0) is True
    assert q.drain(10) == []


# --------------------------------------------------------------------------- real broker


def test_receives_stamped_messages_from_the_subscribed_topic(
    broker: MosquittoBroker, links: list[MqttLink], registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    q = IntakeQueue(100)
    link = _link(links, _cfg(broker), q, metrics=metrics)
    assert link.wait_connected(10)
    assert registry.get_sample_value("anomalyd_mqtt_connected") == 1.0
    before = time.time()
    # Subscriptions are asynchronous: the QoS 1 publish could race the SUBACK, so publish
    # until the first one lands, then check a clean batch.
    wait_for(
        lambda: publish_many(broker, [("sensors/dev-1/telemetry", b"probe")]) or len(q) > 0,
        10,
        interval=0.1,
        what="subscription active",
    )
    q.drain(1000)
    publish_many(broker, [("sensors/dev-1/telemetry", b'{"a": 1}'), ("other/dev-1/x", b"ignored")])
    publish_many(broker, [("sensors/dev-2/telemetry", b"[1,2]")])
    got = _wait_queue(q, 2)
    assert [(m.topic, m.payload) for m in got] == [
        ("sensors/dev-1/telemetry", b'{"a": 1}'),
        ("sensors/dev-2/telemetry", b"[1,2]"),
    ]
    assert all(m.arrival >= before - 1 and m.arrival_mono > 0 for m in got)
    assert not any(m.retained for m in got)


def test_retained_copies_are_marked_as_such(broker: MosquittoBroker, links: list[MqttLink]) -> None:
    """A broker's stored copy (delivered on subscribe) is not a live message: say so."""
    publish_many(broker, [("sensors/old/telemetry", b"stored")], retain=True)
    q = IntakeQueue(100)
    link = _link(links, _cfg(broker), q)
    assert link.wait_connected(10)
    got = _wait_queue(q, 1)
    assert [(m.topic, m.payload, m.retained) for m in got] == [("sensors/old/telemetry", b"stored", True)]


def _subscribed(broker: MosquittoBroker, q: IntakeQueue) -> None:
    wait_for(
        lambda: publish_many(broker, [("sensors/probe/telemetry", b"probe")]) or len(q) > 0,
        10,
        interval=0.1,
        what="subscription active",
    )
    q.drain(100_000)


def test_broker_down_at_start_delays_connection_then_connects(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], registry: CollectorRegistry
) -> None:
    broker = broker_factory(started=False)
    metrics = Metrics(registry)
    q = IntakeQueue(100)
    link = _link(links, _cfg(broker), q, metrics=metrics)
    assert link.wait_connected(0.3) is False
    assert link.alive  # still trying, not dead
    wait_for(
        lambda: (
            (registry.get_sample_value("anomalyd_mqtt_connect_failures_total", {"kind": "network"}) or 0) >= 2
        ),
        10,
        what="repeated connection attempts",
    )
    broker.start()
    assert link.wait_connected(10)
    _subscribed(broker, q)


def test_reconnects_and_resubscribes_after_the_broker_restarts(
    broker: MosquittoBroker, links: list[MqttLink], registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    q = IntakeQueue(1000)
    connects: list[int] = []
    link = _link(links, _cfg(broker), q, on_connect=lambda: connects.append(1), metrics=metrics)
    assert link.wait_connected(10)
    _subscribed(broker, q)
    broker.kill()
    wait_for(lambda: not link.connected, 10, what="disconnect noticed")
    assert registry.get_sample_value("anomalyd_mqtt_connected") == 0.0
    broker.start()  # same port; persistence off, so the subscription must be renewed by us
    wait_for(lambda: link.connected, 15, what="reconnect")
    _subscribed(broker, q)
    assert registry.get_sample_value("anomalyd_mqtt_reconnects_total") == 1.0
    assert len(connects) == 2


def test_mqtt_311_is_selectable(broker: MosquittoBroker, links: list[MqttLink]) -> None:
    q = IntakeQueue(100)
    link = _link(links, _cfg(broker, protocol="3.1.1", client_id="anomalyd-v311"), q)
    assert link.wait_connected(10)
    _subscribed(broker, q)
    # mosquitto logs its protocol enum per client: p2 is MQTT 3.1.1, p5 is MQTT 5.
    assert "as anomalyd-v311 (p2," in broker.log_text()


def test_mqtt_5_is_the_default(broker: MosquittoBroker, links: list[MqttLink]) -> None:
    link = _link(links, _cfg(broker, client_id="anomalyd-v5"), IntakeQueue(10))
    assert link.wait_connected(10)
    assert "as anomalyd-v5 (p5," in broker.log_text()


def test_last_will_is_published_when_the_connection_dies(
    broker: MosquittoBroker, links: list[MqttLink]
) -> None:
    sub = Subscriber(broker, ["test/status"])
    try:
        link = _link(links, _cfg(broker, keepalive_s=1), None, will=Will("test/status", b"offline"))
        assert link.wait_connected(10)
        # Kill the TCP connection without a DISCONNECT: the broker must send the will.
        sock = link._client.socket()  # fault injection into paho's socket
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        sub.wait_until(lambda ms: any(m.payload == b"offline" for m in ms), 10, "last will")
    finally:
        sub.close()


def test_bad_credentials_at_start_raise_broker_error(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], tmp_path: Path
) -> None:
    broker = broker_factory(users={"anomalyd": "right-password"})
    link = _link(links, _cfg(broker, username="anomalyd"), IntakeQueue(10), password="wrong")
    with pytest.raises(BrokerError, match="refused"):
        link.wait_connected(10)
    assert not link.connected
    # the refusal is final for this start: the loop stopped trying
    wait_for(lambda: not link.alive, 5, what="network thread to end")


def test_password_from_file_connects(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], tmp_path: Path
) -> None:
    from anomalyd.config import read_secret

    broker = broker_factory(users={"anomalyd": "s3cret pass"})
    secret = tmp_path / "pw"
    secret.write_text("s3cret pass\n")
    cfg = _cfg(broker, username="anomalyd", password_file=str(secret))
    password = read_secret(cfg.password_file, cfg.password_credential, "mqtt.password_file")
    q = IntakeQueue(10)
    link = _link(links, cfg, q, password=password)
    assert link.wait_connected(10)


def test_tls_with_a_private_ca(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], tmp_path: Path
) -> None:
    tls = TlsFiles.create(tmp_path / "pki")
    broker = broker_factory(tls=tls)
    good = _link(links, _cfg(broker, tls=TlsConfig(ca_file=tls.ca_cert)), IntakeQueue(10))
    assert good.wait_connected(10)
    registry = CollectorRegistry()
    # Without our CA the system trust store cannot verify the broker: no connection.
    bad = _link(links, _cfg(broker, tls={}), IntakeQueue(10), metrics=Metrics(registry))
    assert bad.wait_connected(1.0) is False
    assert (registry.get_sample_value("anomalyd_mqtt_connect_failures_total", {"kind": "network"}) or 0) >= 1


def test_full_queue_drops_counts_and_keeps_running(
    broker: MosquittoBroker, links: list[MqttLink], registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    q = IntakeQueue(5)
    link = _link(links, _cfg(broker), q, metrics=metrics)
    assert link.wait_connected(10)
    _subscribed(broker, q)
    publish_many(broker, [("sensors/d/telemetry", b"%d" % i) for i in range(20)])
    wait_for(
        lambda: (
            registry.get_sample_value("anomalyd_rejected_total", {"reason": Reason.QUEUE_FULL.value}) == 15.0
        ),
        10,
        what="15 drops counted",
    )
    assert registry.get_sample_value("anomalyd_messages_received_total") == 15.0
    assert [m.payload for m in q.drain(100)] == [b"0", b"1", b"2", b"3", b"4"]
    assert link.connected
    publish_many(broker, [("sensors/d/telemetry", b"after")])
    assert [m.payload for m in _wait_queue(q, 1)] == [b"after"]


def test_stop_intake_unsubscribes(broker: MosquittoBroker, links: list[MqttLink]) -> None:
    q = IntakeQueue(100)
    link = _link(links, _cfg(broker), q)
    assert link.wait_connected(10)
    _subscribed(broker, q)
    assert link.stop_intake(5)
    publish_many(broker, [("sensors/d/telemetry", b"late")])
    # A second, still-subscribed client proves the message went out after the UNSUBACK.
    sub = Subscriber(broker, ["sensors/+/telemetry"])
    try:
        publish_many(broker, [("sensors/d/telemetry", b"marker")])
        sub.wait_until(lambda ms: any(m.payload == b"marker" for m in ms), 10)
    finally:
        sub.close()
    assert q.drain(100) == []


def test_read_ahead_delivers_every_message_intact_across_chunk_boundaries(
    broker: MosquittoBroker, links: list[MqttLink]
) -> None:
    """The network thread reads the broker's stream in 64 KiB chunks: packets split across
    chunks, packets larger than a chunk and many small ones must all arrive whole, in order."""
    rng = random.Random(5)
    sizes = [rng.choice([1, 7, 120, 1500, 40_000, 70_000, 200_000]) for _ in range(300)]
    sizes += [90] * 3000  # a run of small ones: many packets per chunk
    sent = [(f"sensors/d{i % 7}/telemetry", bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    queue = IntakeQueue(100_000)
    link = _link(links, _cfg(broker), queue)
    assert link.wait_connected(10)
    publish_many(broker, sent, qos=0)
    got = _wait_queue(queue, len(sent), timeout=30)
    assert [(m.topic, m.payload) for m in got] == sent


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_many_sends_every_message_whole_and_in_order(
    broker: MosquittoBroker, links: list[MqttLink], protocol: str
) -> None:
    """Score messages go out as one write of many QoS 0 PUBLISH packets built by us: lengths
    across the varint boundaries (127, 16,383 bytes) and both protocol versions."""
    sizes = [0, 1, 126, 127, 128, 300, 16_382, 16_383, 16_384, 70_000] * 3
    batch = [(f"anomaly/dev-{i}/score", bytes([65 + i % 26]) * n) for i, n in enumerate(sizes)]
    sub = Subscriber(broker, ["anomaly/#"])
    link = _link(links, _cfg(broker, protocol=protocol))
    try:
        assert link.wait_connected(10)
        assert link.publish_many(batch)
        assert link.publish("anomaly/after/score", b"last")  # paho's own path, after ours
        sub.wait_until(lambda ms: len(ms) == len(batch) + 1, 10, "every message")
        got = [(m.topic, m.payload, m.retain) for m in sub.snapshot()]
    finally:
        sub.close()
    assert got == [(t, p, False) for t, p in batch] + [("anomaly/after/score", b"last", False)]


def test_publish_many_while_disconnected_sends_nothing(
    broker: MosquittoBroker, links: list[MqttLink]
) -> None:
    link = MqttLink(_cfg(broker))  # never started: not connected
    links.append(link)
    assert link.publish_many([("anomaly/x/score", b"{}")]) is False
    assert link.publish_many([]) is True


def test_queue_is_bounded_by_bytes_as_well_as_messages() -> None:
    """Large array messages fill the queue by size long before its message count."""
    q = IntakeQueue(1000, max_bytes=10_000)
    big = RawMessage("sensors/a/telemetry", b"x" * 3000, 0.0, 0.0)
    for _ in range(3):
        assert q.put(big)
    assert not q.put(big)  # a fourth would pass 10,000 bytes (3,000 + topic + overhead each)
    assert len(q) == 3
    assert q.nbytes == 3 * (3000 + len(big.topic) + 200)
    assert q.fill == pytest.approx(q.nbytes / 10_000)
    assert len(q.drain(2)) == 2
    assert q.nbytes == 3000 + len(big.topic) + 200
    assert q.put(big)  # room again
    q.drain(10)
    assert q.nbytes == 0
    assert q.fill == 0.0
