"""End to end: two daemon processes, instances 0 and 1 of a [cluster] of 8 partitions,
share one fleet behind a real nats-server (its MQTT gateway and the partition mapping).

Devices publish plain ``sensors/<device>/telemetry`` over MQTT 3.1.1; the broker's mapping
appends each device's partition, and each instance subscribes to its own four. Checked:
every device is scored by exactly one instance, the one owning its partition (the two
instances run different static thresholds, so a score message names its scorer); each
instance's /metrics shows its partitions and devices; readings a client publishes straight
to a partition topic, for a device that is not that partition's, are rejected and counted
(``foreign_partition``, ``partition_mismatch``) by the instance that receives them; and the
instances' status topics stand side by side.
"""

from __future__ import annotations

import collections
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from anomalyd.partitions import nats_partition
from tests.broker import PrivateNatsServer, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess

P = 8
WINDOW = 8
READINGS = 10  # per device: WINDOW - 1 to fill the window, then one window per reading
DEVICES = [f"dev-{i:02d}" for i in range(50)]
#: Static thresholds, one per instance: the ``threshold`` of a score message says who scored it.
THRESHOLDS = {0: 11.0, 1: 22.0}


def owner(device: str) -> int:
    """Instance (of 2) owning ``device``'s partition: partition p belongs to instance p % 2."""
    return nats_partition(device, P) % 2


def device_in(partition: int) -> str:
    return next(d for i in itertools.count() if nats_partition(d := f"stray-{i}", P) == partition)


def equal_to(expected: float) -> Callable[[float], bool]:
    return lambda value: value == expected


def reading(ts: float) -> bytes:
    return orjson.dumps({"ts": ts, "temperature": 40.0, "pressure": 230.0, "vibration": 0.03})


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[PrivateNatsServer]:
    server = PrivateNatsServer(tmp_path / "nats", partitions=P)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def instances(
    tmp_path: Path, nats: PrivateNatsServer, tiny_model: Callable[..., Path]
) -> Iterator[dict[int, DaemonProcess]]:
    model = tiny_model("m.onnx", window_length=WINDOW)
    made: dict[int, DaemonProcess] = {}
    try:
        for i in (0, 1):
            made[i] = DaemonProcess(
                tmp_path / f"instance{i}",
                nats,
                model,
                sections={
                    # client_id empty: the instance's own default, anomalyd-<i>-<host>-<pid>
                    "mqtt": {"protocol": "3.1.1", "client_id": ""},
                    "cluster": {"partitions": P, "instance": i, "instances": 2},
                    "detector": {"threshold": THRESHOLDS[i]},
                    "output": {"score_interval_s": 0.0},
                },
            )
        for d in made.values():
            d.wait_ready(60)
        yield made
    finally:
        for d in made.values():
            d.close()


def test_two_instances_share_the_fleet_by_partition(
    nats: PrivateNatsServer, instances: dict[int, DaemonProcess]
) -> None:
    owned_devices = collections.Counter(owner(d) for d in DEVICES)
    assert set(owned_devices) == {0, 1}  # both instances have devices to score
    windows_per_device = READINGS - WINDOW + 1

    # Both status words, retained side by side: a late subscriber gets each with retain=1.
    status = Subscriber(nats, ["anomaly/status", "anomaly/status/+"])
    try:
        status.wait_until(
            lambda ms: (
                {(m.topic, m.payload, m.retain) for m in ms}
                >= {("anomaly/status/0", b"online", True), ("anomaly/status/1", b"online", True)}
            ),
            20,
            "both instances online",
        )
        # Nobody says a status for the whole fleet (it would be retained, and here by now).
        assert not status.on_topic("anomaly/status")
    finally:
        status.close()

    scores = Subscriber(nats, ["anomaly/+/score"])
    try:
        t0 = time.time() - 100
        publish_many(
            nats,
            [(f"sensors/{d}/telemetry", reading(t0 + i)) for i in range(READINGS) for d in DEVICES],
        )
        scores.wait_until(
            lambda ms: len(ms) >= len(DEVICES) * windows_per_device, 60, "every device's windows scored"
        )
        for i, d in instances.items():
            d.wait_metric(
                "anomalyd_windows_scored_total", equal_to(owned_devices[i] * windows_per_device), 30
            )
        by_device: dict[str, list[float]] = collections.defaultdict(list)
        for m in scores.snapshot():
            doc = orjson.loads(m.payload)
            assert m.topic == f"anomaly/{doc['device']}/score"
            by_device[doc["device"]].append(doc["threshold"])
    finally:
        scores.close()

    # Every device scored once per window, all by the instance owning its partition.
    assert set(by_device) == set(DEVICES)
    for device, thresholds in by_device.items():
        assert thresholds == [THRESHOLDS[owner(device)]] * windows_per_device, device

    for i, d in instances.items():
        # (scrape(), not metric(): the label is called "name")
        assert d.scrape()[("anomalyd_cluster_instance_info", (("name", str(i)),))] == 1.0
        assert d.metric("anomalyd_cluster_partitions") == P
        assert d.metric("anomalyd_cluster_partitions_owned") == P // 2
        # Gauges of the periodic housekeeping: waited for.
        d.wait_metric("anomalyd_devices_tracked", equal_to(owned_devices[i]), 20)
        assert d.metric("anomalyd_cluster_devices_owned") == owned_devices[i]
        assert d.metric("anomalyd_readings_accepted_total") == owned_devices[i] * READINGS
        for reason in ("foreign_partition", "partition_mismatch", "bad_topic"):
            assert d.metric("anomalyd_rejected_total", reason=reason) == 0.0, (i, reason)

    # A client publishing straight to instance 1's partition topics (four levels: the mapping
    # only rewrites the device's own three-level topic), bypassing the mapping:
    foreign = device_in(2)  # instance 0's device, on instance 1's partition 3
    mismatched = device_in(5)  # instance 1's device, on instance 1's partition 7
    publish_many(
        nats,
        [
            (f"sensors/{foreign}/telemetry/3", reading(t0 + READINGS)),
            (f"sensors/{foreign}/telemetry/3", reading(t0 + READINGS + 1)),
            (f"sensors/{mismatched}/telemetry/7", reading(t0 + READINGS)),
        ],
    )
    one = instances[1]
    one.wait_metric("anomalyd_rejected_total", lambda v: v == 2, 20, reason="foreign_partition")
    one.wait_metric("anomalyd_rejected_total", lambda v: v == 1, 20, reason="partition_mismatch")
    assert one.metric("anomalyd_devices_tracked") == owned_devices[1]  # neither got a window
    wait_for(lambda: "rejected (foreign_partition)" in one.log(), 10, what="the rejection logged")
    zero = instances[0]
    assert zero.metric("anomalyd_rejected_total", reason="foreign_partition") == 0.0  # never sent to it
    assert zero.metric("anomalyd_devices_tracked") == owned_devices[0]

    # Instance 1 stops cleanly: its own status says so, instance 0's is untouched.
    one.signal(signal.SIGTERM)
    assert one.wait() == 0
    status = Subscriber(nats, ["anomaly/status/+"])
    try:
        status.wait_until(
            lambda ms: (
                {(m.topic, m.payload) for m in ms}
                >= {("anomaly/status/0", b"online"), ("anomaly/status/1", b"stopped")}
            ),
            20,
            "instance 1 stopped, instance 0 online",
        )
    finally:
        status.close()
