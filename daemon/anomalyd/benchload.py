"""The load of ``anomalyd bench``: publisher, counting-subscriber and probe child processes.

Run as ``python -m anomalyd.benchload publish ...``, ``... count ...`` or ``... probe ...``
by the bench, never by hand. Each child is its own process (its own interpreter lock), so the load it
offers or receives is not limited by the bench process, nor the bench by it.

A child talks to the bench over its standard streams: it prepares (values, connection),
prints ``ready``, waits for a ``go`` line on stdin, does its work, and prints one JSON
object as its last line (the probe also answers commands in between, see below).

``publish`` sends telemetry for ``--devices`` devices named ``<prefix><k>``:

* paced (``--rate R``, ``--seconds T``): every device publishes R readings per second,
  one per message, or ``--array A`` readings per message every A/R seconds; devices are
  spread evenly over the period. Each reading is stamped with the wall-clock time it is
  due (an array's readings are 1/R s apart and end at the message's due time), so a
  reading's age when its score comes back is the real lag. A publisher that falls behind
  keeps the stamps and catches up; its lateness is reported.
* burst (``--burst K``): every device sends K readings as fast as the connection takes
  them, stamped with the time of sending (readings of one device strictly increasing).

With ``--partitions P`` the device ids are chosen so that they spread evenly over the P
partitions of a NATS-partitioned broker (``balanced_device_ids``): every instance of a
partitioned fleet then gets the same share of the load, so none finishes last because the
hash gave it more devices. ``--protocol 3.1.1`` (every child takes it) speaks MQTT 3.1.1,
the only version NATS's MQTT gateway speaks; the default is MQTT 5.

Values come from ``anomalyd.synthetic.generate_fleet`` (normal data, no anomalies, no
gaps), so none is rejected as malformed or out of order.

``count`` subscribes to a topic filter and only counts what arrives (its message
callback does nothing else): the most a bare paho subscriber receives from the broker. It
stops ``--idle`` seconds after the last message, or with ``--expect M`` as soon as M are in.

``probe`` is the bench's latency probe (``anomalyd.benchrun.Probe`` drives it): ``--devices``
devices publish single readings at ``--rate`` each, stamped ``time.time()`` when sent, and
a second client subscribed to their score topics records (receive time, latency) for each
score, the latency being the receive time minus the score's ``ts``. It is a process of its
own so that its timestamps are not delayed by the bench's work (scraping and parsing
``/metrics``, its other threads) competing for one interpreter lock. After ``ready`` and
``go`` (which sends each device a window of past readings, then starts the paced
readings) it answers each line on stdin with one JSON object: ``poll``, ``pause``,
``resume``, ``stop`` (no more readings; the subscription stays) and ``exit``. Each answer
holds the messages and readings published so far and the samples received since the
previous answer; ``pause`` and ``stop`` answer once the last reading published is on the
socket, so the counts they give are what the broker was sent.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

#: Distinct value series generated for the fleet; devices beyond this reuse them at an offset.
_POOL_DEVICES = 16
_POOL_SAMPLES = 1200
#: A paced publisher sleeps only when it is at least this far ahead of its schedule.
_MIN_SLEEP_S = 0.001
#: Burst mode: readings of one device are at least this far apart in data time.
_BURST_MIN_SPACING_S = 1e-5
#: Keep one lateness sample per this many messages (enough for a p99, cheap to keep).
_LATE_SAMPLE_EVERY = 8
#: ``--protocol``: MQTT 5 (Mosquitto) or 3.1.1 (NATS's MQTT gateway speaks nothing else).
PROTOCOLS = ("5", "3.1.1")


def value_pool(features: int, seed: int = 11) -> list[list[list[float]]]:
    """``pool[i][k]``: reading k of series i, ``features`` values (synthetic channels in turn)."""
    from anomalyd.synthetic import FleetSpec, generate_fleet

    spec = FleetSpec(
        n_devices=_POOL_DEVICES,
        duration_s=float(_POOL_SAMPLES),
        period_s=1.0,
        seed=seed,
        anomalies_per_device_hour=0.0,
        gaps_per_device_hour=0.0,
    )
    pool = []
    for series in generate_fleet(spec):
        rows = series.values.astype("float64").round(4)
        pool.append([[float(row[j % rows.shape[1]]) for j in range(features)] for row in rows])
    return pool


def _mqtt_version(protocol: str) -> Any:
    """paho's protocol constant for ``--protocol`` ("5" or "3.1.1")."""
    return mqtt.MQTTv311 if protocol == "3.1.1" else mqtt.MQTTv5


def balanced_device_ids(prefix: str, count: int, partitions: int) -> list[str]:
    """``count`` device ids ``<prefix><k>``; with ``partitions`` > 0, only the k that keep
    every NATS partition (``anomalyd.partitions.nats_partition``) at most one device above
    the others, so that the partitions, and the instances owning them, get equal loads."""
    if partitions <= 0:
        return [f"{prefix}{k}" for k in range(count)]
    from anomalyd.partitions import nats_partition

    quota = -(-count // partitions)  # ceil: when P does not divide count, the last ones hold one less
    held = [0] * partitions
    ids: list[str] = []
    k = 0
    while len(ids) < count:
        device = f"{prefix}{k}"
        p = nats_partition(device, partitions)
        if held[p] < quota:
            held[p] += 1
            ids.append(device)
        k += 1
    return ids


def _client(client_id: str, protocol: str = "5") -> Any:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=_mqtt_version(protocol))
    # Unbounded client-side queue: publish() never refuses; the socket paces a burst.
    client.max_queued_messages_set(0)
    return client


def _connect(client: Any, host: str, port: int, timeout: float = 10.0) -> None:
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not connected.wait(timeout):
        raise SystemExit(f"benchload: no CONNACK from {host}:{port} within {timeout:.0f} s")


def _wait_go() -> None:
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(0)  # the bench gave up on this run before it started


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def publish(args: argparse.Namespace) -> dict[str, Any]:
    """The ``publish`` child: see the module docstring. Returns the result object."""
    features: list[str] = args.features.split(",")
    pool = value_pool(len(features))
    n = args.devices
    per_msg = max(args.array, 1)
    pre, post = args.topic.split("{device}")
    topics = [f"{pre}{device}{post}" for device in balanced_device_ids(args.prefix, n, args.partitions)]
    series = [pool[k % len(pool)] for k in range(n)]
    cursor = [(k * 131) % _POOL_SAMPLES for k in range(n)]
    last_ts = [-math.inf] * n

    def encode(k: int, end_ts: float, spacing: float) -> bytes:
        docs = []
        for j in range(per_msg):
            row = series[k][cursor[k] % _POOL_SAMPLES]
            cursor[k] += 1
            doc: dict[str, float] = {"ts": end_ts - (per_msg - 1 - j) * spacing}
            doc.update(zip(features, row, strict=True))
            docs.append(doc)
        last_ts[k] = end_ts
        return orjson.dumps(docs if args.array >= 1 else docs[0])

    client = _client(f"bench-pub-{args.prefix}{os.getpid()}", args.protocol)
    _connect(client, args.host, args.port)
    _wait_go()
    messages = 0
    late: list[float] = []
    late_max = 0.0
    info = None
    cpu0 = _cpu_s()
    first = time.time()
    if args.burst:
        per_device = math.ceil(args.burst / per_msg)
        for _ in range(per_device):
            for k in range(n):
                now = time.time()
                end_ts = max(now, last_ts[k] + per_msg * _BURST_MIN_SPACING_S)
                spacing = min(1e-3, (end_ts - last_ts[k]) / per_msg)
                info = client.publish(topics[k], encode(k, end_ts, spacing), qos=0)
                messages += 1
    else:
        period = per_msg / args.rate  # seconds between two messages of one device
        t0 = first
        end = t0 + args.seconds
        i = 0
        while True:
            k, rnd = i % n, i // n
            due = t0 + (rnd + k / n) * period
            if due >= end:
                break
            now = time.time()
            if due - now > _MIN_SLEEP_S:
                time.sleep(due - now)
            elif now - due > late_max:
                late_max = now - due
            if i % _LATE_SAMPLE_EVERY == 0:
                late.append(max(0.0, now - due))
            info = client.publish(topics[k], encode(k, due, 1.0 / args.rate), qos=0)
            messages += 1
            i += 1
    last = time.time()
    flushed = True
    if info is not None:
        # QoS 0: "published" means written to the socket, in order, so the last one is all.
        info.wait_for_publish(args.flush_timeout)
        flushed = bool(info.is_published())
    cpu = _cpu_s() - cpu0
    client.disconnect()
    client.loop_stop()
    late.sort()
    return {
        "messages": messages,
        "readings": messages * per_msg,
        "first": first,
        "last": last,
        "flushed": flushed,
        "cpu_s": cpu,
        "late_p99_s": late[int(0.99 * (len(late) - 1))] if late else 0.0,
        "late_max_s": late_max,
    }


def count(args: argparse.Namespace) -> dict[str, Any]:
    """The ``count`` child: subscribe, count until ``--idle`` s pass without a message."""
    received = 0
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal received
        received += 1  # nothing else: this is the bare subscriber's limit

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-count-{os.getpid()}",
        protocol=_mqtt_version(args.protocol),
    )
    client.on_connect = lambda c, *_a: c.subscribe(args.topic, qos=0)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("benchload: the counting subscriber got no SUBACK")
    _wait_go()
    cpu0 = _cpu_s()
    start = time.time()
    first = last = math.nan
    seen = 0
    # The main thread samples the count, so the callback stays a bare increment; the time
    # of the last message is known to within one poll.
    while True:
        time.sleep(0.005)
        now = time.time()
        if received != seen:
            seen = received
            last = now
            if math.isnan(first):
                first = now
        if args.expect and seen >= args.expect:
            break  # all there: no idle wait, whose length a stall of the sender would set
        if (not math.isnan(last) and now - last > args.idle) or now - start > args.timeout:
            break
    cpu = _cpu_s() - cpu0
    client.disconnect()
    client.loop_stop()
    return {"received": seen, "first": first, "last": last, "cpu_s": cpu}


class _ProbeChild:
    """The ``probe`` child's state: see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        features: list[str] = args.features.split(",")
        self.features = features
        self.rows = value_pool(len(features), seed=5)
        self.rate: float = args.rate
        self.window: int = args.window
        self.devices = [f"{args.prefix}{k}" for k in range(args.devices)]
        self.topics = [args.topic.replace("{device}", d) for d in self.devices]
        self.last_ts = [0.0] * len(self.devices)
        # Appended by the receiving client's network thread only, read by the main thread
        # (list append and slicing are atomic under the interpreter lock: no lock needed).
        self.samples: list[tuple[float, float]] = []
        self.sent = 0  # samples already handed to the bench
        self.messages = 0  # published, under self.publishing
        self.readings = 0
        self.publishing = threading.Lock()  # held while one reading is published and counted
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.last_info: Any = None
        self.thread: threading.Thread | None = None

        # Two clients: a score's arrival is never queued behind the probe's own publishing.
        self.pub = _client(f"bench-probe-pub-{args.prefix}{os.getpid()}", args.protocol)
        _connect(self.pub, args.host, args.port)
        subscribed = threading.Event()
        scores = [(args.score_topic.replace("{device}", d), 0) for d in self.devices]
        self.sub = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-probe-sub-{args.prefix}{os.getpid()}",
            protocol=_mqtt_version(args.protocol),
        )
        self.sub.on_connect = lambda c, *_a: c.subscribe(scores)
        self.sub.on_subscribe = lambda *_a: subscribed.set()
        self.sub.on_message = self._on_message
        self.sub.connect(args.host, args.port, keepalive=60)
        self.sub.loop_start()
        if not subscribed.wait(10):
            raise SystemExit(f"benchload: the probe got no SUBACK from {args.host}:{args.port}")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        # The receive time first, and nothing but the latency after it: this is the figure.
        received = time.time()
        try:
            ts = float(orjson.loads(msg.payload)["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        self.samples.append((received, received - ts))

    def _doc(self, k: int, ts: float, i: int) -> dict[str, float]:
        row = self.rows[k % len(self.rows)]
        doc = {"ts": ts}
        doc.update(zip(self.features, row[i % len(row)], strict=True))
        return doc

    def start(self) -> None:
        """One array of a window's worth of past readings per device, so that each is
        scored from its first live reading on; then the paced readings."""
        now = time.time()
        with self.publishing:
            for k, topic in enumerate(self.topics):
                past = [now - (self.window - j) / self.rate for j in range(self.window)]
                docs = [self._doc(k, ts, j) for j, ts in enumerate(past)]
                self.last_info = self.pub.publish(topic, orjson.dumps(docs), qos=0)
                self.last_ts[k] = past[-1]
                self.messages += 1
                self.readings += self.window
        self.running.set()
        self.thread = threading.Thread(target=self._publish_loop, name="probe-publish", daemon=True)
        self.thread.start()

    def _publish_loop(self) -> None:
        n = len(self.devices)
        period = 1.0 / (self.rate * n)  # the devices take turns, evenly spaced
        next_due = time.time()
        i = 0
        while not self.stopping.is_set():
            if not self.running.is_set():
                self.running.wait(0.1)
                next_due = time.time()
                continue
            ahead = next_due - time.time()
            if ahead > 0 and self.stopping.wait(ahead):
                break
            with self.publishing:
                if not self.running.is_set():
                    continue
                k = i % n
                # Stamped when sent: the probe's true lag is receive time minus this.
                ts = max(time.time(), self.last_ts[k] + 1e-6)
                self.last_ts[k] = ts
                payload = orjson.dumps(self._doc(k, ts, i // n))
                self.last_info = self.pub.publish(self.topics[k], payload, qos=0)
                self.messages += 1
                self.readings += 1
            i += 1
            next_due += period
            if time.time() - next_due > 1.0:
                next_due = time.time()  # starved for a second: do not burst to catch up

    def pause(self, flush_timeout: float) -> None:
        """No reading after this returns; the last one published is on the socket."""
        self.running.clear()
        with self.publishing:
            if self.last_info is not None:
                # QoS 0: "published" means written to the socket, in order, so the last is all.
                self.last_info.wait_for_publish(flush_timeout)

    def stop(self, flush_timeout: float) -> None:
        self.stopping.set()
        self.pause(flush_timeout)
        if self.thread is not None:
            self.thread.join(5)

    def answer(self) -> dict[str, Any]:
        with self.publishing:
            messages, readings = self.messages, self.readings
        end = len(self.samples)
        new = self.samples[self.sent : end]
        self.sent = end
        return {"messages": messages, "readings": readings, "samples": new, "t": time.time()}

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """The ``probe`` child: see the module docstring. Returns the answer to ``exit``."""
    child = _ProbeChild(args)
    # Whatever was allocated so far (the value pool, paho, numpy) is left out of the
    # cyclic collector's full passes, which would otherwise stall the receive timestamps.
    gc.freeze()
    _wait_go()
    child.start()

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(orjson.dumps(obj).decode() + "\n")
        sys.stdout.flush()

    say(child.answer())
    try:
        while True:
            command = sys.stdin.readline().strip()
            if command == "poll":
                pass
            elif command == "pause":
                child.pause(args.flush_timeout)
            elif command == "resume":
                child.running.set()
            elif command == "stop":
                child.stop(args.flush_timeout)
            elif command in ("exit", ""):  # "": the bench closed stdin (it has gone)
                child.stop(args.flush_timeout)
                return child.answer()
            else:
                raise SystemExit(f"benchload: unknown probe command {command!r}")
            say(child.answer())
    finally:
        child.close()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m anomalyd.benchload", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--protocol", choices=PROTOCOLS, default="5")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", default="sensors/{device}/telemetry")
    p.add_argument("--prefix", required=True, help="device ids are <prefix><k>")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--features", default="temperature,pressure,vibration")
    p.add_argument(
        "--array", type=int, default=0, help="readings per message as a JSON array (0: one object)"
    )
    p.add_argument("--rate", type=float, default=1.0, help="paced: readings per second per device")
    p.add_argument("--seconds", type=float, default=10.0, help="paced: how long")
    p.add_argument("--burst", type=int, default=0, help="burst: readings per device, as fast as possible")
    p.add_argument("--flush-timeout", type=float, default=120.0)
    p.add_argument(
        "--partitions", type=int, default=0, help="spread the device ids evenly over P NATS partitions"
    )
    p.set_defaults(run=publish)
    p = sub.add_parser("count")
    p.add_argument("--protocol", choices=PROTOCOLS, default="5")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", default="sensors/+/telemetry")
    p.add_argument("--idle", type=float, default=2.0, help="stop this long after the last message")
    p.add_argument("--expect", type=int, default=0, help="stop as soon as this many messages are in")
    p.add_argument("--timeout", type=float, default=120.0, help="stop after this long in any case")
    p.set_defaults(run=count)
    p = sub.add_parser("probe")
    p.add_argument("--protocol", choices=PROTOCOLS, default="5")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", default="sensors/{device}/telemetry")
    p.add_argument("--score-topic", default="anomaly/{device}/score")
    p.add_argument("--prefix", required=True, help="device ids are <prefix><k>")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--rate", type=float, required=True, help="readings per second per device")
    p.add_argument("--window", type=int, required=True, help="past readings sent to each device first")
    p.add_argument("--features", default="temperature,pressure,vibration")
    p.add_argument("--flush-timeout", type=float, default=10.0)
    p.set_defaults(run=probe)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.run(args)
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
