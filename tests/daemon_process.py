"""Run the real daemon (``python -m anomalyd run``) as a subprocess, the way systemd does:
a generated TOML config, ``$NOTIFY_SOCKET`` bound by the test (so readiness is awaited
over a real unix datagram socket, not guessed), real signals, metrics scraped over HTTP.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.broker import MosquittoBroker, PrivateNatsServer, free_port


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class NotifyListener:
    """A unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="test-notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def lines(self) -> list[str]:
        with self._cond:
            return [line for _, m in self.messages for line in m.split("\n")]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def wait_for(self, line: str, timeout: float, at_least: int = 1) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(m.split("\n").count(line) for _, m in self.messages) < at_least:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {line!r} (x{at_least}) within {timeout} s; got {self.messages}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


class DaemonProcess:
    """``python -m anomalyd run --config FILE`` with a notify socket and a metrics port."""

    def __init__(
        self,
        workdir: Path,
        broker: MosquittoBroker | PrivateNatsServer,
        model: Path,
        *,
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.metrics_port = free_port()
        cfg: dict[str, dict[str, Any]] = {
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
                "client_id": f"anomalyd-test-{workdir.name}",
            },
            "model": {"path": str(model)},
            "metrics": {"port": self.metrics_port},
            "logging": {"level": "INFO", "rejection_log_interval_s": 1.0},
        }
        for name, keys in (sections or {}).items():
            cfg.setdefault(name, {}).update(keys)
        self.config_path = write_config(workdir / "anomalyd.toml", cfg)
        self.notify = NotifyListener(workdir / "notify.sock")
        self.log_path = workdir / "daemon.log"
        full_env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        full_env["NOTIFY_SOCKET"] = str(self.notify.path)
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anomalyd", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - tests only: sets a kernel flag, no locks
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"daemon not ready; exit={self.proc.poll()} log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout} s; log:\n{self.log()}") from None

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """All samples from /metrics over HTTP: {(name, sorted labels): value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(
        self, name: str, predicate: Callable[[float], bool], timeout: float, **labels: str
    ) -> float:
        """Scrape until ``predicate(value)``; the endpoint may not be up yet (start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.metric(name, **labels)
            except urllib.error.URLError:
                value = math.nan
            if predicate(value):
                return value
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(
                    f"{name}{labels} = {value} after {timeout} s; log:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self.notify.close()
