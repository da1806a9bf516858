"""sd_notify over a real unix datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_status_watchdog_stopping_arrive_as_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    assert n.enabled
    # every call is one datagram
    assert n.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.extend_timeout(15)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=15000000"
    n.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier(path) as n:
        n.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert int(value) > 0


def test_abstract_namespace_socket() -> None:
    name = f"anomalyd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        with Notifier("@" + name) as n:
            assert n.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
    finally:
        sock.close()


def test_notifier_reads_notify_socket_from_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as n:
        assert n.ready()
    assert sock.recv(4096) == b"READY=1"


def test_without_a_manager_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    with Notifier(str(tmp_path / "gone.sock")) as n:
        assert n.enabled
        assert n.watchdog() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 2.0),
        ("500000", "self", 0.5),
        ("2000000", "1", None),  # meant for another process
        (None, None, None),
        ("0", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected
