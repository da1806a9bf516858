"""``anomalyd demo`` as a person runs it: the ``anomalyd`` script in a session of its own,
stopped with Ctrl-C sent to its whole process group, as a terminal sends it.

On a broker it found, the demo works under a topic prefix of its own and leaves the broker
as it was: what others retain untouched, nothing of its own retained. With the private
broker it starts, the broker is out of reach of the terminal's Ctrl-C and is stopped by
the demo, last, so that nobody's connection is lost on the way out.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from anomalyd.errors import BrokerError
from anomalyd.simulator import DEMO_TOPIC_ROOT, clear_retained
from tests.broker import MosquittoBroker, Subscriber, free_port, port_open, publish_many

ANOMALYD = Path(sys.executable).with_name("anomalyd")

#: Two devices, 600 s of data at 100x: scores within seconds, and the simulation still
#: running when the test stops it.
SHORT_RUN = ("--speed", "100", "--duration", "600", "--devices", "2")

#: On this kind of machine a broker may listen on 127.0.0.1:1883 (a shared one, not the
#: test's to stop), and the demo then uses it. To take the path of a machine with none,
#: the demo's probe of that port answers "nothing there"; everything else is the real
#: command.
AS_IF_NOTHING_LISTENED_ON_1883 = (
    "import sys\n"
    "import anomalyd.simulator\n"
    "anomalyd.simulator._broker_listening = lambda host, port: False\n"
    "from anomalyd.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

#: What must never appear on the demo's stderr at a Ctrl-C end.
TROUBLE = re.compile(
    r"lost connection|connection lost|Traceback|cannot connect|could not remove", re.IGNORECASE
)


class DemoProcess:
    """The demo as a subprocess leading its own session (so the test can send Ctrl-C to
    its process group without reaching pytest), its stdout read line by line."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="test-demo-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stdout line matching ``pattern``; fails after ``timeout`` seconds."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.lines:
                if m := regex.search(line):
                    return m
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout):
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")
            match = found()
        if match is None:
            raise AssertionError(f"the demo exited ({self.proc.poll()}) before {pattern!r}:\n{self.output()}")
        return match

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def output(self) -> str:
        return "".join(self.lines) + "\n--- stderr:\n" + self.stderr()

    def stderr(self) -> str:
        return self._stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def retained_messages(broker: MosquittoBroker) -> dict[str, bytes]:
    """Everything the broker retains, as a fresh subscriber to ``#`` gets it.

    The broker hands retained messages over right after the SUBACK, before any message
    published afterwards: once a marker published after the SUBACK has arrived, the list
    is complete (no guessing how long to wait)."""
    sub = Subscriber(broker, ["#"])
    try:
        marker = ("test/end-of-retained", secrets.token_hex(8).encode())
        publish_many(broker, [marker])
        sub.wait_until(
            lambda msgs: any((m.topic, m.payload) == marker for m in msgs), 10, "the end-of-retained marker"
        )
        return {m.topic: m.payload for m in sub.snapshot() if m.retain}
    finally:
        sub.close()


def children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def command_of(pid: int) -> str | None:
    """The process's name, or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None


def test_demo_on_a_shared_broker_leaves_it_as_it_was(tmp_path: Path, broker: MosquittoBroker) -> None:
    # What a production daemon and other applications keep on the shared broker: the demo's
    # daemon must neither read these states as its own nor change or clear them.
    others = {
        "anomaly/status": b"online",
        "anomaly/machine-000/alert": b'{"device":"machine-000","state":"anomalous","alert":true}',
        "site/door": b"closed",
    }
    publish_many(broker, list(others.items()), retain=True)
    demo = DemoProcess([str(ANOMALYD), "demo", "--broker", broker.address, *SHORT_RUN], tmp_path / "err")
    try:
        prefix = demo.wait_for_line(rf"topics under ({DEMO_TOPIC_ROOT}/[0-9a-f]+)/", 120).group(1)
        demo.wait_for_line(r"scores .*machine-000", 120)
        during = retained_messages(broker)
        # The demo does leave retained messages while it runs (so that the end below shows
        # they were removed, not that there never were any), all of them under its prefix.
        mine = {t for t in during if t not in others}
        assert f"{prefix}/anomaly/status" in mine, during
        assert f"{prefix}/anomaly/machine-000/alert" in mine, during
        assert all(t.startswith(f"{prefix}/") for t in mine), mine
        assert {t: during[t] for t in others} == others
        demo.ctrl_c()
        assert demo.finish(120) == 0, demo.output()
    finally:
        demo.close()
    assert retained_messages(broker) == others
    text = "".join(demo.lines)
    assert "stopping:" in text
    assert re.search(rf"removed the \d+ retained messages the demo left under {prefix}/", text), text
    assert not TROUBLE.search(demo.stderr()), demo.stderr()


def test_demo_private_broker_outlives_ctrl_c_and_stops_last(tmp_path: Path) -> None:
    demo = DemoProcess(
        [sys.executable, "-c", AS_IF_NOTHING_LISTENED_ON_1883, "demo", *SHORT_RUN], tmp_path / "err"
    )
    try:
        port = int(demo.wait_for_line(r"started a private mosquitto on 127\.0\.0\.1:(\d+)", 60).group(1))
        demo.wait_for_line(r"scores .*machine-000", 120)
        brokers = [pid for pid in children(demo.proc.pid) if command_of(pid) == "mosquitto"]
        assert len(brokers) == 1, children(demo.proc.pid)
        mosquitto = brokers[0]
        # Out of the process group (and session) the terminal's Ctrl-C goes to.
        assert os.getpgid(mosquitto) != os.getpgid(demo.proc.pid)
        assert os.getsid(mosquitto) != os.getsid(demo.proc.pid)
        demo.ctrl_c()
        assert demo.finish(120) == 0, demo.output()
    finally:
        demo.close()
    # The demo stopped and reaped its broker: no mosquitto left behind, its port closed.
    assert command_of(mosquitto) != "mosquitto"
    assert not port_open(port)
    assert "stopping:" in "".join(demo.lines)
    assert not TROUBLE.search(demo.stderr()), demo.stderr()


def test_demo_whose_daemon_fails_still_stops_its_private_broker(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.onnx"
    demo = DemoProcess(
        [sys.executable, "-c", AS_IF_NOTHING_LISTENED_ON_1883, "demo", "--model", str(missing), *SHORT_RUN],
        tmp_path / "err",
    )
    try:
        port = int(demo.wait_for_line(r"started a private mosquitto on 127\.0\.0\.1:(\d+)", 60).group(1))
        # The daemon's own exit code for a bad model (65, EX_DATAERR), as `anomalyd run` exits.
        assert demo.finish(120) == 65, demo.output()
    finally:
        demo.close()
    assert not port_open(port)
    assert "no such model file" in demo.stderr()
    assert "Traceback" not in demo.stderr()


def test_clear_retained_removes_what_is_under_the_prefix_and_nothing_else(broker: MosquittoBroker) -> None:
    publish_many(
        broker,
        [
            ("demo/a1/status", b"stopped"),
            ("demo/a1/deep/x/alert", b"{}"),
            ("demo/a10/status", b"online"),  # same leading characters, another prefix
            ("demo/status", b"online"),
            ("other/a1/status", b"online"),
        ],
        retain=True,
    )
    assert clear_retained(broker.host, broker.port, "demo/a1") == ["demo/a1/deep/x/alert", "demo/a1/status"]
    assert retained_messages(broker) == {
        "demo/a10/status": b"online",
        "demo/status": b"online",
        "other/a1/status": b"online",
    }
    assert clear_retained(broker.host, broker.port, "demo/a1") == []  # nothing left to remove


def test_clear_retained_says_when_the_broker_is_not_there() -> None:
    port = free_port()
    with pytest.raises(BrokerError, match=f"cannot connect to MQTT broker 127.0.0.1:{port}"):
        clear_retained("127.0.0.1", port, "demo/a1")
    with pytest.raises(ValueError, match="wildcards"):
        clear_retained("127.0.0.1", port, "demo/+")
