"""End-to-end throughput of the real daemon through a real Mosquitto, as a ratio against a
limit measured in the same run on the same machine (never absolute targets: machines here
are shared).

Everything runs on 127.0.0.1 against a private Mosquitto started on a free port with
``max_queued_messages`` raised (tests/broker.py's config: 1,000,000), so that the broker
does not silently drop QoS 0 messages to a slow subscriber (FIELD_NOTES, "MQTT on 2
cores"): a drop would otherwise look like a daemon that lost readings.

* publisher: a separate process that pre-encodes ``--devices`` × ``--per-device`` telemetry
  JSON messages (values from the synthetic fleet, timestamps a little in the past and
  strictly increasing per device, so none is rejected) and then floods them at QoS 0;
* limit: a bare paho-mqtt subscriber whose ``on_message`` only counts — messages/s it
  receives from that flood (measured before and after the daemon, the higher one kept, so
  a neighbour's load during one of them makes the ratio pessimistic, never flattering);
* daemon: ``python -m anomalyd run --broker H:P --metrics-addr 127.0.0.1:P`` with the
  default model, fed the same flood; /metrics is scraped over HTTP until every message is
  accounted for (accepted + rejected) and every expected window scored, or a time limit.

Rates are counted from the publisher's first publish to the last message received
(subscriber) or to the scrape that saw everything accounted for (daemon; scraped every
``--scrape-interval`` s, so the daemon's rate is rounded down by up to that much).

Run:

    .venv/bin/python benchmarks/bench_mqtt.py [--devices 200] [--per-device 400]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.broker import MosquittoBroker, free_port

TOPIC = "sensors/{device}/telemetry"  # the daemon's default mqtt.topic_in
CLK_TCK = os.sysconf("SC_CLK_TCK")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --------------------------------------------------------------------------- publisher


def publisher_main(port: int, devices: int, per_device: int, base_ts: float, timeout: float) -> None:
    """Child process: encode every message first, then flood them; print one JSON line."""
    from anomalyd.synthetic import FleetSpec, generate_fleet

    # No gaps: a gap longer than stream.max_gap_s would restart a device's window and
    # change the number of windows the daemon is expected to score.
    spec = FleetSpec(n_devices=devices, duration_s=per_device + 10.0, seed=7, gaps_per_device_hour=0.0)
    fleet = generate_fleet(spec)
    messages: list[tuple[str, bytes]] = []
    for k in range(per_device):
        for d, series in enumerate(fleet):
            v = series.values[k % len(series.values)].tolist()
            # Devices are offset by a millisecond so that readings are distinct in time too.
            payload = {"ts": base_ts + k + d * 1e-3, "temperature": v[0], "pressure": v[1], "vibration": v[2]}
            messages.append((TOPIC.replace("{device}", series.device), orjson.dumps(payload)))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher", protocol=mqtt.MQTTv5)
    # Unbounded client-side queue: publish() never refuses, the socket paces the flood.
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    cpu0 = os.times()
    start = time.time()
    info = None
    for topic, encoded in messages:
        info = client.publish(topic, encoded, qos=0)
    if info is not None:
        info.wait_for_publish(timeout)  # QoS 0: "published" once written to the socket
    end = time.time()
    cpu1 = os.times()
    client.disconnect()
    client.loop_stop()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    done = info is not None and info.is_published()
    print(orjson.dumps({"start": start, "end": end, "n": len(messages), "cpu_s": cpu, "done": done}).decode())


def start_publisher(args: argparse.Namespace, port: int, base_ts: float) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--_publish", str(port), "--devices", str(args.devices)]
    cmd += ["--per-device", str(args.per_device), "--base-ts", repr(base_ts), "--timeout", str(args.timeout)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def finish_publisher(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise RuntimeError("publisher did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"publisher exited with {proc.returncode}")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- helpers


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        # The command name (field 2) may hold spaces; it ends at the last ')'.
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process (Python 3.11 leaves OS thread names unset)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _task_cpu(pid, int(tid))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listing and reading
    return out


def _task_cpu(pid: int, tid: int) -> float:
    with open(f"/proc/{pid}/task/{tid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rejected_by_reason(samples: Samples) -> dict[str, float]:
    return {dict(lb)["reason"]: v for (n, lb), v in samples.items() if n == "anomalyd_rejected_total"}


def histogram_quantile(samples: Samples, name: str, q: float) -> float:
    """Prometheus-style estimate: linear interpolation inside the bucket holding rank q."""
    buckets = sorted((float(dict(lb)["le"]), v) for (n, lb), v in samples.items() if n == f"{name}_bucket")
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lo_le, lo_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lo_le  # beyond the last finite bucket: only a lower bound is known
            return lo_le + (le - lo_le) * (rank - lo_count) / max(count - lo_count, 1e-12)
        lo_le, lo_count = le, count
    return math.nan


# --------------------------------------------------------------------------- limit


def run_limit(args: argparse.Namespace, broker: MosquittoBroker) -> dict[str, float]:
    """A bare subscriber that only counts, fed by the publisher process."""
    n = 0
    last = 0.0
    subscribed = threading.Event()

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        client.subscribe(TOPIC.replace("{device}", "+"), qos=0)

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal n, last
        n += 1
        last = time.time()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-limit", protocol=mqtt.MQTTv5)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError("limit subscriber got no SUBACK")
        total = args.devices * args.per_device
        cpu0 = cpu_seconds(os.getpid())
        broker_cpu0 = cpu_seconds(broker_pid(broker))
        pub = start_publisher(args, broker.port, time.time() - args.per_device - 30.0)
        pub_result = finish_publisher(pub, args.timeout + 60)
        # Wait for the tail: done when everything arrived or nothing arrived for 2 s.
        deadline = time.monotonic() + args.timeout
        while n < total and time.monotonic() < deadline and time.time() - max(last, pub_result["end"]) < 2:
            time.sleep(0.01)
        wall = max(last, pub_result["start"]) - pub_result["start"]
        return {
            "received": n,
            "sent": pub_result["n"],
            "rate": n / wall if wall > 0 else math.nan,
            "wall": wall,
            "pub_rate": pub_result["n"] / max(pub_result["end"] - pub_result["start"], 1e-9),
            "pub_cpu": 100 * pub_result["cpu_s"] / max(pub_result["end"] - pub_result["start"], 1e-9),
            "sub_cpu": 100 * (cpu_seconds(os.getpid()) - cpu0) / max(wall, 1e-9),
            "broker_cpu": 100 * (cpu_seconds(broker_pid(broker)) - broker_cpu0) / max(wall, 1e-9),
        }
    finally:
        client.disconnect()
        client.loop_stop()


def broker_pid(broker: MosquittoBroker) -> int:
    proc = broker._proc  # the test helper keeps its Popen private; the pid is all we read
    if proc is None:
        raise RuntimeError("broker is not running")
    return proc.pid


# --------------------------------------------------------------------------- daemon


def run_daemon(args: argparse.Namespace, broker: MosquittoBroker, workdir: Path) -> dict[str, Any]:
    metrics_port = free_port()
    log_path = workdir / "daemon.log"
    cmd = [sys.executable, "-m", "anomalyd", "run", "--broker", broker.address]
    cmd += ["--metrics-addr", f"127.0.0.1:{metrics_port}", "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if metric(scrape(metrics_port), "anomalyd_ready") == 1:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready in 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        return flood_daemon(args, broker, proc.pid, metrics_port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def flood_daemon(args: argparse.Namespace, broker: MosquittoBroker, pid: int, port: int) -> dict[str, Any]:
    total = args.devices * args.per_device
    # Every accepted reading from the L-th of a device on ends a window (hop 1, warmup "wait").
    length = args.window_length
    expected_windows = args.devices * max(args.per_device - length + 1, 0)
    before = scrape(port)
    cpu0, broker_cpu0 = cpu_seconds(pid), cpu_seconds(broker_pid(broker))
    threads0 = thread_cpu_seconds(pid)
    max_queue = max_pending = 0.0
    pub = start_publisher(args, broker.port, time.time() - args.per_device - 30.0)
    first_seen = math.nan
    deadline = time.monotonic() + args.timeout
    samples, t_done, done = before, math.nan, False
    pub_result: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        time.sleep(args.scrape_interval)
        samples = scrape(port)
        now = time.time()
        received = metric(samples, "anomalyd_messages_received_total") - metric(
            before, "anomalyd_messages_received_total"
        )
        # Sampled gauges: the deepest backlog a scrape happened to see, not a true maximum.
        max_queue = max(max_queue, metric(samples, "anomalyd_intake_queue_depth"))
        max_pending = max(max_pending, metric(samples, "anomalyd_pending_windows"))
        if received > 0 and math.isnan(first_seen):
            first_seen = now
        accepted = metric(samples, "anomalyd_readings_accepted_total")
        rejected = sum(rejected_by_reason(samples).values())
        windows = metric(samples, "anomalyd_windows_scored_total")
        if accepted + rejected >= total and windows >= expected_windows - rejected:
            t_done, done = now, True
            break
        if pub_result is None and pub.poll() is not None:
            pub_result = finish_publisher(pub, 10)
    cpu1, broker_cpu1 = cpu_seconds(pid), cpu_seconds(broker_pid(broker))
    threads1 = thread_cpu_seconds(pid)
    if pub_result is None:
        pub_result = finish_publisher(pub, args.timeout)
    t_end = t_done if done else time.time()
    wall = t_end - pub_result["start"]
    accepted = metric(samples, "anomalyd_readings_accepted_total") - metric(
        before, "anomalyd_readings_accepted_total"
    )
    windows = metric(samples, "anomalyd_windows_scored_total") - metric(
        before, "anomalyd_windows_scored_total"
    )
    return {
        "done": done,
        "sent": pub_result["n"],
        "accepted": accepted,
        "windows": windows,
        "expected_windows": expected_windows,
        "rejected": rejected_by_reason(samples),
        "wall": wall,
        "readings_rate": accepted / wall,
        "windows_rate": windows / wall,
        "pub_rate": pub_result["n"] / max(pub_result["end"] - pub_result["start"], 1e-9),
        "cpu": 100 * (cpu1 - cpu0) / max(wall, 1e-9),
        "broker_cpu": 100 * (broker_cpu1 - broker_cpu0) / max(wall, 1e-9),
        "threads": sorted(
            (100 * (c - threads0.get(t, 0.0)) / max(wall, 1e-9) for t, c in threads1.items()), reverse=True
        ),
        "max_queue": max_queue,
        "max_pending": max_pending,
        "mean_batch": (
            metric(samples, "anomalyd_batch_size_sum") / max(metric(samples, "anomalyd_batch_size_count"), 1)
        ),
        "e2e": {q: histogram_quantile(samples, "anomalyd_end_to_end_seconds", q) for q in (0.5, 0.9, 0.99)},
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--per-device", type=int, default=400, help="messages (one reading each) per device")
    ap.add_argument("--timeout", type=float, default=120.0, help="time limit of each flood, seconds")
    ap.add_argument("--scrape-interval", type=float, default=0.1, help="daemon /metrics poll, seconds")
    ap.add_argument("--_publish", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base-ts", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._publish is not None:
        publisher_main(args._publish, args.devices, args.per_device, args.base_ts, args.timeout)
        return

    from anomalyd.model import DEFAULT_MODEL_PATH, read_contract

    contract = read_contract(DEFAULT_MODEL_PATH)
    args.window_length = contract.window_length
    total = args.devices * args.per_device
    print(
        f"{total} messages ({args.devices} devices × {args.per_device}), QoS 0, one reading each; "
        f"model {contract.model_version} L={args.window_length}; cores={os.cpu_count()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        print(f"mosquitto on {broker.address}, max_queued_messages 1000000 (no QoS 0 drops at the broker)")
        try:
            lim1 = run_limit(args, broker)
            d = run_daemon(args, broker, Path(tmp))
            lim2 = run_limit(args, broker)
        finally:
            broker.stop()
    limit = max(lim1, lim2, key=lambda r: r["rate"])
    for name, r in (("limit (before)", lim1), ("limit (after)", lim2)):
        print(
            f"{name:16} {r['rate']:10.0f} msg/s  received {r['received']:.0f}/{r['sent']:.0f} in "
            f"{r['wall']:.2f} s; publisher {r['pub_rate']:.0f} msg/s at {r['pub_cpu']:.0f}% CPU, "
            f"subscriber {r['sub_cpu']:.0f}% CPU, mosquitto {r['broker_cpu']:.0f}% CPU"
        )
    status = "all accounted for" if d["done"] else f"TIME LIMIT ({args.timeout:.0f} s) reached"
    print(
        f"daemon readings  {d['readings_rate']:10.0f} readings/s  ({d['accepted']:.0f} accepted of "
        f"{d['sent']} sent in {d['wall']:.2f} s; {status})"
    )
    print(
        f"daemon windows   {d['windows_rate']:10.0f} windows/s   ({d['windows']:.0f} scored of "
        f"{d['expected_windows']} expected)"
    )
    print(f"ratio            {d['readings_rate'] / limit['rate']:10.2f}  (daemon readings/s / limit msg/s)")
    rejected = {k: int(v) for k, v in d["rejected"].items() if v}
    print(f"rejected         {rejected or 'none'}")
    e2e = d["e2e"]
    print(
        f"end to end       p50 {1e3 * e2e[0.5]:.1f} ms, p90 {1e3 * e2e[0.9]:.1f} ms, "
        f"p99 {1e3 * e2e[0.99]:.1f} ms  (anomalyd_end_to_end_seconds, interpolated in buckets)"
    )
    print(
        f"cpu              daemon {d['cpu']:.0f}%, mosquitto {d['broker_cpu']:.0f}% (of one core) during the "
        f"daemon flood; publisher sent at {d['pub_rate']:.0f} msg/s"
    )
    busiest = ", ".join(f"{c:.0f}%" for c in d["threads"][:3])
    print(f"daemon threads   busiest: {busiest} (unnamed OS threads; the MQTT and pipeline threads lead)")
    print(
        f"backlog          intake queue up to {d['max_queue']:.0f} messages, batcher up to "
        f"{d['max_pending']:.0f} windows (deepest seen by a scrape); mean batch {d['mean_batch']:.1f}"
    )


if __name__ == "__main__":
    main()
