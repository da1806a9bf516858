"""systemd's notify protocol: one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

A few lines of our own instead of a dependency (sd_notify(3) documents the protocol).
The socket may be a path or, when it starts with ``@``, a Linux abstract-namespace name.
Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address(path: str) -> str | bytes:
    # "@name" is the abstract namespace: the kernel wants a leading NUL byte instead.
    return b"\0" + path[1:].encode() if path.startswith("@") else path


class Notifier:
    """Sends READY / WATCHDOG / STOPPING / RELOADING / STATUS to the service manager."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self.path = path or None
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram with ``lines``; False (and a debug log) if it could not be sent.

        A lost notification must never take the daemon down: the manager may be restarting.
        """
        if self._sock is None or self.path is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), _address(self.path))
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.path, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished (Type=notify units become active now)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Keep-alive ping; send more often than every WatchdogSec."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A reload has begun; send ``ready()`` when it is over.

        MONOTONIC_USEC lets systemd (253+) match this message to the reload it asked for.
        """
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start (or stop) times out (waiting for the broker)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None if there is none.

    ``$WATCHDOG_PID`` names the process the watchdog is meant for; if it is set and is
    not us (a child that inherited the environment), we must not ping.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1_000_000 if value > 0 else None
