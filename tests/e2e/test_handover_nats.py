"""An alert handed over between two instances of a partitioned fleet, behind a real NATS
server (MQTT gateway, partition mapping): the daemons as processes.

Instance ``a`` owns the device's partition and raises its alert; it stops cleanly (as in a
rolling restart) and leaves the retained state as it is; instance ``b`` then owns the
partition, adopts the alert (same ``since``, not raised again) and clears it once after
normal readings. Instance ``other``, owning every other partition, runs throughout and
never touches the device's state.

The tiny test model scores a window by the squares of its newest reading, so readings of
10 are anomalous (score 100 against threshold 1) and readings of 0.1 are normal.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from anomalyd.partitions import nats_partition
from tests.broker import PrivateNatsServer, Received, Subscriber, publish_many
from tests.daemon_process import DaemonProcess
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

PARTITIONS = 8
WINDOW = 4
HOT, COLD = 10.0, 0.1
DEVICE = "pump-7"
MINE = nats_partition(DEVICE, PARTITIONS)
#: A device of another partition, whose retained ``normal`` the ``other`` instance answers
#: with ``unknown``: the sign that it has reconciled what the broker retains.
NEIGHBOUR = next(d for d in (f"fan-{i}" for i in range(100)) if nats_partition(d, PARTITIONS) != MINE)


def readings(start: float, values: list[float]) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{DEVICE}/telemetry",
            orjson.dumps({"ts": start + i, "temperature": v, "pressure": v, "vibration": v}),
        )
        for i, v in enumerate(values)
    ]


def states(messages: list[Received], device: str = DEVICE) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if m.topic == f"anomaly/{device}/alert" and m.payload]


def wait_state(sub: Subscriber, state: str, device: str = DEVICE, timeout: float = 20.0) -> dict[str, Any]:
    sub.wait_until(
        lambda ms: bool(states(ms, device)) and states(ms, device)[-1]["state"] == state,
        timeout,
        f"{device} {state}",
    )
    return states(sub.snapshot(), device)[-1]


def retained_state(server: PrivateNatsServer) -> dict[str, Any]:
    """What a new subscriber is told: the retained message itself."""
    sub = Subscriber(server, [f"anomaly/{DEVICE}/alert"])
    try:
        sub.wait_until(lambda ms: len(ms) > 0, 10, "the retained state")
        first = sub.snapshot()[0]
        assert first.retain
        return dict(orjson.loads(first.payload))
    finally:
        sub.close()


def instance(
    tmp_path: Path, server: PrivateNatsServer, model: Path, name: str, owned: list[int]
) -> DaemonProcess:
    sections: dict[str, dict[str, Any]] = {
        "mqtt": {"protocol": "3.1.1", "client_id": f"anomalyd-handover-{name}"},
        "detector": {"k_enter": 2, "k_exit": 2},
        "output": {"score_interval_s": 0.0},
        "cluster": {"partitions": PARTITIONS, "owned": owned, "name": name},
    }
    d = DaemonProcess(tmp_path / name, server, model, sections=sections)
    d.wait_ready(60)
    return d


def stop(d: DaemonProcess) -> None:
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()[-3000:]


def test_an_alert_moves_to_the_next_owner_without_disappearing_or_being_raised_again(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny.onnx", window_length=WINDOW)
    server = PrivateNatsServer(tmp_path / "nats", partitions=PARTITIONS)
    server.start()
    made: list[DaemonProcess] = []
    sub = Subscriber(server, ["anomaly/+/alert"])
    try:
        a = instance(tmp_path, server, model, "a", [MINE])
        made.append(a)
        t0 = time.time() - 120
        publish_many(server, readings(t0, [HOT] * (WINDOW + 1)))
        raised = wait_state(sub, "anomalous")
        since = raised["since"]

        # Another instance comes up while the alert is retained: not its device, not its business.
        publish_many(server, [(f"anomaly/{NEIGHBOUR}/alert", orjson.dumps({"state": "normal"}))], retain=True)
        other = instance(tmp_path, server, model, "other", [p for p in range(PARTITIONS) if p != MINE])
        made.append(other)
        assert wait_state(sub, "unknown", NEIGHBOUR)["reason"] == "no_state"

        # A clean stop of an instance of the fleet leaves the retained state to the next owner.
        stop(a)
        assert "left as the broker retains them" in a.log()
        doc = retained_state(server)
        assert (doc["state"], doc["since"]) == ("anomalous", since)

        b = instance(tmp_path, server, model, "b", [MINE])
        made.append(b)
        b.wait_metric("anomalyd_alerts_active", lambda v: v == 1.0, 20)  # adopted, before any window
        # Still anomalous: b's window fills from live readings, and its windows keep the alert.
        t1 = t0 + WINDOW + 1
        publish_many(server, readings(t1, [HOT] * (WINDOW + 1)))
        b.wait_metric("anomalyd_windows_scored_total", lambda v: v >= 2, 20)
        assert b.metric("anomalyd_alert_transitions_total", direction="raised") == 0.0
        assert b.metric("anomalyd_alerts_active") == 1.0

        t2 = t1 + WINDOW + 1
        publish_many(server, readings(t2, [COLD] * 3))
        cleared = wait_state(sub, "normal")
        assert cleared["since"] == t2 + 1  # the second normal window (k_exit = 2)
        assert b.metric("anomalyd_alert_transitions_total", direction="cleared") == 1.0
        assert b.metric("anomalyd_alert_transitions_total", direction="raised") == 0.0

        # Every state the device had: normal (a's first window), raised once by a, cleared
        # once by b; never unknown, never another since.
        seen = [(s["state"], s["since"]) for s in states(sub.snapshot())]
        first_window = t0 + WINDOW - 1
        assert seen == [("normal", first_window), ("anomalous", since), ("normal", t2 + 1)]
        assert other.metric("anomalyd_windows_scored_total") == 0.0
        for d in (b, other):
            stop(d)
        assert retained_state(server)["state"] == "normal"
    finally:
        sub.close()
        for d in made:
            d.close()
        server.close()
