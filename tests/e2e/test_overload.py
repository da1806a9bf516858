"""Falling behind, end to end: the real daemon, a real Mosquitto, metrics over HTTP.

1. A backlog in the broker is invisible to the daemon's own queues; it shows as lag in
   data time (``anomalyd_lag_seconds``), which raises ``anomalyd_overloaded`` and the
   retained ``overloaded`` status, and both clear once the data is fresh again. The
   backlog is simulated by readings stamped a minute before they are published.
2. A full intake queue drops telemetry, but never silently: every message the daemon
   received is accepted or counted under a rejection reason, and the status says so.
3. With a persistent session (``clean_start = false``, QoS 1 in) the broker keeps what was
   published while the daemon was down and hands it to the next instance with the same
   client id; with a clean start it is gone.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from anomalyd.decode import Reason
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.slow

FEATURES = ("temperature", "pressure", "vibration")
L = 4  # tiny model window: quick to fill
STATUS = "anomaly/status"

#: A scrape: {(name, sorted labels): value}.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def reading(device: str, ts: float) -> tuple[str, bytes]:
    return f"sensors/{device}/telemetry", orjson.dumps({"ts": ts, **dict.fromkeys(FEATURES, 0.1)})


def statuses(sub: Subscriber) -> list[bytes]:
    return [m.payload for m in sub.on_topic(STATUS)]


def rejected_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "anomalyd_rejected_total")


def dropped_total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class Feeder:
    """Publishes a reading for ``device`` every ``period`` seconds on its own thread,
    stamped ``age_s`` before the wall clock: a steady stream that arrives ``age_s`` late,
    as it would from a broker that holds a backlog of that age."""

    def __init__(self, broker: MosquittoBroker, device: str, age_s: float, period: float = 0.1) -> None:
        self.published = 0
        self._device = device
        self._age_s = age_s
        self._period = period
        self._stop = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name=f"feeder-{device}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            topic, payload = reading(self._device, time.time() - self._age_s)
            info = self._client.publish(topic, payload, qos=1)
            info.wait_for_publish(10)
            if not info.is_published():
                raise AssertionError("feeder: broker did not acknowledge a reading")
            self.published += 1
            self._stop.wait(self._period)

    def close(self) -> int:
        """Stop publishing; returns how many readings went out."""
        self._stop.set()
        self._thread.join(15)
        self._client.disconnect()
        self._client.loop_stop()
        return self.published


def test_a_backlog_in_the_broker_shows_as_lag_and_overloaded_then_clears(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    age = 60.0  # how far behind (data time) the simulated backlog in the broker is
    d = daemon_factory(tiny_model(window_length=L))
    d.wait_ready()
    sub = Subscriber(broker, [STATUS])
    feeders: list[Feeder] = []
    try:
        sub.wait_until(lambda _: statuses(sub) == [b"online"], 10, "online")
        assert d.metric("anomalyd_overloaded") == 0.0

        # Old readings, continuously, so that every overload check sees the lag (a single
        # burst would be one check's worth of lag, then nothing to judge).
        feeders.append(Feeder(broker, "late", age))
        d.wait_metric("anomalyd_overloaded", lambda v: v == 1.0, 15)
        sub.wait_until(lambda _: statuses(sub)[-1:] == [b"overloaded"], 10, "overloaded status")
        lag = d.metric("anomalyd_lag_seconds")
        assert lag == pytest.approx(age, rel=0.1)
        samples = d.scrape()
        passes = samples[("anomalyd_data_lag_seconds_count", ())]
        assert passes > 0
        # Every pass so far scored only late data: the histogram's mean is the backlog's age.
        assert samples[("anomalyd_data_lag_seconds_sum", ())] / passes == pytest.approx(age, rel=0.1)
        assert samples[("anomalyd_data_lag_seconds_bucket", (("le", "30.0"),))] == 0
        late = feeders.pop().close()

        # Caught up: fresh readings (another device, so the late one's window is not reset).
        feeders.append(Feeder(broker, "fresh", 0.0))
        d.wait_metric("anomalyd_overloaded", lambda v: v == 0.0, 15)
        sub.wait_until(lambda _: statuses(sub)[-1:] == [b"online"], 10, "online again")
        # The gauge shows the most recent pass, which was fresh data.
        assert d.metric("anomalyd_lag_seconds") < 10.0
        fresh = feeders.pop().close()

        d.wait_metric("anomalyd_readings_accepted_total", lambda v: v == late + fresh, 10)
        samples = d.scrape()
        assert rejected_total(samples) == 0
        history = statuses(sub)
        assert (history[0], history[-1]) == (b"online", b"online")
        assert b"overloaded" in history
    finally:
        for f in feeders:
            f.close()
        sub.close()
    # A later subscriber gets the retained status: online.
    late_sub = Subscriber(broker, [STATUS])
    try:
        late_sub.wait_until(lambda ms: len(ms) == 1, 10, "retained status")
        assert statuses(late_sub) == [b"online"]
    finally:
        late_sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_a_full_intake_queue_drops_are_counted_and_reported_as_overloaded(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    # A tiny queue in front of a pipeline made slow on purpose (one window per model run,
    # one message per window), so a flood overflows it.
    d = daemon_factory(
        tiny_model(window_length=L),
        sections={
            "stream": {"intake_queue_size": 50, "overload_lag_s": 3600.0},  # only the queue counts
            "batching": {"max_batch": 1, "max_delay_ms": 0.0},
            "output": {"score_interval_s": 0.0},
        },
    )
    d.wait_ready()
    sub = Subscriber(broker, [STATUS])
    try:
        sub.wait_until(lambda _: statuses(sub) == [b"online"], 10, "online")
        n_dev, per_dev = 200, 20
        t0 = time.time() - 1.0
        # Device-major rounds: every device's readings in time order, devices interleaved.
        msgs = [reading(f"dev-{i}", t0 + k * 0.01) for k in range(per_dev) for i in range(n_dev)]
        publish_many(broker, msgs, qos=0)  # as fast as the client can write

        # Everything the broker sent arrives: in the queue (counted when taken) or dropped
        # at the door (counted at once).
        d.wait_metric("anomalyd_messages_received_total", lambda v: v == len(msgs), 30)

        def settled() -> Samples | None:
            s = d.scrape()
            accounted = (
                s[("anomalyd_readings_accepted_total", ())]
                + rejected_total(s)
                + dropped_total(s, "anomalyd_messages_dropped_total")
            )
            return s if accounted == s[("anomalyd_messages_received_total", ())] else None

        samples = wait_for(settled, 10, interval=0.05, what="every received message accounted for")
        assert samples is not None  # for mypy: wait_for returns only a truthy value
        full = samples[("anomalyd_rejected_total", (("reason", Reason.QUEUE_FULL.value),))]
        accepted = samples[("anomalyd_readings_accepted_total", ())]
        assert full > 0, "the flood did not fill the queue: the test proves nothing"
        assert accepted > 0
        # Single-reading messages: one rejection per message, so received splits exactly.
        # Dropping a message can leave a gap in a device's stream, never a reordering.
        assert accepted + full == len(msgs)
        assert dropped_total(samples, "anomalyd_messages_dropped_total") == 0
        assert dropped_total(samples, "anomalyd_windows_dropped_total") == 0

        # Said so on the status topic, then recovered once the flood was over.
        sub.wait_until(lambda _: b"overloaded" in statuses(sub), 10, "overloaded status")
        sub.wait_until(lambda _: statuses(sub)[-1:] == [b"online"], 10, "online again")
        d.wait_metric("anomalyd_overloaded", lambda v: v == 0.0, 10)
        print(
            f"flood: {len(msgs)} messages, {accepted:.0f} accepted, {full:.0f} dropped (queue full); "
            f"status {[s.decode() for s in statuses(sub)]}"
        )
        assert "intake queue full" in d.log()
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


@pytest.mark.parametrize(("clean_start", "kept"), [(False, True), (True, False)])
def test_a_persistent_session_keeps_what_was_published_while_the_daemon_was_down(
    broker: MosquittoBroker,
    daemon_factory: Callable[..., DaemonProcess],
    tiny_model: Callable[..., Path],
    clean_start: bool,
    kept: bool,
) -> None:
    model = tiny_model(window_length=L)
    sections = {"mqtt": {"clean_start": clean_start, "qos_in": 1, "client_id": "anomalyd-persistent"}}
    a = daemon_factory(model, sections=sections)
    a.wait_ready()
    a.signal(signal.SIGKILL)  # no clean disconnect: the broker is left holding the session
    a.wait()

    n = 30
    t0 = time.time() - 2 * n
    publish_many(broker, [reading("m1", t0 + i) for i in range(n)], qos=1)

    b = daemon_factory(model, sections=sections)
    b.wait_ready()
    # Readings published now are delivered after anything the broker kept: once they are
    # in, whatever was kept is in too.
    m = 5
    publish_many(broker, [reading("m2", t0 + i) for i in range(m)], qos=1)
    expected = n + m if kept else m
    b.wait_metric("anomalyd_readings_accepted_total", lambda v: v >= expected, 15)
    samples = b.scrape()
    assert samples[("anomalyd_readings_accepted_total", ())] == expected
    assert samples[("anomalyd_messages_received_total", ())] == expected
    assert rejected_total(samples) == 0
    assert f"session present: {kept}" in b.log()
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
