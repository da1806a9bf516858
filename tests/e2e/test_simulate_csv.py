"""``anomalyd simulate --from-csv``: a recorded file published as one live device, through a
real Mosquitto, as a person runs it (``python -m anomalyd`` in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest

from anomalyd.cli import main
from anomalyd.config import Config
from anomalyd.decode import Decoder, RawMessage
from anomalyd.simulator import stream_start
from tests.broker import MosquittoBroker, Subscriber

SKAB_HEADER = (
    "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;"
    "Voltage;Volume Flow RateRMS;anomaly;changepoint"
)
#: What the file's three published columns are called in telemetry (training's sanitised names).
PUBLISHED = ["accelerometer1_rms", "temperature", "volume_flow_rate_rms"]
SPEED = 10.0


class TimedSubscriber(Subscriber):
    """A ``Subscriber`` that also notes when each message arrived (wall clock)."""

    def __init__(self, broker: MosquittoBroker, topics: list[str]) -> None:
        self.arrivals: list[float] = []
        super().__init__(broker, topics)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.arrivals.append(time.time())
        super()._on_message(c, u, msg)


def skab_like_file(path: Path) -> tuple[list[float], list[list[float]]]:
    """A 40-row file in SKAB's layout, 1 s apart but for a 3 s step after row 20, with one
    bad row (row 30: not a number); returns the good rows' timestamps and published values."""
    start = datetime(2020, 3, 9, 10, 34, 33, tzinfo=UTC).timestamp()
    lines, ts, values = [SKAB_HEADER], [], []
    rng = np.random.default_rng(3)
    for i in range(40):
        t = start + i + (2 if i > 20 else 0)
        # Written as float32's shortest text, which is what the simulator sends back.
        accel, temp, flow = (str(np.float32(x)) for x in (0.027 + rng.normal(0, 1e-3), 75 - i / 10, 32.0 + i))
        when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
        shown = "n/a" if i == 30 else accel
        lines.append(f"{when};{shown};0.04;1.3;0.05;{temp};25.8;224.1;{flow};0.0;0.0")
        if i != 30:
            ts.append(t)
            values.append([float(accel), float(temp), float(flow)])
    path.write_text("\n".join(lines) + "\n")
    return ts, values


def test_a_recorded_file_arrives_as_one_live_device_paced_and_never_ahead(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    src = tmp_path / "1.csv"
    file_ts, file_values = skab_like_file(src)
    sub = TimedSubscriber(broker, ["sensors/#"])
    started = time.time()
    try:
        run = subprocess.run(
            [
                sys.executable, "-m", "anomalyd", "simulate",
                "--from-csv", str(src), "--device", "valve1-1", "--speed", str(SPEED),
                "--broker", broker.address, "--qos", "1",
                "--separator", ";", "--timestamp-column", "datetime",
                "--timestamp-format", "%Y-%m-%d %H:%M:%S",
                "--feature-columns", "Accelerometer1RMS,Temperature,Volume Flow RateRMS",
                "--label-column", "anomaly",
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        sub.wait_until(lambda ms: len(ms) >= len(file_ts), 10, f"{len(file_ts)} readings")
    finally:
        sub.close()
    assert (
        "skipped 1 bad row(s): non_numeric 1 (first: line 32, column 'Accelerometer1RMS': 'n/a')"
        in run.stderr
    )

    messages = sub.snapshot()
    assert len(messages) == len(file_ts)
    assert {m.topic for m in messages} == {"sensors/valve1-1/telemetry"}
    docs = [orjson.loads(m.payload) for m in messages]
    assert all(list(doc) == ["ts", *PUBLISHED] for doc in docs)
    # In file order, each value as the file wrote it (float32 precision, nothing rounded off).
    assert [[doc[name] for name in PUBLISHED] for doc in docs] == file_values

    # Stamped with the file's steps (its 3 s step included), shifted to the present...
    stamps = np.array([doc["ts"] for doc in docs])
    np.testing.assert_allclose(np.diff(stamps), np.diff(file_ts), atol=2e-6)
    span = file_ts[-1] - file_ts[0]
    assert started - span - 1.0 <= stamps[0] <= started + 1.0
    # ... never ahead of the moment the reading arrived (a margin for clock granularity only)...
    arrivals = np.array(sub.arrivals)
    assert (stamps <= arrivals + 0.5).all(), (stamps - arrivals).max()
    # ... so the daemon's decoder takes every one of them as it arrives.
    stream = Config().stream
    decoder = Decoder(
        PUBLISHED,
        Config().mqtt.topic_in,
        stream.max_payload_bytes,
        stream.max_readings_per_message,
        stream.device_id_pattern,
        stream.max_future_skew_s,
    )
    raw = [RawMessage(m.topic, m.payload, t, 0.0) for m, t in zip(messages, arrivals.tolist(), strict=True)]
    decoded = decoder.decode(raw)
    assert decoded.rejections == []
    assert decoded.devices == ["valve1-1"] * len(file_ts)
    # Paced: sending takes at least the data's span over the speed (lateness only lengthens it).
    assert arrivals[-1] - arrivals[0] >= 0.8 * span / SPEED


def test_options_that_do_not_go_together_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "r.csv"
    src.write_text("ts,a\n1767225600,1.0\n")
    csv_run = ["simulate", "--from-csv", str(src), "--broker", "127.0.0.1:1"]
    assert main([*csv_run, "--feature-columns", "a"]) == 64
    assert "--from-csv needs --device NAME" in capsys.readouterr().err
    assert main([*csv_run, "--device", "d"]) == 64
    assert "--from-csv needs --feature-columns" in capsys.readouterr().err
    assert main([*csv_run, "--device", "d", "--feature-columns", "a", "--devices", "3", "--seed", "2"]) == 64
    assert (
        "--devices, --seed: the synthetic fleet's options do not go with --from-csv"
        in capsys.readouterr().err
    )
    assert main(["simulate", "--device", "d", "--separator", ";", "--broker", "127.0.0.1:1"]) == 64
    assert "--device, --separator: only with --from-csv" in capsys.readouterr().err
    assert main([*csv_run, "--device", "a/b", "--feature-columns", "a"]) == 78
    assert "--device: expected a device id without" in capsys.readouterr().err


def test_an_unusable_file_fails_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on port 1: had it tried to connect first, it would wait for a broker.
    run = ["simulate", "--broker", "127.0.0.1:1", "--device", "d", "--feature-columns", "a"]
    assert main([*run, "--from-csv", str(tmp_path / "missing.csv")]) == 65
    assert "missing.csv: no such file" in capsys.readouterr().err
    header_only = tmp_path / "h.csv"
    header_only.write_text("ts,b\n")
    assert main([*run, "--from-csv", str(header_only)]) == 65
    assert "feature column 'a' not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("speed", "first"), [(0.5, 1000.0), (1.0, 1000.0), (4.0, 1000.0 - 75.0), (np.inf, 900.0)]
)
def test_the_first_timestamp_keeps_every_reading_at_or_before_its_sending(speed: float, first: float) -> None:
    """Sent at ``now + offset / speed`` and stamped ``first + offset``: never ahead for any offset."""
    assert stream_start(1000.0, 100.0, speed) == first
    for offset in np.linspace(0.0, 100.0, 11):
        sent = 1000.0 + (offset / speed if np.isfinite(speed) else 0.0)
        assert first + offset <= sent + 1e-9
