"""The figures of ``anomalyd bench``: ratios against their targets, and the printed table.

Each ratio divides a daemon figure by a limit measured in the same run (or compares a
latency, start-up time or memory figure with a fixed target). A ratio that could not be
computed (its scenario was not run, a phase found nothing) is ``None`` with the reason.

``--instances`` has its own figures: per N, the median throughput of its repeats, its
ratio to one instance and to the target (``by_instances``), and its table
(``render_instances``); with ``--hosts``, each host's CPU budget and how much of it each
instance used and was throttled.
"""

from __future__ import annotations

import statistics
from typing import Any

#: name -> (what, unit, comparison, target)
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "windows_vs_raw_ort": ("windows/s (arrays) ÷ raw ONNX Runtime", "", ">=", 0.80),
    "readings_vs_bare_subscriber": ("readings/s (single) ÷ bare subscriber", "", ">=", 0.80),
    "every_window_vs_raw_ort": ("windows/s (every-window) ÷ raw ONNX Runtime", "", ">=", 0.50),
    "batched_vs_naive": ("readings/s (arrays) ÷ naive one-per-reading", "×", ">=", 5.0),
    "p99_at_half_sustainable_ms": ("probe p99 at half the sustainable rate", "ms", "<=", 25.0),
    "start_to_ready_s": ("start → READY=1 (median of the daemon starts)", "s", "<=", 1.5),
    "rss_mb": ("resident memory with the RSS phase's devices tracked", "MB", "<=", 200.0),
}


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _div(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b <= 0:
        return None
    return float(a) / float(b)


def ratios(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every headline figure with its target and whether it was met."""
    sc = result.get("scenarios", {})
    ort = _get(result, "limits", "raw_ort", "windows_per_s")
    sub = _get(result, "limits", "bare_subscriber", "messages_per_s")
    # The half-rate latency of the first scenario that was swept (arrays, by default).
    swept = next((name for name, run in sc.items() if "sweep" in run), "arrays")
    half_p99 = _get(sc, swept, "sweep", "half", "probe_latency_s", "p99")
    half_of = _get(sc, swept, "sweep", "half_of") or "sustainable rate"
    rss = _get(result, "rss", "rss_bytes")
    values: dict[str, tuple[float | None, str]] = {
        "windows_vs_raw_ort": (
            _div(_get(sc, "arrays", "saturation", "windows_per_s"), ort),
            "arrays burst windows/s over raw ORT windows/s at the same batch",
        ),
        "readings_vs_bare_subscriber": (
            _div(_get(sc, "single", "saturation", "readings_per_s"), sub),
            "single burst readings/s over the bare subscriber's messages/s, same burst",
        ),
        "every_window_vs_raw_ort": (
            _div(_get(sc, "every-window", "saturation", "windows_per_s"), ort),
            "every-window burst windows/s over raw ORT windows/s",
        ),
        "batched_vs_naive": (
            _div(
                _get(sc, "arrays", "saturation", "readings_per_s"),
                _get(sc, "naive", "saturation", "readings_per_s"),
            ),
            "arrays burst readings/s over the naive daemon's, same message shape",
        ),
        "p99_at_half_sustainable_ms": (
            1e3 * half_p99 if isinstance(half_p99, int | float) else None,
            f"{swept}: probe latency p99 at half of the {half_of}",
        ),
        "start_to_ready_s": (_get(result, "start_to_ready_s", "median"), "spawn to the daemon's READY=1"),
        "rss_mb": (
            rss / 1e6 if isinstance(rss, int | float) else None,
            f"VmRSS with {_get(result, 'rss', 'devices_tracked')} devices tracked (MB = 10^6 bytes)",
        ),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (what, unit, op, target) in TARGETS.items():
        value, basis = values[name]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"figure": what, "value": value, "unit": unit, "target": f"{op} {target:g}", "met": met}
        out[name]["basis"] = basis if value is not None else f"not measured ({basis})"
    return out


# --------------------------------------------------------------------------- --instances

#: The target: 1.8x the throughput of one instance with two, that is 90 % of linear; the
#: same efficiency is the target for every other N (0.9 x N).
TARGET_EFFICIENCY = 0.9


def by_instances(
    runs: list[dict[str, Any]], counts: tuple[int, ...], limit: dict[str, Any]
) -> dict[str, Any]:
    """Per N: the median throughput over its repeats, its ratio to N = 1 and to the target."""
    medians = {n: statistics.median(r["windows_per_s"] for r in runs if r["instances"] == n) for n in counts}
    base = medians.get(1)
    out: dict[str, Any] = {}
    for n in counts:
        mine = [r for r in runs if r["instances"] == n]
        ratio = medians[n] / base if base else None
        target = TARGET_EFFICIENCY * n if n > 1 else None
        # The run whose throughput is the median (the lower middle one for an even count):
        # its CPU shares and bottleneck stand for this N.
        typical = sorted(mine, key=lambda r: r["windows_per_s"])[(len(mine) - 1) // 2]
        out[str(n)] = {
            "windows_per_s": medians[n],
            "each_repeat": [r["windows_per_s"] for r in mine],
            "readings_per_s": statistics.median(r["readings_per_s"] for r in mine),
            "drain_windows_per_s": typical["drain_windows_per_s"],
            "windows_per_instance_cpu_s": statistics.median(r["windows_per_instance_cpu_s"] for r in mine),
            "ratio_to_1": ratio,
            "target": target,
            "ratio_to_target": ratio / target if ratio is not None and target else None,
            "met": ratio >= target if ratio is not None and target else None,
            "of_bare_subscriber": statistics.median(r["readings_per_s"] for r in mine)
            / limit["readings_per_s"]
            if limit["readings_per_s"] > 0
            else None,
            "cpu": typical["cpu"],
            "bottleneck": typical["bottleneck"],
        }
        if "hosts" in typical:
            out[str(n)]["hosts"] = typical["hosts"]
    return out


def _num(v: Any, digits: int = 0) -> str:
    if not isinstance(v, int | float):
        return "-"
    if abs(v) >= 10_000 and digits == 0:
        return f"{v / 1000:.1f}k"
    return f"{v:.{digits}f}"


def _ms(v: Any) -> str:
    return f"{1e3 * v:.1f} ms" if isinstance(v, int | float) else "-"


def render(result: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    lines = []
    ort = result["limits"]["raw_ort"]
    sub = result["limits"]["bare_subscriber"]
    lines.append("")
    lines.append(
        f"anomalyd bench{' --quick' if result['quick'] else ''}: model {result['model']['version']}, "
        f"{result['machine']['cpus']} CPUs, load average {result['machine']['loadavg_start'][0]:.1f} → "
        f"{result['machine']['loadavg_end'][0]:.1f}, {result['elapsed_s']:.0f} s"
    )
    lines.append("")
    lines.append("limits (measured in this run)")
    by = ", ".join(f"{t} thread(s) {_num(v)}" for t, v in ort["windows_per_s_by_threads"].items())
    lines.append(f"  raw ONNX Runtime, batch {ort['batch']}: {_num(ort['windows_per_s'])} windows/s ({by})")
    lines.append(f"  raw ONNX Runtime, batch 1: {_num(ort['batch1_windows_per_s'])} windows/s")
    lines.append(
        f"  bare subscriber: {_num(sub['messages_per_s'])} messages/s "
        f"({sub['messages_received']} of {sub['messages_sent']}, {_num(sub['subscriber_cpu_pct'])} % CPU)"
    )
    lines.append("")
    head = f"  {'scenario':<13} {'ready':>6} {'readings/s':>11} {'windows/s':>10} {'CPU %':>6} "
    head += f"{'sustainable':>12} {'p99 @ half':>11} {'peak RSS':>9}  accounted"
    lines.append("daemon (burst: readings/s, windows/s, CPU; paced sweep: sustainable readings/s, probe p99)")
    lines.append(head)
    for name, sc in result["scenarios"].items():
        sat = sc.get("saturation", {})
        sweep = sc.get("sweep", {})
        acc = sc.get("accounting", {})
        note = (
            "all"
            if acc.get("lost_readings") == 0 and not acc.get("rejected")
            else (f"lost {acc.get('lost_readings')}, rejected {acc.get('rejected')}")
        )
        if sc.get("unsupported_keys"):
            note += f"; ran without {', '.join(sc['unsupported_keys'])} (unknown to this daemon)"
        peak = sc.get("peak_rss_bytes")
        # "≥": every step of the sweep was sustainable, the limit lies above the last one.
        above = "≥" if sweep and not sweep.get("limit_found") else ""
        sustainable = above + _num(sweep.get("sustainable_readings_per_s"))
        lines.append(
            f"  {name:<13} {_num(sc.get('start_to_ready_s'), 2):>6} {_num(sat.get('readings_per_s')):>11} "
            f"{_num(sat.get('windows_per_s')):>10} {_num(sat.get('daemon_cpu_pct')):>6} "
            f"{sustainable:>12} "
            f"{_ms(_get(sweep, 'half', 'probe_latency_s', 'p99')):>11} "
            f"{_num(peak / 1e6 if peak else None):>6} MB  {note}"
        )
        lag = sc.get("lag_metrics", {})
        absent = [k for k, v in lag.items() if v == "absent"]
        if absent and name == next(iter(result["scenarios"])):
            lines.append(f"  (lag metrics absent from this daemon: {', '.join(absent)})")
    flood = _get(result, "scenarios", next(iter(result["scenarios"])), "flood")
    if isinstance(flood, dict):
        lines.append("")
        ratio = flood["lag_ratio_daemon_to_probe"]
        ratio_text = f"median {ratio['median']:.2f} (n={ratio['n']})" if isinstance(ratio, dict) else ratio
        rec = flood["recovery_s"]
        lines.append(
            f"flood: {_num(flood['offered_readings_per_s'])} readings/s for {flood['seconds']:.0f} s: "
            f"lost {flood['lost_readings']} ({flood['rejected'] or 'nothing rejected'}); probe p99 "
            f"{_ms(flood['probe_latency_s']['p99'])}; daemon lag ÷ probe lag {ratio_text}; RSS "
            f"{_num((flood['rss_bytes_start'] or 0) / 1e6)} → "
            f"{_num((flood['rss_bytes_end'] or 0) / 1e6)} MB; "
            f"lag under 1 s again after {f'{rec:.1f} s' if rec is not None else 'no recovery seen'}"
        )
    rss = result["rss"]
    lines.append("")
    lines.append(
        f"rss: {rss['devices_tracked']} devices tracked: {_num(rss['rss_bytes'] / 1e6)} MB resident, "
        f"peak {_num(rss['peak_rss_bytes'] / 1e6)} MB"
    )
    acc = result["accounting"]
    lines.append(
        f"accounting: {acc.get('offered_readings')} readings offered, "
        f"{acc.get('accepted_readings')} accepted, {acc.get('lost_readings')} lost, "
        f"rejected {acc['rejected'] or 'none'}"
    )
    lines.append("")
    lines.append(f"  {'figure':<58} {'value':>9} {'target':>9}  met")
    for r in result["ratios"].values():
        value = "-" if r["value"] is None else f"{r['value']:.2f}{r['unit'] if r['unit'] == '×' else ''}"
        unit = f" {r['unit']}" if r["unit"] not in ("", "×") else ""
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"  {r['figure']:<58} {value + unit:>9} {r['target']:>9}  {met}")
    return "\n".join(lines)


def _pct(v: Any) -> str:
    return f"{v:.0f} %" if isinstance(v, int | float) else "-"


def render_instances(result: dict[str, Any]) -> str:
    """The table printed at the end of ``anomalyd bench --instances``."""
    s, load, m = result["settings"], result["load"], result["machine"]
    sub = result["limits"]["bare_subscriber"]
    hosts_flag = f" --hosts {s['host_cpus']:g}" if s.get("host_cpus") else ""
    lines = [
        "",
        f"anomalyd bench --instances {','.join(map(str, s['instances']))}"
        f"{' --pin' if s['pin'] else ''}"
        f"{hosts_flag}"
        f"{' --quick' if result['quick'] else ''}: model "
        f"{result['model']['version']}, {m['cpus']} CPUs ({m['usable_cpus']} usable), load average "
        f"{m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}, {result['elapsed_s']:.0f} s",
        f"broker: nats-server {result['broker']['mqtt']} (MQTT 3.1.1), {s['partitions']} partitions; "
        f"instance i owns the partitions p with p % N == i"
        + ("; instance i pinned to core i % cores" if s["pin"] else ""),
        f"load, the same for every N: {load['devices']} devices ({load['devices_per_partition']} per "
        f"partition), {load['readings_per_device']} readings each in messages of "
        f"{load['readings_per_message']}: {load['readings']} readings, {load['messages']} messages, from "
        f"{load['publishers']} publisher processes, as fast as they go",
        f"limit: a bare subscriber through nats-server ({sub['topic_filter']}) received "
        f"{_num(sub['readings_per_s'])} readings/s ({_num(sub['messages_per_s'])} messages/s; nats-server "
        f"{_pct(sub['broker_cpu_pct'])}, publishers {_pct(sub['publishers_cpu_pct'])} CPU)",
        *_hosts_lines(result),
        f"throughput: {result['throughput_is']}; median of {s['repeats']} repeat(s)",
        "",
        f"  {'N':>2} {'windows/s':>10} {'each repeat':<26} {'× N=1':>6} {'target':>7} {'÷ target':>8} "
        f"{'drain w/s':>10} {'÷ bare sub':>10} {'w/CPU-s':>8}",
    ]
    rows = result["by_instances"]
    for n, row in rows.items():
        each = ", ".join(_num(v) for v in row["each_repeat"])
        ratio = "-" if row["ratio_to_1"] is None else f"{row['ratio_to_1']:.2f}"
        target = "-" if row["target"] is None else f"{row['target']:.1f}"
        to_target = "-" if row["ratio_to_target"] is None else f"{row['ratio_to_target']:.2f}"
        lines.append(
            f"  {n:>2} {_num(row['windows_per_s']):>10} {each:<26} {ratio:>6} {target:>7} {to_target:>8} "
            f"{_num(row['drain_windows_per_s']):>10} {_num(row['of_bare_subscriber'], 2):>10} "
            f"{_num(row['windows_per_instance_cpu_s']):>8}"
        )
    lines += [
        "  (drain w/s: after the last publish, the backlog alone; ÷ bare sub: readings/s over the bare "
        "subscriber's; w/CPU-s: windows per CPU second the instances used)",
        "",
        "where the CPU went (the median run of each N; % of one core, over the burst; waiting: the "
        "instances' threads runnable but without a core; other: busy time none of these accounts for)",
        f"  {'N':>2} {'instances':>10} {'each':<18} {'waiting':>8} {'nats-server':>11} {'publishers':>10} "
        f"{'bench':>6} {'other':>6} {'machine busy':>12}  bottleneck",
    ]
    for n, row in rows.items():
        cpu = row["cpu"]
        each = ", ".join(f"{v:.0f}" for v in cpu["each_instance_pct"])
        lines.append(
            f"  {n:>2} {_pct(cpu['instances_pct']):>10} {each:<18} {_pct(cpu['instances_waiting_pct']):>8} "
            f"{_pct(cpu['broker_pct']):>11} {_pct(cpu['publishers_pct']):>10} {_pct(cpu['bench_pct']):>6} "
            f"{_pct(cpu['other_pct']):>6} {_pct(cpu['machine_busy_pct']):>12}  {row['bottleneck']['cause']}"
        )
    if "hosts" in result:
        lines += _budget_lines(rows)
    acc = result["accounting"]
    lines += [
        "",
        f"accounting: {acc['offered_readings']} readings offered, {acc['accepted_readings']} accepted, "
        f"{acc['lost_readings']} lost, {acc['broker_lost_messages']} messages not delivered, rejected "
        f"{acc['rejected'] or 'none'}",
    ]
    return "\n".join(lines)


def _hosts_lines(result: dict[str, Any]) -> list[str]:
    """How ``--hosts`` made its hosts (nothing without it)."""
    h = result.get("hosts")
    if not h:
        return []
    first, last = h["each"][0], h["each"][-1]
    return [
        f"hosts: instance i in network namespace {first['namespace']} ... {last['namespace']}, "
        f"address {first['address']} ... {last['address']} ({h['subnet']}), a veth pair to bridge "
        f"{h['bridge']} where nats-server listens ({h['broker_address']}); and in CPU cgroup "
        f"{h['cgroup_parent']}/h<i> (cgroup v{h['cgroup']['version']}, {h['quota_us']} us per "
        f"{h['period_us']} us: {h['cpus_each']:g} CPUs each; the hosts' group at weight "
        f"{h['cgroup_parent_weight']}, the highest)",
    ]


def _budget_lines(rows: dict[str, Any]) -> list[str]:
    """Per N (its median run): the hosts' budgets, what they leave of the cores, and each
    instance's use of its budget and its throttling."""
    lines = [
        "",
        "each host's CPU budget (the median run of each N; used: the instance's CPU time over its "
        "budget; throttled: periods it ran out of quota in, and for how long)",
        f"  {'N':>2} {'budgets':>8} {'cores left':>10}  each instance: used, throttled periods, "
        "throttled s -> bottleneck",
    ]
    for n, row in rows.items():
        hosts = row["cpu"]["hosts"] or []
        each = "; ".join(
            f"{100 * h['of_budget']:.0f} %, {100 * h['throttled_share']:.0f} %, {h['throttled_s']:.1f} s -> "
            f"{'budget' if h['at_budget'] else row['bottleneck']['per_instance'][i]}"
            for i, h in enumerate(hosts)
        )
        lines.append(
            f"  {n:>2} {row['hosts']['budget_cpus']:>8.2f} {row['hosts']['cpus_left']:>10.2f}  {each}"
        )
    return lines
