"""The phases of ``anomalyd bench`` against one running daemon: a saturation burst, paced
steps of offered load with the probe, the sweep over them, and the flood.

Every phase ends by waiting until the daemon has received every message offered so far
and has nothing left to do, so each reading offered is accounted for: accepted, rejected
(by reason), or lost. The probe is paused while the daemon drains, so that the counts it
is compared with stand still.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from anomalyd.benchrun import (
    Children,
    DaemonProcess,
    LoadSpec,
    Probe,
    Samples,
    cpu_seconds,
    diff_reasons,
    has_metric,
    histogram_quantile,
    metric,
    percentiles,
    publisher_commands,
    summarise_publishers,
)

#: Sustainable: less than this fraction of the offered readings lost ...
MAX_LOSS = 0.001
#: ... and the probe's 99th percentile publish-to-score latency under this.
MAX_P99_S = 0.100
#: Flood recovery: the probe's lag is "back" when a score arrives younger than this.
RECOVERED_LAG_S = 1.0
#: Paced publishers further behind their schedule than this cannot offer the step's load.
MAX_PUBLISHER_LATE_S = 0.25
#: The daemon's score-rate option; older daemons do not know it (configuration exit 78).
SCORE_INTERVAL_KEY = "output.score_interval_s"
LAG_METRICS = ("anomalyd_data_lag_seconds", "anomalyd_lag_seconds", "anomalyd_overloaded")


@dataclass
class BenchSettings:
    """What ``anomalyd bench`` runs; ``quick_variant()`` makes the under-a-minute CI run."""

    model: Path
    broker: tuple[str, int] | None = None
    publishers: int = 2
    rate: float = 10.0  # readings per second per device in paced steps
    array: int = 20  # readings per message in the array scenarios
    scenarios: tuple[str, ...] = ("arrays", "single", "every-window")
    seconds_per_step: float = 10.0
    max_steps: int = 6
    probe_devices: int = 8
    probe_rate: float = 5.0  # readings per second per probe device
    flood: bool = False
    flood_seconds: float = 60.0
    rss_devices: int = 10_000
    quick: bool = False
    # Sizes of the saturation bursts: devices, single-reading messages, and seconds of
    # raw-ORT work for the array bursts.
    burst_devices: int = 200
    burst_messages: int = 50_000
    burst_seconds: float = 5.0
    ort_seconds: float = 3.0
    counter_idle_s: float = 1.0  # the counting subscriber stops this long after the last message

    @classmethod
    def quick_variant(cls, model: Path, **kw: Any) -> BenchSettings:
        s = cls(model, **kw)
        s.quick = True
        s.rate = 50.0  # windows fill in a second
        s.probe_devices, s.probe_rate = 4, 10.0
        s.seconds_per_step, s.max_steps = 1.5, 2
        s.flood = False
        s.rss_devices = 1000
        s.burst_devices, s.burst_messages, s.burst_seconds, s.ort_seconds = 40, 6000, 0.4, 0.3
        s.counter_idle_s = 0.5
        return s


@dataclass
class RunTotals:
    """What one daemon process was offered (load and probe) and what it did with it."""

    messages: int = 0  # by the load publishers
    readings: int = 0
    probe: Probe | None = None

    def add(self, pub: dict[str, Any]) -> None:
        self.messages += int(pub["messages"])
        self.readings += int(pub["readings"])

    def offered(self) -> tuple[int, int]:
        """(messages, readings) offered so far, by the load publishers and the probe."""
        pm, pr = self.probe.counts() if self.probe is not None else (0, 0)
        return self.messages + pm, self.readings + pr


class Phases:
    """What every phase needs: settings, the model's shape, the broker, and helpers.
    ``anomalyd.bench.Bench`` adds the limits, the daemons and the order of phases."""

    def __init__(self, settings: BenchSettings, workdir: Path, out: TextIO) -> None:
        from anomalyd.config import Config
        from anomalyd.model import read_contract

        self.s = settings
        self.workdir = workdir
        self.out = out
        self.run_id = uuid.uuid4().hex[:6]
        self.contract = read_contract(settings.model)
        self.features = list(self.contract.feature_names)
        self.window = self.contract.window_length
        defaults = Config()
        self.max_batch = defaults.batching.max_batch
        self.providers = defaults.model.providers
        self.host, self.port = "127.0.0.1", 0
        self.broker_pid: int | None = None
        self.started = time.time()
        self.ready_times: list[float] = []

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.started:6.1f} s] {text}", file=self.out, flush=True)

    def _broker_cpu(self) -> float | None:
        try:
            return cpu_seconds(self.broker_pid) if self.broker_pid else None
        except OSError:
            return None

    def _load(self, spec: LoadSpec) -> Children:
        kids = Children(publisher_commands(self.host, self.port, spec, self.s.publishers, self.features))
        try:
            kids.wait_ready(60)
        except BaseException:
            kids.close()
            raise
        return kids

    def _quiesce(
        self,
        d: DaemonProcess,
        expected_messages: int,
        limit: float,
        on_scrape: Callable[[Samples], None] | None = None,
    ) -> tuple[Samples, float, bool]:
        """Scrape until the daemon received ``expected_messages`` in all and has nothing
        left to do (queue and batcher empty, counters still). Returns the last scrape,
        the wall-clock time of the scrape that first saw the final counts, and whether it
        got there within ``limit`` seconds."""
        deadline = time.monotonic() + limit
        previous: tuple[float, ...] | None = None
        changed = time.time()
        while True:
            s = d.scrape()
            now = time.time()
            if on_scrape is not None:
                on_scrape(s)
            key = (
                metric(s, "anomalyd_messages_received_total"),
                metric(s, "anomalyd_readings_accepted_total"),
                metric(s, "anomalyd_windows_scored_total"),
                sum(v for (n, _), v in s.items() if n == "anomalyd_rejected_total"),
            )
            if key != previous:
                previous, changed = key, now
            idle = (
                metric(s, "anomalyd_intake_queue_depth") == 0 and metric(s, "anomalyd_pending_windows") == 0
            )
            if key[0] >= expected_messages and idle and now - changed >= 0.3:
                return s, changed, True
            if time.monotonic() > deadline:
                return s, changed, False
            time.sleep(0.1)

    def _burst_spec(self, tag: str, array: int, readings: int) -> LoadSpec:
        devices = self.s.burst_devices
        per_device = max(2 * self.window, math.ceil(readings / devices))
        per_msg = max(array, 1)
        per_device = math.ceil(per_device / per_msg) * per_msg
        return LoadSpec(devices=devices, prefix=f"b{self.run_id}-{tag}-", array=array, burst=per_device)

    def saturation(
        self, d: DaemonProcess, totals: RunTotals, tag: str, array: int, readings: int
    ) -> dict[str, Any]:
        """A burst as fast as the publishers go; rates from first publish to all done."""
        spec = self._burst_spec(tag, array, readings)
        messages = spec.devices * (spec.burst // spec.per_message)
        before = d.scrape()
        cpu0, broker0 = d.cpu_seconds(), self._broker_cpu()
        deepest = 0.0

        def watch(s: Samples) -> None:
            nonlocal deepest
            deepest = max(deepest, metric(s, "anomalyd_intake_queue_depth"))

        kids = self._load(spec)
        try:
            kids.go()
            after, done, complete = self._quiesce(
                d, totals.offered()[0] + messages, max(60.0, 25 * self.s.burst_seconds), watch
            )
            cpu1, broker1 = d.cpu_seconds(), self._broker_cpu()
            pub = summarise_publishers(kids.results(60))
        finally:
            kids.close()
        totals.add(pub)
        wall = max(done - pub["first"], 1e-9)
        accepted = metric(after, "anomalyd_readings_accepted_total") - metric(
            before, "anomalyd_readings_accepted_total"
        )
        windows = metric(after, "anomalyd_windows_scored_total") - metric(
            before, "anomalyd_windows_scored_total"
        )
        return {
            "devices": spec.devices,
            "readings_per_device": spec.burst,
            "readings_per_message": spec.per_message,
            "offered_readings": pub["readings"],
            "accepted_readings": int(accepted),
            "windows_scored": int(windows),
            "expected_windows": spec.devices * (spec.burst - self.window + 1),
            "rejected": diff_reasons(after, before),
            "complete": complete,
            "seconds": wall,
            "readings_per_s": accepted / wall,
            "windows_per_s": windows / wall,
            "publishers_messages_per_s": pub["messages_per_s"],
            "daemon_cpu_pct": 100 * (cpu1 - cpu0) / wall,
            "broker_cpu_pct": None
            if broker0 is None or broker1 is None
            else 100 * (broker1 - broker0) / wall,
            "deepest_intake_queue": deepest,
        }

    def step(
        self, d: DaemonProcess, probe: Probe, totals: RunTotals, *, tag: str, array: int, rate: float
    ) -> dict[str, Any]:
        """Offer ``rate`` readings/s (paced) for warm-up + ``seconds_per_step``; measure the
        steady part, then wait for the daemon to finish and account for every reading."""
        r = self.s.rate
        devices = max(1, round(rate / r))
        warm = self.window / r + (0.5 if self.s.quick else 1.0)
        measure = self.s.seconds_per_step
        spec = LoadSpec(
            devices=devices, prefix=f"b{self.run_id}-{tag}-", array=array, rate=r, seconds=warm + measure
        )
        before = d.scrape()
        unaccounted0 = totals.offered()[1] - metric(before, "anomalyd_readings_accepted_total")
        kids = self._load(spec)
        try:
            probe.resume()
            t_go = kids.go()
            time.sleep(max(0.0, t_go + warm - time.time()))
            # /metrics only at the two ends of the measured interval: rendering it takes the
            # daemon's time (a few ms), which would lengthen the probe's latencies. The
            # interval starts after the first scrape and ends before the second.
            s0, c0, p0, t0 = d.scrape(), d.cpu_seconds(), probe.counts()[1], time.time()
            time.sleep(max(0.0, t0 + measure - time.time()))
            t1 = time.time()
            s1, c1, p1 = d.scrape(), d.cpu_seconds(), probe.counts()[1]
            pub = summarise_publishers(kids.results(warm + measure + 60))
        finally:
            kids.close()
            probe.pause()
        totals.add(pub)
        after, _done, complete = self._quiesce(d, totals.offered()[0], 30.0 if not self.s.quick else 10.0)
        unaccounted1 = totals.offered()[1] - metric(after, "anomalyd_readings_accepted_total")
        lost = int(unaccounted1 - unaccounted0)
        lat = percentiles(probe.latencies(t0, t1))
        span = max(t1 - t0, 1e-9)
        probe_readings = p1 - p0
        accepted = metric(s1, "anomalyd_readings_accepted_total") - metric(
            s0, "anomalyd_readings_accepted_total"
        )
        windows = metric(s1, "anomalyd_windows_scored_total") - metric(s0, "anomalyd_windows_scored_total")
        loss = lost / max(pub["readings"], 1)
        why = []
        if not complete:
            why.append("daemon still busy after the step")
        if loss >= MAX_LOSS:
            why.append(f"lost {100 * loss:.2f} % of readings")
        if lat["p99"] is None:
            why.append("no probe score in the measured interval")
        elif float(lat["p99"]) >= MAX_P99_S:
            why.append(f"probe p99 {1e3 * float(lat['p99']):.0f} ms")
        if pub["late_p99_s"] > MAX_PUBLISHER_LATE_S:
            why.append(f"publishers {pub['late_p99_s']:.2f} s behind (the load generator cannot offer this)")
        return {
            "offered_readings_per_s": devices * r,
            "devices": devices,
            "readings_per_device_per_s": r,
            "readings_per_message": spec.per_message,
            "offered_readings": pub["readings"],
            "lost_readings": lost,
            "loss_fraction": loss,
            "rejected": diff_reasons(after, before),
            "readings_per_s": (accepted - probe_readings) / span,
            "windows_per_s": (windows - probe_readings) / span,
            "daemon_cpu_pct": 100 * (c1 - c0) / span,
            "probe_latency_s": lat,
            "daemon_lag": self._lag(s1, s0),
            "publishers_late_p99_s": pub["late_p99_s"],
            "sustainable": not why,
            "why_not": why,
        }

    def _lag(self, s: Samples, base: Samples | None) -> dict[str, Any]:
        """The daemon's own lag metrics, or "absent" for those it does not export."""
        out: dict[str, Any] = {}
        for name in LAG_METRICS:
            if not has_metric(s, name):
                out[name] = "absent"
            elif name == "anomalyd_data_lag_seconds":
                out[name] = {f"p{int(q * 100)}": histogram_quantile(s, base, name, q) for q in (0.5, 0.99)}
            else:
                out[name] = metric(s, name)
        return out

    def sweep(
        self, d: DaemonProcess, probe: Probe, totals: RunTotals, *, name: str, array: int, cap: float
    ) -> dict[str, Any]:
        """Geometric steps of offered load up to the first unsustainable one, one bisection
        between the last good and the first bad, then a step at half the best."""
        r = self.s.rate
        rate = max(r, cap / 8) if not self.s.quick else 10 * r
        steps: list[dict[str, Any]] = []
        good: float | None = None
        bad: float | None = None
        while len(steps) < self.s.max_steps:
            res = self.step(d, probe, totals, tag=f"{name[:2]}s{len(steps)}", array=array, rate=rate)
            steps.append(res)
            self._say_step(name, res)
            if res["sustainable"]:
                good = res["offered_readings_per_s"]
                rate = 2 * rate
            else:
                bad = res["offered_readings_per_s"]
                break
        if not self.s.quick and good is not None and bad is not None and bad / good > 1.3:
            mid = math.sqrt(good * bad)
            res = self.step(d, probe, totals, tag=f"{name[:2]}s{len(steps)}", array=array, rate=mid)
            steps.append(res)
            self._say_step(name, res)
            if res["sustainable"]:
                good = res["offered_readings_per_s"]
        lowest = min(s["offered_readings_per_s"] for s in steps)
        half_of = good if good is not None else lowest
        half = self.step(d, probe, totals, tag=f"{name[:2]}h", array=array, rate=half_of / 2)
        self._say_step(f"{name} at half", half)
        return {
            "steps": steps,
            "sustainable_readings_per_s": good,
            # False when every step was sustainable: the limit is above the last step.
            "limit_found": bad is not None,
            "half": half,
            "half_of": "sustainable rate" if good is not None else "lowest step (none was sustainable)",
        }

    def _say_step(self, name: str, res: dict[str, Any]) -> None:
        p99 = res["probe_latency_s"]["p99"]
        self.say(
            f"{name}: offered {res['offered_readings_per_s']:.0f} readings/s, accepted "
            f"{res['readings_per_s']:.0f}/s, probe p99 "
            + (f"{1e3 * p99:.1f} ms" if p99 is not None else "-")
            + f" (n={res['probe_latency_s']['n']}), lost {res['lost_readings']}: "
            + ("sustainable" if res["sustainable"] else "; ".join(res["why_not"]))
        )

    def flood(
        self, d: DaemonProcess, probe: Probe, totals: RunTotals, array: int, rate: float
    ) -> dict[str, Any]:
        """``flood_seconds`` at ``rate``: the daemon's lag metrics beside the probe's true
        lag, every reading lost and why, memory before and after, and the recovery."""
        r = self.s.rate
        devices = max(1, round(rate / r))
        seconds = self.s.flood_seconds
        spec = LoadSpec(devices=devices, prefix=f"b{self.run_id}-fl-", array=array, rate=r, seconds=seconds)
        before = d.scrape()
        mem0 = d.memory()
        accepted0 = metric(before, "anomalyd_readings_accepted_total")
        unaccounted0 = totals.offered()[1] - accepted0
        trace: list[dict[str, Any]] = []
        kids = self._load(spec)
        try:
            probe.resume()
            t_go = kids.go()
            while time.time() < t_go + seconds:
                time.sleep(0.5)
                s = d.scrape()
                trace.append(
                    {
                        "t": time.time() - t_go,
                        "daemon_lag_s": metric(s, "anomalyd_lag_seconds")
                        if has_metric(s, "anomalyd_lag_seconds")
                        else None,
                        "overloaded": metric(s, "anomalyd_overloaded")
                        if has_metric(s, "anomalyd_overloaded")
                        else None,
                        "probe_lag_s": probe.latest(1.0),
                        "intake_queue": metric(s, "anomalyd_intake_queue_depth"),
                    }
                )
            end_scrape = d.scrape()
            mem1 = d.memory()
            pub = summarise_publishers(kids.results(120))
        finally:
            kids.close()
        totals.add(pub)
        t_end = pub["last"]
        # Recovery: the first probe score after the flood whose lag is under a second.
        recovered: float | None = None
        deadline = time.monotonic() + 180.0
        while recovered is None and time.monotonic() < deadline:
            first = probe.first_received(t_end, RECOVERED_LAG_S)
            if first is not None:
                recovered = first - t_end
            else:
                time.sleep(0.1)
        probe.pause()
        after, _done, complete = self._quiesce(d, totals.offered()[0], 180.0)
        lost = int(totals.offered()[1] - metric(after, "anomalyd_readings_accepted_total") - unaccounted0)
        pairs = [
            p["daemon_lag_s"] / p["probe_lag_s"]
            for p in trace
            if p["daemon_lag_s"] is not None and p["probe_lag_s"] is not None and p["probe_lag_s"] > 0
        ]
        lat = percentiles(probe.latencies(t_go, t_end))
        return {
            "offered_readings_per_s": devices * r,
            "seconds": seconds,
            "offered_readings": pub["readings"],
            "lost_readings": lost,
            "rejected": diff_reasons(after, before),
            "drained": complete,
            "probe_latency_s": lat,
            "daemon_lag": self._lag(end_scrape, before),
            "lag_ratio_daemon_to_probe": (
                {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "n": len(pairs)}
                if pairs
                else "absent"
            ),
            "overloaded_seen": max(
                (p["overloaded"] for p in trace if p["overloaded"] is not None), default=None
            ),
            "rss_bytes_start": mem0.get("rss"),
            "rss_bytes_end": mem1.get("rss"),
            "recovery_s": recovered,
            "trace": trace,
        }

    @staticmethod
    def _accounting(totals: RunTotals, s: Samples, drained: bool) -> dict[str, Any]:
        """Offered against received, accepted and rejected, over one daemon's life."""
        messages, readings = totals.offered()
        received = int(metric(s, "anomalyd_messages_received_total"))
        accepted = int(metric(s, "anomalyd_readings_accepted_total"))
        return {
            "offered_messages": messages,
            "received_messages": received,
            "broker_lost_messages": messages - received,
            "offered_readings": readings,
            "accepted_readings": accepted,
            "rejected": diff_reasons(s, {}),
            "lost_readings": readings - accepted,
            "drained": drained,
        }
