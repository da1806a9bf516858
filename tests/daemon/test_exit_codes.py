"""Every exit code of the ``anomalyd`` command (``anomalyd.errors``), from the installed
console script, with what it says on stderr; a failed start logs the code it exits with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.broker import MosquittoBroker
from tests.daemon_process import NotifyListener

ANOMALYD = str(Path(sys.executable).parent / "anomalyd")


def anomalyd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    full_env.update(env or {})
    return subprocess.run(
        [ANOMALYD, *args], capture_output=True, text=True, timeout=timeout, check=False, env=full_env
    )


def config(tmp_path: Path, text: str, name: str = "anomalyd.toml") -> str:
    path = tmp_path / name
    path.write_text(text + "\n[metrics]\nport = 0\n")
    return str(path)


def fault(tmp_path: Path, code: str) -> dict[str, str]:
    """An environment whose Python runs ``code`` at start-up (a ``sitecustomize``): to inject
    a fault the daemon cannot be brought to for real."""
    directory = tmp_path / "fault"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(directory)}


def assert_start_failed(out: subprocess.CompletedProcess[str], code: int, problem: str) -> None:
    assert out.returncode == code, out.stderr
    assert problem in out.stderr
    # The log says the code the process exits with, never a clean stop.
    assert f"stopped (exit {code})" in out.stderr
    assert "stopped (exit 0)" not in out.stderr


# --------------------------------------------------------------------------- 0


def test_0_for_a_good_configuration_and_a_clean_stop(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Callable[..., Path]
) -> None:
    model = tiny_model()
    cfg = config(tmp_path, f'[model]\npath = "{model}"\n')
    out = anomalyd("check-config", cfg)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    # A broker URL as Telegraf or Node-RED write it (--broker), run until SIGTERM.
    notify = NotifyListener(tmp_path / "notify.sock")
    log = (tmp_path / "daemon.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    proc = subprocess.Popen(
        [ANOMALYD, "run", "--config", cfg, "--broker", f"mqtt://127.0.0.1:{broker.port}"],
        stdout=log,
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
    log.seek(0)
    text = log.read()
    log.close()
    assert f"subscribed to sensors/{{device}}/telemetry at 127.0.0.1:{broker.port}" in text
    assert "stopped (exit 0)" in text


# --------------------------------------------------------------------------- 64


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("run", "--bogus"), "unrecognized arguments: --bogus"),
        (("check-config",), "the following arguments are required: FILE"),
        (("simulate", "--devices", "0"), "argument --devices: expected an integer >= 1, got '0'"),
        (("bench", "--quick", "--flood"), "--flood: it runs for minutes; it is not part of --quick"),
    ],
)
def test_64_for_a_wrong_command_line(args: tuple[str, ...], problem: str) -> None:
    out = anomalyd(*args)
    assert out.returncode == 64, out.stderr
    assert problem in out.stderr


# --------------------------------------------------------------------------- 65


def test_65_for_a_missing_or_unusable_model(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    out = anomalyd("run", "--config", config(tmp_path, f'[model]\npath = "{missing}"\n'))
    assert_start_failed(out, 65, f"start failed: no such model file [{missing}]")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    out = anomalyd("inspect-model", str(junk))
    assert out.returncode == 65
    assert "ONNX Runtime cannot load the file" in out.stderr


# --------------------------------------------------------------------------- 69


def test_69_for_cuda_requested_where_it_is_not_available(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    cfg = config(tmp_path, f'[model]\npath = "{tiny_model()}"\nproviders = "cuda"\n')
    # No device visible, whether or not this onnxruntime has CUDA.
    out = anomalyd("run", "--config", cfg, env={"CUDA_VISIBLE_DEVICES": ""})
    assert_start_failed(out, 69, "providers = 'cuda' was requested")


# --------------------------------------------------------------------------- 70


def test_70_when_the_pipeline_thread_dies(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Callable[..., Path]
) -> None:
    env = fault(
        tmp_path,
        "from anomalyd.pipeline import Pipeline\n"
        "def broken_flush(self, force=False):\n"
        "    raise RuntimeError('injected: the pipeline broke')\n"
        "Pipeline.flush = broken_flush\n",
    )
    cfg = config(
        tmp_path, f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\npath = "{tiny_model()}"\n'
    )
    out = anomalyd("run", "--config", cfg, env=env)
    assert out.returncode == 70, out.stderr
    assert "pipeline thread failed" in out.stderr
    assert "RuntimeError: injected: the pipeline broke" in out.stderr
    assert "stopped (exit 0)" not in out.stderr


def test_70_with_the_traceback_for_a_bug(tmp_path: Path) -> None:
    env = fault(
        tmp_path,
        "import anomalyd.config\n"
        "def broken_load(*args, **kwargs):\n"
        "    raise RuntimeError('injected: a bug')\n"
        "anomalyd.config.load_config = broken_load\n",
    )
    out = anomalyd("run", env=env)
    assert out.returncode == 70, out.stderr
    assert "internal error (exit 70)" in out.stderr
    assert "Traceback" in out.stderr
    assert "RuntimeError: injected: a bug" in out.stderr


# --------------------------------------------------------------------------- 76


def test_76_when_the_broker_refuses_the_credentials(
    tmp_path: Path, broker_factory: Callable[..., MosquittoBroker], tiny_model: Callable[..., Path]
) -> None:
    secured = broker_factory(users={"anomalyd": "correct horse"})
    wrong = tmp_path / "pw"
    wrong.write_text("battery staple\n")
    cfg = config(
        tmp_path,
        f'[mqtt]\nhost = "mqtt://{secured.host}:{secured.port}"\nusername = "anomalyd"\n'
        f'password_file = "{wrong}"\n[model]\npath = "{tiny_model()}"\n',
    )
    out = anomalyd("run", "--config", cfg)
    assert_start_failed(out, 76, "refused the connection")
    assert "battery staple" not in out.stderr


# --------------------------------------------------------------------------- 78


@pytest.mark.parametrize(
    ("toml", "args", "problem"),
    [
        ('[mqtt]\nhost = "not a host!!"\n', (), "anomalyd: mqtt.host: expected a host name or an IP address"),
        ("[detector]\nthreshold = -1\n", (), "anomalyd: detector.threshold: expected a threshold > 0"),
        ("", ("--broker", "mqtt://127.0.0.1:18831:1883"), "anomalyd: --broker: expected one of HOST"),
        ("", ("--broker", "ws://127.0.0.1:8080"), "anomalyd: --broker: MQTT over websockets"),
    ],
)
def test_78_for_a_configuration_error_before_the_start(
    tmp_path: Path, toml: str, args: tuple[str, ...], problem: str
) -> None:
    out = anomalyd("run", "--config", config(tmp_path, toml), *args)
    assert out.returncode == 78, out.stderr
    [line] = out.stderr.strip().splitlines()  # one line, before any logging
    assert line.startswith(problem), line


def test_78_for_a_credential_without_credentials_directory(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    cfg = config(
        tmp_path,
        f'[mqtt]\nusername = "u"\npassword_credential = "mqtt_password"\n[model]\npath = "{tiny_model()}"\n',
    )
    out = anomalyd("check-config", cfg)
    assert out.returncode == 78
    assert "mqtt.password_credential: credential 'mqtt_password' is read from $CREDENTIALS_DIRECTORY" in (
        out.stderr
    )
    out = anomalyd("run", "--config", cfg)
    assert_start_failed(out, 78, "$CREDENTIALS_DIRECTORY is not set")
