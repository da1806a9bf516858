"""Where the CPU went during a burst of ``anomalyd bench --instances``, and what held it
back.

On one machine the daemon instances share the cores with nats-server, the publishers, the
bench itself and whatever else runs there. A ``CpuMark`` takes, at one moment, the CPU
seconds of the instances and of nats-server (``/proc/<pid>/stat``), of this process
(``os.times()``) and of the whole machine (``/proc/stat``: busy and total over every
core); two marks give each one's share of the burst, in % of one core, and "other": the
machine's busy time that none of them accounts for (other people's work, the kernel).
The publishers report their own CPU seconds when they finish.

It also takes how long the instances' threads waited, runnable, for a core
(``/proc/<pid>/task/*/schedstat``, the scheduler's run-queue wait): an instance that waits
about as long as it runs is held back by the cores it shares, not by its own work.

With ``--hosts`` each instance has a CPU budget of its own (``anomalyd.benchhosts``): a
mark also takes each host's cgroup counters (``cpu.stat``: periods, periods throttled,
time throttled), and the shares say how much of its budget each instance used. The
run-queue wait then includes the time a host's threads were held by its quota (the
kernel counts a throttled thread as waiting). An instance that used nearly all of its
budget was held by it: "the instance (its host's CPU budget)", whatever else ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from anomalyd.benchhosts import AT_BUDGET, CpuGroup, CpuStat
from anomalyd.benchrun import CLK_TCK, cpu_seconds

__all__ = ["HOSTS_BUDGETS", "HOST_BUDGET", "KEPT_PACE", "MACHINE_BUSY", "CpuMark", "bottleneck"]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat's
    ``cpu`` line (busy: everything but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - fields[3] - fields[4]) / CLK_TCK, total / CLK_TCK


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a core (second
    field of each ``/proc/<pid>/task/<tid>/schedstat``; threads that ended are not counted)."""
    waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                waited += int(fh.read().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return waited / 1e9


@dataclass
class CpuMark:
    """CPU seconds of everything measured, at one moment."""

    at: float
    instances: list[float]
    waiting: list[float]  # the instances' run-queue wait
    broker: float | None
    bench: float
    machine_busy: float
    machine_total: float
    #: With ``--hosts``: the cgroup counters of each instance's host, in the same order.
    budgets: list[CpuStat] = field(default_factory=list)

    @classmethod
    def now(cls, pids: list[int], broker: float | None, groups: Sequence[CpuGroup] = ()) -> CpuMark:
        """A mark of the instances (``pids``), the broker's CPU seconds (read by the caller),
        this process's, the machine's, and (``--hosts``) the instances' CPU cgroups."""
        instances = [cpu_seconds(pid) for pid in pids]
        waiting = [runqueue_wait_seconds(pid) for pid in pids]
        budgets = [g.stat() for g in groups]
        busy, total = machine_cpu()
        own = os.times()
        return cls(time.time(), instances, waiting, broker, own.user + own.system, busy, total, budgets)

    def shares_since(self, start: CpuMark, *, publishers_s: float) -> dict[str, Any]:
        """Each one's CPU between ``start`` and this mark, in % of one core; the machine's
        busy time in % of all its cores."""
        wall = max(self.at - start.at, 1e-9)
        each = [a - b for a, b in zip(self.instances, start.instances, strict=True)]
        waited = [a - b for a, b in zip(self.waiting, start.waiting, strict=True)]
        broker = None if self.broker is None or start.broker is None else self.broker - start.broker
        bench = self.bench - start.bench
        busy = self.machine_busy - start.machine_busy
        ours = sum(each) + (broker or 0.0) + publishers_s + bench
        hosts = None
        if self.budgets:
            hosts = []
            for used, now, then in zip(each, self.budgets, start.budgets, strict=True):
                periods = now.periods - then.periods
                throttled = now.throttled_periods - then.throttled_periods
                of_budget = used / wall / now.cpus
                hosts.append(
                    {
                        "budget_pct": 100 * now.cpus,
                        "cpu_pct": 100 * used / wall,
                        "of_budget": of_budget,
                        "at_budget": of_budget >= AT_BUDGET,
                        # Periods in which the host ran at all, and those it ran out of quota in.
                        "periods": periods,
                        "throttled_periods": throttled,
                        "throttled_share": throttled / periods if periods else 0.0,
                        "throttled_s": now.throttled_s - then.throttled_s,
                    }
                )
        return {
            "instances_pct": 100 * sum(each) / wall,
            "each_instance_pct": [100 * s / wall for s in each],
            "instances_waiting_pct": 100 * sum(waited) / wall,
            "broker_pct": None if broker is None else 100 * broker / wall,
            "publishers_pct": 100 * publishers_s / wall,
            "bench_pct": 100 * bench / wall,
            "other_pct": 100 * (busy - ours) / wall,
            "machine_busy_pct": 100 * busy / max(self.machine_total - start.machine_total, 1e-9),
            "seconds": wall,
            "hosts": hosts,
        }


#: The machine is the bottleneck when its cores were busier than this, all of them together.
MACHINE_BUSY = 0.90
#: The load generator set the pace when the instances were done this soon after the last
#: publish (a fraction of the whole burst): they had no backlog to drain.
KEPT_PACE = 0.10


#: The bottleneck of an instance that used nearly all of its host's budget, and of a run
#: in which every instance did.
HOST_BUDGET = "the instance (its host's CPU budget)"
HOSTS_BUDGETS = "the instances (their hosts' CPU budgets)"


def bottleneck(shares: dict[str, Any], backlog_fraction: float, cpus: int) -> dict[str, Any]:
    """What held a run back: the hosts' CPU budgets (``--hosts``: every instance used nearly
    all of its own), the machine's cores, the load generator, or the instances. With
    ``--hosts``, also what held each instance (``per_instance``)."""
    why = []
    hosts: list[dict[str, Any]] = shares.get("hosts") or []
    budgets = bool(hosts) and all(h["at_budget"] for h in hosts)
    if hosts:
        each = ", ".join(
            f"{h['cpu_pct']:.0f} % of its {h['budget_pct']:.0f} % "
            f"(throttled in {100 * h['throttled_share']:.0f} % of its periods)"
            for h in hosts
        )
        if budgets:
            why.append(f"{HOSTS_BUDGETS}: each instance used nearly all of its budget: {each}")
        else:
            why.append(f"hosts' budgets used: {each}")
    busy = shares["machine_busy_pct"] >= 100 * MACHINE_BUSY
    # With every host at its budget the machine gave the instances all they may have: its
    # busy cores (a neighbour's work) are then not what held them.
    machine = busy and not budgets
    if busy:
        parts = [
            f"instances {shares['instances_pct']:.0f} %, waiting for a core "
            f"{shares['instances_waiting_pct']:.0f} %"
        ]
        if shares["broker_pct"] is not None:
            parts.append(f"nats-server {shares['broker_pct']:.0f} %")
        parts += [f"publishers {shares['publishers_pct']:.0f} %", f"other {shares['other_pct']:.0f} %"]
        what = "the machine" if machine else "the machine busy, but not what held the instances"
        why.append(f"{what}: {shares['machine_busy_pct']:.0f} % of {cpus} cores busy ({', '.join(parts)})")
    generator = backlog_fraction < KEPT_PACE
    if generator:
        why.append(
            "the load generator: the instances kept pace with the publishers (done "
            f"{100 * backlog_fraction:.0f} % of the burst after the last publish), so this is what was "
            "offered, a lower bound of what they can do"
        )
    causes = [
        c
        for c, hit in ((HOSTS_BUDGETS, budgets), ("the machine", machine), ("the load generator", generator))
        if hit
    ]
    out: dict[str, Any] = {
        "cause": " and ".join(causes) if causes else "the instances",
        "machine": machine,
        "machine_busy": busy,
        "load_generator": generator,
        "hosts_budgets": budgets,
        "backlog_fraction": backlog_fraction,
        "verdict": "; ".join(why) if why else "the instances (cores to spare, a backlog to drain)",
    }
    if hosts:
        # An instance below its budget was held by what held the run, if anything did.
        otherwise = "the machine" if machine else "the load generator" if generator else "the instance"
        out["per_instance"] = [HOST_BUDGET if h["at_budget"] else otherwise for h in hosts]
    return out
