"""``anomalyd bench``: the real daemon, end to end, against limits measured in the same run.

Everything runs on this machine over 127.0.0.1: a private Mosquitto (or ``--broker``),
the daemon as its own process (``python -m anomalyd run --config <generated TOML>``),
load from publisher processes (``anomalyd.benchload``) and the probe devices in a process
of their own (``anomalyd.benchload probe``, driven by ``anomalyd.benchrun.Probe``), so
that the bench's own work does not delay the latencies they measure. Machines are shared
and noisy, so the headline figures are ratios against limits measured beside them:

* raw ONNX Runtime: the same model at the daemon's batch size, alone in this process
  (best of 1 and 2 intra-op threads, spinning off), while no daemon runs;
* a bare paho subscriber that only counts, fed the same single-reading burst as the
  daemon's ``single`` scenario;
* a naive daemon: the same daemon with ``batching.max_batch = 1``,
  ``batching.max_delay_ms = 0`` and ``output.score_interval_s = 0`` (one inference and
  one score message per reading), fed a burst of the same array messages (fewer of
  them: it is sized by ONNX Runtime's rate at batch 1, the most such a daemon can do).

Each scenario (``arrays``, ``single``, ``every-window``) is one daemon process:
start-up to ``READY=1``; a saturation burst (readings/s accepted, windows/s scored);
then, with the probe, paced steps of offered load (devices × readings/s, geometric) up to
the highest sustainable rate (loss < 0.1 % and probe p99 < 100 ms), and one step at half
of it. ``--flood`` adds 60 s at three times the sustainable rate to the first scenario.
A last daemon gets 10,000 devices for its memory. Every reading offered is accounted for
(accepted, rejected by reason, or lost).

Ctrl-C, SIGTERM or SIGHUP stop the bench with its cleanup: the daemon, the load processes
and the private broker are stopped and the temporary folder removed (exit 130, 143, 129;
``stopped_like_ctrl_c``, which the command wraps around every mode, ``--instances`` too).

``anomalyd bench --instances`` (several instances sharing a fleet through NATS partitions)
is ``anomalyd.benchcluster``; it reuses the phases' helpers and the child processes here.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import numpy as np

from anomalyd.benchphases import LAG_METRICS, SCORE_INTERVAL_KEY, BenchSettings, Phases, RunTotals
from anomalyd.benchreport import ratios, render
from anomalyd.benchrun import (
    BenchError,
    Children,
    DaemonProcess,
    LoadSpec,
    Probe,
    has_metric,
    metric,
    summarise_publishers,
)

__all__ = ["Bench", "BenchSettings", "run_bench", "stopped_like_ctrl_c"]


def scenario_table(array: int) -> dict[str, dict[str, Any]]:
    """The scenarios: message shape and configuration overrides."""
    return {
        "arrays": {"array": array, "overrides": {}},
        "single": {"array": 0, "overrides": {}},
        "every-window": {"array": array, "overrides": {SCORE_INTERVAL_KEY: 0}},
        "naive": {
            "array": array,
            "overrides": {"batching.max_batch": 1, "batching.max_delay_ms": 0, SCORE_INTERVAL_KEY: 0},
        },
    }


def total_accounting(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The accounting of every daemon run, summed; ``nothing_lost`` when every reading
    offered was accepted and every message offered was received."""
    keys = [
        "offered_messages",
        "received_messages",
        "broker_lost_messages",
        "offered_readings",
        "accepted_readings",
        "lost_readings",
    ]
    out: dict[str, Any] = {k: sum(int(r["accounting"][k]) for r in runs) for k in keys}
    rejected: dict[str, int] = {}
    for r in runs:
        for reason, n in r["accounting"]["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + int(n)
    out["rejected"] = rejected
    out["drained"] = all(r["accounting"]["drained"] for r in runs)
    out["nothing_lost"] = out["lost_readings"] == 0 and out["broker_lost_messages"] == 0 and not rejected
    return out


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, values: dict[str, object]) -> Path:
    """Dotted keys (``"mqtt.port"``) to a TOML file of one-level tables."""
    tables: dict[str, list[str]] = {}
    for dotted, v in values.items():
        table, _, key = dotted.rpartition(".")
        tables.setdefault(table, []).append(f"{key} = {_toml_value(v)}")
    path.write_text("".join(f"[{t}]\n" + "\n".join(lines) + "\n\n" for t, lines in tables.items()))
    return path


class Bench(Phases):
    """One run of the benchmark; ``run()`` returns the JSON-ready result."""

    def __init__(self, settings: BenchSettings, workdir: Path, out: TextIO) -> None:
        super().__init__(settings, workdir, out)
        self.limits: dict[str, Any] = {}

    def raw_ort(self) -> dict[str, Any]:
        """Windows/s of ONNX Runtime alone at the daemon's batch size (and at batch 1)."""
        from anomalyd.benchload import value_pool
        from anomalyd.model import SessionOptions, load_model

        rows = np.asarray(value_pool(len(self.features))[0], dtype=np.float32)
        starts = np.arange(self.max_batch) % (len(rows) - self.window)
        windows = np.stack([rows[i : i + self.window] for i in starts])

        def measure(threads: int, batch: int, seconds: float) -> float:
            model = load_model(
                self.s.model,
                SessionOptions(providers=self.providers, intra_op_threads=threads, allow_spinning=False),
            )
            x = np.ascontiguousarray(windows[:batch])
            for _ in range(3):
                model.run(x)
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds:
                model.run(x)
                n += 1
            return n * batch / elapsed

        by_threads = {str(t): measure(t, self.max_batch, self.s.ort_seconds) for t in (1, 2)}
        best = max(by_threads, key=lambda k: by_threads[k])
        return {
            "batch": self.max_batch,
            "windows_per_s_by_threads": by_threads,
            "best_threads": int(best),
            "windows_per_s": by_threads[best],
            "batch1_windows_per_s": measure(1, 1, self.s.ort_seconds / 2),
        }

    def bare_subscriber(self) -> dict[str, Any]:
        """Messages/s a subscriber that only counts receives from the single-reading burst."""
        spec = self._burst_spec("sub", 0, self.s.burst_messages)
        counter = Children(
            [
                [
                    sys.executable,
                    "-m",
                    "anomalyd.benchload",
                    "count",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--idle",
                    repr(self.s.counter_idle_s),
                ]
            ]
        )
        try:
            counter.wait_ready(30)
            kids = self._load(spec)
            try:
                broker0 = self._broker_cpu()
                counter.go()
                kids.go()
                pub = summarise_publishers(kids.results(120))
            finally:
                kids.close()
            got = counter.results(150)[0]
        finally:
            counter.close()
        wall = max(got["last"] - pub["first"], 1e-9) if got["received"] else math.nan
        broker1 = self._broker_cpu()
        return {
            "messages_sent": pub["messages"],
            "messages_received": got["received"],
            "messages_per_s": got["received"] / wall,
            "seconds": wall,
            "subscriber_cpu_pct": 100 * got["cpu_s"] / wall,
            "publishers_messages_per_s": pub["messages_per_s"],
            "broker_cpu_pct": None
            if broker0 is None or broker1 is None
            else 100 * (broker1 - broker0) / wall,
        }

    # ------------------------------------------------------------------ daemon runs

    def _config(self, name: str, overrides: dict[str, object], metrics_port: int) -> dict[str, object]:
        values: dict[str, object] = {
            "mqtt.host": self.host,
            "mqtt.port": self.port,
            "mqtt.client_id": f"anomalyd-bench-{self.run_id}-{name}",
            "model.path": str(self.s.model),
            "metrics.host": "127.0.0.1",
            "metrics.port": metrics_port,
            "logging.level": "WARNING",
            # The load runs faster than real time (each device many readings a second of
            # data time), which the cadence check would rightly refuse to score.
            "stream.cadence_check": False,
        }
        values.update(overrides)
        return values

    def supported(self, overrides: dict[str, object]) -> tuple[dict[str, object], list[str]]:
        """``overrides`` without the keys this daemon does not know (``check-config``'s
        errors), and those keys."""
        from anomalyd.config import config_errors

        probe = write_toml(self.workdir / "check.toml", dict(overrides))
        unknown = sorted({e.key_path for e in config_errors(probe) if e.key_path in overrides})
        return {k: v for k, v in overrides.items() if k not in unknown}, unknown

    def start_daemon(self, name: str, overrides: dict[str, object]) -> tuple[DaemonProcess, dict[str, Any]]:
        from anomalyd.broker import free_port

        kept, dropped = self.supported(overrides)
        run_dir = self.workdir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):
            port = free_port()
            cfg = write_toml(run_dir / "anomalyd.toml", self._config(name, kept, port))
            d = DaemonProcess(run_dir, cfg, port)
            try:
                ready = d.wait_ready(90)
            except BenchError:
                code = d.stop(5)
                # 78: configuration error. A key that check-config accepted but the
                # daemon refused (another version on the path) is dropped, once.
                late = [k for k in kept if k.rsplit(".", 1)[-1] in d.log_tail()] if code == 78 else []
                if late:
                    dropped += late
                    kept = {k: v for k, v in kept.items() if k not in late}
                    continue
                raise
            self.ready_times.append(ready)
            info = {"config": kept, "unsupported_keys": dropped, "start_to_ready_s": ready}
            return d, info
        raise BenchError(f"daemon for {name} did not start")

    def scenario(self, name: str, *, sweep: bool, flood: bool) -> dict[str, Any]:
        """One daemon process: start, saturation burst, then (with the probe) the sweep,
        the half-rate step and the flood; at the end, every reading accounted for."""
        table = scenario_table(self.s.array)[name]
        array: int = table["array"]
        d, info = self.start_daemon(name, table["overrides"])
        result: dict[str, Any] = {"readings_per_message": max(array, 1), **info}
        totals = RunTotals()
        probe: Probe | None = None
        try:
            first = d.scrape()
            result["lag_metrics"] = {n: "present" if has_metric(first, n) else "absent" for n in LAG_METRICS}
            self.say(
                f"{name}: daemon ready in {info['start_to_ready_s']:.2f} s"
                + (
                    f" (without {', '.join(info['unsupported_keys'])}: unknown to this daemon)"
                    if info["unsupported_keys"]
                    else ""
                )
            )
            # Burst sizes: the bare subscriber's burst for "single" (the same flood), else
            # about burst_seconds of the model's own limit at the daemon's batch size.
            ort = self.limits["raw_ort"]
            if name == "single":
                budget = self.s.burst_messages
            elif name == "naive":
                budget = int(ort["batch1_windows_per_s"] * self.s.burst_seconds)
            else:
                budget = int(ort["windows_per_s"] * self.s.burst_seconds)
            sat = self.saturation(d, totals, f"{name[:2]}b", array, budget)
            result["saturation"] = sat
            self.say(
                f"{name}: burst of {sat['offered_readings']} readings: "
                f"{sat['readings_per_s']:.0f} readings/s, {sat['windows_per_s']:.0f} windows/s, "
                f"daemon CPU {sat['daemon_cpu_pct']:.0f} %"
            )
            if sweep or flood:
                probe = Probe(
                    self.host,
                    self.port,
                    f"b{self.run_id}-probe-{name[:2]}-",
                    devices=self.s.probe_devices,
                    rate=self.s.probe_rate,
                    window=self.window,
                    features=self.features,
                )
                totals.probe = probe
                if not probe.wait_scored(30.0):
                    raise BenchError(f"{name}: no score for the probe devices: {d.log_tail()}")
                probe.pause()
                # The probe's first windows (a window of past readings) are scored now,
                # before any step: their scores report old readings, not lag.
                self._quiesce(d, totals.offered()[0], 30.0)
                result["sweep"] = self.sweep(
                    d, probe, totals, name=name, array=array, cap=sat["readings_per_s"]
                )
                if flood:
                    base = result["sweep"]["sustainable_readings_per_s"] or min(
                        s["offered_readings_per_s"] for s in result["sweep"]["steps"]
                    )
                    self.say(f"{name}: flood at {3 * base:.0f} readings/s for {self.s.flood_seconds:.0f} s")
                    result["flood"] = self.flood(d, probe, totals, array, 3 * base)
                probe.stop()
            final, _t, drained = self._quiesce(d, totals.offered()[0], 60.0)
            mem = d.memory()
            result["peak_rss_bytes"] = mem.get("peak")
            result["accounting"] = self._accounting(totals, final, drained)
        finally:
            if probe is not None:
                probe.close()
            code = d.stop()
        result["exit_code"] = code
        return result

    def rss(self) -> dict[str, Any]:
        """A fresh daemon, ``rss_devices`` devices with a few readings each: its memory."""
        d, info = self.start_daemon("rss", {})
        totals = RunTotals()
        try:
            spec = LoadSpec(devices=self.s.rss_devices, prefix=f"b{self.run_id}-rss-", array=5, burst=5)
            kids = self._load(spec)
            try:
                kids.go()
                s, _t, drained = self._quiesce(d, spec.devices, 120.0)
                totals.add(summarise_publishers(kids.results(60)))
            finally:
                kids.close()
            deadline = time.monotonic() + 10
            # The gauge is refreshed by the daemon's housekeeping, about once a second.
            while metric(s, "anomalyd_devices_tracked") < spec.devices and time.monotonic() < deadline:
                time.sleep(0.2)
                s = d.scrape()
            mem = d.memory()
            out = {
                **info,
                "devices": spec.devices,
                "devices_tracked": int(metric(s, "anomalyd_devices_tracked")),
                "rss_bytes": mem.get("rss"),
                "peak_rss_bytes": mem.get("peak"),
                "accounting": self._accounting(totals, s, drained),
            }
        finally:
            out_code = d.stop()
        out["exit_code"] = out_code
        return out

    def run(self, broker_address: tuple[str, int] | None) -> dict[str, Any]:
        from anomalyd import __version__
        from anomalyd.broker import PrivateBroker

        result: dict[str, Any] = {
            "schema": 1,
            "anomalyd": __version__,
            "quick": self.s.quick,
            "started_unix": self.started,
            "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
            "model": {
                "path": str(self.s.model),
                "version": self.contract.model_version,
                "window": self.window,
                "features": self.features,
            },
            "settings": {k: v for k, v in vars(self.s).items() if k not in ("model", "broker")},
        }
        private: PrivateBroker | None = None
        try:
            if broker_address is None:
                private = PrivateBroker(self.workdir / "broker")
                private.start()
                self.host, self.port, self.broker_pid = private.host, private.port, private.pid
            else:
                self.host, self.port = broker_address
            result["broker"] = {
                "address": f"{self.host}:{self.port}",
                "private": private is not None,
                "max_queued_messages": private.max_queued_messages if private else None,
            }
            self.say(
                f"broker {self.host}:{self.port} ({'private' if private else 'given'}); model "
                f"{self.contract.model_version} (window {self.window}); {os.cpu_count()} CPUs"
            )
            self.limits["raw_ort"] = self.raw_ort()
            self.say(
                f"raw ONNX Runtime: {self.limits['raw_ort']['windows_per_s']:.0f} windows/s at batch "
                f"{self.max_batch} ({self.limits['raw_ort']['best_threads']} threads)"
            )
            self.limits["bare_subscriber"] = self.bare_subscriber()
            self.say(f"bare subscriber: {self.limits['bare_subscriber']['messages_per_s']:.0f} messages/s")
            scenarios: dict[str, Any] = {}
            for i, name in enumerate(self.s.scenarios):
                do_sweep = i == 0 or not self.s.quick
                scenarios[name] = self.scenario(name, sweep=do_sweep, flood=self.s.flood and i == 0)
            scenarios["naive"] = self.scenario("naive", sweep=False, flood=False)
            result["scenarios"] = scenarios
            result["rss"] = self.rss()
            self.say(
                f"rss: {result['rss']['devices_tracked']} devices tracked, "
                f"{result['rss']['rss_bytes'] / 1e6:.0f} MB resident"
            )
            if not self.s.quick:
                # Measured again at the end: the higher is kept, so a neighbour busy during
                # one of them makes a ratio pessimistic, never flattering.
                again = self.raw_ort()
                if again["windows_per_s"] > self.limits["raw_ort"]["windows_per_s"]:
                    again["before"] = self.limits["raw_ort"]["windows_per_s"]
                    self.limits["raw_ort"] = again
                sub = self.bare_subscriber()
                if sub["messages_per_s"] > self.limits["bare_subscriber"]["messages_per_s"]:
                    sub["before"] = self.limits["bare_subscriber"]["messages_per_s"]
                    self.limits["bare_subscriber"] = sub
            result["limits"] = self.limits
        finally:
            if private is not None:
                private.close()
        result["accounting"] = total_accounting([*scenarios.values(), result["rss"]])
        result["start_to_ready_s"] = {
            "each": self.ready_times,
            "median": statistics.median(self.ready_times) if self.ready_times else None,
        }
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["elapsed_s"] = time.time() - self.started
        result["ratios"] = ratios(result)
        return result


@contextlib.contextmanager
def stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP end the bench as Ctrl-C does, as an exception, so that every
    ``finally`` runs: Python's default for them ends the process at once and leaves the
    private broker, the daemons and the temporary folder behind. For every ``anomalyd
    bench`` (``--instances`` too; ``--hosts`` adds its own handlers inside this and restores
    these). Only the main thread can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_bench(settings: BenchSettings, json_path: Path | None, out: TextIO | None = None) -> int:
    """The ``anomalyd bench`` command: run, print the table, write the JSON. Exit code."""
    import orjson

    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="anomalyd-bench-") as tmp:
        bench = Bench(settings, Path(tmp), out)
        try:
            result = bench.run(settings.broker)
        except BenchError as exc:
            print(f"anomalyd bench: {exc}", file=sys.stderr)
            return 1
    print(render(result), file=out, flush=True)
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"JSON written to {json_path}", file=out)
    return 0
