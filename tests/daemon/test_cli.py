"""The ``anomalyd`` command line, run as ``python -m anomalyd`` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from anomalyd.broker import PrivateBroker
from anomalyd.cli import main, parse_address
from anomalyd.errors import ConfigError
from anomalyd.model import DEFAULT_MODEL_PATH
from tests.broker import MosquittoBroker, Subscriber, port_open


def anomalyd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anomalyd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_parse_address() -> None:
    assert parse_address("broker.local:1884", "--broker") == ("broker.local", 1884)
    assert parse_address("[::1]:1883", "--broker") == ("::1", 1883)
    for bad in ("nohost", ":1883", "h:port", "h:70000"):
        with pytest.raises(ConfigError, match="--broker"):
            parse_address(bad, "--broker")


def test_version_and_help() -> None:
    out = anomalyd("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("anomalyd ")
    helptext = anomalyd("--help").stdout
    for command in ("run", "check-config", "inspect-model", "simulate", "demo", "bench"):
        assert command in helptext


def test_check_config_ok_and_every_error_with_its_key_path(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[mqtt]\nhost = "broker"\nport = 1884\n[detector]\nk_enter = 2\n')
    out = anomalyd("check-config", str(good))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = 0\nhots = "x"\n[batching]\nmax_batch = "many"\n[nonsense]\n')
    out = anomalyd("check-config", str(bad))
    assert out.returncode == 78
    for key in ("mqtt.port", "mqtt.hots", "batching.max_batch", "nonsense"):
        assert f": {key}: " in out.stderr, (key, out.stderr)
    assert "4 error(s)" in out.stderr


def test_inspect_model_prints_contract_graph_check_and_providers() -> None:
    out = anomalyd("inspect-model", str(DEFAULT_MODEL_PATH))
    assert out.returncode == 0, out.stderr
    assert "model version" in out.stdout
    assert "graph check     OK" in out.stdout
    assert "CPUExecutionProvider" in out.stdout


def test_inspect_model_exit_65_on_a_bad_model(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    out = anomalyd("inspect-model", str(junk))
    assert out.returncode == 65
    assert "ONNX Runtime cannot load the file" in out.stderr
    # contract readable but disagreeing with the graph: contract printed, graph check fails
    liar = tiny_model("liar.onnx", window_length=8, contract_overrides={"window_length": 9})
    out = anomalyd("inspect-model", str(liar))
    assert out.returncode == 65
    assert "window length   9 samples" in out.stdout
    assert "graph check     FAILED" in out.stdout


def test_run_with_a_bad_option_value_exits_78_with_one_line() -> None:
    out = anomalyd("run", "--broker", "localhost:notaport")
    assert out.returncode == 78
    assert out.stderr.strip().splitlines() == [
        "anomalyd: --broker: expected a port between 1 and 65535 in 'localhost:notaport', got 'notaport'"
    ]
    out = anomalyd("run", "--config", "/nonexistent/anomalyd.toml")
    assert out.returncode == 78
    assert "cannot read configuration file" in out.stderr


def test_main_returns_exit_codes_in_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = -1\n")
    assert main(["check-config", str(bad)]) == 78


def test_importing_the_cli_and_service_never_loads_tensorflow() -> None:
    probe = (
        "import sys, json, anomalyd.cli, anomalyd.service, anomalyd.simulator; "
        "anomalyd.cli.build_parser(); print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    forbidden = [m for m in loaded if m.split(".")[0] in {"tensorflow", "keras", "tf2onnx", "onnx", "scipy"}]
    assert forbidden == []
    assert "anomalyd.service" in loaded


def test_simulate_publishes_the_fleet(broker: MosquittoBroker) -> None:
    sub = Subscriber(broker, ["sensors/+/telemetry"])
    try:
        out = anomalyd(
            "simulate",
            "--broker",
            broker.address,
            "--devices",
            "2",
            "--duration",
            "60",
            "--speed",
            "inf",
            "--seed",
            "3",
            "--qos",
            "1",
        )
        assert out.returncode == 0, out.stderr
        sub.wait_until(lambda ms: len(ms) == 120, 10, "120 readings")
    finally:
        sub.close()
    devices = {m.topic.split("/")[1] for m in sub.snapshot()}
    assert devices == {"machine-000", "machine-001"}
    doc = orjson.loads(sub.snapshot()[0].payload)
    assert set(doc) == {"ts", "temperature", "pressure", "vibration"}


def test_demo_shows_scores_and_stops_on_ctrl_c(broker: MosquittoBroker) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anomalyd",
            "demo",
            "--broker",
            broker.address,
            "--speed",
            "500",
            "--duration",
            "900",
            "--devices",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        lines: list[str] = []
        seen_scores = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "scores " in line and "machine-000" in line:
                    seen_scores.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert seen_scores.wait(60), "".join(lines)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            reader.join(5)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = "".join(lines)
    assert text.startswith("anomalyd demo: broker")
    assert "stopping:" in text


def test_private_broker_for_the_demo() -> None:
    b = PrivateBroker()
    try:
        b.start()
        assert port_open(b.port)
        assert f"max_queued_messages {1_000_000}" in b.config_path.read_text()
    finally:
        b.close()
    assert not port_open(b.port)
    assert not b.workdir.exists()  # its temporary directory went with it


def test_inspect_model_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`anomalyd inspect-model m.onnx | head -1` must not end in a BrokenPipeError trace.

    The reading end is closed before the child writes anything, so every write fails
    with EPIPE whatever the pipe buffer size (a real `| head` only fails sometimes)."""
    from tests.helpers.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "m.onnx")
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "anomalyd", "inspect-model", str(model)],
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert proc.stdout is not None
        proc.stdout.close()
        code = proc.wait(timeout=60)
    stderr = err_path.read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_demo_view_does_not_show_alert_states_left_by_earlier_runs() -> None:
    import io

    from anomalyd.simulator import LiveView

    out = io.StringIO()
    view = LiveView(out)
    doc = orjson.dumps({"device": "m-1", "ts": 1.0, "score": 9.0, "threshold": 1.0, "alert": True})
    view.handle("anomaly/m-1/alert", doc, retained=True)
    assert (view.raised, view.stale, out.getvalue()) == (0, 1, "")
    view.handle("anomaly/m-1/alert", doc)
    assert view.raised == 1
    assert "raised" in out.getvalue()


def test_simulation_flags_left_out_keep_the_simulated_fleet() -> None:
    import dataclasses

    from anomalyd.cli import _simulation_settings, build_parser
    from anomalyd.simulator import SIMULATED_FLEET, SimulationSettings
    from anomalyd.synthetic import FleetSpec

    # The simulator departs from the generator's defaults in these settings only.
    default = FleetSpec()
    differs = {
        f.name
        for f in dataclasses.fields(FleetSpec)
        if getattr(SIMULATED_FLEET, f.name) != getattr(default, f.name)
    }
    assert differs == {"seed", "gaps_per_device_hour"}
    assert SimulationSettings().fleet == SIMULATED_FLEET
    assert _simulation_settings(build_parser().parse_args(["simulate"])).fleet == SIMULATED_FLEET
    flags = ["simulate", "--devices", "2", "--rate", "2", "--duration", "60", "--seed", "3", "--speed", "inf"]
    given = _simulation_settings(build_parser().parse_args(flags))
    assert (given.devices, given.rate_hz, given.duration_s, given.fleet.seed) == (2, 2.0, 60.0, 3)
    assert given.fleet.gaps_per_device_hour == 0.0
    # A fleet the generator refuses is a configuration error, not a crash mid-run.
    with pytest.raises(ConfigError, match="duration_s"):
        _simulation_settings(build_parser().parse_args(["simulate", "--duration", "1"]))


def test_demo_view_shows_states_and_keeps_a_first_normal_quiet() -> None:
    import io

    from anomalyd.simulator import LiveView

    out = io.StringIO()
    view = LiveView(out)

    def state(doc: dict[str, object]) -> None:
        view.handle("anomaly/m-1/alert", orjson.dumps({"device": "m-1", "ts": 1.0, **doc}))

    state({"state": "normal", "alert": False, "score": 0.1, "threshold": 1.0})
    assert out.getvalue() == ""
    state({"state": "anomalous", "alert": True, "score": 9.0, "threshold": 1.0})
    state({"state": "normal", "alert": False, "score": 0.1, "threshold": 1.0})
    state({"state": "unknown", "alert": False, "score": None, "threshold": None, "reason": "idle"})
    lines = out.getvalue().splitlines()
    assert [line.split("m-1")[1].split()[0] for line in lines] == ["raised", "cleared", "unknown"]
    assert lines[-1].endswith("unknown (idle)")


def test_run_takes_an_mqtts_url_and_connects_with_tls(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], tiny_model: Callable[..., Path]
) -> None:
    """An ``mqtts://`` address: host and port taken apart, and the daemon connects to a
    TLS-only listener."""
    from tests.broker import TlsFiles
    from tests.daemon_process import NotifyListener

    files = TlsFiles.create(tmp_path / "tls")
    secured = broker_factory(tls=files)
    config = tmp_path / "anomalyd.toml"
    config.write_text(
        f'[mqtt]\nhost = "mqtts://127.0.0.1:{secured.port}"\n[mqtt.tls]\nca_file = "{files.ca_cert}"\n'
        f'[model]\npath = "{tiny_model()}"\n[metrics]\nport = 0\n'
    )
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "anomalyd", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        notify.wait_for("READY=1", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
    assert f"at 127.0.0.1:{secured.port}" in log.read_text()
