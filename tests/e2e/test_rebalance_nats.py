"""A fleet of 1,000 devices scored by two daemons, then by three after a rolling rebalance,
behind a real NATS server (its MQTT gateway maps each device to one of 16 partitions;
JetStream keeps each device's last window of readings).

What must hold, as an operator would check it:

- every device is scored by exactly one instance, the one that owns its partition
  (``nats_partition(device, 16) % N``), before and after the rebalance;
- after the rebalance every window is full at once: each device's first live reading is
  scored, although every instance restarted without a snapshot (the windows came back from
  JetStream);
- no reading is scored twice, and every reading published while the fleet was settled is
  scored once.

The devices are quiet during the roll itself: while old and new assignments coexist a
partition may be owned twice or not at all for a moment (docs/scaling.md says what that
costs); what is checked here is the fleet before and after.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from anomalyd.partitions import nats_partition
from tests.broker import PrivateNatsServer, Subscriber, wait_for
from tests.daemon_process import DaemonProcess
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

DEVICES = [f"pump-{i}" for i in range(1000)]
PARTITIONS = 16
WINDOW = 8  # the tiny model's window length


def _publish_rounds(server: PrivateNatsServer, first_ts: float, rounds: range) -> None:
    """One reading per device per round, round after round, through NATS's MQTT gateway
    (QoS 1: every message acknowledged before this returns)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(500)
    client.max_queued_messages_set(0)
    client.connect(server.host, server.port, keepalive=30)
    client.loop_start()
    try:
        infos = []
        for r in rounds:
            for device in DEVICES:
                payload = {"ts": first_ts + r, "temperature": 0.1, "pressure": 0.2, "vibration": 0.01}
                infos.append(client.publish(f"sensors/{device}/telemetry", json.dumps(payload), qos=1))
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published(), "NATS did not acknowledge a reading"
    finally:
        client.disconnect()
        client.loop_stop()


class _Scores:
    """Every score message, by instance (each instance publishes under its own prefix)."""

    def __init__(self, sub: Subscriber) -> None:
        self._sub = sub

    def all(self) -> list[tuple[str, str, float]]:
        out = []
        for m in self._sub.snapshot():
            _, instance, device, _ = m.topic.split("/")
            out.append((instance, device, float(json.loads(m.payload)["ts"])))
        return out

    def wait_count(self, n: int, timeout: float) -> list[tuple[str, str, float]]:
        wait_for(lambda: len(self._sub.snapshot()) >= n, timeout, interval=0.1, what=f"{n} score messages")
        time.sleep(1.0)  # anything beyond n would be a reading scored twice: let it arrive
        return self.all()


def _instance(
    tmp_path: Path, server: PrivateNatsServer, model: Path, name: str, *, instance: int, instances: int
) -> DaemonProcess:
    sections: dict[str, dict[str, Any]] = {
        "mqtt": {"protocol": "3.1.1", "client_id": f"anomalyd-rebalance-{name}"},
        "output": {"score_topic": f"scores/{name}/{{device}}/score", "score_interval_s": 0.0},
        "stream": {"max_devices": 2000},
        "cluster": {"partitions": PARTITIONS, "instance": instance, "instances": instances, "name": name},
        "cluster.jetstream": {"servers": [server.nats_url], "timeout_s": 20.0},
    }
    d = DaemonProcess(tmp_path / name, server, model, sections=sections)
    d.wait_ready(60)
    d.wait_metric("anomalyd_warmups_total", lambda v: v >= 1, 30, result="complete")
    return d


def _stop(d: DaemonProcess) -> None:
    try:
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log()[-3000:]
    finally:
        d.close()


def _check_owners(scores: list[tuple[str, str, float]], owner_of: dict[str, str]) -> None:
    wrong = [(inst, dev) for inst, dev, _ in scores if owner_of[dev] != inst]
    assert not wrong, f"{len(wrong)} scores from an instance that does not own the device: {wrong[:5]}"


def test_two_instances_then_three_after_a_rolling_rebalance(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny.onnx", window_length=WINDOW)
    server = PrivateNatsServer(tmp_path / "nats", partitions=PARTITIONS)
    server.start()
    sub = Subscriber(server, ["scores/+/+/score"])
    scores = _Scores(sub)
    running: list[DaemonProcess] = []
    try:
        # ---- two instances
        running = [_instance(tmp_path, server, model, f"a{i}", instance=i, instances=2) for i in range(2)]
        owner2 = {d: f"a{nats_partition(d, PARTITIONS) % 2}" for d in DEVICES}
        t0 = float(int(time.time()) - 120)
        _publish_rounds(server, t0, range(12))
        expected_a = len(DEVICES) * (12 - WINDOW + 1)  # the first full window ends at round 7
        phase_a = scores.wait_count(expected_a, 120)
        assert len(phase_a) == expected_a, "a reading was scored twice (or a score came from nowhere)"
        _check_owners(phase_a, owner2)
        assert Counter(d for _, d, _ in phase_a) == dict.fromkeys(DEVICES, 12 - WINDOW + 1)
        owned = [d.metric("anomalyd_cluster_partitions_owned") for d in running]
        assert owned == [8.0, 8.0]
        devices = [d.metric("anomalyd_cluster_devices_owned") for d in running]
        assert sum(devices) == len(DEVICES)
        assert devices == [float(sum(1 for d in DEVICES if owner2[d] == f"a{i}")) for i in range(2)]

        # ---- rolling rebalance to three: the new instance first, then each old one in turn
        b2 = _instance(tmp_path, server, model, "b2", instance=2, instances=3)
        running.append(b2)
        for i in range(2):
            old = running.pop(i)
            _stop(old)
            running.insert(i, _instance(tmp_path, server, model, f"b{i}", instance=i, instances=3))
        owner3 = {d: f"b{nats_partition(d, PARTITIONS) % 3}" for d in DEVICES}
        before_b = len(scores.all())

        # ---- three instances: every window is full at once
        _publish_rounds(server, t0, range(12, 16))
        phase_b = scores.wait_count(before_b + 4 * len(DEVICES), 120)[before_b:]
        assert len(phase_b) == 4 * len(DEVICES), "a reading was scored twice (or a score came from nowhere)"
        _check_owners(phase_b, owner3)
        per_device = {d: sorted(ts for _, dev, ts in phase_b if dev == d) for d in DEVICES}
        assert all(v == [t0 + r for r in range(12, 16)] for v in per_device.values()), (
            "a device's first live reading after the rebalance was not scored: its window was not full"
        )
        everything = Counter((dev, ts) for _, dev, ts in scores.all())
        assert max(everything.values()) == 1
        owned = [d.metric("anomalyd_cluster_partitions_owned") for d in running]
        assert owned == [6.0, 5.0, 5.0]
        for d in running:
            assert d.metric("anomalyd_rejected_total", reason="foreign_partition") == 0
            assert d.metric("anomalyd_warmup_readings_total", result="filled") > 0
        # Each instance refilled the windows of exactly its own devices from JetStream.
        filled = sum(d.metric("anomalyd_warmup_readings_total", result="filled") for d in running)
        assert filled == len(DEVICES) * WINDOW
    finally:
        for d in running:
            d.close()
        sub.close()
        server.close()
