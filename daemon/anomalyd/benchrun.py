"""The moving parts of ``anomalyd bench``: the daemon under test, the probe device, the
load publishers (``anomalyd.benchload`` children), and what is read from them.

* ``DaemonProcess``: ``python -m anomalyd run --config FILE`` with ``$NOTIFY_SOCKET``
  pointing at a unix datagram socket owned here, so start-up is timed from spawn to the
  daemon's own ``READY=1``; its ``/metrics`` scraped over HTTP; its CPU time and memory
  read from ``/proc/<pid>``.
* ``Probe``: probe devices publishing single readings at a steady rate, stamped
  ``time.time()``, and a subscription to their score topics: publish-to-score latency is
  the receive time minus the score's ``ts`` (the newest reading of the window scored).
  Both run in a child process of their own (``anomalyd.benchload probe``), driven over
  its standard streams.
* ``Children``: load processes started together (a ready/go handshake over their
  standard streams), each reporting what it did as one JSON line.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: One scrape: (sample name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class BenchError(Exception):
    """A phase of the benchmark could not be run (daemon did not start, child failed ...)."""


# --------------------------------------------------------------------------- /proc and /metrics


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_bytes(pid: int) -> dict[str, int]:
    """``{"rss": VmRSS, "peak": VmHWM}`` in bytes, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    return out


def scrape(port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> Samples:
    """Every sample of ``http://<host>:<port>/metrics``."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the daemon does not export it (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def has_metric(samples: Samples, name: str) -> bool:
    return any(n == name or n.startswith(f"{name}_") for n, _ in samples)


def rejected_by_reason(samples: Samples) -> dict[str, float]:
    return {dict(lb)["reason"]: v for (n, lb), v in samples.items() if n == "anomalyd_rejected_total"}


def diff_reasons(after: Samples, before: Samples) -> dict[str, int]:
    """Rejections by reason between two scrapes, only the reasons that moved."""
    a, b = rejected_by_reason(after), rejected_by_reason(before)
    return {k: int(v - b.get(k, 0.0)) for k, v in sorted(a.items()) if v - b.get(k, 0.0) > 0}


def histogram_quantile(after: Samples, before: Samples | None, name: str, q: float) -> float | None:
    """Prometheus-style quantile of a histogram's increase between two scrapes (linear
    interpolation inside the bucket holding rank q); None if nothing was observed."""
    base = before or {}
    buckets = sorted(
        (float(dict(lb)["le"]), v - base.get((n, lb), 0.0))
        for (n, lb), v in after.items()
        if n == f"{name}_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_le, lo_count = 0.0, 0.0
    for le, cnt in buckets:
        if cnt >= rank:
            if math.isinf(le):
                return lo_le  # beyond the last finite bucket: only a lower bound is known
            return lo_le + (le - lo_le) * (rank - lo_count) / max(cnt - lo_count, 1e-12)
        lo_le, lo_count = le, cnt
    return None


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max of ``values`` (nearest rank); None when empty."""
    v = sorted(values)
    if not v:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}

    def rank(q: float) -> float:
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]

    return {"n": len(v), "p50": rank(0.5), "p95": rank(0.95), "p99": rank(0.99), "max": v[-1]}


# --------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """The daemon under test, started the way systemd starts it (``Type=notify``).

    ``launcher`` is a command prefix the daemon is started through, one that ends by
    ``exec``-ing it (so that the process id is the daemon's): ``anomalyd.benchhosts.Host``'s
    puts it in a host's cgroup and network namespace, whose address is then
    ``metrics_host``. The notify socket is a path in the file system, which every network
    namespace reaches."""

    def __init__(
        self,
        workdir: Path,
        config_path: Path,
        metrics_port: int,
        *,
        launcher: Sequence[str] = (),
        metrics_host: str = "127.0.0.1",
    ) -> None:
        self.workdir = workdir
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.log_path = workdir / "daemon.log"
        self._notify_path = workdir / "notify.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self._notify_path))
        self._notify.settimeout(0.2)
        self._ready = threading.Event()
        self._ready_at = math.nan
        self._closed = False
        self._listener = threading.Thread(target=self._listen, name="bench-notify", daemon=True)
        self._listener.start()
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(self._notify_path)
        cmd = [*launcher, sys.executable, "-m", "anomalyd", "run", "--config", str(config_path)]
        with self.log_path.open("wb") as log:
            self._spawned_at = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.pid = self.proc.pid

    def _listen(self) -> None:
        while not self._closed:
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n") and not self._ready.is_set():
                self._ready_at = time.monotonic()
                self._ready.set()

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn to ``READY=1``. Raises ``BenchError`` with the exit code and
        the end of the daemon's log if it exits or is not ready within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"daemon not ready after {timeout:.0f} s: {self.log_tail()}")
        return self._ready_at - self._spawned_at

    def log_tail(self, chars: int = 1500) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:].strip() or "(no log output)"

    def scrape(self) -> Samples:
        """The daemon's metrics; ``BenchError`` with its log if it no longer answers."""
        try:
            return scrape(self.metrics_port, host=self.metrics_host)
        except (urllib.error.URLError, OSError) as exc:
            state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "running"
            raise BenchError(f"cannot scrape the daemon ({state}): {exc}: {self.log_tail()}") from None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def pin(self, cpus: set[int]) -> int:
        """Keep every thread of the daemon on ``cpus`` (``sched_setaffinity`` on each task
        of ``/proc/<pid>/task``; threads started later inherit it). Returns how many
        threads were pinned."""
        pinned = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(task), cpus)
                pinned += 1
        return pinned

    def memory(self) -> dict[str, int]:
        return memory_bytes(self.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the daemon drains, then exits); SIGKILL after ``timeout``. The exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._closed = True
            self._notify.close()
            self._listener.join(2)
        return self.proc.returncode


# --------------------------------------------------------------------------- the probe


class Probe:
    """Probe devices publishing single readings at a steady rate, and the latency of each
    of their scores, from a child process (``python -m anomalyd.benchload probe``).

    The child publishes and receives; this object only sends it commands and keeps the
    samples it hands back. Timestamps taken in this process would be late by whatever
    else this process does (scraping and parsing ``/metrics``, its other threads) while
    holding the interpreter lock.

    The daemon publishes a device's score at most once per ``output.score_interval_s`` of
    data time (one a second by default), so one device yields about one latency a second;
    ``devices`` probe devices, staggered, yield that many. Each starts with one array of a
    window's worth of past readings, so that it is scored from its first live reading on.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        devices: int,
        rate: float,
        window: int,
        features: Sequence[str],
        topic_in: str = "sensors/{device}/telemetry",
        score_topic: str = "anomaly/{device}/score",
        timeout: float = 60.0,
    ) -> None:
        self.devices = [f"{prefix}{k}" for k in range(devices)]
        self.rate = rate  # readings per second per device
        self.samples: list[tuple[float, float]] = []  # (receive time, latency), as received
        self.messages = 0  # published so far, as of the child's last answer
        self.readings = 0
        self._publishing = False  # True between resume and pause: the counts move
        self._timeout = timeout
        cmd = [sys.executable, "-m", "anomalyd.benchload", "probe", "--host", host, "--port", str(port)]
        cmd += ["--prefix", prefix, "--devices", str(devices), "--rate", repr(rate)]
        cmd += ["--window", str(window), "--features", ",".join(features)]
        cmd += ["--topic", topic_in, "--score-topic", score_topic]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="bench-probe-out", daemon=True)
        self._reader.start()
        try:
            if self._next_line(timeout).strip() != "ready":
                raise BenchError(f"probe process did not get ready (exit {self._proc.poll()})")
            self._command("go")
        except BaseException:
            self.close()
            raise
        self._publishing = True

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output: the child has gone

    def _next_line(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def _command(self, command: str) -> None:
        """Send one command and take in its answer (counts, new samples)."""
        if self._proc.poll() is not None:
            raise BenchError(f"probe process exited with {self._proc.returncode}")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{command}\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"probe process gone (exit {self._proc.poll()})") from None
        line = self._next_line(self._timeout)
        if not line.strip():
            raise BenchError(f"probe process did not answer {command!r} (exit {self._proc.poll()})")
        answer = orjson.loads(line)
        self.messages, self.readings = int(answer["messages"]), int(answer["readings"])
        self.samples.extend((float(rec), float(lat)) for rec, lat in answer["samples"])

    def poll(self) -> None:
        """Take in the samples received so far and the current counts."""
        self._command("poll")

    def pause(self) -> None:
        """Stop publishing until ``resume``, so that the counts stand still while the daemon
        drains; returns once the last reading published is on the socket and counted."""
        self._command("pause")
        self._publishing = False

    def resume(self) -> None:
        self._command("resume")
        self._publishing = True

    def counts(self) -> tuple[int, int]:
        """(messages, readings) published so far; asks the child only while it publishes."""
        if self._publishing:
            self.poll()
        return self.messages, self.readings

    def latencies(self, t0: float = 0.0, t1: float = math.inf) -> list[float]:
        """Latencies of the scores received between wall-clock times ``t0`` and ``t1``."""
        self.poll()
        return [lat for rec, lat in self.samples if t0 <= rec < t1]

    def latest(self, max_age: float) -> float | None:
        """Latency of the last score received, if it came within ``max_age`` seconds."""
        self.poll()
        if not self.samples or time.time() - self.samples[-1][0] > max_age:
            return None
        return self.samples[-1][1]

    def first_received(self, after: float, below: float) -> float | None:
        """Receive time of the first score after ``after`` whose latency is under ``below``."""
        self.poll()
        return next((rec for rec, lat in self.samples if rec > after and lat < below), None)

    def wait_scored(self, timeout: float, after: float = 0.0) -> bool:
        """Wait until a score received after ``after`` (wall clock) is in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.latencies(after):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop publishing for good (the subscription stays until ``close``)."""
        self._command("stop")
        self._publishing = False

    @property
    def exit_code(self) -> int | None:
        """The child's exit code; None while it runs."""
        return self._proc.poll()

    def close(self) -> None:
        """End the child: its last answer is taken in if it gives one; killed otherwise."""
        with contextlib.suppress(BenchError, OSError, ValueError):
            if self._proc.poll() is None:
                self._command("exit")
        self._publishing = False
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._reader.join(2)  # it ends at the child's end of output; then its pipe can close
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --------------------------------------------------------------------------- load children


@dataclass
class LoadSpec:
    """What one group of publishers offers (see ``anomalyd.benchload``)."""

    devices: int
    prefix: str
    array: int = 0  # readings per message as a JSON array; 0: one reading, one object
    rate: float = 1.0  # paced: readings per second per device
    seconds: float = 0.0  # paced: how long
    burst: int = 0  # burst: readings per device, as fast as possible
    protocol: str = "5"  # MQTT version of the publishers: "3.1.1" for NATS's MQTT gateway
    partitions: int = 0  # > 0: device ids spread evenly over this many NATS partitions

    @property
    def per_message(self) -> int:
        return max(self.array, 1)


class Children:
    """Child processes that print ``ready``, wait for ``go`` on stdin, and end with one
    JSON line; killed if still running at ``close``."""

    def __init__(self, commands: list[list[str]]) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for cmd in commands:
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = _readline(proc, max(0.1, deadline - time.monotonic()))
            if line.strip() != "ready":
                raise BenchError(f"load process {proc.args!r} did not get ready (exit {proc.poll()})")

    def go(self) -> float:
        """Tell every child to start; returns the wall-clock time of the signal."""
        now = time.time()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return now

    def results(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for proc in self.procs:
            try:
                stdout, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"load process {proc.args!r} did not finish within {timeout:.0f} s"
                ) from None
            if proc.returncode != 0 or not stdout.strip():
                raise BenchError(f"load process {proc.args!r} exited with {proc.returncode}")
            out.append(orjson.loads(stdout.strip().splitlines()[-1]))
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
                proc.communicate(timeout=10)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a child's stdout, or '' if none comes within ``timeout``."""
    box: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def publisher_commands(
    host: str, port: int, spec: LoadSpec, publishers: int, features: Sequence[str]
) -> list[list[str]]:
    """Split ``spec``'s devices over ``publishers`` processes (device ids stay unique)."""
    base = [sys.executable, "-m", "anomalyd.benchload", "publish", "--host", host, "--port", str(port)]
    base += ["--features", ",".join(features), "--array", str(spec.array)]
    if spec.protocol != "5":
        base += ["--protocol", spec.protocol]
    if spec.partitions:
        base += ["--partitions", str(spec.partitions)]
    if spec.burst:
        base += ["--burst", str(spec.burst)]
    else:
        base += ["--rate", repr(spec.rate), "--seconds", repr(spec.seconds)]
    cmds = []
    n = max(1, min(publishers, spec.devices))
    for p in range(n):
        devices = spec.devices // n + (1 if p < spec.devices % n else 0)
        cmds.append([*base, "--prefix", f"{spec.prefix}p{p}-", "--devices", str(devices)])
    return cmds


def summarise_publishers(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a group's publishers."""
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    messages = sum(int(r["messages"]) for r in results)
    return {
        "messages": messages,
        "readings": sum(int(r["readings"]) for r in results),
        "first": first,
        "last": last,
        "messages_per_s": messages / max(last - first, 1e-9),
        "cpu_s": sum(float(r["cpu_s"]) for r in results),
        "late_p99_s": max(float(r["late_p99_s"]) for r in results),
        "late_max_s": max(float(r["late_max_s"]) for r in results),
        "flushed": all(bool(r["flushed"]) for r in results),
    }
