"""A real Mosquitto broker for tests, plus small helpers to talk to it.

Tests start ``/usr/sbin/mosquitto`` on a free 127.0.0.1 port with a generated config
(anonymous access by default; optionally a password file, optionally a TLS listener)
and can stop, kill and restart it on the same port to exercise reconnects.

``Subscriber`` is a plain paho client that records what it receives and lets a test
wait for a condition with a timeout instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; return it, or fail after ``timeout``.

    For conditions that no event signals (a TCP port opening, a scrape value moving).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what or predicate!r}")
        time.sleep(interval)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks; the tiny race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, made with openssl."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
        key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
        ext = directory / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
                str(ca_cert), "-days", "2", "-subj", "/CN=anomalyd test CA")  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                "-subj", "/CN=localhost")  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
        return cls(ca_cert=ca_cert, server_cert=cert, server_key=key)


class MosquittoBroker:
    """One Mosquitto process on a fixed free port; restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.users = users
        self.tls = tls
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            # Tests publish faster than real time; the default of 1000 queued QoS 0
            # messages per client would drop readings (FIELD_NOTES), which is the
            # broker's choice, not a daemon bug, so lift it for tests.
            "max_queued_messages 1000000",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Run as root, mosquitto drops to user "mosquitto", which cannot read the
            # password file and certificates in pytest's private (0700) tmp directory.
            lines.append("user root")
        if self.users is not None:
            pw_file = self.workdir / "passwords"
            pw_file.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw_file), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        wait_for(
            lambda: port_open(self.port) or (self._proc is not None and self._proc.poll() is not None),
            timeout,
            what=f"mosquitto on {self.address}",
        )
        if not self.running:
            raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM)."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill abruptly (SIGKILL): clients see their connection drop, no goodbye."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            self._proc.wait(timeout)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """A test-side MQTT client that records every message on the given topic filters.

    ``wait_until(pred, timeout)`` blocks on a condition variable, so tests wait for
    messages instead of sleeping.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        topics: list[str],
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("test subscriber did not get its SUBACK")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, _rcs: Any, _p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))
            self._cond.notify_all()

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def on_topic(self, topic: str) -> list[Received]:
        return [m for m in self.snapshot() if m.topic == topic]

    def wait_until(self, predicate: Callable[[list[Received]], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [(m.topic, m.payload[:120]) for m in self.messages[-5:]]
                    raise AssertionError(
                        f"timed out after {timeout:.1f} s waiting for {what or 'messages'}; "
                        f"{len(self.messages)} received, last: {tail}"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_many(
    broker: MosquittoBroker, messages: list[tuple[str, bytes]], qos: int = 1, retain: bool = False
) -> None:
    """Publish messages in order and wait until the broker has acknowledged all of them."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=qos, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(10)
            if not info.is_published():
                raise AssertionError("test publisher: broker did not acknowledge a message")
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def running_broker(workdir: Path, **kwargs: Any) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(workdir, **kwargs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
