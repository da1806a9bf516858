"""``anomalyd bench --quick`` end to end: it runs the real daemon behind a real Mosquitto,
accounts for every reading it offers, measures the probe's latency and writes its figures
as JSON.

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

from anomalyd.benchreport import TARGETS
from anomalyd.benchrun import Probe
from tests.broker import MosquittoBroker, Received, Subscriber, publish_many


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
