"""Cadence is part of the contract: devices at 0.2 Hz and 2 Hz against a 1 Hz model, through
the daemon as a process and a real Mosquitto."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.broker import MosquittoBroker, Received, Subscriber, publish_many
from tests.daemon_process import DaemonProcess
from tests.helpers.tiny_model import tiny_contract

WINDOW = 4
N = 24  # readings per device: well past the 8 steps the verdict needs


def one_hz_model(tiny_model: Callable[..., Path]) -> Path:
    data = tiny_contract()["training_data"] | {
        "sample_period_s": 1.0,
        "sample_period_p05_s": 0.98,
        "sample_period_p95_s": 1.02,
    }
    return tiny_model(window_length=WINDOW, contract_overrides={"training_data": data})


def readings(device: str, t0: float, period: float, n: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{device}/telemetry",
            orjson.dumps({"ts": t0 + i * period, "temperature": 0.1, "pressure": 0.1, "vibration": 0.1}),
        )
        for i in range(n)
    ]


def newest_state(messages: list[Received], device: str) -> dict[str, Any] | None:
    topic = f"anomaly/{device}/alert"
    for m in reversed(messages):
        if m.topic == topic and m.payload:
            return dict(orjson.loads(m.payload))
    return None


def scores_of(messages: list[Received], device: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if m.topic == f"anomaly/{device}/score"]


def test_wrong_cadence_is_not_scored_and_says_so(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(one_hz_model(tiny_model), sections={"output": {"score_interval_s": 0.0}})
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/+/alert", "anomaly/+/score"])
    try:
        t0 = time.time() - 200
        publish_many(
            broker, readings("slow", t0, 5.0, N) + readings("fast", t0, 0.5, N) + readings("ok", t0, 1.0, N)
        )
        sub.wait_until(
            lambda ms: len([m for m in ms if m.topic == "anomaly/ok/score"]) == N - WINDOW + 1, 10, "ok"
        )
        for device, period in (("slow", 5.0), ("fast", 0.5)):
            sub.wait_until(
                lambda ms, device=device: (newest_state(ms, device) or {}).get("state") == "cadence_mismatch",
                10,
                f"{device} cadence_mismatch",
            )
            doc = newest_state(sub.snapshot(), device)
            assert doc is not None
            assert doc["period_s"] == period
            assert doc["expected_period_s"] == 1.0
            assert doc["alert"] is False
            # Windows completed before the verdict (on the 8th step, the 9th reading) were scored;
            # none from the verdict on.
            assert [s["ts"] for s in scores_of(sub.snapshot(), device)] == [
                t0 + i * period for i in range(WINDOW - 1, 8)
            ]
        sub.wait_until(lambda ms: (newest_state(ms, "ok") or {}).get("state") == "normal", 10, "ok normal")
        assert d.wait_metric("anomalyd_devices_cadence_mismatch", lambda v: v == 2.0, 5) == 2.0
        dropped = d.metric("anomalyd_windows_dropped_total", reason="cadence_mismatch")
        assert dropped == 2 * (N - 8)
        assert "'slow': median sample period 5 s, the model expects 1 s" in d.log()
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_resampling_scores_them_on_the_models_period(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(
        one_hz_model(tiny_model),
        sections={"output": {"score_interval_s": 0.0}, "stream": {"resample": "linear"}},
    )
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/+/alert", "anomaly/+/score"])
    try:
        t0 = float(int(time.time()) - 300)
        publish_many(broker, readings("slow", t0, 5.0, N))
        # after the verdict, every real step of 5 s becomes five readings on the 1 s grid
        sub.wait_until(lambda ms: len(scores_of(ms, "slow")) >= 40, 10, "resampled scores")
        ts = [s["ts"] for s in scores_of(sub.snapshot(), "slow")]
        resampled = [t for t in ts if t > t0 + 8 * 5.0]
        assert resampled
        assert all(b - a == 1.0 for a, b in itertools.pairwise(resampled))
        # The retained state (QoS 1) may reach the subscriber after later QoS 0 scores:
        # MQTT orders messages per QoS level, not across them.
        sub.wait_until(
            lambda ms: (newest_state(ms, "slow") or {}).get("state") == "normal", 10, "slow normal"
        )
        assert d.metric("anomalyd_windows_dropped_total", reason="cadence_mismatch") == 0.0
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
