"""systemd/anomalyd.service: syntax (``systemd-analyze verify``), hardening score
(``systemd-analyze security --offline=true``), and the daemon running under the
kernel's own write-xor-execute rule, as ``MemoryDenyWriteExecute=yes`` demands."""

from __future__ import annotations

import ctypes
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from anomalyd.errors import ConfigError, ModelContractError, UsageError
from tests.broker import MosquittoBroker, Subscriber, publish_many
from tests.daemon_process import DaemonProcess

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "anomalyd.service"
#: The bound we promise: `systemd-analyze security --offline` rated this set of directives 1.2 ("OK").
EXPOSURE_MAX = 1.5
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
INSTALLED_EXEC = "/opt/anomalyd/venv/bin/anomalyd"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_declares_what_the_daemon_relies_on() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    # The exits a restart cannot fix: a usage error, a bad configuration, a bad model.
    no_restart = {UsageError.exit_code, ConfigError.exit_code, ModelContractError.exit_code}
    assert {int(code) for code in d["RestartPreventExitStatus"][0].split()} == no_restart
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["DynamicUser"] == ["yes"]
    assert d["LoadCredential"] == ["mqtt_password:/etc/anomalyd/mqtt_password"]
    assert "WatchdogSec" in d
    assert d["ExecStart"][0].startswith(INSTALLED_EXEC + " run --config ")


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # The unit names the documented install path, absent on a test machine: verify a copy
    # pointing at this checkout's console script (everything else unchanged) ...
    exe = Path(sys.executable).with_name("anomalyd")
    assert exe.is_file(), "the project is not installed in this environment (pip install -e .)"
    copy = tmp_path / "anomalyd.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_EXEC, str(exe)))
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""
    # ... and the unit itself, whose only complaint may be that missing executable.
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, check=False)
    complaints = [line for line in out.stderr.splitlines() if line.strip()]
    assert all(f"Command {INSTALLED_EXEC} is not executable" in line for line in complaints), complaints


def test_security_exposure_is_at_most_the_stated_bound() -> None:
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for anomalyd\.service: ([0-9.]+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr
    assert float(match.group(1)) <= EXPOSURE_MAX


def _deny_write_execute() -> None:
    """In the child: refuse memory that is (or becomes) both writable and executable.

    prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) is the kernel's (6.3+) form of what
    systemd's MemoryDenyWriteExecute= enforces with seccomp; it survives execve.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed: kernel older than 6.3?")


def test_the_daemon_scores_under_memory_deny_write_execute(tmp_path: Path, broker: MosquittoBroker) -> None:
    # The probe itself: W+X memory must really be refused in such a process.
    probe = subprocess.run(
        [sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        preexec_fn=_deny_write_execute,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0
    assert "Permission denied" in probe.stderr

    from anomalyd.model import DEFAULT_MODEL_PATH, read_contract

    window = read_contract(DEFAULT_MODEL_PATH).window_length
    d = DaemonProcess(tmp_path / "mdwe", broker, DEFAULT_MODEL_PATH, preexec_fn=_deny_write_execute)
    try:
        d.wait_ready(60)
        sub = Subscriber(broker, ["anomaly/+/score"])
        try:
            t0 = time.time() - 200
            publish_many(
                broker,
                [
                    (
                        "sensors/m/telemetry",
                        orjson.dumps(
                            {"ts": t0 + i, "temperature": 40.0, "pressure": 230.0, "vibration": 0.03}
                        ),
                    )
                    for i in range(60)
                ],
            )
            # Rate-limited score messages: together they cover every window scored.
            sub.wait_until(
                lambda ms: sum(orjson.loads(m.payload)["windows"] for m in ms) == 60 - window + 1,
                20,
                "scores under MDWE",
            )
        finally:
            sub.close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()
