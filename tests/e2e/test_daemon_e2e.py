"""End to end: simulated devices with injected anomalies → Mosquitto → the daemon (a real
subprocess with the committed default model) → scores and alerts over MQTT and /metrics.

Two kinds of check:

1. Mechanics, exact: every window's published score equals the score the same model gives
   the same window offline (values as sent, i.e. rounded to 6 decimals; rtol 1e-4), no
   reading is lost or rejected, and /metrics agrees with what was published.
2. Detection, with tolerances (the default model is a learned detector, not an oracle):
   - recall: at least RECALL_MIN of the injected anomaly events have an anomalous window
     that overlaps them (a window ending inside the event or within L-1 samples after it);
   - precision: at most CLEAN_FLAG_RATE_MAX of the windows that contain no anomalous sample
     are flagged, and hysteresis alerts (k_enter = 3) raised on clean data number at most
     CLEAN_ALERTS_PER_DEVICE_HOUR_MAX per device-hour.
   The stream is not hand-picked: the simulator's settings with 4 devices x 2 h and 3
   anomalies per device-hour, seed 31 and a start at 06:00 UTC, all fixed before the model
   was measured on it. The bounds come from the distribution over 40 such streams (seeds
   1-40, same settings, scored offline through the daemon's stages with its default
   detector by benchmarks/eval_default_model.py) with the default model
   (MODEL_CARD.md, "The end-to-end test's stream"): they hold for every one of the 40
   streams, not just this one. Seed 31 is the worst of the 40 on clean windows flagged
   (0.0022), so a retrained model that raises more false alarms fails here first.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from anomalyd.config import MqttConfig
from anomalyd.model import DEFAULT_MODEL_PATH, load_model, read_contract
from anomalyd.mqtt import MqttLink
from anomalyd.simulator import SIMULATED_FLEET, SimulationSettings, Stream, build_stream, publish_stream
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.slow

# Measured over 40 streams with these settings (seeds 1-40) and the default model
# default-437dfa2f1e0f (MODEL_CARD.md, "The end-to-end test's stream"); seed 31 in brackets.
# Event recall (window level): min 0.78, median 0.94 (0.87); 15-23 events per stream, so one
# missed event moves it by ~0.05. The bound holds for the worst stream and leaves three events
# of room below seed 31 (20 of 23 found; 17 pass).
RECALL_MIN = 0.70
# Clean windows flagged: 0 on 37 of the 40 streams (seed 31 among them), 1.8e-4 to 2.6e-4 on
# the other three (3-4 windows of one device); the bound is about 4x the worst stream.
CLEAN_FLAG_RATE_MAX = 0.001
# Clean alerts per device-hour: 0 on 37 of the 40 streams (seed 31 among them), 0.125 (1 in
# 8 device-hours) on the other 3; the bound allows 2.
CLEAN_ALERTS_PER_DEVICE_HOUR_MAX = 0.25
#: The stream, fixed before measuring (not chosen for its result).
STREAM_SEED = 31
STREAM_START_HOUR = 6


def _start_of_yesterday_at(hour: int) -> float:
    """A fixed time of day, in the past: the synthetic physics follows the wall-clock day,
    so a fixed hour makes the stream (and the scores) the same on every run."""
    now = time.time()
    return math.floor(now / 86_400) * 86_400 - 86_400 + hour * 3_600


def _publish(broker: MosquittoBroker, stream: Stream, settings: SimulationSettings) -> None:
    link = MqttLink(MqttConfig(host=broker.host, port=broker.port), client_id="e2e-simulator", name="e2e-sim")
    link.start()
    try:
        assert link.wait_connected(10)
        result = publish_stream(link, stream, settings)
        assert result.failed == 0
    finally:
        link.close(60)


def test_injected_anomalies_are_flagged_and_clean_data_mostly_is_not(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    model = DEFAULT_MODEL_PATH
    assert model.is_file(), "the committed default model is missing (exported_models/default/model.onnx)"
    contract = read_contract(model)
    window = contract.window_length
    fleet = replace(
        SIMULATED_FLEET, n_devices=4, duration_s=2 * 3600.0, seed=STREAM_SEED, anomalies_per_device_hour=3.0
    )
    settings = SimulationSettings(fleet=fleet, speed=math.inf)
    stream = build_stream(settings, _start_of_yesterday_at(STREAM_START_HOUR))
    assert len(stream.events) >= 15  # enough events for the recall bound to mean something
    expected = sum(len(d.ts) - window + 1 for d in stream.fleet)

    # Every window's score is checked below: one score message per window.
    d = daemon_factory(model, sections={"output": {"score_interval_s": 0.0}})
    d.wait_ready(60)
    sub = Subscriber(broker, ["anomaly/+/score", "anomaly/+/alert"])
    try:
        _publish(broker, stream, settings)
        d.wait_metric("anomalyd_windows_scored_total", lambda v: v == expected, 120)
        d.wait_metric("anomalyd_published_total", lambda v: v == expected, 60, kind="score")
        published = expected + d.metric("anomalyd_published_total", kind="alert")
        # len() only: the predicate runs on every message received, under the subscriber's
        # lock, so anything that walks the whole list slows the subscriber quadratically.
        sub.wait_until(lambda ms: len(ms) >= published, 120, "every score and alert")
        # The alert count was read while the last windows' alerts may still have been on their
        # way, so len() can reach it a message early with a score still in flight: wait for
        # every score itself (this scan runs only for the last few messages), then for the
        # alerts counted once all scores are in.
        sub.wait_until(lambda ms: sum(m.topic.endswith("/score") for m in ms) >= expected, 60, "every score")
        published = expected + d.metric("anomalyd_published_total", kind="alert")
        sub.wait_until(lambda ms: len(ms) >= published, 60, "every alert")
        msgs = sub.snapshot()
        metrics = d.scrape()
    finally:
        sub.close()

    scores = [orjson.loads(m.payload) for m in msgs if m.topic.endswith("/score")]
    alerts = [orjson.loads(m.payload) for m in msgs if m.topic.endswith("/alert")]
    assert {s["model_version"] for s in scores} == {contract.model_version}

    # ---- mechanics: the daemon's scores are the model's scores for the same windows
    offline = load_model(model)
    for dev in stream.fleet:
        sent = np.array([[round(v, 6) for v in row] for row in dev.values.tolist()], dtype=np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(sent, (window, sent.shape[1]))[:, 0]
        reference, _ = offline.run(np.ascontiguousarray(windows))
        got = sorted((s["ts"], s["score"]) for s in scores if s["device"] == dev.device)
        assert len(got) == len(reference)
        got_scores = np.array([g for _, g in got])
        # A stuck channel's flatline term (up to 1000) is 1000 x (1 - spread / floor), with
        # spread a float32 standard deviation of near-equal values: ONNX Runtime's rounding
        # of it depends on the batch a window was scored in (measured: 999.69 vs 1000.01).
        # Those windows are far above any threshold, so they are compared at rtol 1e-2.
        flat = reference >= 100.0
        np.testing.assert_allclose(got_scores[~flat], reference[~flat], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_scores[flat], reference[flat], rtol=1e-2)
        np.testing.assert_allclose([t for t, _ in got], np.round(dev.ts[window - 1 :], 6), atol=1e-6)

    # Scores sorted by ts line up with the windows ending at samples L-1 .. n-1 (checked above).
    flags = {
        dev.device: np.array(
            [a for _, a in sorted((s["ts"], s["anomaly"]) for s in scores if s["device"] == dev.device)]
        )
        for dev in stream.fleet
    }
    period = 1.0 / settings.rate_hz

    # ---- recall: per injected event, any anomalous window that contains part of it
    found = 0
    fleet = {dev.device: dev for dev in stream.fleet}
    for device, event in stream.events:
        end_ts = fleet[device].ts[window - 1 :]
        overlaps = (end_ts >= event.start_ts) & (end_ts <= event.end_ts + (window - 1) * period * 1.1)
        found += bool(flags[device][overlaps].any())
    recall = found / len(stream.events)

    # ---- precision: windows without any labelled sample
    clean_total = clean_flagged = 0
    for dev in stream.fleet:
        dirty = np.lib.stride_tricks.sliding_window_view(dev.labels, window).any(axis=1)
        clean_total += int((~dirty).sum())
        clean_flagged += int((flags[dev.device] & ~dirty).sum())
    clean_rate = clean_flagged / clean_total

    def in_event(device: str, t: float) -> bool:
        return any(
            dv == device and e.start_ts <= t <= e.end_ts + (window - 1) * period * 1.1
            for dv, e in stream.events
        )

    raised = [a for a in alerts if a["state"] == "anomalous"]
    clean_alerts = [a for a in raised if not in_event(a["device"], a["ts"])]
    device_hours = settings.devices * settings.duration_s / 3600
    print(
        f"e2e: {len(stream.events)} events, recall {recall:.2f}; clean windows flagged "
        f"{clean_flagged}/{clean_total} ({clean_rate:.4f}); alerts raised {len(raised)}, "
        f"{len(clean_alerts)} on clean data"
    )
    assert recall >= RECALL_MIN
    assert clean_rate <= CLEAN_FLAG_RATE_MAX
    assert len(clean_alerts) <= CLEAN_ALERTS_PER_DEVICE_HOUR_MAX * device_hours

    # ---- /metrics agrees with what was published
    def m(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert m("anomalyd_readings_accepted_total") == len(stream)
    assert m("anomalyd_messages_received_total") == len(stream)
    assert sum(v for (n, _), v in metrics.items() if n == "anomalyd_rejected_total") == 0
    assert m("anomalyd_anomalous_windows_total") == sum(1 for s in scores if s["anomaly"])
    assert m("anomalyd_alert_transitions_total", direction="raised") == len(raised)
    assert m("anomalyd_end_to_end_seconds_count") == expected
    assert m("anomalyd_devices_tracked") == settings.devices
    assert m("anomalyd_batch_size_sum") == expected
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_broker_killed_and_restarted_mid_stream(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    window = 4
    d = daemon_factory(tiny_model(window_length=window), sections={"output": {"score_interval_s": 0.0}})
    d.wait_ready()
    status_sub = Subscriber(broker, ["anomaly/status"])
    status_sub.wait_until(lambda ms: ms and ms[-1].payload == b"online", 10, "online")
    status_sub.close()
    t0 = time.time() - 100

    def burst(device: str, start: float, n: int) -> list[tuple[str, bytes]]:
        return [
            (
                f"sensors/{device}/telemetry",
                orjson.dumps({"ts": start + i, "temperature": 0.1, "pressure": 0.1, "vibration": 0.1}),
            )
            for i in range(n)
        ]

    sub = Subscriber(broker, ["anomaly/+/score"])
    publish_many(broker, burst("m1", t0, 10))
    sub.wait_until(lambda ms: len(ms) == 10 - window + 1, 10, "scores before the outage")
    sub.close()

    broker.kill()
    d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 0.0, 10)
    assert d.proc.poll() is None  # the outage does not kill the daemon
    broker.start()  # same port, no persistence: the daemon must resubscribe by itself
    d.wait_metric("anomalyd_mqtt_reconnects_total", lambda v: v == 1.0, 20)
    d.wait_metric("anomalyd_mqtt_connected", lambda v: v == 1.0, 20)

    status = Subscriber(broker, ["anomaly/status"])  # retained "online" was published again
    status.wait_until(lambda ms: [m.payload for m in ms] == [b"online"], 10, "online after reconnect")
    status.close()
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        # The subscription is renewed right after the CONNACK; publish until it is in place.
        next_ts = itertools.count(int(t0) + 10)

        def scores_flow() -> bool:
            publish_many(broker, burst("m1", next(next_ts), 1))
            try:
                sub.wait_until(lambda ms: len(ms) > 0, 0.5)
            except AssertionError:
                return False
            return True

        wait_for(scores_flow, 15, interval=0.0, what="scores after the broker came back")
        publish_many(broker, burst("m2", t0, 10))
        sub.wait_until(lambda ms: sum(1 for m in ms if "/m2/" in m.topic) == 10 - window + 1, 10, "m2")
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_last_will_offline_when_the_daemon_is_killed(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = daemon_factory(tiny_model(window_length=4))
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/status"])
    try:
        sub.wait_until(lambda ms: ms and ms[-1].payload == b"online", 10, "online")
        d.signal(signal.SIGKILL)
        d.wait()
        sub.wait_until(lambda ms: ms[-1].payload == b"offline", 10, "last will")
    finally:
        sub.close()
