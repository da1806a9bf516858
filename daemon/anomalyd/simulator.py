"""Publish the synthetic fleet (``anomalyd.synthetic``) over MQTT, as devices would; and
``anomalyd demo``, which runs the daemon, the simulator and a live view together.

One JSON object per reading on ``sensors/<device>/telemetry`` (the daemon's default input
topic), paced by the readings' timestamps divided by ``speed`` (``speed = inf``: as fast
as the connection takes them).

Timestamps are placed so that no reading is ever stamped in the future when it is sent
(the daemon rejects readings more than ``stream.max_future_skew_s`` ahead): at
``speed = 1`` the stream starts now, faster streams start far enough in the past to end
about now.

The demo puts every topic (telemetry, scores, alert states, status, commands) under a
prefix of its own, ``anomalyd-demo/<random>/``, and removes what it left retained there
when it ends: a broker it shares with real daemons and devices is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import numpy.typing as npt
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from anomalyd.broker import PrivateBroker
from anomalyd.config import Config, MqttConfig
from anomalyd.errors import EX_SOFTWARE, AnomalydError, BrokerError
from anomalyd.intake import IntakeQueue
from anomalyd.mqtt import MqttLink, subscription_filter
from anomalyd.synthetic import FEATURES, AnomalyEvent, DeviceSeries, FleetSpec, generate_fleet, interleave

if TYPE_CHECKING:
    from anomalyd.csvdata import CsvRecording
    from anomalyd.service import Service

log = logging.getLogger(__name__)

#: Decimals kept in published values: 1e-6 is far below every channel's sensor noise.
_DECIMALS = 6


#: The fleet ``simulate`` and ``demo`` publish unless told otherwise: the generator's defaults
#: (``FleetSpec()``) except for two choices made for watching the model at work.
SIMULATED_FLEET = FleetSpec(
    # Not the training fleet's seed (0): the demo must show machines the model never saw.
    seed=1,
    # A gap restarts the device's window in the daemon; none, so that scores keep flowing.
    gaps_per_device_hour=0.0,
)


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate (``fleet``) and how to publish it.

    ``fleet.start_ts`` is not used: the stream's first timestamp is chosen when it runs
    (``start_ts``), so that no reading is ever stamped in the future.
    """

    fleet: FleetSpec = SIMULATED_FLEET
    speed: float = 1.0  # data seconds per wall-clock second; math.inf: no pacing
    topic_template: str = "sensors/{device}/telemetry"
    qos: int = 0

    def __post_init__(self) -> None:
        if not (self.speed > 0):
            raise ValueError(f"speed: need a number > 0 (inf: as fast as possible), got {self.speed}")

    @property
    def devices(self) -> int:
        """Number of simulated devices."""
        return self.fleet.n_devices

    @property
    def rate_hz(self) -> float:
        """Readings per second per device (data time)."""
        return 1.0 / self.fleet.period_s

    @property
    def duration_s(self) -> float:
        """Seconds of data per device (data time)."""
        return self.fleet.duration_s

    def start_ts(self, now: float) -> float:
        """First timestamp such that the stream, sent at ``speed``, never runs ahead of ``now``."""
        return stream_start(now, self.duration_s, self.speed)

    def fleet_spec(self, start_ts: float) -> FleetSpec:
        """``fleet``, its first reading at ``start_ts``."""
        return replace(self.fleet, start_ts=start_ts)


def stream_start(now: float, duration_s: float, speed: float) -> float:
    """First timestamp of ``duration_s`` of data sent at ``speed`` from ``now`` such that no
    reading is stamped after the moment it is sent: at speed <= 1, ``now``; faster, far
    enough back that the last reading is stamped about when it is sent."""
    lag = 1.0 if math.isinf(speed) else 1.0 - 1.0 / max(speed, 1.0)
    return now - duration_s * lag


@dataclass
class Stream:
    """The fleet and the time-ordered stream the simulator publishes."""

    fleet: list[DeviceSeries]
    device_index: npt.NDArray[np.int32]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float32]
    labels: npt.NDArray[np.bool_]
    #: The JSON field of each column of ``values`` (a recording's own feature names).
    features: tuple[str, ...] = FEATURES
    #: Decimals kept in published values; None: all of float32's (a recording's values are
    #: data, where the synthetic fleet's last decimals are noise).
    decimals: int | None = _DECIMALS

    @property
    def events(self) -> list[tuple[str, AnomalyEvent]]:
        """Every injected anomaly with its device."""
        return [(d.device, e) for d in self.fleet for e in d.events]

    def __len__(self) -> int:
        return len(self.ts)


def build_stream(settings: SimulationSettings, start_ts: float) -> Stream:
    """Generate the fleet (deterministic for given settings and ``start_ts``) and interleave it."""
    fleet = generate_fleet(settings.fleet_spec(start_ts))
    dev, ts, values, labels = interleave(fleet)
    return Stream(fleet, dev, ts, values, labels)


@dataclass
class SimulationResult:
    published: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    events: list[tuple[str, AnomalyEvent]] = field(default_factory=list)


def reading_payload(
    ts: float,
    values: list[float] | npt.NDArray[np.float32],
    features: tuple[str, ...] = FEATURES,
    decimals: int | None = _DECIMALS,
) -> bytes:
    """``{"ts": ..., "temperature": ..., "pressure": ..., "vibration": ...}`` as bytes.

    ``decimals`` None: each value as the shortest text that reads back as the same float32.
    """
    doc: dict[str, object] = {"ts": round(ts, 6)}
    if decimals is None:
        # orjson writes a numpy float32 in its own shortest form (0.0270797, not 0.02707969956).
        doc.update(zip(features, np.asarray(values, np.float32), strict=True))
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    for name, v in zip(features, values, strict=True):
        doc[name] = round(v, decimals)
    return orjson.dumps(doc)


def publish_stream(
    link: MqttLink,
    stream: Stream,
    settings: SimulationSettings,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Publish ``stream`` through a connected ``link``, paced by ``settings.speed``.

    Returns early when ``stop`` is set. ``progress(sent, total)`` is called about once a
    second of wall-clock time.
    """
    stop = stop or threading.Event()
    result = SimulationResult(events=stream.events)
    names = [d.device for d in stream.fleet]
    pre, post = settings.topic_template.split("{device}")
    topics = [pre + n + post for n in names]
    ts_list = stream.ts.tolist()
    values_list = stream.values.tolist() if stream.decimals is not None else list(stream.values)
    dev_list = stream.device_index.tolist()
    t0_wall = time.monotonic()
    t0_data = ts_list[0] if ts_list else 0.0
    paced = math.isfinite(settings.speed)
    next_progress = t0_wall + 1.0
    for i, ts in enumerate(ts_list):
        if paced:
            ahead = t0_wall + (ts - t0_data) / settings.speed - time.monotonic()
            if ahead > 0.002 and stop.wait(ahead):
                break
        elif i % 1000 == 0 and stop.is_set():
            break
        payload = reading_payload(ts, values_list[i], stream.features, stream.decimals)
        if link.publish(topics[dev_list[i]], payload, qos=settings.qos):
            result.published += 1
        else:
            result.failed += 1
        if progress is not None and i % 64 == 0 and time.monotonic() >= next_progress:
            progress(i + 1, len(ts_list))
            next_progress = time.monotonic() + 1.0
    result.elapsed_s = time.monotonic() - t0_wall
    if result.failed:
        log.warning("%d readings could not be published (broker connection lost?)", result.failed)
    return result


# --------------------------------------------------------------------------- commands


def _mqtt_config(host: str, port: int, topic_in: str = "sensors/{device}/telemetry") -> MqttConfig:
    return MqttConfig(host=host, port=port, topic_in=topic_in)


def simulate(
    settings: SimulationSettings,
    host: str,
    port: int,
    start_ts: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """The ``anomalyd simulate`` command: connect, publish the whole stream, disconnect."""
    first = settings.start_ts(time.time()) if start_ts is None else start_ts
    stream = build_stream(settings, first)

    def announce() -> None:
        log.info(
            "simulating %d devices at %g Hz, %d readings, %d anomalies injected, speed %g",
            settings.devices,
            settings.rate_hz,
            len(stream),
            len(stream.events),
            settings.speed,
        )

    return _publish_over_mqtt(stream, settings, host=host, port=port, announce=announce, stop=stop)


def recording_stream(recording: CsvRecording, device: str, start_ts: float) -> Stream:
    """``recording`` as the stream of one device named ``device``, in file order: its first
    row stamped ``start_ts``, each later one as far after it as in the file."""
    ts = start_ts + (recording.ts - recording.ts[0])
    labels = recording.labels if recording.labels is not None else np.zeros(len(ts), np.bool_)
    series = DeviceSeries(device=device, ts=ts, values=recording.values, labels=labels)
    index = np.zeros(len(ts), np.int32)
    return Stream([series], index, ts, recording.values, labels, tuple(recording.names), decimals=None)


def simulate_recording(
    recording: CsvRecording,
    device: str,
    settings: SimulationSettings,
    *,
    host: str,
    port: int,
    start_ts: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """The ``anomalyd simulate --from-csv`` command: publish ``recording`` as the live device
    ``device``, paced by the file's timestamps over ``settings.speed``.

    Stamped as the synthetic fleet is (``stream_start``): the steps between readings are the
    file's, and the first timestamp is chosen so that no reading is stamped after the moment
    it is sent (``start_ts`` overrides it). ``settings.fleet`` is not used.
    """
    span = float(recording.ts.max() - recording.ts[0])
    first = stream_start(time.time(), span, settings.speed) if start_ts is None else start_ts
    stream = recording_stream(recording, device, first)

    def announce() -> None:
        log.info(
            "publishing %s as device %s: %d readings (%s) over %g s of data time, speed %g",
            recording.path,
            device,
            len(stream),
            ", ".join(stream.features),
            span,
            settings.speed,
        )

    return _publish_over_mqtt(stream, settings, host=host, port=port, announce=announce, stop=stop)


def _publish_over_mqtt(
    stream: Stream,
    settings: SimulationSettings,
    *,
    host: str,
    port: int,
    announce: Callable[[], None],
    stop: threading.Event | None,
) -> int:
    """Connect, ``announce()``, publish ``stream``, disconnect; the command's exit code."""
    stop = stop or threading.Event()
    link = MqttLink(_mqtt_config(host, port), client_id=f"anomalyd-simulator-{os.getpid()}", name="sim-mqtt")
    link.start()
    try:
        while not link.wait_connected(5.0):
            if stop.is_set():
                return 130
            log.warning("simulator: waiting for the MQTT broker at %s:%d", host, port)
        announce()

        def progress(sent: int, total: int) -> None:
            log.info("published %d of %d readings", sent, total)

        result = publish_stream(link, stream, settings, stop=stop, progress=progress)
        log.info("published %d readings in %.1f s", result.published, result.elapsed_s)
        return 0 if not result.failed else 1
    finally:
        # Publishes are only queued in the client. QoS 0 ones go out before the
        # DISCONNECT (one ordered stream); QoS>0 ones must be acknowledged first.
        if not link.flush(timeout=60.0):
            log.warning("some QoS>0 readings were not acknowledged by the broker")
        link.close(timeout=60.0)


class LiveView:
    """Prints what the daemon publishes: alert changes at once, a summary every second."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: dict[str, dict[str, Any]] = {}
        self._alerts: set[str] = set()
        self.scores = 0
        self.raised = 0
        self.stale = 0  # retained alert states from before this demo, not shown
        self._summarised = 0
        self._next_summary = time.monotonic() + 1.0

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Take one message from the output topics.

        A retained alert arrives on subscribe and tells the state some earlier run left
        on the broker, not what this demo's daemon decided: it is counted, not shown."""
        if retained and topic.endswith("/alert"):
            self.stale += 1
            return
        if topic.endswith("/status") or "/" not in topic:
            self._print(f"daemon status: {payload.decode(errors='replace')}")
            return
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict) or "device" not in doc:
            return
        device = str(doc["device"])
        if topic.endswith("/alert"):
            self._alert(device, doc)
        else:
            self.scores += 1
            self._last[device] = doc

    def _alert(self, device: str, doc: dict[str, Any]) -> None:
        state = str(doc.get("state", "anomalous" if doc.get("alert") else "normal"))
        when = time.strftime("%H:%M:%S", time.gmtime(float(doc.get("ts") or 0.0)))
        contributions = doc.get("contributions") or {}
        total = sum(contributions.values()) or 1.0
        top = ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(contributions.items(), key=lambda kv: -kv[1])[:2]
        )
        score = doc.get("score")
        score_text = "       -" if score is None else f"{score:8.3g}"
        if state == "anomalous":
            self.raised += 1
            self._alerts.add(device)
            self._print(
                f"ALERT   {device:<14} raised   score {score_text} > {doc.get('threshold') or 0.0:.3g}"
                f"  [data time {when} UTC]  {top}"
            )
        elif state == "normal":
            if device in self._alerts:  # a device's first verdict ("normal") is not news
                self._alerts.discard(device)
                self._print(f"ALERT   {device:<14} cleared  score {score_text}  [data time {when} UTC]")
        else:
            self._alerts.discard(device)
            reason = f" ({doc['reason']})" if doc.get("reason") else ""
            self._print(f"STATE   {device:<14} {state}{reason}")

    def tick(self) -> None:
        """Print the summary line if a second has passed."""
        if time.monotonic() < self._next_summary:
            return
        self._next_summary = time.monotonic() + 1.0
        if self.scores == self._summarised:
            return  # nothing new: do not repeat the same line every second
        self._summarised = self.scores
        cells = []
        for device in sorted(self._last):
            d = self._last[device]
            flag = "!" if d.get("anomaly") else " "
            cells.append(f"{device} {d.get('score', 0):7.3g}{flag}")
        alerts = ", ".join(sorted(self._alerts)) or "none"
        self._print(f"scores  {self.scores:>7} | " + "  ".join(cells) + f" | alerts: {alerts}")

    def _print(self, line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {line}", file=self._out, flush=True)


#: Where ``anomalyd demo`` looks for a broker when it is not given one.
LOCAL_BROKER = ("127.0.0.1", 1883)

#: First level of every topic ``anomalyd demo`` uses; the second is random, one per run.
DEMO_TOPIC_ROOT = "anomalyd-demo"

#: Retained messages the demo found under its prefix and could not clear are named in a
#: warning; beyond this many, the rest are counted.
_NAMED_MAX = 5


def demo_topic_prefix() -> str:
    """``anomalyd-demo/<8 random hex digits>``: a prefix that no other run (demo or real
    daemon) uses, so that the demo neither reads nor changes their messages."""
    return f"{DEMO_TOPIC_ROOT}/{secrets.token_hex(4)}"


def demo_topic_overrides(prefix: str) -> dict[str, object]:
    """Configuration overrides that put every topic the daemon uses under ``prefix/``:
    telemetry in; scores, batches, alert states and status out; operator commands. Each is
    the default topic with ``prefix/`` in front."""
    defaults = Config()
    return {
        "mqtt.topic_in": f"{prefix}/{defaults.mqtt.topic_in}",
        "output.score_topic": f"{prefix}/{defaults.output.score_topic}",
        "output.batch_topic": f"{prefix}/{defaults.output.batch_topic}",
        "output.alert_topic": f"{prefix}/{defaults.output.alert_topic}",
        "output.status_topic": f"{prefix}/{defaults.output.status_topic}",
        "commands.topic": f"{prefix}/{defaults.commands.topic}",
    }


def clear_retained(host: str, port: int, prefix: str, timeout: float = 10.0) -> list[str]:
    """Delete every message the broker at ``host:port`` retains under ``prefix/``; return
    their topics, sorted.

    The broker hands over what it retains under ``prefix/#`` right after granting that
    subscription, before anything published later on the same connection: so once a marker
    message this client publishes after the SUBACK comes back, the list is complete. Each
    is then overwritten with an empty retained message (MQTT's way of deleting one), at
    QoS 1, and acknowledged before this returns.

    Raises ``BrokerError`` if the broker cannot be reached, refuses the connection, the
    subscription or a deletion, or has not answered within ``timeout`` seconds.
    """
    if not prefix or any(c in prefix for c in "+#\0") or prefix.startswith("$"):
        raise ValueError(f"expected a topic prefix without wildcards, got {prefix!r}")
    where = f"MQTT broker {host}:{port}"
    marker_topic = f"{prefix}/end-of-retained"
    marker = secrets.token_hex(8).encode()
    retained: set[str] = set()
    refused: list[str] = []
    listed = threading.Event()

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            refused.append(f"the connection ({reason})")
            listed.set()
            return
        c.subscribe(f"{prefix}/#", qos=1)

    def on_subscribe(c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            refused.append(f"the subscription to {prefix}/# ({reasons[0]})")
            listed.set()
            return
        c.publish(marker_topic, marker, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker_topic and msg.payload == marker:
            listed.set()
        elif msg.retain and msg.payload and not listed.is_set():
            retained.add(msg.topic)

    failed_mids: dict[int, str] = {}

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if reason.is_failure:  # MQTT 5: a PUBACK can refuse (an ACL, for one)
            failed_mids[mid] = str(reason)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"anomalyd-demo-cleanup-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_publish = on_publish
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise BrokerError(f"cannot connect to {where}: {exc}") from None
    client.loop_start()
    try:
        if not listed.wait(timeout):
            raise BrokerError(f"{where} did not list its retained messages within {timeout:g} s")
        if refused:
            raise BrokerError(f"{where} refused {refused[0]}")
        topics = sorted(retained)
        infos = [client.publish(t, b"", qos=1, retain=True) for t in topics]
        for info in infos:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerError(f"cannot send to {where}: {mqtt.error_string(info.rc)}")
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        left = [
            t
            for t, info in zip(topics, infos, strict=True)
            if not info.is_published() or info.mid in failed_mids
        ]
        if left:
            named = ", ".join(left[:_NAMED_MAX]) + (
                f" and {len(left) - _NAMED_MAX} more" if len(left) > _NAMED_MAX else ""
            )
            raise BrokerError(f"{where} did not acknowledge the deletion of {named}")
        return topics
    finally:
        client.disconnect()
        client.loop_stop()


def _clear_demo_retained(host: str, port: int, prefix: str, out: TextIO) -> None:
    """``clear_retained`` for the demo's prefix, and a line saying what it did."""
    try:
        cleared = clear_retained(host, port, prefix)
    except BrokerError as exc:
        log.warning(
            "could not remove the retained messages the demo left under %s/: %s; remove them with "
            "`mosquitto_sub -h %s -p %d -t '%s/#' --remove-retained -W 2`",
            prefix,
            exc,
            host,
            port,
            prefix,
        )
        return
    print(f"removed the {len(cleared)} retained messages the demo left under {prefix}/", file=out, flush=True)


def _broker_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _start_private_broker() -> PrivateBroker:
    """A throwaway mosquitto on a free 127.0.0.1 port, for a demo that found no broker."""
    try:
        private = PrivateBroker()
    except BrokerError as exc:
        raise BrokerError(
            f"no MQTT broker listens on {LOCAL_BROKER[0]}:{LOCAL_BROKER[1]} and none can be started "
            f"here: {exc}; or pass --broker HOST:PORT"
        ) from None
    try:
        private.start()
    except BrokerError:
        private.close()
        raise
    return private


class _StopSignals:
    """While in use: SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal went away) set
    ``stop``, so that the demo ends in order instead of where it stands; the second and
    later ones also call ``on_repeat`` (the demo forces the daemon's stop with it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.received = 0
        self.on_repeat: Callable[[], None] | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.received += 1
        self.stop.set()
        if self.received > 1 and self.on_repeat is not None:
            self.on_repeat()

    def __exit__(self, *_exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot put back; the default it is.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def run_demo(
    settings: SimulationSettings,
    broker: tuple[str, int] | None,
    model_path: Path | None,
    metrics_addr: tuple[str, int],
    *,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """The ``anomalyd demo`` command: broker (found or started), daemon, simulator, live view.

    Every topic it uses lies under a prefix of its own (``demo_topic_prefix``). However it
    ends (``stop``, Ctrl-C, SIGTERM, SIGHUP, an error) it stops in order: the simulator and
    the daemon (which drains and publishes its final states), the live view, then what it
    left retained under its prefix on a broker it found, then a private broker. A second
    signal skips the daemon's drain (exit 130). Call it from the main thread (signals).
    """
    out = out or sys.stdout
    stop = stop or threading.Event()
    with _StopSignals(stop) as signals, contextlib.ExitStack() as on_exit:
        private: PrivateBroker | None = None
        if broker is None:
            broker = LOCAL_BROKER
            if not _broker_listening(*broker):
                private = _start_private_broker()
                on_exit.callback(private.close)  # registered first, so it runs last
                broker = (private.host, private.port)
                print(f"started a private mosquitto on {private.address}", file=out)
        host, port = broker
        prefix = demo_topic_prefix()
        if private is None:
            # A broker someone else runs is left as it was; a private one goes with everything on it.
            on_exit.callback(_clear_demo_retained, host, port, prefix, out)
        return _demo(
            settings,
            host=host,
            port=port,
            prefix=prefix,
            model_path=model_path,
            metrics_addr=metrics_addr,
            out=out,
            stop=stop,
            signals=signals,
        )


def _demo(
    settings: SimulationSettings,
    *,
    host: str,
    port: int,
    prefix: str,
    model_path: Path | None,
    metrics_addr: tuple[str, int],
    out: TextIO,
    stop: threading.Event,
    signals: _StopSignals,
) -> int:
    """Daemon, simulator and live view on the broker at ``host:port``, under ``prefix``,
    until ``stop``; then the daemon stopped, the simulator and the view closed."""
    from anomalyd.config import load_config
    from anomalyd.service import Service

    if stop.is_set():
        return 130  # interrupted while the broker was being started
    overrides: dict[str, object] = {
        "mqtt.host": host,
        "mqtt.port": port,
        "metrics.host": metrics_addr[0],
        "metrics.port": metrics_addr[1],
        "logging.level": "WARNING",
        **demo_topic_overrides(prefix),
    }
    if model_path is not None:
        overrides["model.path"] = str(model_path)
    config = load_config(None, overrides)
    service = Service(config)

    stop_requests = 0

    def request_stop() -> None:
        nonlocal stop_requests
        stop_requests += 1
        service.request_stop()

    def force_stop() -> None:
        # The service takes its second stop request as "stop now, skip the drain".
        while stop_requests < 2:
            request_stop()

    signals.on_repeat = force_stop
    settings = replace(settings, topic_template=config.mqtt.topic_in)
    queue = IntakeQueue(100_000)
    viewer = MqttLink(
        _mqtt_config(host, port),
        queue=queue,
        client_id=f"anomalyd-demo-view-{os.getpid()}",
        topics=[
            subscription_filter(config.output.score_topic),
            subscription_filter(config.output.alert_topic),
            config.output.status_topic,
        ],
        name="view-mqtt",
    )
    outcome = _DaemonOutcome()
    runner = threading.Thread(target=_run_daemon, args=(service, stop, outcome), name="anomalyd-demo-daemon")
    sim = threading.Thread(
        target=simulate, args=(settings, host, port, None, stop), name="anomalyd-demo-sim", daemon=True
    )
    began = False
    try:
        runner.start()
        while not service.ready.wait(0.2):
            if stop.is_set() or not runner.is_alive():
                break
        else:
            began = True
            assert service.model is not None
            c = service.model.contract
            print(
                f"anomalyd demo: broker {host}:{port}, model {c.model_version} "
                f"({c.kind}, window {c.window_length}), threshold {service.threshold:.3g}, "
                f"metrics http://{metrics_addr[0]}:{service.metrics_port}/metrics",
                file=out,
            )
            print(
                f"topics under {prefix}/: telemetry {config.mqtt.topic_in}, "
                f"scores {config.output.score_topic}, alerts {config.output.alert_topic}, "
                f"status {config.output.status_topic}",
                file=out,
            )
            span = settings.duration_s / settings.speed
            first = c.window_length / settings.rate_hz / settings.speed
            print(
                f"simulating {settings.devices} devices at {settings.rate_hz:g} Hz, "
                f"{settings.duration_s:.0f} s of data at {settings.speed:g}x ({span:.0f} s); "
                f"the first scores come after one window ({first:.1f} s). Ctrl-C stops.",
                file=out,
                flush=True,
            )
            viewer.start()
            viewer.wait_connected(10.0)
            sim.start()
            _watch(queue, sim, runner, stop, out)
    finally:
        # Readings stop, then the daemon drains and publishes its last states while the
        # broker is still there to take them; the simulator's and the view's connections
        # close cleanly before anyone stops the broker.
        stop.set()
        if stop_requests == 0:
            request_stop()
        runner.join(60.0)
        if sim.ident is not None:
            sim.join(30.0)
        viewer.close(2.0)
    if outcome.exit_code is None:
        # Still running, or its thread died of an unexpected error (its traceback is printed).
        log.error("the daemon %s", "did not stop within 60 s" if runner.is_alive() else "failed")
        return EX_SOFTWARE
    if not began and signals.received and outcome.exit_code == 0:
        return 130  # interrupted before the demo began: nothing was shown
    return outcome.exit_code


def _watch(
    queue: IntakeQueue, sim: threading.Thread, runner: threading.Thread, stop: threading.Event, out: TextIO
) -> None:
    """The live view, until ``stop`` or the daemon's end."""
    view = LiveView(out)
    announced = False
    while not stop.is_set() and runner.is_alive():
        queue.wait(0.2)
        for msg in queue.drain(10_000):
            view.handle(msg.topic, msg.payload, msg.retained)
        view.tick()
        if not announced and not sim.is_alive() and not stop.is_set():
            announced = True
            print("simulation finished; the daemon keeps running. Ctrl-C stops.", file=out, flush=True)
    print(f"stopping: {view.scores} scores and {view.raised} alerts seen", file=out, flush=True)


@dataclass
class _DaemonOutcome:
    """How the demo's daemon thread ended: ``exit_code`` as ``anomalyd run`` would exit
    with it; None while it runs."""

    exit_code: int | None = None


def _run_daemon(service: Service, stop: threading.Event, outcome: _DaemonOutcome) -> None:
    """The demo's daemon thread: start, run until ``request_stop()``, stop in order. Sets
    ``stop`` when it ends, so that a daemon that fails (at start or later) ends the demo."""
    try:
        if service.start():
            # run_forever returns once request_stop() was called (by _demo's finally).
            outcome.exit_code = service.run_forever()
        else:
            outcome.exit_code = service.shutdown()
    except AnomalydError as exc:
        log.error("daemon failed to start: %s", exc)
        service.shutdown()
        outcome.exit_code = exc.exit_code
    finally:
        stop.set()
