"""``anomalyd bench --quick`` end to end: it runs the real daemon behind a real Mosquitto,
accounts for every reading it offers, measures the probe's latency and writes its figures
as JSON. ``anomalyd bench --instances 1,2 --quick`` does the same for daemon instances
sharing a fleet through a real nats-server's partitions.

Speeds and ratios are not asserted: the machines that run the tests are shared and
noisy, and the quick run's loads are too small to mean anything. This checks that the
benchmark is correct, not that the daemon is fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from anomalyd.benchcluster import PARTITIONED_FILTER
from anomalyd.benchload import balanced_device_ids
from anomalyd.benchreport import TARGETS
from anomalyd.benchrun import Children, LoadSpec, Probe, publisher_commands, summarise_publishers
from anomalyd.partitions import nats_partition
from tests.broker import MosquittoBroker, PrivateNatsServer, Received, Subscriber, publish_many


def readings_in(messages: list[Received]) -> int:
    """Readings in telemetry messages: an array's length, or one for a single object."""
    docs = [orjson.loads(m.payload) for m in messages]
    return sum(len(d) if isinstance(d, list) else 1 for d in docs)


def test_probe_process_counts_what_it_sent_and_times_the_scores_it_receives(
    broker: MosquittoBroker,
) -> None:
    """The probe child against a bare broker, the test standing in for the daemon: what it
    reports as published is what reached the broker, and a score's latency is its receive
    time minus its ``ts``."""
    seen = Subscriber(broker, ["sensors/+/telemetry"])
    probe = Probe(broker.host, broker.port, "t-probe-", devices=2, rate=20.0, window=5, features=["a", "b"])
    try:
        time.sleep(0.3)
        probe.pause()
        messages, readings = probe.counts()
        assert messages > 2  # one window of past readings per device, then live readings

        seen.wait_until(lambda got: len(got) >= messages, 10, "the probe's readings")
        time.sleep(0.3)
        # Paused: nothing more is sent, and the counts are exactly what the broker got.
        assert probe.counts() == (messages, readings)
        assert len(seen.snapshot()) == messages
        assert readings_in(seen.snapshot()) == readings

        publish_many(broker, [("anomaly/t-probe-1/score", orjson.dumps({"ts": time.time() - 0.25}))])
        assert probe.wait_scored(10)
        (latency,) = probe.latencies()
        assert 0.25 <= latency < 5

        probe.resume()
        time.sleep(0.2)
        probe.stop()
        after = probe.counts()
        assert after[0] > messages
        seen.wait_until(lambda got: len(got) >= after[0], 10, "the readings sent after resume")
        time.sleep(0.2)
        assert probe.counts() == after
        assert len(seen.snapshot()) == after[0]
    finally:
        probe.close()
        seen.close()
    assert probe.exit_code == 0


@pytest.mark.slow
def test_quick_bench_accounts_for_every_reading_and_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "anomalyd", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True

    # Every reading offered (load publishers and probe, every daemon run) is accounted for.
    total = doc["accounting"]
    assert total["offered_readings"] > 10_000
    assert total["accepted_readings"] == total["offered_readings"]
    assert total["lost_readings"] == 0
    assert total["received_messages"] == total["offered_messages"]
    assert total["rejected"] == {}
    assert total["nothing_lost"] is True

    for name in ("arrays", "single", "every-window", "naive"):
        run = doc["scenarios"][name]
        assert run["accounting"]["lost_readings"] == 0, name
        assert run["accounting"]["drained"] is True, name
        assert run["exit_code"] == 0, name
        assert 0 < run["start_to_ready_s"] < 60, name
        burst = run["saturation"]
        assert burst["complete"] is True, name
        assert burst["accepted_readings"] == burst["offered_readings"], name
        assert burst["windows_scored"] == burst["expected_windows"], name
        assert burst["readings_per_s"] > 0, name
        assert burst["windows_per_s"] > 0, name
    # The scenarios' configurations reached the daemon (or were reported as unknown to it).
    naive = doc["scenarios"]["naive"]
    assert naive["config"]["batching.max_batch"] == 1
    assert "output.score_interval_s" in {*naive["config"], *naive["unsupported_keys"]}

    # The probe's publish-to-score latency was measured in every step of the sweep.
    sweep = doc["scenarios"]["arrays"]["sweep"]
    assert sweep["steps"]
    for step in [*sweep["steps"], sweep["half"]]:
        assert step["lost_readings"] == 0
        latency = step["probe_latency_s"]
        assert latency["n"] > 0
        assert 0 < latency["p50"] <= latency["p99"] < 60
        assert set(step["daemon_lag"]) == {
            "anomalyd_data_lag_seconds",
            "anomalyd_lag_seconds",
            "anomalyd_overloaded",
        }

    limits = doc["limits"]
    assert limits["raw_ort"]["windows_per_s"] > 0
    assert limits["bare_subscriber"]["messages_received"] == limits["bare_subscriber"]["messages_sent"]
    assert doc["rss"]["devices_tracked"] == doc["rss"]["devices"]
    assert doc["rss"]["rss_bytes"] > 0

    # Every ratio was computed and judged against its target; whether it met it is the
    # machine's business, not this test's.
    assert set(doc["ratios"]) == set(TARGETS)
    for name, ratio in doc["ratios"].items():
        assert isinstance(ratio["value"], float), name
        assert isinstance(ratio["met"], bool), name
    for ratio in doc["ratios"].values():
        assert ratio["figure"] in proc.stdout


@pytest.mark.parametrize(
    ("args", "code", "problem"),
    [
        (("--pin",), 64, "--pin: only with --instances"),
        (("--instances", "2", "--flood", "--rate", "3"), 64, "not with --flood, --rate"),
        (("--instances", "two"), 78, "expected positive integers separated by commas, got 'two'"),
        (("--instances", "0,2"), 78, "expected positive integers separated by commas, got '0,2'"),
        (("--instances", "8", "--partitions", "4"), 78, "expected at most 4 instances"),
    ],
)
def test_instances_options_are_checked_before_anything_runs(
    args: tuple[str, ...], code: int, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalyd.cli import main

    assert main(["bench", *args]) == code
    assert problem in capsys.readouterr().err


def test_publishers_spread_their_devices_evenly_over_the_nats_partitions(tmp_path: Path) -> None:
    """The ``--instances`` load: publisher children speaking MQTT 3.1.1 to a real nats-server
    with the partition mapping, device ids chosen so that every partition gets as many
    devices, hence every instance owning as many partitions the same share of the load."""
    partitions = 8
    spec = LoadSpec(
        devices=2 * 3 * partitions,
        prefix="t-bal-",
        array=5,
        burst=10,
        protocol="3.1.1",
        partitions=partitions,
    )
    with PrivateNatsServer(tmp_path / "nats", partitions=partitions) as server:
        seen = Subscriber(server, [PARTITIONED_FILTER])
        kids = Children(publisher_commands(server.host, server.port, spec, 2, ["a", "b"]))
        try:
            kids.wait_ready(60)
            kids.go()
            pub = summarise_publishers(kids.results(60))
            seen.wait_until(lambda got: len(got) >= pub["messages"], 30, "every message of the burst")
        finally:
            kids.close()
            seen.close()
    assert pub["messages"] == spec.devices * 2  # 10 readings per device, 5 per message
    devices_of: dict[int, set[str]] = {}
    for m in seen.snapshot():
        _sensors, device, _telemetry, level = m.topic.split("/")
        # The broker's partition is the one nats_partition computes for the device.
        assert int(level) == nats_partition(device, partitions), m.topic
        devices_of.setdefault(int(level), set()).add(device)
    assert sorted(devices_of) == list(range(partitions))
    assert {len(d) for d in devices_of.values()} == {spec.devices // partitions}
    # The same ids as the bench computes, publisher by publisher.
    expected = {
        d for p in range(2) for d in balanced_device_ids(f"t-bal-p{p}-", spec.devices // 2, partitions)
    }
    assert set().union(*devices_of.values()) == expected


@pytest.mark.slow
def test_instances_bench_scales_out_over_nats_partitions_and_accounts_for_every_reading(
    tmp_path: Path,
) -> None:
    out = tmp_path / "instances.json"
    proc = subprocess.run(
        [sys.executable, "-m", "anomalyd", "bench", "--instances", "2", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "instances"
    assert doc["settings"]["instances"] == [1, 2]  # 1 is always measured: the baseline
    partitions = doc["settings"]["partitions"]
    load = doc["load"]

    total = doc["accounting"]
    assert total["offered_readings"] == 2 * load["readings"]  # the same load for each N
    assert total["nothing_lost"] is True, total
    assert total["accepted_readings"] == total["offered_readings"]

    assert [r["instances"] for r in doc["runs"]] == [1, 2]
    for run in doc["runs"]:
        n = run["instances"]
        assert run["complete"] is True, n
        assert run["accounting"]["offered_readings"] == load["readings"], n
        assert run["windows_scored"] == run["expected_windows"], n
        assert run["windows_per_s"] > 0, n
        assert len(run["per_instance"]) == n
        for inst in run["per_instance"]:
            # Each instance subscribed to its own partitions only, got exactly its share of
            # the evenly spread devices, and rejected nothing (no foreign partition).
            assert inst["partitions_owned"] == partitions // n, inst
            assert inst["windows_scored"] == run["expected_windows"] // n, inst
            assert inst["rejected"] == {}, inst
            assert inst["exit_code"] == 0, inst
        cpu = run["cpu"]
        assert len(cpu["each_instance_pct"]) == n
        assert cpu["broker_pct"] is not None
        assert 0 < cpu["machine_busy_pct"] <= 100
        assert cpu["instances_waiting_pct"] >= 0
        assert run["bottleneck"]["cause"] in {
            "the machine",
            "the load generator",
            "the machine and the load generator",
            "the instances",
        }
        assert run["bottleneck"]["verdict"]

    rows = doc["by_instances"]
    assert rows["1"]["ratio_to_1"] == 1.0
    assert rows["1"]["target"] is None
    assert rows["2"]["target"] == pytest.approx(1.8)
    assert rows["2"]["ratio_to_1"] == pytest.approx(rows["2"]["windows_per_s"] / rows["1"]["windows_per_s"])
    assert isinstance(rows["2"]["met"], bool)
    sub = doc["limits"]["bare_subscriber"]
    assert sub["messages_received"] == sub["messages_sent"] == load["messages"]
    assert "× N=1" in proc.stdout
    assert "where the CPU went" in proc.stdout
