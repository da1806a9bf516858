"""A throwaway Mosquitto broker on a free 127.0.0.1 port.

``anomalyd demo`` starts one when no broker listens on 127.0.0.1:1883, ``anomalyd bench``
starts one for every run, and the test suite builds its brokers (passwords, TLS) on the
same class. The broker gets its own directory with a generated ``mosquitto.conf`` and a
log file; it can be stopped, killed and restarted on the same port. It runs in a session
of its own, so that a Ctrl-C in the terminal reaches the program that started it, which
stops its clients first and the broker last, and not the broker itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from anomalyd.errors import BrokerError

#: Where distributions put the binary when ``sbin`` is not on the user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")

#: Mosquitto's own default is 1000 queued messages per client; beyond that it drops QoS 0
#: messages for a subscriber that reads more slowly than devices publish, silently. A
#: demo or benchmark publishing faster than the daemon reads would then look like a daemon
#: that lost readings, so the private broker queues up to a million instead.
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000

#: The line mosquitto logs (log_type notice) once every listener is open.
_RUNNING = re.compile(rb"mosquitto version \S+ running")

INSTALL_HINT = (
    "install mosquitto with your package manager (`apt-get install mosquitto`, "
    "`dnf install mosquitto`, `brew install mosquitto`)"
)


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary (PATH, then /usr/sbin, /usr/local/sbin).

    Raises ``BrokerError`` saying how to install it when there is none.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BrokerError(
        f"mosquitto is not installed (not on PATH, nor in {', '.join(_SBIN_DIRS)}): {INSTALL_HINT}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it).

    Another process could take it before we bind it again; on a loopback address that
    race is rare, and a broker that cannot bind fails its start with its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class BrokerProcess:
    """What a throwaway broker process of ours shares, whichever broker it is: a working
    directory (a temporary one, removed by ``close()``, when none is given) with its
    configuration and log file, a loopback host, and the process's life: ``stop()``,
    ``kill()``, ``restart()`` on the same configuration, and use as a context manager.

    Subclasses write their configuration in ``__init__`` and implement ``start()`` with
    ``_launch()`` and their own test of "listening".
    """

    def __init__(
        self, workdir: Path | None, *, prefix: str, executable: str, log_name: str, config_name: str
    ) -> None:
        self.executable = executable
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.log_path = self.workdir / log_name
        self.config_path = self.workdir / config_name
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (None when stopped)."""
        return self._proc.pid if self._proc is not None and self.running else None

    def start(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _launch(self) -> int:
        """Start the process with its configuration; returns the log's size before it, so
        that ``start()`` can look for what this run logged."""
        with self.log_path.open("ab") as log:
            log_start = log.tell()
            # A session (and process group) of its own: the terminal sends Ctrl-C to its
            # whole foreground process group, and a broker in ours would die with the
            # demo's clients still connected to it. Whoever started it stops it: stop(),
            # close(), or the context manager.
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return log_start

    def _exited(self) -> bool:
        return self._proc is None or self._proc.poll() is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM); SIGKILL if it has not exited after ``timeout`` seconds."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill abruptly (SIGKILL): clients see their connection drop, no goodbye."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop, then start again on the same port(s) with the same configuration."""
        self.stop(timeout)
        self.start(timeout)

    def log_text(self) -> str:
        """Everything the broker logged so far (empty before the first start)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the broker and remove the temporary directory, if this object made one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


class PrivateBroker(BrokerProcess):
    """One Mosquitto process listening on ``127.0.0.1:<port>``, anonymous access.

    ``workdir`` holds ``mosquitto.conf`` and ``mosquitto.log``; without one, a temporary
    directory is made and removed by ``close()``. ``extra_config`` lines are appended to
    the generated configuration (password files, TLS, ...). The configuration is written
    once, here, so that ``restart()`` comes back on the same port.

    Use it as a context manager, or call ``start()`` and ``close()``.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        persistence: bool = False,
        allow_anonymous: bool = True,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__(
            workdir,
            prefix="anomalyd-mosquitto-",
            executable=find_mosquitto(),
            log_name="mosquitto.log",
            config_name="mosquitto.conf",
        )
        self.port = port or free_port(self.host)
        self.max_queued_messages = max_queued_messages
        lines = [
            f"listener {self.port} {self.host}",
            f"max_queued_messages {max_queued_messages}",
            f"persistence {'true' if persistence else 'false'}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if persistence:
            # Without a location mosquitto writes mosquitto.db into its working directory.
            lines.append(f"persistence_location {self.workdir}/")
        if os.geteuid() == 0:
            # Started as root, mosquitto switches to user "mosquitto", which cannot read or
            # write in a private (0700) directory like this one: persistence, password
            # files and certificates live here.
            lines.append("user root")
        self.config_path.write_text("\n".join([*lines, *extra_config]) + "\n")

    @property
    def address(self) -> str:
        """``host:port``, as ``--broker`` takes it."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and return once its port accepts connections.

        Raises ``BrokerError`` with the end of its log if it exits or does not listen
        within ``timeout`` seconds.
        """
        if self.running:
            return
        log_start = self._launch()
        deadline = time.monotonic() + timeout
        # An open port alone could be another process's (a port= that is taken): mosquitto
        # logs "... running" only once all its listeners are open, so wait for that too.
        while not (self._says_running(log_start) and port_open(self.port, self.host)):
            if self._exited() or time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"could not start mosquitto ({self.executable}) on {self.address}: "
                    f"{self.log_text()[-2000:] or 'no log output'}"
                )
            time.sleep(0.02)

    def _says_running(self, offset: int) -> bool:
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return _RUNNING.search(fh.read()) is not None
