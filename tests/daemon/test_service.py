"""The service lifecycle: the real daemon as a subprocess (signals, sd_notify, exit codes),
and in-process checks where a fault must be injected (a stalled pipeline, a forced stop).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.config import load_config
from anomalyd.decode import Reason
from anomalyd.sdnotify import Notifier
from anomalyd.service import EXIT_FORCED, Service
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess, NotifyListener

FEATURES = ("temperature", "pressure", "vibration")
L = 4  # tiny model window: quick to fill


def readings(device: str, n: int, start: float | None = None, value: float = 0.1) -> list[tuple[str, bytes]]:
    """``n`` readings one second apart, ending about now (the daemon rejects future ones)."""
    t0 = start if start is not None else time.time() - n - 5
    return [
        (f"sensors/{device}/telemetry", orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, value)}))
        for i in range(n)
    ]


def scores_of(sub: Subscriber, device: str | None = None) -> list[dict[str, Any]]:
    docs = [orjson.loads(m.payload) for m in sub.snapshot() if m.topic.endswith("/score")]
    return [d for d in docs if device is None or d["device"] == device]


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    made: list[DaemonProcess] = []
    yield made
    for d in made:
        d.close()


@pytest.fixture
def start_daemon(
    tmp_path: Path, broker: MosquittoBroker, daemons: list[DaemonProcess]
) -> Callable[..., DaemonProcess]:
    def start(model: Path, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"daemon{len(daemons)}", broker, model, **kwargs)
        daemons.append(d)
        return d

    return start


# --------------------------------------------------------------------------- subprocess


def test_sd_notify_ready_watchdog_stopping_and_clean_exit(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    status = Subscriber(broker, ["anomaly/status"])
    try:
        d = start_daemon(tiny_model(window_length=L), env={"WATCHDOG_USEC": "600000"})
        d.wait_ready()
        status.wait_until(lambda ms: ms and ms[-1].payload == b"online", 10, "online")
        assert d.metric("anomalyd_ready") == 1.0
        assert d.metric("anomalyd_mqtt_connected") == 1.0
        # Pings every WATCHDOG_USEC/2 while the (idle) pipeline keeps turning.
        d.notify.wait_for("WATCHDOG=1", 10, at_least=3)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        d.notify.wait_for("STOPPING=1", 5)
        status.wait_until(lambda ms: ms[-1].payload == b"stopped", 10, "stopped")
    finally:
        status.close()
    late = Subscriber(broker, ["anomaly/status"])  # retained: a later subscriber learns it too
    try:
        late.wait_until(lambda ms: len(ms) == 1, 10, "retained status")
        assert (late.snapshot()[0].payload, late.snapshot()[0].retain) == (b"stopped", True)
    finally:
        late.close()
    # READY came after the ordered start: the model was warm, the broker connected.
    log = d.log()
    assert log.index("warm:") < log.index("connected to MQTT broker") < log.index("ready:")


def test_sigterm_under_load_scores_pending_windows_then_publishes_stopped(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    # A huge max_delay and batch keep every window pending in the batcher until the stop.
    d = start_daemon(
        tiny_model(window_length=L),
        sections={
            "batching": {"max_batch": 4096, "max_delay_ms": 600_000.0},
            "shutdown": {"drain_timeout_s": 20.0},
            "output": {"score_interval_s": 0.0},  # a message per window, to count them
        },
    )
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/#"])
    try:
        n_dev, n = 20, 30
        msgs = [m for i in range(n_dev) for m in readings(f"dev-{i}", n)]
        publish_many(broker, msgs)
        d.wait_metric("anomalyd_readings_accepted_total", lambda v: v == n_dev * n, 20)
        assert d.metric("anomalyd_windows_scored_total") == 0.0  # all still pending
        assert d.metric("anomalyd_pending_windows") >= 0
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        expected = n_dev * (n - L + 1)
        sub.wait_until(lambda ms: any(m.payload == b"stopped" for m in ms), 20, "stopped")
        topics = [m.topic for m in sub.snapshot()]
        stopped_at = max(i for i, m in enumerate(sub.snapshot()) if m.payload == b"stopped")
        scores_before_stop = [t for t in topics[:stopped_at] if t.endswith("/score")]
        assert len(scores_before_stop) == expected
    finally:
        sub.close()
    assert "drained:" in d.log()


def test_sighup_with_a_broken_model_keeps_the_old_one_and_a_good_one_is_swapped_in(
    broker: MosquittoBroker,
    start_daemon: Callable[..., DaemonProcess],
    tiny_model: Callable[..., Path],
    tmp_path: Path,
) -> None:
    model = tiny_model("serving.onnx", window_length=L)
    d = start_daemon(model, sections={"batching": {"max_delay_ms": 1.0}})
    d.wait_ready()
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        publish_many(broker, readings("a", L))
        sub.wait_until(lambda ms: len(ms) == 1, 10, "first score")

        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"this is not an onnx file")
        os.replace(broken, model)  # how operators should replace it: atomically
        d.signal(signal.SIGHUP)
        d.wait_metric("anomalyd_model_reloads_total", lambda v: v == 1.0, 20, result="failure")
        d.notify.wait_for("RELOADING=1", 5)
        # still serving the old model
        publish_many(broker, readings("b", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "b")) == 1, 10, "score after failed reload")
        assert scores_of(sub, "b")[0]["model_version"] == "tiny-test-1"
        assert "model reload failed, still serving tiny-test-1" in d.log()

        from tests.helpers.tiny_model import build_tiny_model

        staged = build_tiny_model(
            tmp_path / "staged.onnx", window_length=L, contract_overrides={"model_version": "tiny-test-2"}
        )
        os.replace(staged, model)
        d.signal(signal.SIGHUP)
        d.wait_metric("anomalyd_model_reloads_total", lambda v: v == 1.0, 20, result="success")
        publish_many(broker, readings("c", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "c")) == 1, 10, "score after good reload")
        assert scores_of(sub, "c")[0]["model_version"] == "tiny-test-2"
        info = d.scrape()
        assert any(
            name == "anomalyd_model_info" and ("version", "tiny-test-2") in labels for name, labels in info
        )
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_hostile_payloads_are_counted_and_the_daemon_lives(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    d = start_daemon(tiny_model(window_length=L), sections={"stream": {"max_payload_bytes": 1024}})
    d.wait_ready()
    good = dict.fromkeys(FEATURES, 0.1)
    hostile = [
        ("sensors/x/telemetry", b"{not json"),
        ("sensors/x/telemetry", b"\xff\xfe\x00garbage"),
        ("sensors/x/telemetry", orjson.dumps({"ts": time.time(), "temperature": 1.0})),  # missing
        ("sensors/x/telemetry", orjson.dumps({**good, "pressure": "high"})),
        ("sensors/x/telemetry", b'{"temperature": NaN, "pressure": 1, "vibration": 1}'),
        ("sensors/x/telemetry", orjson.dumps({**good, "ts": "yesterday"})),
        ("sensors/x/telemetry", b"[" + b"1," * 2000 + b"1]"),  # oversized
        ("sensors/x/telemetry", b"[" * 500 + b"]" * 500),  # deep nesting
        ("sensors/bad$id/telemetry", orjson.dumps(good)),
        ("sensors/x/telemetry", b""),
    ]
    publish_many(broker, hostile)
    d.wait_metric("anomalyd_messages_received_total", lambda v: v == len(hostile), 10)
    # not JSON, not UTF-8, nested past any sane depth, empty
    d.wait_metric("anomalyd_rejected_total", lambda v: v == 4, 10, reason=Reason.MALFORMED_JSON.value)
    for reason in (
        Reason.NON_FINITE,
        Reason.MISSING_FEATURE,
        Reason.NON_NUMERIC,
        Reason.BAD_TIMESTAMP,
        Reason.OVERSIZED,
        Reason.BAD_DEVICE_ID,
    ):
        assert d.metric("anomalyd_rejected_total", reason=reason.value) >= 1, reason
    total = sum(v for (name, _), v in d.scrape().items() if name == "anomalyd_rejected_total")
    assert total == len(hostile)  # each message rejected once, none silently dropped
    assert d.proc.poll() is None
    # and it still scores good data
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        publish_many(broker, readings("ok", L))
        sub.wait_until(lambda ms: len(ms) == 1, 10, "score after hostile input")
    finally:
        sub.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_broker_down_at_start_delays_ready(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    broker.stop()
    d = start_daemon(tiny_model(window_length=L))
    d.wait_metric("anomalyd_mqtt_connect_failures_total", lambda v: v >= 2, 20, kind="network")
    assert d.notify.count("READY=1") == 0
    assert d.metric("anomalyd_ready") == 0.0
    broker.start()
    d.wait_ready()
    assert d.metric("anomalyd_ready") == 1.0
    d.signal(signal.SIGINT)
    assert d.wait() == 0


def test_cuda_requested_without_a_gpu_fails_with_exit_69(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.fail("this check needs a machine without CUDA; here CUDA is available")
    d = start_daemon(tiny_model(window_length=L), sections={"model": {"providers": "cuda"}})
    assert d.wait() == 69
    assert "providers = 'cuda' was requested" in d.log()
    assert d.notify.count("READY=1") == 0


def test_bad_model_and_bad_config_exit_codes(
    broker: MosquittoBroker, start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    assert start_daemon(junk).wait() == 65
    assert start_daemon(junk, sections={"mqtt": {"port": "not a port"}}).wait() == 78


# --------------------------------------------------------------------------- in-process


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _service(broker: MosquittoBroker, model: Path, notify: NotifyListener, **overrides: object) -> Service:
    cfg = load_config(
        None,
        {
            "mqtt.host": broker.host,
            "mqtt.port": broker.port,
            "model.path": str(model),
            "metrics.enabled": False,
            "batching.max_delay_ms": 1.0,
            **overrides,
        },
    )
    return Service(cfg, registry=CollectorRegistry(), notifier=Notifier(str(notify.path)))


def test_watchdog_pings_only_while_the_pipeline_makes_progress(
    broker: MosquittoBroker,
    tiny_model: Callable[..., Path],
    notify: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s while healthy
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    svc = _service(broker, tiny_model(window_length=L), notify)
    assert svc.start()
    runner = threading.Thread(target=svc.run_forever, name="test-run")
    runner.start()
    release = threading.Event()
    entered = threading.Event()
    try:
        notify.wait_for("WATCHDOG=1", 10, at_least=2)
        assert svc.model is not None
        real_run = svc.model.run

        def stuck_run(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fault injection
            entered.set()
            release.wait(30)
            return real_run(windows)

        monkeypatch.setattr(svc.model, "run", stuck_run)
        publish_many(broker, readings("w", L))
        assert entered.wait(10)
        # Negative check, so it needs time to pass: the heartbeat goes stale after 0.2 s
        # (one ping may already be on its way), then a healthy daemon would ping ~5 times.
        time.sleep(0.3)
        stalled = notify.count("WATCHDOG=1")
        time.sleep(1.0)
        assert notify.count("WATCHDOG=1") == stalled
        release.set()
        notify.wait_for("WATCHDOG=1", 10, at_least=stalled + 2)  # resumes once unstuck
    finally:
        release.set()
        svc.request_stop()
        runner.join(20)


def test_second_stop_request_forces_exit_130(
    broker: MosquittoBroker, tiny_model: Callable[..., Path], notify: NotifyListener
) -> None:
    svc = _service(broker, tiny_model(window_length=L), notify)
    assert svc.start()
    svc.request_stop()
    svc.request_stop()
    assert svc.run_forever() == EXIT_FORCED
    notify.wait_for("STOPPING=1", 5)


def test_stop_requested_during_start_exits_cleanly(
    broker: MosquittoBroker, tiny_model: Callable[..., Path], notify: NotifyListener
) -> None:
    broker.stop()  # start would wait for the broker forever
    svc = _service(broker, tiny_model(window_length=L), notify)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(svc.start()))
    t.start()
    wait_for(
        lambda: (
            (svc.registry.get_sample_value("anomalyd_mqtt_connect_failures_total", {"kind": "network"}) or 0)
            >= 1
        ),
        10,
        what="start to be waiting for the broker",
    )
    svc.request_stop()
    t.join(15)
    assert result == [False]
    assert svc.shutdown() == 0
    assert notify.count("READY=1") == 0


def test_a_free_metrics_port_is_required(
    broker: MosquittoBroker, tiny_model: Callable[..., Path], notify: NotifyListener
) -> None:
    from anomalyd.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = _service(
            broker, tiny_model(window_length=L), notify, **{"metrics.enabled": True, "metrics.port": port}
        )
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            svc.start()
        svc.shutdown()


def test_a_state_directory_that_cannot_be_searched_is_a_warning_and_the_start_goes_on(
    *,
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Callable[..., Path],
    notify: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    snapshot = state / "snapshot.npz"
    real_is_file = Path.is_file

    # Root (who runs these tests) searches any directory whatever its mode: injected. Python
    # 3.11's is_file() raises this for a directory the daemon's user cannot search.
    def unsearchable(self: Path) -> bool:
        if self == snapshot:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", unsearchable)
    svc = _service(broker, tiny_model(window_length=L), notify, **{"state.directory": str(state)})
    try:
        assert svc.start()
        restores = svc.registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "unreadable"})
        assert restores == 1.0
        assert (
            f"snapshot not used (unreadable): state.directory: cannot read {snapshot}: Permission denied"
            in (caplog.text)
        )
    finally:
        assert svc.shutdown() == 0


def test_credentials_from_systemd_credentials_directory_and_refusal_exit_76(
    tmp_path: Path,
    broker_factory: Callable[..., MosquittoBroker],
    daemons: list[DaemonProcess],
    tiny_model: Callable[..., Path],
) -> None:
    secured = broker_factory(users={"anomalyd": "correct horse"})
    model = tiny_model(window_length=L)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt_password").write_text("correct horse\n")
    good = DaemonProcess(
        tmp_path / "good",
        secured,
        model,
        sections={"mqtt": {"username": "anomalyd", "password_credential": "mqtt_password"}},
        env={"CREDENTIALS_DIRECTORY": str(creds)},
    )
    daemons.append(good)
    good.wait_ready()
    assert "correct horse" not in good.log()
    good.signal(signal.SIGTERM)
    assert good.wait() == 0

    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    bad = DaemonProcess(
        tmp_path / "bad",
        secured,
        model,
        sections={"mqtt": {"username": "anomalyd", "password_file": str(wrong)}},
    )
    daemons.append(bad)
    assert bad.wait() == 76
    assert "refused the connection" in bad.log()
    assert "battery staple" not in bad.log()


def test_the_live_detector_follows_the_detector_section(
    broker: MosquittoBroker, tiny_model: Callable[..., Path], notify: NotifyListener
) -> None:
    """[detector] threshold_scale and adaptive reach the running pipeline, not only replay."""
    model = tiny_model(window_length=L, threshold=1.0)
    svc = _service(
        broker,
        model,
        notify,
        **{
            "detector.threshold_scale": 2.5,
            "detector.adaptive": True,
            "detector.adaptive_min_windows": 5,
            "detector.adaptive_floor": 0.0,  # let the learnt threshold go below the static one
            "output.score_interval_s": 0.0,  # every window's threshold is looked at
        },
    )
    sub = Subscriber(broker, ["anomaly/+/score"])
    assert svc.start()
    runner = threading.Thread(target=svc.run_forever, name="test-run")
    runner.start()
    try:
        assert svc.threshold == pytest.approx(2.5)
        t0, topic = time.time() - 20, "sensors/scaled/telemetry"
        values = np.random.default_rng(3).uniform(0.1, 0.3, 12)
        publish_many(
            broker,
            [
                (topic, orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, float(v))}))
                for i, v in enumerate(values)
            ],
        )
        sub.wait_until(lambda ms: len(scores_of(sub, "scaled")) >= 9, 10, "9 scores")
        docs = scores_of(sub, "scaled")
        # Before the adaptive threshold has learnt 5 windows the static one (1.0 × 2.5) applies.
        assert docs[0]["threshold"] == pytest.approx(2.5)
        # Afterwards the device carries its own learnt threshold (scores here are < 0.1).
        assert all(d["threshold"] < 1.0 for d in docs[6:])
    finally:
        svc.request_stop()
        runner.join(20)
        sub.close()
