"""A real Mosquitto broker for tests, plus small helpers to talk to it.

Tests start mosquitto on a free 127.0.0.1 port with a generated config (the daemon's own
``anomalyd.broker.PrivateBroker``: anonymous access by default; here optionally a
password file, optionally a TLS listener) and can stop, kill and restart it on the same
port to exercise reconnects.

For the scale-out tests, ``PrivateNatsServer`` (re-exported from ``anomalyd.nats_broker``)
is a real nats-server with its MQTT gateway, JetStream and the partition mapping; the
helpers below speak MQTT 3.1.1 to it (the only version it speaks) and MQTT 5 to Mosquitto.

``Subscriber`` is a plain paho client that records what it receives and lets a test
wait for a condition with a timeout instead of sleeping.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from anomalyd.broker import PrivateBroker, free_port, port_open
from anomalyd.nats_broker import PrivateNatsServer

__all__ = [
    "MosquittoBroker",
    "PrivateNatsServer",
    "Received",
    "Subscriber",
    "TlsFiles",
    "free_port",
    "port_open",
    "publish_many",
    "running_broker",
    "wait_for",
]

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

T = TypeVar("T")


def _protocol_of(broker: Any) -> int:
    """MQTT 5 for Mosquitto; 3.1.1 for a broker that speaks only that (NATS's MQTT gateway)."""
    return mqtt.MQTTv311 if getattr(broker, "mqtt_protocol", "5") == "3.1.1" else mqtt.MQTTv5


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


class MosquittoBroker(PrivateBroker):
    """``anomalyd.broker.PrivateBroker`` in ``workdir``, plus what tests need: a password
    file (``users``: anonymous access off), a TLS listener (``tls``) and an ACL file
    (``acl``: its text)."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
        port: int | None = None,
        acl: str | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        extra: list[str] = []
        if acl is not None:
            # Mosquitto's ACL file: `topic` lines before any `user` line apply to anonymous
            # clients; `user NAME` starts that user's lines. Without an ACL, all is allowed.
            acl_file = workdir / "acl"
            acl_file.write_text(acl)
            extra.append(f"acl_file {acl_file}")
        if users is not None:
            pw_file = workdir / "passwords"
            pw_file.write_text("")
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw_file), user, password], check=True)
            extra.append(f"password_file {pw_file}")
        if tls is not None:
            # These follow the `listener` line, so they make that listener a TLS one.
            extra += [f"cafile {tls.ca_cert}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}"]
        super().__init__(workdir, port=port, allow_anonymous=users is None, extra_config=extra)
        self.users = users
        self.tls = tls


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
        broker: MosquittoBroker | PrivateNatsServer,
        topics: list[str],
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=_protocol_of(broker))
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
    broker: MosquittoBroker | PrivateNatsServer,
    messages: list[tuple[str, bytes]],
    qos: int = 1,
    retain: bool = False,
    *,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Publish messages in order and wait until the broker has acknowledged all of them."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=_protocol_of(broker))
    if username is not None:
        client.username_pw_set(username, password)
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
