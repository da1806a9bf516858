"""``anomalyd bench``: its options and how they become the benchmark's settings.

The single-daemon bench (``anomalyd.bench``: throughput, latency, memory and start-up
against limits measured in the same run) or, with ``--instances``, several daemon instances
sharing one fleet through NATS partitions (``anomalyd.benchcluster``), each optionally a
host of its own (``--hosts``, ``anomalyd.benchhosts``). Options that mean nothing to the
chosen kind are refused (exit 64) rather than ignored.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from anomalyd.cli_values import plain_broker, positive_float, positive_int
from anomalyd.errors import ConfigError, UsageError

#: ``anomalyd bench`` options copied onto ``BenchSettings`` when given (else the full or
#: the quick run's own value stands).
_BENCH_TUNABLES = (
    "publishers",
    "rate",
    "array",
    "seconds_per_step",
    "max_steps",
    "probe_devices",
    "probe_rate",
    "flood_seconds",
    "rss_devices",
)
_BENCH_SCENARIOS = ("arrays", "single", "every-window")
#: Options of the single-daemon bench that mean nothing to ``--instances`` (refused with it),
#: and the options of ``--instances`` alone, as argparse destinations.
_BENCH_NOT_FOR_INSTANCES = (
    "broker",
    "scenarios",
    "flood",
    "rate",
    "seconds_per_step",
    "max_steps",
    "probe_devices",
    "probe_rate",
    "flood_seconds",
    "rss_devices",
)
_BENCH_INSTANCES_ONLY = ("partitions", "repeats", "pin", "burst_readings", "hosts")


def _cmd_bench_instances(args: argparse.Namespace, model: Path) -> int:
    from anomalyd.benchcluster import ClusterSettings, instance_counts, run_cluster_bench
    from anomalyd.benchphases import BenchSettings

    given = [n for n in _BENCH_NOT_FOR_INSTANCES if getattr(args, n) not in (None, False)]
    if given:
        options = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(f"--instances: not with {options} (the single-daemon bench's)")
    try:
        counts = instance_counts(args.instances)
    except ValueError as exc:
        raise ConfigError(str(exc), "--instances") from None
    cluster = ClusterSettings.quick_variant() if args.quick else ClusterSettings()
    cluster.instances, cluster.pin = counts, args.pin
    for name in ("partitions", "repeats", "burst_readings"):
        if getattr(args, name) is not None:
            setattr(cluster, name, getattr(args, name))
    if max(counts) > cluster.partitions:
        raise ConfigError(
            f"expected at most {cluster.partitions} instances (one partition each), got {max(counts)}",
            "--instances",
        )
    if args.hosts is not None:
        _check_bench_hosts(args.hosts, max(counts), args.pin)
        cluster.host_cpus = args.hosts
    settings = BenchSettings.quick_variant(model) if args.quick else BenchSettings(model)
    for name in ("publishers", "array"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return run_cluster_bench(settings, cluster, args.json)


def _check_bench_hosts(cpus: float, hosts: int, pin: bool) -> None:
    """``--hosts CPUS``: the options first (a budget per host that fits the cores), then
    what the machine must offer (root, ``ip``, a CPU cgroup controller: exit 69)."""
    from anomalyd.benchhosts import MIN_QUOTA_US, PERIOD_US, check_hosts_possible

    if pin:
        raise UsageError("--hosts: not with --pin (a host's budget is its CPU quota, on any core)")
    cores = len(os.sched_getaffinity(0))
    if hosts * cpus > cores:
        raise ConfigError(
            f"{hosts} hosts of {cpus:g} CPUs need {hosts * cpus:g} cores, this machine has {cores}: "
            "the budgets could not all be given",
            "--hosts",
        )
    if round(cpus * PERIOD_US) < MIN_QUOTA_US:
        raise ConfigError(f"expected at least 0.01 CPUs (the kernel's least quota), got {cpus:g}", "--hosts")
    check_hosts_possible()


def _cmd_bench(args: argparse.Namespace) -> int:
    from anomalyd.bench import stopped_like_ctrl_c

    with stopped_like_ctrl_c():
        return _run_bench_command(args)


def _run_bench_command(args: argparse.Namespace) -> int:
    from anomalyd.bench import BenchSettings, run_bench
    from anomalyd.config import Config

    model = args.model or Config().model.path
    if args.instances is not None:
        return _cmd_bench_instances(args, model)
    given = [n for n in _BENCH_INSTANCES_ONLY if getattr(args, n) not in (None, False)]
    if given:
        options = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(f"{options}: only with --instances")
    settings = BenchSettings.quick_variant(model) if args.quick else BenchSettings(model)
    if args.flood and args.quick:
        raise UsageError("--flood: it runs for minutes; it is not part of --quick")
    settings.flood = args.flood
    settings.broker = plain_broker(args.broker, "--broker") if args.broker else None
    for name in _BENCH_TUNABLES:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.scenarios:
        names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
        bad = [n for n in names if n not in _BENCH_SCENARIOS]
        if bad or not names:
            raise ConfigError(
                f"expected some of {', '.join(_BENCH_SCENARIOS)}, got {args.scenarios!r}", "--scenarios"
            )
        settings.scenarios = names
    return run_bench(settings, args.json)


def add_bench_parser(sub: Any) -> None:
    """Add the ``bench`` subcommand to ``sub`` (``build_parser``'s subparsers)."""
    p = sub.add_parser(
        "bench",
        help="benchmark the daemon end to end",
        description="Run the real daemon behind a private mosquitto (or --broker) with publisher "
        "processes and a probe device; print throughput, latency, memory and start-up as ratios of "
        "limits measured in the same run (raw ONNX Runtime, a bare subscriber, a naive daemon). "
        "About 10 minutes; --quick: under a minute, small loads, for correctness only.",
    )
    p.add_argument("--quick", action="store_true", help="small loads, under a minute (CI)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    p.add_argument(
        "--broker", metavar="ADDRESS", help="use this broker, HOST[:PORT] (default: a private mosquitto)"
    )
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument("--publishers", type=positive_int, help="publisher processes (2)")
    p.add_argument("--rate", type=positive_float, help="readings/s per device in paced steps (10; quick 50)")
    p.add_argument("--array", type=positive_int, help="readings per message in the array scenarios (20)")
    p.add_argument(
        "--scenarios", metavar="LIST", help=f"comma-separated, of {', '.join(_BENCH_SCENARIOS)} (all)"
    )
    p.add_argument(
        "--seconds-per-step", type=positive_float, help="measured seconds per load step (10; quick 1.5)"
    )
    p.add_argument("--max-steps", type=positive_int, help="load steps per sweep at most (6; quick 2)")
    p.add_argument("--probe-devices", type=positive_int, help="probe devices (8; quick 4)")
    p.add_argument(
        "--probe-rate", type=positive_float, help="readings per second per probe device (5; quick 10)"
    )
    p.add_argument("--flood", action="store_true", help="add a flood at 3x the sustainable rate")
    p.add_argument("--flood-seconds", type=positive_float, help="length of the flood (60)")
    p.add_argument("--rss-devices", type=positive_int, help="devices in the memory phase (10000; quick 1000)")
    p.add_argument(
        "--instances",
        metavar="N[,N...]",
        help="instead: throughput of N daemon instances sharing one fleet through NATS partitions, for "
        "each N (1 always: the ratios' baseline), on the same load, e.g. 1,2,4",
    )
    p.add_argument(
        "--partitions", type=positive_int, help="with --instances: partitions of the NATS mapping (16)"
    )
    p.add_argument(
        "--repeats", type=positive_int, help="with --instances: bursts per N, median kept (3; quick 1)"
    )
    p.add_argument(
        "--burst-readings",
        type=positive_int,
        help="with --instances: readings per burst (400000; quick 24000)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --instances: keep instance i on core i %% cores (one core each)",
    )
    p.add_argument(
        "--hosts",
        type=positive_float,
        metavar="CPUS",
        help="with --instances: run each instance as a host of its own: its own network namespace "
        "(a veth link to the broker) and CPUS cores' worth of CPU time (a cgroup quota), e.g. 0.4; "
        "needs root",
    )
    p.set_defaults(run=_cmd_bench)
