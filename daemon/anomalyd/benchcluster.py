"""``anomalyd bench --instances N[,N...]``: how the throughput of a partitioned fleet grows
with the number of daemon instances sharing it, on one machine, on the same load.

A private nats-server (``anomalyd.nats_broker.PrivateNatsServer``) with its MQTT gateway
and the partition mapping (``sensors.*.telemetry -> sensors.<device>.telemetry.<p>``, P
partitions) stands in for the fleet's broker. Publishers send plain
``sensors/<device>/telemetry`` in MQTT 3.1.1, as devices do, and the server appends each
device's partition. For each N, N daemon processes run with ``[cluster] partitions = P,
instance = i, instances = N`` and ``mqtt.protocol = "3.1.1"``, each with its own client id
and metrics port; each subscribes to its own partitions only.

Throughput is the work the instances did together: windows scored per second
(``anomalyd_windows_scored_total`` summed over the instances: one window is one row of a
model batch, the scoring work; readings accepted are reported beside it), from the first
publish of a fixed burst to the scrape that saw the last window scored. The burst is the
same for every N (the same number of devices, readings and messages; its device ids are
chosen to spread evenly over the partitions, so no instance gets more than its share) and
offered as fast as the publishers go, which is faster than one daemon takes it: the
instances run saturated, and what they could not take at once waits in their intake
queues. Rounds go N = 1, 2, 4, 1, 2, 4, ...: each figure is the median of its repeats,
and a busy neighbour hits every N alike.

Everything shares this machine's cores: the instances, nats-server, the publishers and the
bench. Each run therefore reports where the CPU went (``/proc/<pid>/stat`` of the
instances and of nats-server, the publishers' own ``os.times()``, this process's, and the
machine's busy time from ``/proc/stat``, which includes whatever else runs here), and
names the bottleneck: the machine (its cores nearly all busy), the load generator (the
instances kept pace with the publishers: the measured rate is what was offered, a lower
bound of what the instances can do), or the instances. A counting subscriber through the
same server (``sensors/+/telemetry/+``, the same burst) gives what the broker and the
publishers deliver at most.

``--pin`` keeps instance i on core ``i % cores`` (``sched_setaffinity``): one core per
instance, so N = 1 is measured on one core and the ratios say how throughput grows per
core added; without it every instance may use every core.

``--hosts CPUS`` runs instance i as host i (``anomalyd.benchhosts``): in a network
namespace of its own, linked to nats-server's bridge by a veth pair (its MQTT traffic
crosses that link; the bench scrapes its ``/metrics`` at the host's address), and in a
CPU cgroup holding CPUS cores' worth of time. The budget per instance is fixed, so the
ratio of N instances to one says whether another host of the same size adds as much
again. Each run records what the kernel says of each instance (its namespace, its
cgroup and quota, its connection to the broker) and each host's throttling; an instance
that used nearly all of its budget was held by it.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from anomalyd.bench import total_accounting, write_toml
from anomalyd.benchcpu import CpuMark, bottleneck
from anomalyd.benchhosts import PERIOD_US, Hosts
from anomalyd.benchphases import BenchSettings, Phases
from anomalyd.benchreport import by_instances
from anomalyd.benchrun import (
    BenchError,
    Children,
    DaemonProcess,
    LoadSpec,
    Samples,
    diff_reasons,
    metric,
    rejected_by_reason,
    summarise_publishers,
)

if TYPE_CHECKING:
    from anomalyd.nats_broker import PrivateNatsServer

__all__ = ["ClusterSettings", "run_cluster_bench"]

#: Scrape intervals during a burst (see ``ClusterBench._drain``), and the share of the
#: burst's windows from which the end is near.
SLOW_SCRAPE_S = 0.5
FAST_SCRAPE_S = 0.1
NEAR_END = 0.95
#: Telemetry topics of the partitioned fleet, as the broker delivers them.
PARTITIONED_FILTER = "sensors/+/telemetry/+"


@dataclass
class ClusterSettings:
    """What ``anomalyd bench --instances`` runs, beside the shared ``BenchSettings`` (model,
    publishers, readings per message, quick)."""

    instances: tuple[int, ...] = (1, 2, 4)
    partitions: int = 16
    repeats: int = 3
    pin: bool = False
    #: Readings in each burst (rounded up to whole messages for every device).
    burst_readings: int = 400_000
    #: Devices per partition for each publisher process.
    devices_per_partition: int = 8
    #: ``--hosts``: each instance in a network namespace and a CPU cgroup of this many cores.
    host_cpus: float | None = None

    @classmethod
    def quick_variant(cls, **kw: Any) -> ClusterSettings:
        s = cls(**kw)
        s.repeats, s.burst_readings, s.devices_per_partition = 1, 24_000, 1
        return s


def instance_counts(text: str) -> tuple[int, ...]:
    """``"2,4"`` -> (1, 2, 4): ascending, each once, with 1 (the ratios' baseline) always in.
    ``ValueError`` for anything but positive integers."""
    try:
        counts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        counts = set()
    if not counts or min(counts) < 1:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(sorted(counts | {1}))


@dataclass
class _Trace:
    """Scrapes of every instance during a burst: the windows scored by then, summed."""

    points: list[tuple[float, float]] = field(default_factory=list)

    def windows_at(self, t: float) -> float:
        """Windows scored by wall-clock time ``t`` (linear between scrapes)."""
        before = [p for p in self.points if p[0] <= t]
        after = [p for p in self.points if p[0] > t]
        if not before:
            return self.points[0][1] if self.points else 0.0
        if not after:
            return before[-1][1]
        (t0, w0), (t1, w1) = before[-1], after[0]
        return w0 + (w1 - w0) * (t - t0) / max(t1 - t0, 1e-9)


@dataclass
class _Burst:
    """What one burst left to summarise: scrapes before and after, when the instances were
    done and whether within the limit, the trace, CPU marks, the publishers' totals and
    the instances' exit codes."""

    before: list[Samples]
    after: list[Samples]
    done: float
    complete: bool
    trace: _Trace
    start: CpuMark
    end: CpuMark
    pub: dict[str, Any]
    exits: list[int | None]


def _sum_metric(scrapes: list[Samples], name: str) -> float:
    return sum(metric(s, name) for s in scrapes)


class ClusterBench(Phases):
    """One run of ``anomalyd bench --instances``; ``run()`` returns the JSON-ready result."""

    def __init__(self, settings: BenchSettings, cluster: ClusterSettings, workdir: Path, out: TextIO) -> None:
        super().__init__(settings, workdir, out)
        self.c = cluster
        self.cpus = sorted(os.sched_getaffinity(0))
        per_publisher = cluster.partitions * cluster.devices_per_partition
        self.devices = per_publisher * max(1, settings.publishers)
        per_msg = max(settings.array, 1)
        per_device = max(2 * self.window, math.ceil(cluster.burst_readings / self.devices))
        self.readings_per_device = math.ceil(per_device / per_msg) * per_msg
        # Twice a generous size of the whole burst (a reading is about 90 bytes of JSON, a
        # message about 200 more in the queue's accounting), and never below the default.
        burst_bytes = self.devices * self.readings_per_device * 128 + self.devices * 256 * (
            self.readings_per_device // per_msg
        )
        self.intake_queue_mib = max(32, math.ceil(2 * burst_bytes / 2**20))
        self.hosts: Hosts | None = None

    # ------------------------------------------------------------------ load

    def _spec(self, tag: str) -> LoadSpec:
        return LoadSpec(
            devices=self.devices,
            prefix=f"c{self.run_id}-{tag}-",
            array=self.s.array,
            burst=self.readings_per_device,
            protocol="3.1.1",
            partitions=self.c.partitions,
        )

    def bare_subscriber(self) -> dict[str, Any]:
        """What the broker delivers to one subscriber that only counts, of the same burst:
        the most the publishers and nats-server can feed the instances."""
        spec = self._spec("sub")
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
                    "--protocol",
                    "3.1.1",
                    "--topic",
                    PARTITIONED_FILTER,
                    "--expect",
                    str(spec.devices * (spec.burst // spec.per_message)),
                    # Only if messages go missing: a pause of the publishers on a busy
                    # machine must not end the count early.
                    "--idle",
                    "10",
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
                pub = summarise_publishers(kids.results(300))
            finally:
                kids.close()
            got = counter.results(300)[0]
        finally:
            counter.close()
        broker1 = self._broker_cpu()
        wall = max(got["last"] - pub["first"], 1e-9) if got["received"] else math.nan
        per_msg = spec.per_message
        return {
            "topic_filter": PARTITIONED_FILTER,
            "messages_sent": pub["messages"],
            "messages_received": got["received"],
            "messages_per_s": got["received"] / wall,
            "readings_per_s": got["received"] * per_msg / wall,
            "seconds": wall,
            "subscriber_cpu_pct": 100 * got["cpu_s"] / wall,
            "publishers_messages_per_s": pub["messages_per_s"],
            "publishers_cpu_pct": 100 * pub["cpu_s"] / wall,
            "broker_cpu_pct": None
            if broker0 is None or broker1 is None
            else 100 * (broker1 - broker0) / wall,
        }

    # ------------------------------------------------------------------ instances

    def _instance_config(
        self, n: int, i: int, tag: str, metrics_host: str, metrics_port: int
    ) -> dict[str, object]:
        return {
            "mqtt.host": self.host,
            "mqtt.port": self.port,
            "mqtt.protocol": "3.1.1",
            "mqtt.client_id": f"anomalyd-bench-{self.run_id}-{tag}-{i}",
            "model.path": str(self.s.model),
            "metrics.host": metrics_host,
            "metrics.port": metrics_port,
            "logging.level": "WARNING",
            # The burst runs faster than real time, which the cadence check would rightly
            # refuse to score (as in the single-daemon bench).
            "stream.cadence_check": False,
            # One instance takes the burst far more slowly than the publishers offer it: the
            # rest waits in its intake queue, which must hold all of it (the default bound
            # would drop part of it as queue_full, and this measures speed, not overload).
            "stream.intake_queue_mib": self.intake_queue_mib,
            "cluster.partitions": self.c.partitions,
            "cluster.instance": i,
            "cluster.instances": n,
        }

    def start_instances(self, n: int, tag: str) -> list[DaemonProcess]:
        """N daemons, started together, each ready (``READY=1``: connected and subscribed);
        with ``--hosts``, instance i in host i."""
        from anomalyd.broker import free_port
        from anomalyd.config import Config

        daemons: list[DaemonProcess] = []
        try:
            for i in range(n):
                run_dir = self.workdir / tag / f"instance-{i}"
                run_dir.mkdir(parents=True, exist_ok=True)
                if self.hosts is not None:
                    # A host has a network stack of its own: the daemon's default port is free.
                    host = self.hosts.hosts[i]
                    launcher, metrics_host, port = host.launcher(), host.address, Config().metrics.port
                else:
                    launcher, metrics_host, port = [], "127.0.0.1", free_port()
                config = self._instance_config(n, i, tag, metrics_host, port)
                cfg = write_toml(run_dir / "anomalyd.toml", config)
                daemons.append(
                    DaemonProcess(run_dir, cfg, port, launcher=launcher, metrics_host=metrics_host)
                )
            for d in daemons:
                self.ready_times.append(d.wait_ready(120))
            if self.c.pin:
                for i, d in enumerate(daemons):
                    d.pin({self.cpus[i % len(self.cpus)]})
        except BaseException:
            for d in daemons:
                d.stop(10)
            raise
        return daemons

    def _mark(self, daemons: list[DaemonProcess]) -> CpuMark:
        groups = [h.cgroup for h in self.hosts.hosts[: len(daemons)]] if self.hosts is not None else []
        return CpuMark.now([d.pid for d in daemons], self._broker_cpu(), groups)

    def _observe(self, daemons: list[DaemonProcess]) -> list[dict[str, Any] | None]:
        """With ``--hosts``: what the kernel says of each instance, once it is ready (its
        network namespace, CPU cgroup and quota, its connection to the broker)."""
        if self.hosts is None:
            return [None] * len(daemons)
        return [h.observe(d.pid, self.port) for h, d in zip(self.hosts.hosts, daemons, strict=False)]

    def _drain(
        self, daemons: list[DaemonProcess], expected_messages: int, expected_windows: float, limit: float
    ) -> tuple[list[Samples], float, bool, _Trace, CpuMark]:
        """Scrape every instance until together they have received ``expected_messages``
        and each has nothing left to do (queue and batcher empty, counters still). Returns
        the last scrapes, the wall-clock time of the scrape that first saw the final
        counts, whether that came within ``limit`` seconds, the trace of windows scored,
        and the CPU mark taken with that scrape.

        Rendering ``/metrics`` takes a daemon a few milliseconds of its interpreter lock,
        the lock that bounds its throughput: every ``SLOW_SCRAPE_S`` until the windows
        scored near ``expected_windows``, then every ``FAST_SCRAPE_S`` to catch the end."""
        deadline = time.monotonic() + limit
        trace = _Trace()
        previous: tuple[float, ...] | None = None
        changed, mark = time.time(), self._mark(daemons)
        while True:
            scrapes = [d.scrape() for d in daemons]
            now, here = time.time(), self._mark(daemons)
            windows = _sum_metric(scrapes, "anomalyd_windows_scored_total")
            trace.points.append((now, windows))
            key = (
                _sum_metric(scrapes, "anomalyd_messages_received_total"),
                _sum_metric(scrapes, "anomalyd_readings_accepted_total"),
                windows,
                sum(sum(rejected_by_reason(s).values()) for s in scrapes),
            )
            if key != previous:
                previous, changed, mark = key, now, here
            idle = all(
                metric(s, "anomalyd_intake_queue_depth") == 0 and metric(s, "anomalyd_pending_windows") == 0
                for s in scrapes
            )
            if key[0] >= expected_messages and idle and now - changed >= 0.3:
                return scrapes, changed, True, trace, mark
            if time.monotonic() > deadline:
                return scrapes, changed, False, trace, mark
            time.sleep(FAST_SCRAPE_S if windows >= NEAR_END * expected_windows else SLOW_SCRAPE_S)

    def measure(self, n: int, repeat: int) -> dict[str, Any]:
        """N instances, one burst, every reading accounted for, where the CPU went."""
        tag = f"n{n}r{repeat}"
        daemons = self.start_instances(n, tag)
        spec = self._spec(tag)
        messages = spec.devices * (spec.burst // spec.per_message)
        try:
            observed = self._observe(daemons)
            before = [d.scrape() for d in daemons]
            kids = self._load(spec)
            try:
                start = self._mark(daemons)
                kids.go()
                # Generous: a saturated single instance on a busy 2-core machine, or on a
                # host with a fraction of a core.
                limit = max(60.0, spec.devices * spec.burst / 2_000) / min(1.0, self.c.host_cpus or 1.0)
                windows = _sum_metric(before, "anomalyd_windows_scored_total")
                windows += spec.devices * (spec.burst - self.window + 1)
                after, done, complete, trace, end = self._drain(daemons, messages, windows, limit)
                pub = summarise_publishers(kids.results(120))
            finally:
                kids.close()
            exits = [d.stop() for d in daemons]
        finally:
            for d in daemons:
                d.stop(10)
        result = self._summarise(
            n, repeat, spec, _Burst(before, after, done, complete, trace, start, end, pub, exits)
        )
        if self.hosts is not None:
            cores = len(self.cpus)
            result["hosts"] = {
                "budget_cpus": n * self.hosts.cpus,
                # What the hosts' budgets leave of the cores for nats-server, the
                # publishers, the bench and anything else.
                "cpus_left": cores - n * self.hosts.cpus,
            }
            for i, p in enumerate(result["per_instance"]):
                p["host"] = {**self.hosts.hosts[i].describe(), "observed": observed[i]}
                p["cpu_budget"] = result["cpu"]["hosts"][i]
                p["bottleneck"] = result["bottleneck"]["per_instance"][i]
        return result

    def _summarise(self, n: int, repeat: int, spec: LoadSpec, b: _Burst) -> dict[str, Any]:
        before, after, done, pub = b.before, b.after, b.done, b.pub

        def moved(name: str, i: int) -> float:
            return metric(after[i], name) - metric(before[i], name)

        wall = max(done - pub["first"], 1e-9)
        per_instance: list[dict[str, Any]] = []
        for i in range(n):
            per_instance.append(
                {
                    "instance": i,
                    "partitions_owned": int(metric(after[i], "anomalyd_cluster_partitions_owned")),
                    "received_messages": int(moved("anomalyd_messages_received_total", i)),
                    "accepted_readings": int(moved("anomalyd_readings_accepted_total", i)),
                    "windows_scored": int(moved("anomalyd_windows_scored_total", i)),
                    "rejected": diff_reasons(after[i], before[i]),
                    "devices_tracked": int(metric(after[i], "anomalyd_devices_tracked")),
                    "exit_code": b.exits[i],
                }
            )
        windows = sum(p["windows_scored"] for p in per_instance)
        accepted = sum(p["accepted_readings"] for p in per_instance)
        received = sum(p["received_messages"] for p in per_instance)
        rejected: dict[str, int] = {}
        for p in per_instance:
            for reason, count in p["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + count
        # After the last publish, only the backlog is left: the instances' own rate, with
        # the publishers no longer competing for the cores.
        tail = done - pub["last"]
        scored_before = _sum_metric(before, "anomalyd_windows_scored_total")
        drained_windows = windows - (b.trace.windows_at(pub["last"]) - scored_before)
        shares = b.end.shares_since(b.start, publishers_s=pub["cpu_s"])
        for i, p in enumerate(per_instance):
            p["cpu_pct"] = shares["each_instance_pct"][i]
            p["share_of_windows"] = p["windows_scored"] / windows if windows else None
        return {
            "instances": n,
            "repeat": repeat,
            "pinned": [self.cpus[i % len(self.cpus)] for i in range(n)] if self.c.pin else None,
            "seconds": wall,
            "windows_per_s": windows / wall,
            "readings_per_s": accepted / wall,
            "publish_seconds": pub["last"] - pub["first"],
            "publishers_messages_per_s": pub["messages_per_s"],
            "backlog_seconds": tail,
            "drain_windows_per_s": drained_windows / tail if tail > 0.5 else None,
            # Work per CPU second the instances got: what splitting the fleet costs,
            # whatever share of the cores the neighbours left them.
            "windows_per_instance_cpu_s": windows
            / max(shares["instances_pct"] * shares["seconds"] / 100, 1e-9),
            "windows_scored": windows,
            "expected_windows": spec.devices * (spec.burst - self.window + 1),
            "cpu": shares,
            "bottleneck": bottleneck(shares, tail / wall, len(self.cpus)),
            "per_instance": per_instance,
            "complete": b.complete,
            "accounting": {
                "offered_messages": pub["messages"],
                "received_messages": received,
                "broker_lost_messages": pub["messages"] - received,
                "offered_readings": pub["readings"],
                "accepted_readings": accepted,
                "rejected": rejected,
                "lost_readings": pub["readings"] - accepted,
                "drained": b.complete,
            },
        }

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        from anomalyd import __version__
        from anomalyd.nats_broker import PrivateNatsServer

        result: dict[str, Any] = {
            "schema": 1,
            "kind": "instances",
            "anomalyd": __version__,
            "quick": self.s.quick,
            "started_unix": self.started,
            "machine": {
                "cpus": os.cpu_count(),
                "usable_cpus": len(self.cpus),
                "loadavg_start": list(os.getloadavg()),
            },
            "model": {
                "path": str(self.s.model),
                "version": self.contract.model_version,
                "window": self.window,
                "features": self.features,
            },
            "settings": {
                "instances": list(self.c.instances),
                "partitions": self.c.partitions,
                "repeats": self.c.repeats,
                "pin": self.c.pin,
                "host_cpus": self.c.host_cpus,
                "publishers": self.s.publishers,
                "array": self.s.array,
            },
            "throughput_is": "windows scored per second, all instances together "
            "(anomalyd_windows_scored_total summed), first publish to the last window scored",
        }
        spec = self._spec("x")
        result["load"] = {
            "devices": spec.devices,
            "devices_per_partition": spec.devices // self.c.partitions,
            "readings_per_device": spec.burst,
            "readings_per_message": spec.per_message,
            "messages": spec.devices * (spec.burst // spec.per_message),
            "readings": spec.devices * spec.burst,
            "publishers": self.s.publishers,
        }
        runs: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            if self.c.host_cpus is not None:
                self.hosts = stack.enter_context(Hosts(max(self.c.instances), self.c.host_cpus))
                result["hosts"] = self.hosts.describe()
                nats = self.hosts.nats_server(self.workdir / "nats", self.c.partitions)
                self.say(self._hosts_line())
            else:
                nats = PrivateNatsServer(self.workdir / "nats", partitions=self.c.partitions)
            stack.callback(nats.close)
            limit = self._measure_all(nats, result, runs)
        self.hosts = None
        result["limits"] = {"bare_subscriber": limit}
        result["runs"] = runs
        result["by_instances"] = by_instances(runs, self.c.instances, limit)
        result["accounting"] = total_accounting(runs)
        result["start_to_ready_s"] = {
            "each": self.ready_times,
            "median": statistics.median(self.ready_times) if self.ready_times else None,
        }
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["elapsed_s"] = time.time() - self.started
        return result

    def _hosts_line(self) -> str:
        assert self.hosts is not None
        h = self.hosts
        return (
            f"hosts: {h.count} network namespaces ({h.hosts[0].namespace} ...) on {h.subnet}, "
            f"nats-server at {h.broker_address} on bridge {h.bridge}; each host {h.cpus:g} CPUs "
            f"(cgroup v{h.controller.version} {h.controller.root}{h.parent.path}/h<i>: "
            f"{h.quota_us} us per {PERIOD_US} us)"
        )

    def _measure_all(
        self, nats: PrivateNatsServer, result: dict[str, Any], runs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Start nats-server; the bare subscriber, then each N's bursts round after round
        (appended to ``runs``); returns the bare subscriber's limit."""
        nats.start()
        self.host, self.port, self.broker_pid = nats.host, nats.port, nats.pid
        result["broker"] = {"kind": "nats-server", "mqtt": nats.address, "partitions": self.c.partitions}
        self.say(
            f"nats-server {nats.address} (MQTT), {self.c.partitions} partitions; model "
            f"{self.contract.model_version} (window {self.window}); {len(self.cpus)} usable CPUs; "
            f"instances {', '.join(map(str, self.c.instances))}"
            + (" (pinned: instance i on core i % cores)" if self.c.pin else "")
        )
        limit = self.bare_subscriber()
        self.say(
            f"bare subscriber through nats-server: {limit['readings_per_s']:.0f} readings/s "
            f"({limit['messages_received']} of {limit['messages_sent']} messages)"
        )
        for repeat in range(self.c.repeats):
            for n in self.c.instances:
                run = self.measure(n, repeat)
                runs.append(run)
                cpu = run["cpu"]
                self.say(
                    f"N={n} (repeat {repeat + 1}/{self.c.repeats}): {run['windows_per_s']:.0f} "
                    f"windows/s; CPU: instances {cpu['instances_pct']:.0f} %, nats-server "
                    f"{cpu['broker_pct'] or 0:.0f} %, publishers {cpu['publishers_pct']:.0f} %, "
                    f"machine {cpu['machine_busy_pct']:.0f} % busy; {run['bottleneck']['verdict']}"
                )
        if not self.s.quick:
            # Again at the end, the higher kept: a neighbour busy during one of them
            # makes the limit pessimistic, never flattering.
            again = self.bare_subscriber()
            if again["readings_per_s"] > limit["readings_per_s"]:
                again["before"] = limit["readings_per_s"]
                limit = again
        return limit


def run_cluster_bench(
    settings: BenchSettings, cluster: ClusterSettings, json_path: Path | None, out: TextIO | None = None
) -> int:
    """The ``anomalyd bench --instances`` command: run, print the table, write the JSON."""
    import orjson

    from anomalyd.benchreport import render_instances

    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="anomalyd-bench-") as tmp:
        bench = ClusterBench(settings, cluster, Path(tmp), out)
        try:
            result = bench.run()
        except BenchError as exc:
            print(f"anomalyd bench: {exc}", file=sys.stderr)
            return 1
    print(render_instances(result), file=out, flush=True)
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"JSON written to {json_path}", file=out)
    return 0
