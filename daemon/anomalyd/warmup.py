"""Warm-up: refill the windows of this instance's devices from a NATS JetStream stream.

In a partitioned fleet (``[cluster]``) a daemon that starts, reconnects or takes over a
partition holds no window (or an old one) for its devices; waiting for L live readings
per device would leave them unscored for a whole window. The broker's JetStream stream
keeps each device's last L telemetry messages (one subject per device, e.g.
``sensors.pump-7.telemetry.5``, ``max_msgs_per_subject = L``), so the daemon reads them
back and writes them into the windows before it scores live readings.

Three parts, one per thread that runs them:

* ``JetStreamSource.fetch`` (a helper thread): connects with nats-py, makes sure the
  stream exists, reads every message of each owned partition that is in the stream when
  the read starts (an ordered consumer per partition, delivering everything, stopping once
  it has caught up with the stream's last sequence taken at the start) and returns them as
  the daemon's ``RawMessage`` objects, topics back in MQTT form. ``timeout_s`` bounds it:
  on the deadline it returns what it has read (``timeout``); a server it cannot reach is
  ``failed``, with the reason in one WARNING line. nats-py is imported there, never at
  module import: a daemon without ``[cluster.jetstream]`` never loads it, and the start
  stays fast.
* ``WarmUp`` (the pipeline thread, and the MQTT network thread for ``request``): a
  connect listener asks for a warm-up on every (re)connect; while one is due or running,
  the pipeline thread takes no live reading (they wait in the intake queue); when the
  replay is in, it goes into the stages (``Pipeline.warm``: into the windows, never
  scored), and live processing resumes.
* ``Pipeline.warm`` (``anomalyd.pipeline``) does the writing and keeps the overlap
  horizon: live readings the replay already put in a window are dropped and counted.

Results (``anomalyd_warmups_total{result}``): ``complete``, ``timeout``, ``failed``, and
``no_jetstream`` once at start for a ``[cluster]`` without ``[cluster.jetstream]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from anomalyd.config_cluster import ClusterConfig, JetStreamConfig
from anomalyd.config_mqtt import read_secret
from anomalyd.decode import RawMessage
from anomalyd.metrics import Metrics
from anomalyd.nats_broker import partition_mapping

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

__all__ = [
    "COMPLETE",
    "FAILED",
    "NO_JETSTREAM",
    "TIMEOUT",
    "JetStreamSource",
    "Replay",
    "WarmCounts",
    "WarmTarget",
    "WarmUp",
    "announce_no_jetstream",
    "partition_subject",
    "stream_subject",
]

log = logging.getLogger(__name__)

#: Results of a warm-up (the ``result`` label of ``anomalyd_warmups_total``).
COMPLETE = "complete"
TIMEOUT = "timeout"
FAILED = "failed"
NO_JETSTREAM = "no_jetstream"

#: Longest the NATS connection may take to close after a read (on top of ``timeout_s``):
#: closing a healthy connection takes milliseconds; a hung server must not hold the start.
_CLOSE_S = 1.0
#: How long live readings are checked against the replay's horizon, in ``timeout_s``: the
#: live readings that overlap the replay are those queued while it ran, taken within a
#: few passes after it.
_HORIZON_TIMEOUTS = 2.0


def stream_subject(topic_in: str) -> str:
    """The stream's subject filter for ``topic_in``: ``sensors/{device}/telemetry`` gives
    ``sensors.*.telemetry.*`` (the device level and the partition level as wildcards)."""
    source, _dest = partition_mapping(topic_in, 1)
    return f"{source}.*"


def partition_subject(topic_in: str, partition: int) -> str:
    """The subjects of one partition: ``sensors.*.telemetry.<partition>``."""
    source, _dest = partition_mapping(topic_in, 1)
    return f"{source}.{partition}"


@dataclass
class Replay:
    """What one read of the stream brought back."""

    messages: list[RawMessage]
    result: str  # COMPLETE, TIMEOUT or FAILED
    seconds: float
    reason: str = ""  # why it failed or timed out, for the log line


@dataclass
class WarmCounts:
    """What the stages did with replayed readings (``Pipeline.warm``)."""

    filled: int = 0  # written into a window
    already_held: int = 0  # the window already had it (a snapshot, or live readings)
    rejected: int = 0  # bad input (logged as a live rejection is; counted here only)
    devices: int = 0  # devices with at least one replayed reading

    def __add__(self, other: WarmCounts) -> WarmCounts:
        return WarmCounts(
            self.filled + other.filled,
            self.already_held + other.already_held,
            self.rejected + other.rejected,
            self.devices + other.devices,
        )

    @property
    def readings(self) -> int:
        return self.filled + self.already_held + self.rejected


class WarmTarget(Protocol):
    """What takes a replay: a ``Pipeline``, or a ``ModelRouter`` over several."""

    def warm(self, messages: list[RawMessage], horizon_s: float) -> WarmCounts:
        """Write replayed readings into the windows, never scoring them."""


class _StopReadError(Exception):
    """Internal: the read cannot go on (the stream is missing and may not be created)."""


class JetStreamSource:
    """Reads the owned partitions' last readings back from the stream (``fetch``).

    ``window_length`` is L: a stream this source creates keeps L messages per subject
    (per device). Reading the password file happens here, so a missing one fails the
    start as a configuration error, as the MQTT password does.
    """

    def __init__(self, cluster: ClusterConfig, topic_in: str, window_length: int) -> None:
        if cluster.jetstream is None:
            raise ValueError("a JetStreamSource needs [cluster.jetstream]")
        self.config: JetStreamConfig = cluster.jetstream
        self.partitions = cluster.owned_partitions()
        self.topic_in = topic_in
        self.window_length = window_length
        self.subject = stream_subject(topic_in)
        self._password = read_secret(self.config.password_file, None, "cluster.jetstream.password_file")
        self._stream_checked = False  # the stream's limits were judged once (warn once)

    # ------------------------------------------------------------------ blocking entry point

    def fetch(self, timeout: float | None = None) -> Replay:
        """Read every owned partition's messages present now; at most ``timeout`` seconds
        (default ``timeout_s``), plus up to a second to close the connection.

        Runs its own event loop in the calling thread (which must not be running one).
        Never raises for a server that is down, refuses us or misbehaves: that is a
        ``failed`` replay with the reason.
        """
        limit = self.config.timeout_s if timeout is None else timeout
        t0 = time.monotonic()
        out: list[RawMessage] = []
        try:
            result, reason = asyncio.run(self._fetch(out, limit))
        except Exception as exc:  # belt and braces: a warm-up must never take the daemon down
            result, reason = FAILED, _describe(exc)
        return Replay(out, result, time.monotonic() - t0, reason)

    # ------------------------------------------------------------------ asyncio

    async def _fetch(self, out: list[RawMessage], limit: float) -> tuple[str, str]:
        # Imported here: only an instance with [cluster.jetstream] loads nats-py.
        from nats.aio.client import Client

        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            # nats-py's default logs a traceback per error; the reason goes in our one line.
            errors.append(_describe(exc))
            log.debug("NATS client: %s", errors[-1])

        async def on_closed() -> None:
            if not lost.done():
                lost.set_result("the connection to NATS was closed")

        deadline = time.monotonic() + limit
        nc = Client()
        try:
            await asyncio.wait_for(
                nc.connect(
                    self.config.servers,
                    user=self.config.user,
                    password=self._password,
                    name="anomalyd-warmup",
                    # Each server once more at once, then give up: a warm-up does not wait
                    # for NATS to come back (windows fill from live readings meanwhile).
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    # Past the deadline: a server that accepts but never answers is a
                    # timeout of the warm-up, not one of nats-py's retries.
                    connect_timeout=int(limit) + 1,
                    error_cb=on_error,
                    closed_cb=on_closed,
                ),
                limit,
            )
        except TimeoutError:
            await _close(nc)  # its socket too: the attempt was cut short, not ended by nats-py
            return TIMEOUT, f"no connection to {', '.join(self.config.servers)} within {limit:.1f} s"
        except Exception as exc:
            await _close(nc)
            why = errors[-1] if errors else _describe(exc)
            return FAILED, f"cannot connect to {', '.join(self.config.servers)}: {why}"
        try:
            read: asyncio.Future[None] = asyncio.ensure_future(self._read_all(nc, out))
            waiting: set[asyncio.Future[Any]] = {read, lost}
            done, _pending = await asyncio.wait(
                waiting,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if read in done:
                read.result()  # raises what the read raised
                return COMPLETE, ""
            read.cancel()
            with contextlib.suppress(BaseException):
                await read
            if lost in done:
                return FAILED, lost.result()
            return TIMEOUT, f"not done after {limit:.1f} s"
        except _StopReadError as exc:
            return FAILED, str(exc)
        except Exception as exc:
            return FAILED, _describe(exc)
        finally:
            await _close(nc)

    async def _read_all(self, nc: NatsClient, out: list[RawMessage]) -> None:
        js = nc.jetstream(timeout=min(self.config.timeout_s, 5.0))
        last_seq = await self._ensure_stream(js)
        if last_seq == 0:
            return  # an empty stream
        await asyncio.gather(*(self._read_partition(js, p, last_seq, out) for p in self.partitions))

    async def _ensure_stream(self, js: JetStreamContext) -> int:
        """The stream's last sequence now (0: empty), creating the stream if it is missing
        and ``create_stream``; warns once when it keeps fewer than L messages per device."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError

        name = self.config.stream
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            if not self.config.create_stream:
                raise _StopReadError(
                    f"JetStream stream {name!r} does not exist "
                    "(create it, or set cluster.jetstream.create_stream = true)"
                ) from None
            config = StreamConfig(
                name=name,
                subjects=[self.subject],
                max_msgs_per_subject=self.window_length,
                storage=StorageType.FILE,
            )
            try:
                info = await js.add_stream(config)
                log.info(
                    "created JetStream stream %r: subjects %s, %d messages per device",
                    name,
                    self.subject,
                    self.window_length,
                )
            except BadRequestError:
                info = await js.stream_info(name)  # another instance created it meanwhile
        if not self._stream_checked:
            self._stream_checked = True
            self._judge_stream(info.config.max_msgs_per_subject)
        return int(info.state.last_seq) if info.state.messages else 0

    def _judge_stream(self, per_subject: int | None) -> None:
        if per_subject is not None and 0 < per_subject < self.window_length:
            log.warning(
                "JetStream stream %r keeps %d messages per device, fewer than the window length %d: "
                "windows cannot be refilled fully (raise its max_msgs_per_subject)",
                self.config.stream,
                per_subject,
                self.window_length,
            )

    async def _read_partition(
        self, js: JetStreamContext, partition: int, last_seq: int, out: list[RawMessage]
    ) -> None:
        """Every message of one partition up to ``last_seq``, in stream order, into ``out``."""
        from nats.js.api import DeliverPolicy

        caught_up = asyncio.Event()

        async def take(msg: Msg) -> None:
            if caught_up.is_set():
                return
            meta = msg.metadata
            # The stored time is the broker's arrival time: the reading's time if it has no ts.
            arrival = meta.timestamp.timestamp()
            out.append(RawMessage(msg.subject.replace(".", "/"), msg.data, arrival, time.monotonic()))
            if meta.num_pending == 0 or meta.sequence.stream >= last_seq:
                caught_up.set()

        sub = await js.subscribe(
            partition_subject(self.topic_in, partition),
            stream=self.config.stream,
            cb=take,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            info = await sub.consumer_info()
            # The consumer sequence, not the stream's: a new consumer on a stream whose
            # first messages are gone starts with a stream sequence but has delivered none.
            delivered = info.delivered.consumer_seq if info.delivered is not None else None
            if not info.num_pending and not delivered:
                return  # nothing in this partition, and nothing delivered: nothing will come
            await caught_up.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def _close(nc: NatsClient) -> None:
    """Close the connection (and its socket), waiting ``_CLOSE_S`` at most."""
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(nc.close(), _CLOSE_S)


def _describe(exc: BaseException) -> str:
    """One line for an exception: its type and message (no traceback)."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


class WarmUp:
    """Runs a warm-up on every (re)connect, between the MQTT link and the pipeline thread.

    ``request`` (the network thread's connect listener) marks one as due; the pipeline
    thread then calls ``step`` between its passes: it starts the read on a helper thread
    (``wait_subscribed(timeout)`` first, so that the read starts after the broker granted
    the telemetry subscription: nothing published meanwhile is missed by both), takes no
    live reading while ``busy``, sleeps in ``wait`` rather than on the intake queue, and
    hands the replay to the stages once it is in. ``wake`` is called when the read is done
    (it wakes the pipeline thread).
    """

    def __init__(
        self,
        source: JetStreamSource,
        metrics: Metrics,
        *,
        wait_subscribed: Callable[[float], object] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.timeout_s = source.config.timeout_s
        self._wait_subscribed = wait_subscribed
        self._wake = wake
        self._requested = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._replay: Replay | None = None
        self._started = 0.0
        #: Warm-ups applied so far (the first is the start's, the others reconnects').
        self.count = 0

    def request(self) -> None:
        """A (re)connect: a warm-up is due before the next live reading (network thread)."""
        self._requested.set()
        if self._wake is not None:
            self._wake()

    @property
    def busy(self) -> bool:
        """True while a warm-up is due, running, or read but not yet applied."""
        return self._requested.is_set() or self._thread is not None

    def wait(self, timeout: float) -> None:
        """Sleep until the running read is done or ``timeout`` passes (pipeline thread)."""
        if self._thread is not None:
            self._done.wait(timeout)

    def step(self, target: WarmTarget) -> bool:
        """Pipeline thread: apply a read that is done; start one that is due. Returns
        ``busy`` after that."""
        if self._thread is not None:
            if not self._done.is_set():
                return True
            self._thread.join()
            self._thread = None
            replay, self._replay = self._replay, None
            assert replay is not None
            self._apply(target, replay)
        if self._requested.is_set():
            self._requested.clear()
            self._done.clear()
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._read, name="anomalyd-warmup", daemon=True)
            self._thread.start()
        return self.busy

    def _read(self) -> None:
        """Helper thread: wait for the subscription, then read the stream."""
        try:
            timeout = self.timeout_s
            if self._wait_subscribed is not None:
                try:
                    self._wait_subscribed(timeout)
                except Exception as exc:  # the link failed for good: the start reports that
                    log.debug("warm-up: waiting for the subscription: %s", _describe(exc))
                timeout = max(0.0, self.timeout_s - (time.monotonic() - self._started))
            self._replay = (
                self.source.fetch(timeout)
                if timeout > 0
                else Replay([], TIMEOUT, 0.0, "the telemetry subscription was not granted in time")
            )
        except BaseException as exc:  # never leave the pipeline thread waiting
            self._replay = Replay([], FAILED, 0.0, _describe(exc))
        finally:
            self._done.set()
            if self._wake is not None:
                self._wake()

    def _apply(self, target: WarmTarget, replay: Replay) -> None:
        counts = WarmCounts()
        if replay.messages:
            counts = target.warm(replay.messages, _HORIZON_TIMEOUTS * self.timeout_s)
        seconds = time.monotonic() - self._started
        m = self.metrics
        m.warmups.labels(result=replay.result).inc()
        m.warmup_seconds.set(seconds)
        for result, n in (
            ("filled", counts.filled),
            ("already_held", counts.already_held),
            ("rejected", counts.rejected),
        ):
            if n:
                m.warmup_readings.labels(result=result).inc(n)
        self.count += 1
        when = "start" if self.count == 1 else "reconnect"
        summary = (
            f"{counts.readings} readings of {counts.devices} devices from {len(replay.messages)} messages "
            f"in {seconds:.2f} s ({counts.filled} into windows, {counts.already_held} already held, "
            f"{counts.rejected} rejected)"
        )
        extra: dict[str, Any] = {
            "result": replay.result,
            "readings": counts.readings,
            "devices": counts.devices,
            "seconds": round(seconds, 3),
        }
        if replay.result == COMPLETE:
            log.info("warm-up from JetStream (%s): %s: complete", when, summary, extra=extra)
        elif replay.result == TIMEOUT:
            log.warning(
                "warm-up from JetStream (%s) timed out (%s): %s; "
                "the rest of the windows fill from live readings",
                when,
                replay.reason,
                summary,
                extra=extra,
            )
        else:
            log.warning(
                "warm-up from JetStream (%s) failed: %s; windows fill from live readings",
                when,
                replay.reason,
                extra=extra,
            )


def announce_no_jetstream(metrics: Metrics) -> None:
    """A ``[cluster]`` without ``[cluster.jetstream]``: said once, at start."""
    metrics.warmups.labels(result=NO_JETSTREAM).inc()
    log.info("no [cluster.jetstream]: windows fill from live readings")
