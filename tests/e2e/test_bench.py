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
from pathlib import Path

import pytest

from anomalyd.benchreport import TARGETS


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
