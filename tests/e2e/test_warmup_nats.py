"""A daemon of a partitioned fleet starts with full windows: it refills them from JetStream
before it scores live readings, and again after it reconnects, without scoring a reading twice.

Everything is real: nats-server with its MQTT gateway, the partition mapping and JetStream;
devices publishing MQTT 3.1.1 through the gateway; ``python -m anomalyd run`` as systemd
runs it (readiness over a notify socket, metrics scraped over HTTP).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from anomalyd.warmup import stream_subject
from tests.broker import PrivateNatsServer, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

DEVICES = [f"press-{i}" for i in range(20)]
PARTITIONS = 8
WINDOW = 8  # the tiny model's window length
STREAM = "ANOMALYD_TELEMETRY"


def _add_stream(server: PrivateNatsServer) -> None:
    """The stream as docs/scaling.md tells an operator to create it (``nats stream add``)."""
    import nats

    async def go() -> None:
        nc = await nats.connect(server.nats_url)
        try:
            await nc.jetstream().add_stream(
                name=STREAM,
                subjects=[stream_subject("sensors/{device}/telemetry")],
                max_msgs_per_subject=WINDOW,
            )
        finally:
            await nc.close()

    asyncio.run(go())


def _publish_round(server: PrivateNatsServer, ts: float) -> None:
    """One reading per device, as devices publish them (QoS 1, acknowledged)."""
    payload = {"temperature": 0.1, "pressure": 0.2, "vibration": 0.01}
    publish_many(
        server,
        [(f"sensors/{d}/telemetry", json.dumps({"ts": ts, **payload}).encode()) for d in DEVICES],
        qos=1,
    )


def _scores(sub: Subscriber) -> list[tuple[str, float]]:
    out = []
    for m in sub.snapshot():
        doc = json.loads(m.payload)
        out.append((m.topic.split("/")[1], float(doc["ts"])))
    return out


def _wait_scores(sub: Subscriber, n: int) -> list[tuple[str, float]]:
    wait_for(lambda: len(sub.snapshot()) >= n, 60, interval=0.05, what=f"{n} score messages")
    return _scores(sub)


def test_a_started_and_a_reconnected_instance_score_at_once_and_never_twice(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny.onnx", window_length=WINDOW)
    server = PrivateNatsServer(tmp_path / "nats", partitions=PARTITIONS)
    server.start()
    _add_stream(server)
    t0 = float(int(time.time()) - 120)
    history = WINDOW + 5
    for k in range(history):  # the fleet ran before this daemon: JetStream keeps the last WINDOW
        _publish_round(server, t0 + k)
    last_replayed = t0 + history - 1

    sub = Subscriber(server, ["anomaly/+/score"])
    sections: dict[str, dict[str, Any]] = {
        "mqtt": {"protocol": "3.1.1"},
        "output": {"score_interval_s": 0.0},
        "cluster": {"partitions": PARTITIONS, "instance": 0, "instances": 1},
        "cluster.jetstream": {"servers": [server.nats_url], "stream": STREAM, "timeout_s": 20.0},
    }
    daemon = DaemonProcess(tmp_path / "daemon", server, model, sections=sections)
    try:
        daemon.wait_ready(60)
        daemon.wait_metric("anomalyd_warmups_total", lambda v: v == 1, 30, result="complete")
        assert daemon.metric("anomalyd_warmup_readings_total", result="filled") == len(DEVICES) * WINDOW
        assert daemon.metric("anomalyd_warmup_readings_total", result="rejected") == 0
        assert daemon.metric("anomalyd_warmup_seconds") > 0
        assert daemon.metric("anomalyd_windows_scored_total") == 0  # replayed: never scored
        assert (
            f"warm-up from JetStream (start): {len(DEVICES) * WINDOW} readings of {len(DEVICES)} devices"
            in (daemon.log())
        )

        # Each device's first live reading is scored at once: its window came from JetStream.
        _publish_round(server, last_replayed + 1)
        first = _wait_scores(sub, len(DEVICES))
        assert sorted(first) == sorted((d, last_replayed + 1) for d in DEVICES)

        # A reconnect (the broker restarts on the same ports, JetStream kept on disk): the
        # windows are refilled again, and what they already hold is not taken twice.
        server.restart()
        daemon.wait_metric("anomalyd_warmups_total", lambda v: v == 2, 60, result="complete")
        assert daemon.metric("anomalyd_warmup_readings_total", result="already_held") == len(DEVICES) * WINDOW
        assert daemon.metric("anomalyd_warmup_readings_total", result="filled") == len(DEVICES) * WINDOW
        sub.close()
        sub = Subscriber(server, ["anomaly/+/score"])
        for k in (2, 3):
            _publish_round(server, last_replayed + k)
        second = _wait_scores(sub, 2 * len(DEVICES))
        assert sorted(second) == sorted((d, last_replayed + k) for k in (2, 3) for d in DEVICES)

        everything = first + second
        assert min(ts for _, ts in everything) > last_replayed  # no replayed reading was scored
        assert max(Counter(everything).values()) == 1  # none twice
        assert daemon.metric("anomalyd_windows_scored_total") == 3 * len(DEVICES)
        assert daemon.metric("anomalyd_rejected_total", reason="foreign_partition") == 0
        for reason in ("duplicate", "out_of_order"):
            assert daemon.metric("anomalyd_rejected_total", reason=reason) == 0

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log()[-3000:]
    finally:
        daemon.close()
        sub.close()
        server.close()
