"""End to end: one daemon serves two models (``[[models]]``), each device routed by its id.

Two tiny models with different windows and feature lists: ``pump-*`` devices go to model
``pumps`` (3 features, window 8), ``fan-*`` devices to model ``fans`` (1 feature, window
4). A real daemon process on a real broker: both sets of devices get scores with their
model's contributions, a device no model takes is rejected as ``no_model``, the per-model
metrics carry both names, ``/readyz`` checks both models, a reload after one model's
file changed loads that model only while the other keeps serving, and a restart with a
state directory resumes each model's devices from that model's own snapshot file.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import MosquittoBroker, Received, Subscriber, free_port, publish_many, wait_for
from tests.daemon_process import NotifyListener

PUMP_FEATURES = ("temperature", "pressure", "vibration")
FAN_FEATURES = ("vibration",)
PUMP_WINDOW, FAN_WINDOW = 8, 4

_Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MultiModelDaemon:
    """``anomalyd run --config FILE`` with a ``[[models]]`` configuration."""

    def __init__(self, workdir: Path, broker: MosquittoBroker, models_toml: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port()
        self.config_path = workdir / "anomalyd.toml"
        self.config_path.write_text(
            f"""
[mqtt]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.05
reconnect_max_s = 0.5
client_id = "anomalyd-test-multi"

[output]
score_interval_s = 0.0

[metrics]
port = {self.metrics_port}

[logging]
level = "INFO"
rejection_log_interval_s = 1.0
{models_toml}
"""
        )
        self.notify = NotifyListener(workdir / "notify.sock")
        self.log_path = workdir / "daemon.log"
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anomalyd", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"daemon not ready; exit={self.proc.poll()} log:\n{self.log()}") from None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> _Samples:
        out: _Samples = {}
        for fam in text_string_to_metric_families(self.get("/metrics")[1]):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(
        self, name: str, predicate: Callable[[float], bool], timeout: float, **labels: str
    ) -> float:
        def check() -> tuple[float] | None:
            value = self.metric(name, **labels)
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited; log:\n{self.log()[-3000:]}")
            return (value,) if predicate(value) else None  # a tuple: 0.0 is a value too

        try:
            found = wait_for(check, timeout, interval=0.05, what=f"{name}{labels}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; {name}{labels} = {self.metric(name, **labels)}; log:\n{self.log()[-3000:]}"
            ) from None
        assert found is not None  # wait_for returns only a truthy value
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self.notify.close()


def _readings(device: str, features: tuple[str, ...], start: float, n: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{device}/telemetry",
            orjson.dumps({"ts": start + i, **dict.fromkeys(features, 0.1 * (i % 3))}),
        )
        for i in range(n)
    ]


@pytest.fixture
def two_models(tmp_path: Path, tiny_model: Callable[..., Path]) -> tuple[Path, Path]:
    pumps = tiny_model(
        "pumps.onnx",
        window_length=PUMP_WINDOW,
        features=PUMP_FEATURES,
        contract_overrides={"model_version": "pumps-1"},
    )
    fans = tiny_model(
        "fans.onnx",
        window_length=FAN_WINDOW,
        features=FAN_FEATURES,
        contract_overrides={"model_version": "fans-1"},
    )
    return pumps, fans


@pytest.fixture
def daemon(
    tmp_path: Path, broker: MosquittoBroker, two_models: tuple[Path, Path]
) -> Iterator[MultiModelDaemon]:
    pumps, fans = two_models
    d = MultiModelDaemon(
        tmp_path / "daemon",
        broker,
        f"""
[[models]]
name = "pumps"
path = "{pumps}"
devices = ["pump-*"]
concurrent_batches = 1

[[models]]
name = "fans"
path = "{fans}"
devices = ["fan-*"]

[models.detector]
k_enter = 1
""",
    )
    try:
        yield d
    finally:
        d.close()


def test_two_models_score_their_own_devices_and_reload_one_at_a_time(
    tmp_path: Path,
    broker: MosquittoBroker,
    daemon: MultiModelDaemon,
    tiny_model: Callable[..., Path],
) -> None:
    d = daemon
    d.wait_ready()
    status, body = d.get("/readyz?verbose")
    assert status == 200, body
    assert "[+]model_loaded:pumps ok" in body
    assert "[+]model_loaded:fans ok" in body
    assert "model_loaded:pumps" in body
    assert "model_loaded:fans" in body

    n = 12
    # Recent readings: old ones would make the daemon overloaded (data lag), not ready.
    t0 = math.floor(time.time()) - n - 3
    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        messages = (
            _readings("pump-1", PUMP_FEATURES, t0, n)
            + _readings("fan-1", FAN_FEATURES, t0, n)
            + _readings("fan-2", FAN_FEATURES, t0, n)
            + _readings("valve-1", PUMP_FEATURES, t0, 3)  # matched by no model
        )
        publish_many(broker, messages)
        pump_windows, fan_windows = n - PUMP_WINDOW + 1, 2 * (n - FAN_WINDOW + 1)
        d.wait_metric("anomalyd_model_windows_scored_total", lambda v: v == pump_windows, 60, model="pumps")
        d.wait_metric("anomalyd_model_windows_scored_total", lambda v: v == fan_windows, 60, model="fans")
        sub.wait_until(lambda ms: len(ms) >= pump_windows + fan_windows, 60, "every score")
        scores = [orjson.loads(m.payload) for m in sub.snapshot()]
    finally:
        sub.close()

    by_device: dict[str, list[dict[str, object]]] = {}
    for s in scores:
        by_device.setdefault(str(s["device"]), []).append(s)
    assert set(by_device) == {"pump-1", "fan-1", "fan-2"}
    for s in by_device["pump-1"]:
        assert s["model_version"] == "pumps-1"
        assert list(s["contributions"]) == list(PUMP_FEATURES)  # type: ignore[call-overload]
    for dev in ("fan-1", "fan-2"):
        for s in by_device[dev]:
            assert s["model_version"] == "fans-1"
            assert list(s["contributions"]) == list(FAN_FEATURES)  # type: ignore[call-overload]

    # The gauges follow at the next housekeeping round (about a second).
    d.wait_metric("anomalyd_devices_tracked", lambda v: v == 3, 30)
    m = d.scrape()
    assert m[("anomalyd_rejected_total", (("reason", "no_model"),))] == 3
    assert m[("anomalyd_rejected_total", (("reason", "ambiguous_model"),))] == 0
    assert m[("anomalyd_windows_scored_total", ())] == pump_windows + fan_windows
    assert m[("anomalyd_model_devices_tracked", (("model", "pumps"),))] == 1
    assert m[("anomalyd_model_devices_tracked", (("model", "fans"),))] == 2
    assert m[("anomalyd_model_inference_seconds_count", (("model", "pumps"),))] > 0
    assert m[("anomalyd_model_inference_seconds_count", (("model", "fans"),))] > 0
    infos = {labels: v for (name, labels), v in m.items() if name == "anomalyd_served_model_info"}
    versions = {dict(labels)["model"]: dict(labels)["version"] for labels in infos}
    assert versions == {"pumps": "pumps-1", "fans": "fans-1"}
    assert "rejected (no_model)" in d.log()
    assert "valve-1" in d.log()

    # ---- a new fans model file: the reload loads it alone; pumps keep serving
    tiny_model(
        "fans.onnx",
        window_length=FAN_WINDOW,
        features=FAN_FEATURES,
        contract_overrides={"model_version": "fans-2"},
    )
    d.proc.send_signal(signal.SIGHUP)
    d.wait_metric("anomalyd_model_reloads_total", lambda v: v == 1, 60, result="success")
    log = d.log()
    assert "model fans reloaded: now serving fans-2" in log
    assert "model pumps reloaded" not in log
    reloaded = {labels for (name, labels), _v in d.scrape().items() if name == "anomalyd_served_model_info"}
    assert {dict(labels)["model"]: dict(labels)["version"] for labels in reloaded} == {
        "pumps": "pumps-1",
        "fans": "fans-2",
    }

    sub = Subscriber(broker, ["anomaly/+/score"])
    try:
        t1 = max(t0 + n, math.floor(time.time()) - 3)
        publish_many(
            broker, _readings("pump-1", PUMP_FEATURES, t1, 3) + _readings("fan-1", FAN_FEATURES, t1, 3)
        )
        # The pumps' windows go on (the device's window was kept); fan-1's window is kept as
        # well (same shape), so each reading scores one window on each.
        d.wait_metric(
            "anomalyd_model_windows_scored_total", lambda v: v == pump_windows + 3, 60, model="pumps"
        )
        sub.wait_until(
            lambda ms: sum(1 for x in ms if x.topic == "anomaly/fan-1/score") >= 3, 60, "fan-1's new scores"
        )
        newer = [orjson.loads(x.payload) for x in sub.snapshot()]
    finally:
        sub.close()
    assert {s["model_version"] for s in newer if s["device"] == "fan-1"} == {"fans-2"}
    assert {s["model_version"] for s in newer if s["device"] == "pump-1"} == {"pumps-1"}
    status, body = d.get("/readyz")
    assert status == 200, body

    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0, d.log()[-3000:]


# The tiny model scores a window by the squares of its newest reading: HOT is anomalous
# (far above the threshold of 1), COLD normal.
HOT, COLD = 10.0, 0.1


def _valued(
    device: str, features: tuple[str, ...], start: float, values: list[float]
) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/{device}/telemetry", orjson.dumps({"ts": start + i, **dict.fromkeys(features, v)}))
        for i, v in enumerate(values)
    ]


def _alert_states(messages: list[Received], device: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if m.topic == f"anomaly/{device}/alert" and m.payload]


def _retained_state(broker: MosquittoBroker, device: str) -> dict[str, Any]:
    """What a new subscriber is told: the retained alert message itself."""
    sub = Subscriber(broker, [f"anomaly/{device}/alert"])
    try:
        sub.wait_until(lambda ms: len(ms) > 0, 10, f"retained state of {device}")
        first = sub.snapshot()[0]
        assert first.retain
        return dict(orjson.loads(first.payload))
    finally:
        sub.close()


def test_a_restart_resumes_each_models_devices_from_its_own_snapshot(
    tmp_path: Path, broker: MosquittoBroker, two_models: tuple[Path, Path]
) -> None:
    pumps, fans = two_models
    state = tmp_path / "state"
    models_toml = f"""
[state]
directory = "{state}"

[detector]
k_enter = 2
k_exit = 2

[[models]]
name = "pumps"
path = "{pumps}"
devices = ["pump-*"]

[[models]]
name = "fans"
path = "{fans}"
devices = ["fan-*"]
"""
    # Recent readings: old ones would make the daemon overloaded (data lag), not ready.
    t0 = math.floor(time.time()) - 30
    pump_sent, fan_sent = PUMP_WINDOW + 3, FAN_WINDOW + 3
    first = MultiModelDaemon(tmp_path / "first", broker, models_toml)
    alerts = Subscriber(broker, ["anomaly/+/alert"])
    try:
        first.wait_ready()
        publish_many(
            broker,
            _valued("pump-1", PUMP_FEATURES, t0, [COLD] * PUMP_WINDOW + [HOT] * 3)
            + _valued("fan-1", FAN_FEATURES, t0, [COLD] * FAN_WINDOW + [HOT] * 3),
        )
        for device in ("pump-1", "fan-1"):
            alerts.wait_until(
                lambda ms, d=device: any(s["state"] == "anomalous" for s in _alert_states(ms, d)),
                30,
                f"{device} anomalous",
            )
        raised = {
            device: next(s for s in _alert_states(alerts.snapshot(), device) if s["state"] == "anomalous")
            for device in ("pump-1", "fan-1")
        }
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0, first.log()[-3000:]
    finally:
        alerts.close()
        first.close()
    assert "state directory ignored" not in first.log()
    # One file per model; the single-model file name is not used.
    assert sorted(p.name for p in state.iterdir()) == ["snapshot-fans.npz", "snapshot-pumps.npz"]
    for device in ("pump-1", "fan-1"):
        # Not unknown (stopped): the next start resumes it.
        assert _retained_state(broker, device)["state"] == "anomalous"

    second = MultiModelDaemon(tmp_path / "second", broker, models_toml)
    scores = Subscriber(broker, ["anomaly/+/score"])
    alerts = Subscriber(broker, ["anomaly/+/alert"])
    try:
        second.wait_ready()
        assert second.metric("anomalyd_snapshot_restores_total", result="restored") == 2.0
        assert second.metric("anomalyd_snapshot_restores_total", result="missing") == 0.0
        # One reading each: their windows are already full, so each is scored at once.
        publish_many(
            broker,
            _valued("pump-1", PUMP_FEATURES, t0 + pump_sent, [HOT])
            + _valued("fan-1", FAN_FEATURES, t0 + fan_sent, [HOT]),
        )
        scores.wait_until(lambda ms: len(ms) == 2, 30, "a score for each first reading after the restart")
        by_device = {str(d["device"]): d for d in (orjson.loads(m.payload) for m in scores.snapshot())}
        assert by_device["pump-1"]["ts"] == t0 + pump_sent
        assert by_device["pump-1"]["model_version"] == "pumps-1"
        assert by_device["fan-1"]["ts"] == t0 + fan_sent
        assert by_device["fan-1"]["model_version"] == "fans-1"
        assert by_device["pump-1"]["alert"] is True
        assert by_device["fan-1"]["alert"] is True
        for device in ("pump-1", "fan-1"):
            # The same episode, re-asserted on connect: the alert state resumed.
            doc = _retained_state(broker, device)
            assert (doc["state"], doc["since"]) == ("anomalous", raised[device]["since"])
        assert all(
            s["state"] != "unknown" for d in ("pump-1", "fan-1") for s in _alert_states(alerts.snapshot(), d)
        )
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0, second.log()[-3000:]
    finally:
        scores.close()
        alerts.close()
        second.close()


def test_inspect_model_prints_every_model_of_the_configuration(
    tmp_path: Path, two_models: tuple[Path, Path]
) -> None:
    pumps, fans = two_models
    config = tmp_path / "multi.toml"
    config.write_text(
        f'[[models]]\nname = "pumps"\npath = "{pumps}"\ndevices = ["pump-*"]\n\n'
        f'[[models]]\nname = "fans"\npath = "{fans}"\ndevices = ["fan-*", "blower-?"]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "anomalyd", "inspect-model", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "model 'pumps'" in out.stdout
    assert "model 'fans'" in out.stdout
    assert "devices fan-*, blower-?" in out.stdout
    assert "pumps-1" in out.stdout
    assert "fans-1" in out.stdout
    assert out.stdout.count("graph check     OK") == 2
    assert json.dumps(str(pumps))[1:-1] in out.stdout


# ---------------------------------------------------------------------------- configuration, routing


def _models_config(tmp_path: Path, text: str) -> list[str]:
    from anomalyd.config import config_errors

    path = tmp_path / "c.toml"
    path.write_text(text)
    return [str(e) for e in config_errors(path)]


def test_model_and_models_together_is_a_config_error(tmp_path: Path) -> None:
    errors = _models_config(
        tmp_path, '[model]\npath = "a.onnx"\n\n[[models]]\nname = "a"\npath = "a.onnx"\ndevices = ["x*"]\n'
    )
    assert any("[model] and [[models]] do not go together" in e for e in errors), errors


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ('name = "a"\npath = "a.onnx"\ndevices = ["x*"]', "named 'a'"),
        (
            'name = "b"\npath = "b.onnx"\ndevices = ["x*"]',
            "'x*' (model 'a') and 'x*' (model 'b') both match 'x'",
        ),
        (
            'name = "b"\npath = "b.onnx"\ndevices = ["y*", "*7"]',
            "'x*' (model 'a') and '*7' (model 'b') both match 'x7'",
        ),
        ('name = "B c"\npath = "b.onnx"\ndevices = ["y*"]', "models[1].name"),
        ('name = "b"\npath = "b.onnx"\ndevices = []', "models[1].devices"),
    ],
)
def test_bad_models_entries_are_config_errors(tmp_path: Path, entries: str, expected: str) -> None:
    first = '[[models]]\nname = "a"\npath = "a.onnx"\ndevices = ["x*"]\n\n'
    errors = _models_config(tmp_path, first + "[[models]]\n" + entries + "\n")
    assert any(expected in e for e in errors), errors


def test_models_detector_inherits_the_keys_it_does_not_set(tmp_path: Path) -> None:
    from anomalyd.config import load_config, model_entries

    path = tmp_path / "c.toml"
    path.write_text(
        "[detector]\nk_exit = 7\nthreshold_scale = 2.0\n\n"
        '[[models]]\nname = "a"\npath = "a.onnx"\ndevices = ["x*"]\n\n'
        "[models.detector]\nthreshold_scale = 3.0\n\n"
        '[[models]]\nname = "b"\npath = "b.onnx"\ndevices = ["y*"]\n'
    )
    cfg = load_config(path)
    entries = model_entries(cfg)
    assert entries is not None
    a, b = (cfg.for_model(e) for e in entries)
    assert (a.detector.k_exit, a.detector.threshold_scale) == (7, 3.0)
    assert (b.detector.k_exit, b.detector.threshold_scale) == (7, 2.0)
    assert a.model.path == tmp_path / "a.onnx"  # relative to the file, as [model] path is
    assert model_entries(a) is None


def test_a_device_two_models_match_is_rejected_as_ambiguous(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    from prometheus_client import CollectorRegistry

    from anomalyd.config import load_config
    from anomalyd.decode import RawMessage
    from anomalyd.metrics import Metrics
    from anomalyd.model import load_model
    from anomalyd.routing import ModelRouter

    pumps = tiny_model("p.onnx", window_length=PUMP_WINDOW, features=PUMP_FEATURES)
    fans = tiny_model("f.onnx", window_length=FAN_WINDOW, features=FAN_FEATURES)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[[models]]\nname = "pumps"\npath = "{pumps}"\ndevices = ["pump-*"]\n\n'
        f'[[models]]\nname = "odd"\npath = "{fans}"\ndevices = ["fan-*"]\n'
    )
    # Overlapping globs are refused when the file loads (test_bad_models_entries_are_config_errors);
    # the router's own rule is the last line of defence, so it is tested on a configuration
    # changed after validation.
    valid = load_config(path)
    entries = valid.models  # type: ignore[attr-defined]
    cfg = valid.model_copy(
        update={"models": [entries[0], entries[1].model_copy(update={"devices": ["*-7"]})]}
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    router = ModelRouter(cfg, {"pumps": load_model(pumps), "odd": load_model(fans)}, metrics)
    now = time.time()

    def msg(device: str, i: int) -> RawMessage:
        body = orjson.dumps({"ts": now - 30 + i, "temperature": 0.1, "pressure": 0.1, "vibration": 0.1})
        return RawMessage(f"sensors/{device}/telemetry", body, now, time.monotonic())

    router.ingest([msg("pump-7", i) for i in range(3)] + [msg("fan-7", i) for i in range(2)])
    router.ingest([msg("nobody", 0), msg("bad+id", 0)])
    router.flush(force=True)
    assert router.route("pump-7") == "ambiguous_model"
    assert router.route("fan-7") == "odd"
    assert registry.get_sample_value("anomalyd_rejected_total", {"reason": "ambiguous_model"}) == 3
    assert registry.get_sample_value("anomalyd_rejected_total", {"reason": "no_model"}) == 1
    # Not a routing question: the first model's decoder refuses the id as it always has.
    assert registry.get_sample_value("anomalyd_rejected_total", {"reason": "bad_device_id"}) == 1
    assert registry.get_sample_value("anomalyd_messages_received_total") == 7
    assert router.pipelines["odd"].buffers.readings("fan-7") == 2
    router.close()
