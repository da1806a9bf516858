"""The retained alert state never lies: the daemon as a process against a real Mosquitto.

Covers: eviction (idle, capacity) publishes ``unknown``; a broker restarted without
persistence gets every state back; a stale ``anomalous`` from an earlier run is reconciled
to ``unknown`` and then decided; a restart with a snapshot resumes scores on the next
reading with the alert state continuous; the operator verbs over MQTT.

The tiny test model scores a window by the squares of its newest reading, so readings of
10 are anomalous (score 100 against threshold 1) and readings of 0.1 are normal.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.broker import MosquittoBroker, Received, Subscriber, publish_many
from tests.daemon_process import DaemonProcess

WINDOW = 4
HOT, COLD = 10.0, 0.1


def readings(device: str, start: float, values: list[float]) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{device}/telemetry",
            orjson.dumps({"ts": start + i, "temperature": v, "pressure": v, "vibration": v}),
        )
        for i, v in enumerate(values)
    ]


def states(messages: list[Received], device: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if m.topic == f"anomaly/{device}/alert" and m.payload]


def last_state(sub: Subscriber, device: str) -> str | None:
    docs = states(sub.snapshot(), device)
    return docs[-1]["state"] if docs else None


def wait_state(sub: Subscriber, device: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the newest alert message of ``device`` says ``state``; return it."""
    sub.wait_until(lambda ms: last_state_of(ms, device) == state, timeout, f"{device} {state}")
    return states(sub.snapshot(), device)[-1]


def last_state_of(messages: list[Received], device: str) -> str | None:
    # called under the subscriber's lock on every message: walk back to the newest one only
    topic = f"anomaly/{device}/alert"
    for m in reversed(messages):
        if m.topic == topic and m.payload:
            return str(orjson.loads(m.payload).get("state"))
    return None


def retained_state(broker: MosquittoBroker, device: str) -> dict[str, Any]:
    """What a new subscriber is told: the retained message itself."""
    sub = Subscriber(broker, [f"anomaly/{device}/alert"])
    try:
        sub.wait_until(lambda ms: len(ms) > 0, 5, f"retained state of {device}")
        first = sub.snapshot()[0]
        assert first.retain
        return dict(orjson.loads(first.payload))
    finally:
        sub.close()


TINY_DETECTOR = {"k_enter": 2, "k_exit": 2}


def test_eviction_and_a_broker_that_lost_its_retained_messages(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(
        tiny_model(window_length=WINDOW),
        # probation_slots = max_devices: any device may be pushed out by a newcomer, even one
        # with a full window (otherwise m3 would be refused while m1 and m2 are active).
        sections={
            "detector": TINY_DETECTOR,
            "stream": {"idle_evict_s": 3.0, "max_devices": 2, "probation_slots": 2},
        },
    )
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/+/alert"])
    try:
        t0 = time.time() - 60
        publish_many(broker, readings("m1", t0, [COLD] * WINDOW + [HOT] * 3))
        doc = wait_state(sub, "m1", "anomalous")
        assert doc["alert"] is True
        assert doc["peak_score"] == pytest.approx(100.0)
        assert doc["since"] == t0 + WINDOW + 1  # the second anomalous window raised it
        assert set(doc["contributions"]) == {"temperature", "pressure", "vibration"}
        # one message per change of state, never the same state twice in a row
        seen = [s["state"] for s in states(sub.snapshot(), "m1")]
        assert seen[-1] == "anomalous"
        assert all(a != b for a, b in itertools.pairwise(seen)), seen

        # A broker without persistence, killed: it forgets every retained message. The
        # daemon re-asserts what it knows when it reconnects.
        broker.kill()
        d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 0.0, 10)
        broker.start()
        d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 1.0, 20)
        deadline = time.monotonic() + 10
        while True:
            try:
                back = retained_state(broker, "m1")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        assert back["state"] == "anomalous"
        assert back["since"] == doc["since"]

        # Capacity eviction (max_devices = 2, both on probation): m1 is the least recent when m3 arrives.
        sub2 = Subscriber(broker, ["anomaly/+/alert"])
        publish_many(broker, readings("m2", t0, [COLD] * WINDOW))
        publish_many(broker, readings("m3", t0, [COLD] * WINDOW))
        evicted = wait_state(sub2, "m1", "unknown")
        assert evicted["reason"] == "evicted"
        assert evicted["alert"] is False
        # Idle eviction: nobody sends for idle_evict_s.
        idle = wait_state(sub2, "m2", "unknown", timeout=15)
        assert idle["reason"] == "idle"
        sub2.close()
        assert d.metric("anomalyd_alerts_active") == 0.0
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_a_stale_alert_left_by_an_earlier_run_is_reconciled(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    model = tiny_model(window_length=WINDOW)
    first = daemon_factory(model, sections={"detector": TINY_DETECTOR})
    first.wait_ready()
    t0 = time.time() - 120
    sub = Subscriber(broker, ["anomaly/+/alert"])
    publish_many(broker, readings("stale-1", t0, [HOT] * (WINDOW + 2)))
    wait_state(sub, "stale-1", "anomalous")
    sub.close()
    first.signal(signal.SIGKILL)  # no clean stop: nothing cleans up after it
    first.wait()
    assert retained_state(broker, "stale-1")["state"] == "anomalous"

    second = daemon_factory(model, sections={"detector": TINY_DETECTOR})
    sub = Subscriber(broker, ["anomaly/+/alert"])
    try:
        second.wait_ready()
        doc = wait_state(sub, "stale-1", "unknown")
        assert doc["reason"] == "no_state"
        assert retained_state(broker, "stale-1")["state"] == "unknown"
        # normal readings: the first full window decides
        publish_many(broker, readings("stale-1", t0 + 100, [COLD] * (WINDOW + 5)))
        wait_state(sub, "stale-1", "normal")
    finally:
        sub.close()
    # A clean stop without a state directory: nothing will resume this state.
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    doc = retained_state(broker, "stale-1")
    assert (doc["state"], doc["reason"]) == ("unknown", "stopped")


def test_restart_with_a_snapshot_resumes_on_the_next_reading_with_the_alert_intact(
    tmp_path: Path,
    broker: MosquittoBroker,
    daemon_factory: Callable[..., DaemonProcess],
    tiny_model: Callable[..., Path],
) -> None:
    model = tiny_model(window_length=WINDOW)
    sections = {
        "detector": TINY_DETECTOR,
        "state": {"directory": str(tmp_path / "state")},
        "output": {"score_interval_s": 0.0},
    }
    first = daemon_factory(model, sections=sections)
    first.wait_ready()
    t0 = time.time() - 60
    sub = Subscriber(broker, ["anomaly/+/alert"])
    publish_many(broker, readings("p1", t0, [COLD] * WINDOW + [HOT] * 3))
    raised = wait_state(sub, "p1", "anomalous")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert (tmp_path / "state" / "snapshot.npz").is_file()
    assert retained_state(broker, "p1")["state"] == "anomalous"  # not unknown: it will resume

    second = daemon_factory(model, sections=sections)
    scores = Subscriber(broker, ["anomaly/+/score"])
    try:
        second.wait_ready()
        assert second.metric("anomalyd_snapshot_restores_total", result="restored") == 1.0
        # One reading: its window is already full, so it is scored at once.
        publish_many(broker, readings("p1", t0 + WINDOW + 3, [HOT]))
        scores.wait_until(lambda ms: len(ms) == 1, 10, "a score for the first reading after the restart")
        score = orjson.loads(scores.snapshot()[0].payload)
        assert score["ts"] == t0 + WINDOW + 3
        assert score["alert"] is True
        # The alert state is continuous: the same episode, re-asserted on connect.
        doc = retained_state(broker, "p1")
        assert (doc["state"], doc["since"]) == ("anomalous", raised["since"])
        # and it clears after k_exit normal windows, as if no restart had happened
        publish_many(broker, readings("p1", t0 + WINDOW + 4, [COLD] * 2))
        wait_state(sub, "p1", "normal")
        assert all(s["state"] != "unknown" for s in states(sub.snapshot(), "p1"))
    finally:
        scores.close()
        sub.close()
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_operator_commands_over_mqtt(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(tiny_model(window_length=WINDOW), sections={"detector": TINY_DETECTOR})
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/+/alert"])
    t0 = time.time() - 300
    sent = [0]  # readings so far: timestamps go on from there

    def send(values: list[float]) -> None:
        publish_many(broker, readings("c1", t0 + sent[0], values))
        sent[0] += len(values)

    def command(verb: str, body: dict[str, Any], retain: bool = False) -> None:
        publish_many(broker, [(f"anomalyd/cmd/c1/{verb}", orjson.dumps(body))], retain=retain)

    try:
        send([COLD] * WINDOW)
        wait_state(sub, "c1", "normal")
        command("shelve", {"by": "j.smith", "why": "valve swap", "duration_s": 2})
        doc = wait_state(sub, "c1", "shelved")
        assert doc["operator"]["by"] == "j.smith"
        assert doc["shelved_until"] > time.time()
        send([HOT] * 3)  # anomalous underneath, but shelved: no alert shown
        d.wait_metric("anomalyd_alert_transitions_total", lambda v: v == 1.0, 10, direction="raised")
        assert last_state(sub, "c1") == "shelved"
        # the shelving expires by itself into the state that is then true
        doc = wait_state(sub, "c1", "anomalous", timeout=10)
        # shelved again, and unshelved by hand before it expires
        command("shelve", {"by": "j.smith", "why": "again", "duration_s": 600})
        wait_state(sub, "c1", "shelved")
        command("unshelve", {"by": "j.smith", "why": "done early"})
        assert wait_state(sub, "c1", "anomalous")["operator"]["verb"] == "unshelve"
        # out of service, then back
        command("out_of_service", {"by": "ops", "why": "pump replaced"})
        assert wait_state(sub, "c1", "out_of_service")["condition"] == "anomalous"
        command("in_service", {"by": "ops", "why": "done"})
        wait_state(sub, "c1", "anomalous")
        # the machine now runs hot for good (a changed but healthy state): re-baseline
        command("rebaseline", {"by": "ops", "why": "new impeller"})
        doc = wait_state(sub, "c1", "normal")
        assert doc["operator"]["verb"] == "rebaseline"
        # refused: unknown verb, bad JSON, missing why, retained, unknown device
        command("explode", {"by": "x", "why": "y"})
        publish_many(broker, [("anomalyd/cmd/c1/shelve", b"{not json")])
        command("shelve", {"by": "x"})
        command("unshelve", {"by": "x", "why": "y"}, retain=True)
        publish_many(broker, [("anomalyd/cmd/nobody/shelve", orjson.dumps({"by": "x", "why": "y"}))])
        for reason, n in (("unknown_verb", 1), ("malformed", 2), ("retained", 1), ("unknown_device", 1)):
            d.wait_metric("anomalyd_commands_rejected_total", lambda v, n=n: v == n, 10, reason=reason)
        for verb, n in (
            ("shelve", 2),
            ("unshelve", 1),
            ("out_of_service", 1),
            ("in_service", 1),
            ("rebaseline", 1),
        ):
            assert d.metric("anomalyd_commands_total", verb=verb) == n
        assert "command shelve for 2 s on c1 by 'j.smith': valve swap" in d.log()
        assert d.proc.poll() is None
    finally:
        publish_many(broker, [("anomalyd/cmd/c1/unshelve", b"")], retain=True)  # clear the retained one
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_an_unusable_snapshot_is_ignored_with_a_warning_and_a_metric(
    tmp_path: Path,
    broker: MosquittoBroker,
    daemon_factory: Callable[..., DaemonProcess],
    tiny_model: Callable[..., Path],
) -> None:
    state = tmp_path / "state"
    sections = {"state": {"directory": str(state), "max_age_s": 30.0}}
    first = daemon_factory(tiny_model(window_length=WINDOW), sections=sections)
    first.wait_ready()
    assert first.metric("anomalyd_snapshot_restores_total", result="missing") == 1.0
    publish_many(broker, readings("s1", time.time() - 60, [COLD] * WINDOW))
    first.wait_metric("anomalyd_windows_scored_total", lambda v: v == 1.0, 10)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    good = (state / "snapshot.npz").read_bytes()

    # another window length: the snapshot describes another model
    other = daemon_factory(tiny_model("other.onnx", window_length=WINDOW + 1), sections=sections)
    other.wait_ready()
    assert other.metric("anomalyd_snapshot_restores_total", result="model_mismatch") == 1.0
    assert "snapshot not used (model_mismatch)" in other.log()
    other.signal(signal.SIGKILL)
    other.wait()

    # damaged on disk
    (state / "snapshot.npz").write_bytes(good[: len(good) // 3])
    broken = daemon_factory(tiny_model(window_length=WINDOW), sections=sections)
    broken.wait_ready()
    assert broken.metric("anomalyd_snapshot_restores_total", result="corrupt") == 1.0
    assert "snapshot not used (corrupt)" in broken.log()
    broken.signal(signal.SIGKILL)
    broken.wait()

    # older than state.max_age_s
    (state / "snapshot.npz").write_bytes(good)
    # (the age is the creation time recorded inside the snapshot)
    stale = daemon_factory(
        tiny_model(window_length=WINDOW),
        sections=sections | {"state": {"directory": str(state), "max_age_s": 0.001}},
    )
    stale.wait_ready()
    assert stale.metric("anomalyd_snapshot_restores_total", result="stale") == 1.0
    stale.signal(signal.SIGTERM)
    assert stale.wait() == 0
