"""Home Assistant MQTT discovery, end to end: the daemon as a process against a real
Mosquitto, the discovery configs read back from the broker as Home Assistant would.

Each retained config is checked against what Home Assistant documents for MQTT discovery
(``tests.helpers.ha_discovery.check_config``), and its templates are rendered
(``render``, there) against the real score, alert and status payloads the daemon
published.

The tiny test model scores a window by the squares of its newest reading, so readings of
10 are anomalous (score 100 against threshold 1) and readings of 0.1 are normal.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.broker import MosquittoBroker, Received, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess
from tests.helpers.ha_discovery import PREFIX, check_config, render

WINDOW = 4
HOT, COLD = 10.0, 0.1
#: A device id that is a valid topic level as it is, and one that is not ('.', ':').
PLAIN, ODD = "pump-7", "line.2:b"
ENABLED = {"homeassistant": {"enabled": True}, "detector": {"k_enter": 2, "k_exit": 2}}

# --------------------------------------------------------------------------- helpers


def readings(device: str, start: float, values: list[float]) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{device}/telemetry",
            orjson.dumps({"ts": start + i, "temperature": v, "pressure": v, "vibration": v}),
        )
        for i, v in enumerate(values)
    ]


def recent() -> float:
    """A start time for a few readings a second apart, the newest of them a few seconds
    old: in the past, but not so far that the daemon thinks it is falling behind."""
    return time.time() - 10


def scored(messages: list[Received], device: str, ts: float) -> bool:
    topic = f"anomaly/{device}/score"
    return any(m.topic == topic and orjson.loads(m.payload)["ts"] == ts for m in messages)


def newest(messages: list[Received], topic: str) -> bytes | None:
    for m in reversed(messages):
        if m.topic == topic and m.payload:
            return m.payload
    return None


def last_state(messages: list[Received], device: str) -> str | None:
    payload = newest(messages, f"anomaly/{device}/alert")
    return None if payload is None else str(orjson.loads(payload)["state"])


def configs_seen(messages: list[Received]) -> dict[str, bytes]:
    """The newest payload seen on each config topic (empty: removed)."""
    out: dict[str, bytes] = {}
    for m in messages:
        if m.topic.startswith(f"{PREFIX}/") and m.topic.endswith("/config"):
            out[m.topic] = m.payload
    return out


def retained_under_prefix(broker: MosquittoBroker) -> dict[str, bytes]:
    """Every message the broker retains under the discovery prefix. A new subscriber gets
    them right after its SUBACK, ahead of anything published later: so once a probe it
    publishes afterwards has come back, every retained message is in."""
    sub = Subscriber(broker, [f"{PREFIX}/#"])
    probe = f"{PREFIX}/anomalyd-test-probe/{time.monotonic_ns()}"
    try:
        publish_many(broker, [(probe, b"probe")])
        sub.wait_until(lambda ms: any(m.topic == probe for m in ms), 10, "the probe")
        return {m.topic: m.payload for m in sub.snapshot() if m.retain and m.topic != probe}
    finally:
        sub.close()


def check_templates(docs: dict[str, dict[str, Any]], messages: list[Received]) -> None:
    """Render every config's templates against the newest real payloads on its topics."""
    for topic, doc in docs.items():
        state = newest(messages, doc["state_topic"])
        assert state is not None, f"nothing published on {doc['state_topic']}"
        rendered = render(doc["value_template"], state)
        published = orjson.loads(state)
        if topic.startswith(f"{PREFIX}/binary_sensor/"):
            expected = doc["payload_on"] if published["state"] == "anomalous" else doc["payload_off"]
            assert rendered == expected, (topic, rendered, published["state"])
        else:
            assert float(rendered) == published["score"], (topic, rendered)
        for entry in doc["availability"]:
            status = newest(messages, entry["topic"])  # online (or overloaded: still scoring)
            assert status is not None
            assert render(entry["value_template"], status) == entry["payload_available"], status


# --------------------------------------------------------------------------- tests


def test_every_device_gets_valid_configs_that_go_when_it_is_forgotten(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(
        tiny_model(window_length=WINDOW),
        sections={**ENABLED, "stream": {"idle_evict_s": 2.0}, "output": {"score_interval_s": 0.0}},
    )
    d.wait_ready()
    sub = Subscriber(broker, [f"{PREFIX}/#", "anomaly/#"])
    try:
        t0 = recent()
        publish_many(
            broker,
            readings(PLAIN, t0, [COLD] * WINDOW + [HOT] * 3) + readings(ODD, t0, [COLD] * (WINDOW + 2)),
        )
        sub.wait_until(
            lambda ms: (
                last_state(ms, PLAIN) == "anomalous"
                and last_state(ms, ODD) == "normal"
                and sum(1 for p in configs_seen(ms).values() if p) == 4
            ),
            15,
            "both devices decided and announced",
        )
        retained = retained_under_prefix(broker)
        assert len(retained) == 4
        docs = {topic: orjson.loads(payload) for topic, payload in retained.items()}
        entities = {(check_config(topic, doc), doc["device"]["name"]) for topic, doc in docs.items()}
        assert entities == {(c, dev) for c in ("binary_sensor", "sensor") for dev in (PLAIN, ODD)}
        messages = sub.snapshot()
        version = orjson.loads(newest(messages, f"anomaly/{PLAIN}/score") or b"{}")["model_version"]
        for topic, doc in docs.items():
            name = doc["device"]["name"]
            assert topic.split("/")[2] == "anomalyd"  # the node id
            assert doc["device"]["identifiers"] == [f"anomalyd_{name}"]
            assert (doc["device"]["manufacturer"], doc["device"]["model"]) == ("anomalyd", version)
            assert doc["availability"][0]["topic"] == "anomaly/status"
            kind = "alert" if "/binary_sensor/" in topic else "score"
            assert doc["state_topic"] == f"anomaly/{name}/{kind}"
            assert doc["unique_id"] == f"anomalyd_{name}_{kind}"
        assert len({doc["unique_id"] for doc in docs.values()}) == 4
        # the odd id's topic level is sanitised, the plain one's is the id itself
        assert all(re.fullmatch(r"[A-Za-z0-9_-]+", t.split("/")[3]) for t in docs)
        assert any(t.split("/")[3] == f"{PLAIN}_alert" for t in docs)
        check_templates(docs, messages)

        # Silent for stream.idle_evict_s: both are forgotten, and so are their configs.
        sub.wait_until(
            lambda ms: last_state(ms, PLAIN) == "unknown" and last_state(ms, ODD) == "unknown",
            15,
            "idle eviction",
        )
        sub.wait_until(
            lambda ms: all(configs_seen(ms).get(topic) == b"" for topic in docs), 10, "empty config payloads"
        )
        assert retained_under_prefix(broker) == {}
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    # A stopped daemon makes the entities unavailable.
    status = Subscriber(broker, ["anomaly/status"])
    try:
        status.wait_until(lambda ms: len(ms) > 0, 10, "the retained status")
        word = status.snapshot()[-1].payload
    finally:
        status.close()
    assert word == b"stopped"
    entry = next(iter(docs.values()))["availability"][0]
    assert render(entry["value_template"], word) == entry["payload_not_available"]


def test_configs_are_published_again_when_home_assistant_or_the_broker_restarts(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(tiny_model(window_length=WINDOW), sections=ENABLED)
    d.wait_ready()
    sub = Subscriber(broker, [f"{PREFIX}/#"])
    try:
        publish_many(broker, readings(PLAIN, recent(), [COLD] * (WINDOW + 1)))
        sub.wait_until(lambda ms: len(ms) == 2, 15, "the two configs")
        topics = {m.topic for m in sub.snapshot()}
        # Home Assistant's birth message: it (re)started, so everything is announced again.
        publish_many(broker, [(f"{PREFIX}/status", b"online")])
        sub.wait_until(lambda ms: len([m for m in ms if m.topic in topics]) == 4, 15, "configs again")
    finally:
        sub.close()
    # A broker without persistence forgets every retained message; the daemon announces
    # again after it reconnects.
    broker.kill()
    d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 0.0, 10)
    broker.start()
    d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 1.0, 20)
    wait_for(lambda: set(retained_under_prefix(broker)) == topics, 15, interval=0.5, what="configs back")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_disabled_by_default_nothing_appears_under_the_discovery_prefix(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    sub = Subscriber(broker, [f"{PREFIX}/#", "anomaly/#"])
    d = daemon_factory(tiny_model(window_length=WINDOW), sections={"detector": ENABLED["detector"]})
    try:
        d.wait_ready()
        t0 = recent()
        publish_many(broker, [(f"{PREFIX}/status", b"online")])  # not listened to either
        publish_many(
            broker,
            readings(PLAIN, t0, [COLD] * WINDOW + [HOT] * 3) + readings(ODD, t0, [COLD] * (WINDOW + 2)),
        )
        sub.wait_until(
            lambda ms: last_state(ms, PLAIN) == "anomalous" and last_state(ms, ODD) == "normal", 15, "states"
        )
        # Whatever the daemon published with those states reached the broker before the
        # score of a later reading, which comes from the same connection afterwards.
        later = t0 + WINDOW + 2
        publish_many(broker, readings(ODD, later, [COLD]))
        sub.wait_until(lambda ms: scored(ms, ODD, later), 10, "the score of a later reading")
        assert [m.topic for m in sub.snapshot() if m.topic.startswith(f"{PREFIX}/")] == [f"{PREFIX}/status"]
        assert retained_under_prefix(broker) == {}
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
