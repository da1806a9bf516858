"""Reloading (SIGHUP): the pure comparison of two configurations (``anomalyd.reload``), the
detector reconfigured in place, and the service reading its configuration file and model
again against a real Mosquitto, in process and as the real daemon under a real SIGHUP.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.alerts import OperatorAction
from anomalyd.config import Config, DetectorConfig, load_config
from anomalyd.detector import Detector
from anomalyd.reload import LIVE_KEYS, Change, changed_keys, file_digest, plan_reload
from anomalyd.sdnotify import Notifier
from anomalyd.service import Service
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess, NotifyListener, write_config

FEATURES = ("temperature", "pressure", "vibration")
L = 4  # tiny model window: quick to fill


def _cfg(**overrides: object) -> Config:
    return load_config(None, overrides)


def _keys(changes: tuple[Change, ...]) -> list[str]:
    return [c.key_path for c in changes]


# --------------------------------------------------------------------------- plan_reload


def test_identical_configurations_plan_nothing() -> None:
    running = _cfg(**{"detector.threshold": 2.0, "mqtt.port": 1884})
    plan = plan_reload(running, _cfg(**{"detector.threshold": 2.0, "mqtt.port": 1884}))
    assert plan.unchanged
    assert (plan.live, plan.restart) == ((), ())
    assert plan.config == running


def test_a_detector_change_is_live_and_lands_in_the_resulting_config() -> None:
    running = _cfg()
    new = _cfg(**{"detector.threshold": 3.0, "detector.k_enter": 2, "detector.adaptive": True})
    plan = plan_reload(running, new)
    assert _keys(plan.live) == ["detector.threshold", "detector.k_enter", "detector.adaptive"]
    assert plan.restart == ()
    assert plan.config.detector == new.detector
    assert plan.config == new
    assert plan.live_in("detector")
    assert not plan.live_in("model")
    assert plan.live[0].describe() == "detector.threshold None -> 3.0"


def test_restart_keys_keep_their_running_value_while_the_live_ones_apply() -> None:
    running = _cfg()
    new = _cfg(
        **{
            "mqtt.host": "broker.example",
            "mqtt.port": 1884,
            "batching.max_batch": 32,
            "output.score_topic": "plant/{device}/score",
            "output.include_contributions": False,
            "output.status_topic": "plant/status",
            "output.alert_topic": "plant/{device}/alert",
            "logging.level": "DEBUG",
            "logging.rejection_log_interval_s": 5.0,
            "stream.idle_evict_s": 10.0,
            "stream.max_devices": 5,
            "shutdown.drain_timeout_s": 3.0,
        }
    )
    plan = plan_reload(running, new)
    assert _keys(plan.live) == [
        "stream.idle_evict_s",
        "output.score_topic",
        "output.include_contributions",
        "logging.level",
        "shutdown.drain_timeout_s",
    ]
    assert _keys(plan.restart) == [
        "mqtt.host",
        "mqtt.port",
        "stream.max_devices",
        "batching.max_batch",
        "output.alert_topic",
        "output.status_topic",
        "logging.rejection_log_interval_s",
    ]
    cfg = plan.config
    assert (cfg.mqtt, cfg.batching) == (running.mqtt, running.batching)
    assert (cfg.stream.idle_evict_s, cfg.stream.max_devices) == (10.0, running.stream.max_devices)
    assert (cfg.output.score_topic, cfg.output.include_contributions) == ("plant/{device}/score", False)
    assert (cfg.output.status_topic, cfg.output.alert_topic) == (
        running.output.status_topic,
        "anomaly/{device}/alert",
    )
    assert (cfg.logging.level, cfg.logging.rejection_log_interval_s) == ("DEBUG", 10.0)
    assert cfg.shutdown.drain_timeout_s == 3.0
    # The merged configuration is one the validation accepts as it stands.
    assert Config.model_validate(cfg.model_dump()) == cfg
    # Reloading the same file again: nothing more is live, the restart keys still wait.
    again = plan_reload(cfg, new)
    assert again.live == ()
    assert _keys(again.restart) == _keys(plan.restart)


def test_a_table_that_appears_is_one_key_path_and_tables_in_both_compare_key_by_key() -> None:
    plain = _cfg()
    tls = _cfg(**{"mqtt.tls": {}})
    assert changed_keys(plain, tls) == ["mqtt.tls"]
    assert _keys(plan_reload(plain, tls).restart) == ["mqtt.tls"]
    insecure = _cfg(**{"mqtt.tls": {"insecure": True}})
    assert changed_keys(tls, insecure) == ["mqtt.tls.insecure"]
    assert changed_keys(_cfg(), _cfg(**{"batching.warmup_batch_sizes": [1, 8]})) == [
        "batching.warmup_batch_sizes"
    ]


def test_the_model_file_and_its_session_options_are_live_its_inference_threads_are_not(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(b"")  # any path: nothing is loaded here
    new = _cfg(
        **{
            "model.path": str(other),
            "model.providers": "cpu",
            "model.intra_op_threads": 2,
            "model.allow_spinning": True,
            "model.concurrent_batches": 4,
        }
    )
    plan = plan_reload(_cfg(), new)
    assert _keys(plan.live) == [
        "model.path",
        "model.providers",
        "model.intra_op_threads",
        "model.allow_spinning",
    ]
    assert _keys(plan.restart) == ["model.concurrent_batches"]
    assert plan.live_in("model")
    assert plan.config.model.path == other
    assert plan.config.model.concurrent_batches == _cfg().model.concurrent_batches


def test_every_live_key_names_a_key_of_the_configuration() -> None:
    for key_path in LIVE_KEYS:
        node: Any = Config
        for part in key_path.split("."):
            assert part in node.model_fields, key_path
            node = node.model_fields[part].annotation


def test_changes_describe_paths_plainly_and_shorten_long_values() -> None:
    assert Change("model.path", Path("/a/m.onnx"), Path("/b/m.onnx")).describe() == (
        "model.path /a/m.onnx -> /b/m.onnx"
    )
    text = Change("stream.device_id_pattern", "x", "y" * 200).describe()
    assert text.startswith("stream.device_id_pattern 'x' -> 'yyy")
    assert text.endswith("...")
    assert len(text) < 140


def test_file_digest_follows_the_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"model one")
    b.write_bytes(b"model one")
    c.write_bytes(b"model two")
    assert file_digest(a) == file_digest(b) != file_digest(c)
    assert file_digest(tmp_path / "missing") is None


# --------------------------------------------------------------------------- Detector.reconfigure


def _decide(det: Detector, device: str, scores: list[float], t0: float = 0.0) -> list[Any]:
    n = len(scores)
    return det.update(
        [device] * n,
        np.arange(t0, t0 + n, dtype=np.float64),
        np.asarray(scores, np.float32),
        np.zeros((n, 3), np.float32),
        np.zeros(n, np.bool_),
    )


def test_reconfigure_keeps_alerts_and_hysteresis_and_applies_from_the_next_window() -> None:
    det = Detector.from_config(DetectorConfig(k_enter=1, k_exit=3), contract_threshold=1.0)
    _decide(det, "hot", [5.0])
    _decide(det, "cool", [0.5])
    assert det.alert_state("hot")
    assert not det.alert_state("cool")
    det.reconfigure(DetectorConfig(threshold=10.0, k_enter=2, k_exit=1), contract_threshold=1.0)
    assert det.threshold == 10.0
    assert det.alert_state("hot")  # kept until a window decides otherwise
    record = det.record("hot")
    assert record is not None
    assert record.state == "anomalous"
    (d,) = _decide(det, "hot", [5.0], t0=1.0)
    assert (d.threshold, d.anomaly, d.alert, d.alert_changed) == (10.0, False, False, True)  # k_exit = 1
    # threshold unset again: the contract's, times the new scale
    det.reconfigure(DetectorConfig(threshold_scale=2.0), contract_threshold=1.0)
    assert (det.base_threshold, det.threshold) == (1.0, 2.0)


def test_reconfigure_keeps_what_the_adaptive_threshold_learnt_and_recomputes_it() -> None:
    cfg = DetectorConfig(adaptive=True, adaptive_min_windows=5, adaptive_floor=0.0, adaptive_k=1.0)
    det = Detector.from_config(cfg, contract_threshold=1.0)
    _decide(det, "d", list(np.random.default_rng(1).uniform(0.05, 0.15, 20)))
    learnt = det.device_threshold("d")
    assert learnt < 1.0  # its own threshold, below the static one (floor 0)
    det.reconfigure(cfg.model_copy(update={"adaptive_k": 3.0}), contract_threshold=1.0)
    assert learnt < det.device_threshold("d") < 1.0  # same statistics, more standard deviations
    (state,) = det.export_state()
    assert state["learnt"] == 20
    det.reconfigure(cfg.model_copy(update={"adaptive_min_windows": 50}), contract_threshold=1.0)
    assert det.device_threshold("d") == 1.0  # not warmed up under the new minimum: static
    det.reconfigure(cfg.model_copy(update={"adaptive": False}), contract_threshold=1.0)
    assert det.device_threshold("d") == 1.0
    assert det.export_state()[0]["learnt"] == 0


def test_turning_adaptive_off_ends_a_rebaseline_so_that_alerts_come_back() -> None:
    cfg = DetectorConfig(adaptive=True, adaptive_min_windows=50, k_enter=2)
    det = Detector.from_config(cfg, contract_threshold=1.0)
    _decide(det, "d", [0.1, 0.1])
    det.rebaseline("d", OperatorAction("rebaseline", "op", "new pump", 0.0))
    assert not any(d.alert for d in _decide(det, "d", [5.0] * 5, t0=2.0))  # re-baselining: no alert
    det.reconfigure(cfg.model_copy(update={"adaptive": False}), contract_threshold=1.0)
    decisions = _decide(det, "d", [5.0, 5.0], t0=7.0)
    assert [d.alert for d in decisions] == [False, True]


def test_another_smoothing_restarts_the_smoothing_and_what_was_learnt() -> None:
    cfg = DetectorConfig(smoothing="ewma", ewma_alpha=0.5, adaptive=True, adaptive_min_windows=3)
    det = Detector.from_config(cfg, contract_threshold=1.0)
    _decide(det, "d", [0.2, 0.4, 0.2, 0.4])
    det.reconfigure(cfg.model_copy(update={"ewma_alpha": 0.25}), contract_threshold=1.0)
    (kept,) = det.export_state()
    assert kept["smoothed"] is not None
    assert kept["learnt"] == 4
    det.reconfigure(cfg.model_copy(update={"smoothing": "none"}), contract_threshold=1.0)
    (reset,) = det.export_state()
    assert (reset["smoothed"], reset["learnt"], reset["adaptive"]) == (None, 0, None)
    (d,) = _decide(det, "d", [0.8], t0=4.0)
    assert d.smoothed == pytest.approx(0.8)  # no smoothing, no trace of the EWMA


def test_a_detector_config_the_detector_refuses_changes_nothing() -> None:
    det = Detector.from_config(DetectorConfig(threshold=2.0), contract_threshold=1.0)
    bad = DetectorConfig.model_construct(**{**DetectorConfig().model_dump(), "ewma_alpha": 2.0})
    with pytest.raises(ValueError, match="ewma_alpha"):
        det.reconfigure(bad, contract_threshold=1.0)
    assert (det.threshold, det.ewma_alpha) == (2.0, 0.3)


# --------------------------------------------------------------------------- the service, in process


def readings(device: str, n: int, value: float = 0.1) -> list[tuple[str, bytes]]:
    """``n`` readings one second apart, ending about now (the daemon rejects future ones)."""
    t0 = time.time() - n - 5
    return [
        (f"sensors/{device}/telemetry", orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, value)}))
        for i in range(n)
    ]


def scores_of(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    docs = [orjson.loads(m.payload) for m in sub.snapshot()]
    return [d for d in docs if d.get("device") == device and "score" in d]


class Running:
    """A started service with the configuration file it was loaded from."""

    def __init__(self, service: Service, path: Path, sections: dict[str, dict[str, Any]]) -> None:
        self.service = service
        self.path = path
        self.sections = sections

    def rewrite(self, **changes: dict[str, Any]) -> None:
        """Write the file again with ``changes`` merged into its sections."""
        sections = {name: dict(keys) for name, keys in self.sections.items()}
        for name, keys in changes.items():
            sections.setdefault(name, {}).update(keys)
        write_config(self.path, sections)

    def count(self, metric: str, result: str) -> float:
        return self.service.registry.get_sample_value(f"anomalyd_{metric}_total", {"result": result}) or 0.0

    def reload(self, result: str = "success") -> None:
        """Request a reload and wait until it is counted with ``result``."""
        before = self.count("config_reloads", result)
        self.service.request_reload()
        wait_for(lambda: self.count("config_reloads", result) == before + 1, 30, what=f"a reload ({result})")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.fixture
def start_service(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Callable[..., Path], notify: NotifyListener
) -> Iterator[Callable[..., Running]]:
    started: list[tuple[Service, threading.Thread]] = []

    def start(
        sections: dict[str, dict[str, Any]] | None = None, overrides: dict[str, object] | None = None
    ) -> Running:
        base: dict[str, dict[str, Any]] = {
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05},
            "model": {"path": str(tiny_model("serving.onnx", window_length=L))},
            "metrics": {"enabled": False},
            "batching": {"max_delay_ms": 1.0},
            "output": {"score_interval_s": 0.0},
        }
        for name, keys in (sections or {}).items():
            base.setdefault(name, {}).update(keys)
        path = write_config(tmp_path / "anomalyd.toml", base)
        cfg = load_config(path, overrides)
        svc = Service(
            cfg,
            registry=CollectorRegistry(),
            notifier=Notifier(str(notify.path)),
            config_path=path,
            overrides=overrides,
        )
        assert svc.start()
        runner = threading.Thread(target=svc.run_forever, name="test-run")
        runner.start()
        started.append((svc, runner))
        return Running(svc, path, base)

    yield start
    for svc, runner in started:
        svc.request_stop()
        runner.join(30)


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_changed_threshold_is_in_force_after_a_reload_and_logged(
    start_service: Callable[..., Running], broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run = start_service({"detector": {"threshold": 2.0}})
    svc = run.service
    serving = svc.model
    assert svc.threshold == 2.0
    run.rewrite(detector={"threshold": 3.5})
    run.reload()
    assert svc.threshold == 3.5
    assert svc.config.detector.threshold == 3.5
    assert svc.registry.get_sample_value("anomalyd_model_threshold") == 3.5
    assert any("reload: applied detector.threshold 2.0 -> 3.5" in m for m in _messages(caplog, logging.INFO))
    # The model file did not change: it is not loaded again.
    assert svc.model is serving
    assert run.count("model_reloads", "success") == 0
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        publish_many(broker, readings("after", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "after")) == 1, 10, "a score after the reload")
        assert scores_of(sub, "after")[0]["threshold"] == 3.5
    finally:
        sub.close()


def test_a_reload_without_changes_says_so_and_counts_a_success(
    start_service: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run = start_service()
    serving, config = run.service.model, run.service.config
    run.reload()
    infos = _messages(caplog, logging.INFO)
    assert any(m.startswith("reload: nothing changed") for m in infos)
    assert not any(m.startswith("reload: applied") for m in infos)
    assert run.service.model is serving
    assert run.service.config is config
    assert run.count("model_reloads", "success") == 0


def test_a_broken_toml_file_keeps_the_running_configuration(
    start_service: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    run = start_service({"detector": {"threshold": 2.0}})
    config = run.service.config
    run.path.write_text("[detector]\nthreshold = 3.0\n[mqtt\n")
    run.reload("failure")
    (error,) = _messages(caplog, logging.ERROR)
    assert error.startswith(
        "configuration reload failed, still serving tiny-test-1 with the running configuration"
    )
    assert "is not valid TOML" in error
    assert run.service.config is config
    assert run.service.threshold == 2.0
    assert run.count("config_reloads", "success") == 0
    assert run.count("model_reloads", "failure") == 0  # the model was not tried


def test_an_unknown_key_or_a_bad_value_is_named_and_nothing_of_the_file_applies(
    start_service: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    run = start_service({"detector": {"threshold": 2.0}})
    config = run.service.config
    # A good change beside the bad key: it must not apply either.
    run.rewrite(detector={"treshold": 3.0, "k_enter": 7})
    run.reload("failure")
    run.rewrite(detector={"threshold": "high"})
    run.reload("failure")
    unknown, bad = _messages(caplog, logging.ERROR)
    assert "detector.treshold: unknown key" in unknown
    assert "did you mean 'threshold'?" in unknown
    assert str(run.path) in unknown
    assert "detector.threshold: expected a valid number" in bad
    assert run.service.config is config
    assert (run.service.threshold, run.service.config.detector.k_enter) == (2.0, 3)


def test_a_broken_model_file_keeps_the_old_model_and_the_running_configuration(
    start_service: Callable[..., Running],
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = start_service({"detector": {"threshold": 2.0}})
    svc = run.service
    serving, config = svc.model, svc.config
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx file")
    run.rewrite(model={"path": str(broken)}, detector={"threshold": 3.0})
    run.reload("failure")
    assert run.count("model_reloads", "failure") == 1
    (error,) = _messages(caplog, logging.ERROR)
    assert error.startswith("model reload failed, still serving tiny-test-1 with the running configuration")
    assert str(broken) in error
    assert svc.model is serving
    assert svc.config is config
    assert svc.threshold == 2.0  # all or nothing: the threshold beside the model waits too
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        publish_many(broker, readings("still", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "still")) == 1, 10, "a score from the old model")
        doc = scores_of(sub, "still")[0]
        assert (doc["model_version"], doc["threshold"]) == ("tiny-test-1", 2.0)
    finally:
        sub.close()


def test_a_new_model_path_is_loaded_warmed_and_swapped_in(
    start_service: Callable[..., Running],
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.helpers.tiny_model import build_tiny_model

    caplog.set_level(logging.INFO)
    run = start_service()
    newer = build_tiny_model(
        tmp_path / "newer.onnx",
        window_length=L,
        threshold=4.0,
        contract_overrides={"model_version": "tiny-test-2"},
    )
    run.rewrite(model={"path": str(newer)})
    run.reload()
    svc = run.service
    assert svc.model is not None
    assert svc.model.contract.model_version == "tiny-test-2"
    assert svc.threshold == 4.0  # the new contract's (no threshold configured)
    assert run.count("model_reloads", "success") == 1
    assert "model reloaded: now serving tiny-test-2" in _messages(caplog, logging.INFO)
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        publish_many(broker, readings("new", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "new")) == 1, 10, "a score from the new model")
        assert scores_of(sub, "new")[0]["model_version"] == "tiny-test-2"
    finally:
        sub.close()


def test_keys_that_need_a_restart_are_logged_one_each_and_the_rest_still_applies(
    start_service: Callable[..., Running], broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run = start_service({"detector": {"threshold": 2.0}})
    svc = run.service
    run.rewrite(
        mqtt={"port": broker.port + 1, "keepalive_s": 60},
        detector={"threshold": 3.0},
        output={"score_topic": "plant/{device}/score", "include_contributions": False},
    )
    run.reload()
    warnings = [m for m in _messages(caplog, logging.WARNING) if "needs a restart" in m]
    stays = "(the running value stays until then)"
    assert warnings == [
        f"reload: needs a restart: mqtt.port {broker.port} -> {broker.port + 1} {stays}",
        f"reload: needs a restart: mqtt.keepalive_s 30 -> 60 {stays}",
    ]
    assert (svc.config.mqtt.port, svc.config.mqtt.keepalive_s) == (broker.port, 30)
    assert svc.threshold == 3.0
    # Still connected to the running broker, publishing where the new [output] says.
    sub = Subscriber(broker, ["plant/+/score", "anomaly/+/score"])
    try:
        publish_many(broker, readings("moved", L))
        sub.wait_until(lambda ms: len(scores_of(sub, "moved")) == 1, 10, "a score on the new topic")
        (msg,) = [m for m in sub.snapshot() if b"moved" in m.payload]
        assert msg.topic == "plant/moved/score"
        doc = orjson.loads(msg.payload)
        assert doc["threshold"] == 3.0
        assert "contributions" not in doc
    finally:
        sub.close()


def test_overrides_given_at_start_stay_on_top_of_the_reloaded_file(
    start_service: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run = start_service({"detector": {"threshold": 2.0}}, overrides={"detector.threshold": 5.0})
    assert run.service.threshold == 5.0
    run.rewrite(detector={"threshold": 3.0, "k_enter": 4})
    run.reload()
    assert run.service.threshold == 5.0
    assert run.service.config.detector.k_enter == 4
    assert any(m == "reload: applied detector.k_enter 3 -> 4" for m in _messages(caplog, logging.INFO))


# --------------------------------------------------------------------------- the real daemon


def test_sighup_to_the_daemon_rereads_its_configuration_file(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Callable[..., Path]
) -> None:
    d = DaemonProcess(
        tmp_path / "daemon", broker, tiny_model(window_length=L), sections={"detector": {"threshold": 2.0}}
    )
    try:
        d.wait_ready()
        assert d.metric("anomalyd_model_threshold") == 2.0
        sections = tomllib.loads(d.config_path.read_text())
        sections["detector"]["threshold"] = 3.0
        sections["logging"]["format"] = "json"
        write_config(d.config_path, sections)
        d.signal(signal.SIGHUP)
        d.wait_metric("anomalyd_config_reloads_total", lambda v: v == 1.0, 30, result="success")
        d.notify.wait_for("RELOADING=1", 5)
        d.notify.wait_for("READY=1", 5, at_least=2)
        assert d.metric("anomalyd_model_threshold") == 3.0
        # Text lines until the reload, JSON lines from then on, as the reloaded [logging] says.
        lines = d.log().splitlines()
        assert not lines[0].startswith("{")
        messages = [orjson.loads(line)["message"] for line in lines if line.startswith("{")]
        assert "reload: applied detector.threshold 2.0 -> 3.0; logging.format 'text' -> 'json'" in messages
        assert any(m.startswith("reload done:") and "static threshold 3" in m for m in messages)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()
