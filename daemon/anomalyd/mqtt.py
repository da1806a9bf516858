"""The MQTT link: one paho client, its connection lifecycle, receive and publish.

``MqttLink`` owns one paho client (callback API version 2) and a network thread
(``_run_mqtt_loop``) that connects, reconnects with capped, jittered exponential
backoff, subscribes in ``on_connect`` (so every reconnect resubscribes) and hands each
telemetry message, stamped with its arrival time, to an ``IntakeQueue`` (``anomalyd.intake``). Nothing else
happens on the network thread: decoding is the pipeline thread's job, in bulk.

paho types never leave this module (``publisher`` uses ``MqttLink.publish``).

Credentials: a broker that refuses our user name or password *before we have ever been
connected* is a configuration problem, so ``wait_connected`` reports it as a
``BrokerError`` and the start fails (exit 76; systemd restarts it after RestartSec, so a
transient refusal still recovers). Once we have served, the same refusal on a reconnect
is logged at ERROR and retried with backoff: a running daemon is not taken down because
the broker's user database is being edited.

Subscriptions: the broker answers each topic filter of a SUBSCRIBE with a granted QoS or
a refusal (its ACL, usually: "Not authorized"). A telemetry subscription refused before
it was ever granted is a configuration problem like bad credentials: ``BrokerError``,
exit 76. The connection is then dropped without a DISCONNECT, so the broker publishes
our last will (``offline``) instead of leaving ``online`` behind. Refused after we have
served (a reconnect to a broker whose ACL changed), it is logged at ERROR, shown in
``anomalyd_mqtt_subscription_denied`` and ``degraded``, reported to the subscription
listeners (the service takes readiness away) and asked for again every
``SUBSCRIBE_RETRY_S`` until granted. ``add_subscription`` adds filters beside the
telemetry one, subscribed in the same SUBSCRIBE on every connect, with MQTT 5's No Local
option (we are not sent our own publications back); their messages go to their handler
through paho's per-filter callbacks and never reach the intake queue, so the telemetry
path does no extra work for them. A refused extra filter is logged and counted
(``anomalyd_mqtt_subscription_refusals_total{topic_filter}``), retried like telemetry,
and does not touch readiness.

Publish acknowledgements: every publish names a ``kind`` (score, alert, status, batch).
For QoS>0 the link keeps (kind, topic) per packet id until the broker's PUBACK (QoS 1)
or PUBREC (QoS 2) settles it; an MQTT 5 reason code >= 0x80 means the broker refused the
message (0x87 "Not authorized" from an ACL), which is counted in
``anomalyd_publish_failures_total{kind, reason}`` and logged, rate-limited per kind.
``anomalyd_published_total{kind}`` counts QoS>0 messages on a successful acknowledgement
and QoS 0 messages when they are handed to the client (they are never acknowledged).
So that QoS 0 kinds are checked too, the publisher sends one message of a kind at QoS 1
instead of 0 whenever ``canary_due(kind)`` says so (at most every ``CANARY_INTERVAL_S``).
The kind's QoS 0 messages handed over while that canary awaits its acknowledgement are
counted by its verdict; later ones by the newest verdict: while it is a refusal
(``denied(kind)``, ``anomalyd_publish_denied{kind}``) they are still sent but counted as
failures (``not_authorized``). Any denied kind or refused telemetry subscription makes
the link ``degraded``; health listeners hear of every change (the publisher republishes
its retained status). MQTT 3.1.1 has no reason codes (Mosquitto acknowledges a denied
3.1.1 publish as a success), so refused publishes can only be seen with MQTT 5.

The ack bookkeeping holds paho's out-message lock around ``publish()`` and the recording
of the packet id: paho settles acknowledgements under the same lock, so an ack can never
arrive for a packet id the link has not recorded yet.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import ssl
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from anomalyd.config import MqttConfig
from anomalyd.decode import RawMessage, Reason
from anomalyd.errors import BrokerError
from anomalyd.intake import IntakeQueue
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics

log = logging.getLogger(__name__)

# CONNACK reason codes that retrying will not fix (MQTT 5 numbering; paho maps the 3.1.1
# return codes 4 and 5 onto these).
_BAD_CREDENTIALS = 134
_NOT_AUTHORIZED = 135
_AUTH_FAILURES = frozenset({_BAD_CREDENTIALS, _NOT_AUTHORIZED})
#: MQTT 5: a PUBACK/PUBREC/SUBACK reason code from here up is a failure.
_FIRST_FAILURE = 0x80

#: MQTT 5 session expiry when clean_start is false: keep our subscription and queued
#: QoS>0 telemetry at the broker for an hour while we are away.
_SESSION_EXPIRY_S = 3600
#: QoS>0 messages paho keeps while disconnected (alerts, status): bounded, like everything.
_MAX_QUEUED_OUT = 10000
#: Bytes read from the broker per system call (see ``_ReadAhead``): a few hundred small
#: telemetry messages, and short enough that writes and keep-alives are not held back.
_CHUNK = 64 * 1024
#: At most once per this many seconds per kind, one QoS 0 message goes out at QoS 1 so
#: that the broker's acknowledgement says whether it accepts that kind (see
#: ``MqttLink.canary_due``): an ACL fixed or broken is noticed within this long.
CANARY_INTERVAL_S = 10.0
#: How often a subscription the broker refused is asked for again while connected.
SUBSCRIBE_RETRY_S = 30.0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base * 2**attempt)]``.

    Jitter spreads a fleet of daemons that lost the same broker (AWS architecture blog,
    "Exponential Backoff And Jitter"); the cap bounds the wait once the broker is back.
    """
    upper = min(cap, base * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, upper)


class _TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the last socket it wrapped.

    paho 2.2 does not close the TLS socket when the handshake fails (the ``SSLSocket``
    leaks until garbage collection, with a ResourceWarning): after a failed connect the
    link closes it through this reference.
    """

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock


class _ReadAhead:
    """A socket for paho that reads the broker's byte stream ``_CHUNK`` bytes at a time.

    paho asks for one byte (the packet type), then the length bytes one by one, then the
    rest of the packet, each a ``recv()`` system call; this serves those requests from a
    buffer filled by one large ``recv()``. paho's ``loop()`` consults ``pending()`` (meant
    for bytes an SSL socket has already decrypted) and reads without waiting in
    ``select()`` when it is non-zero. Everything else is the wrapped socket's.
    """

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho."""
        return len(self._buf) - self._pos

    def recv(self, size: int) -> bytes:
        left = len(self._buf) - self._pos
        if left <= 0:
            data: bytes = self._sock.recv(_CHUNK)  # BlockingIOError when empty, as paho expects
            if not data:
                return data  # the broker closed the connection
            self._buf, self._pos, left = data, 0, len(data)
        take = min(size, left)
        start = self._pos
        self._pos = start + take
        return self._buf[start : start + take]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def subscription_filter(topic_template: str) -> str:
    """``sensors/{device}/telemetry`` → ``sensors/+/telemetry``."""
    return topic_template.replace("{device}", "+")


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def failure_reason(code: int) -> str:
    """The ``reason`` label of a refused publish: ``not_authorized`` (0x87) or ``refused``."""
    return "not_authorized" if code == _NOT_AUTHORIZED else "refused"


def _reason_text(packet_type: int, code: int) -> str:
    """The broker's reason code by its MQTT 5 name, with its number: "Not authorized (0x87)"."""
    try:
        name = ReasonCode(packet_type, identifier=code).getName()
    except (KeyError, ValueError):
        name = "unknown reason code"
    return f"{name} (0x{code:02x})"


def _check_filter(topic_filter: str) -> None:
    """Raise ValueError unless ``topic_filter`` is a valid MQTT topic filter."""
    levels = topic_filter.split("/")
    if not topic_filter or "\0" in topic_filter or len(topic_filter.encode()) > 65535:
        raise ValueError(f"invalid MQTT topic filter {topic_filter!r}")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ValueError(
                f"invalid MQTT topic filter {topic_filter!r}: '+' must be a whole level and '#' the last one"
            )


class _Client(mqtt.Client):
    """paho's client, plus the reason code of every PUBREC.

    paho drops a PUBREC's reason code (it answers PUBREL either way, and ``on_publish``
    fires at the PUBCOMP, with the PUBCOMP's code, which Mosquitto sends as a success even
    for a message it refused): a refused QoS 2 publish would look accepted. ``on_pubrec``
    sees ``(packet id, reason code)`` first (0, success, where the packet has none:
    MQTT 3.1.1, or MQTT 5's short form).
    """

    on_pubrec: Callable[[int, int], None] | None = None

    def _handle_pubrec(self) -> MQTTErrorCode:
        hook = self.on_pubrec
        packet = self._in_packet["packet"]
        if hook is not None and len(packet) >= 2:
            # Variable header: packet id (2 bytes), then (MQTT 5) a reason code.
            hook(int.from_bytes(packet[:2], "big"), packet[2] if len(packet) > 2 else 0)
        rc: MQTTErrorCode = super()._handle_pubrec()
        return rc


@dataclass(slots=True)
class _Pending:
    """A QoS>0 message waiting for the broker's PUBACK/PUBREC."""

    kind: str
    topic: str
    refused: bool | None = None  # set when the acknowledgement arrives


@dataclass(frozen=True, slots=True)
class _Sub:
    """One topic filter of a SUBSCRIBE: telemetry (to the intake queue) or an extra one."""

    topic_filter: str
    qos: int
    telemetry: bool
    retain_as_published: bool = False


class MqttLink:
    """One MQTT connection: connect, back off and reconnect, subscribe, receive, publish.

    ``queue`` is None for a publish-only link (the simulator). ``topics`` replaces the
    subscription (default: ``config.topic_in`` with ``{device}`` as ``+``).
    Listeners all run on the network thread: connect listeners after every accepted
    CONNACK (the publisher republishes its retained status there), subscription listeners
    when the telemetry subscription is refused or granted again (the service's
    readiness), health listeners when ``degraded`` changes (the status word).
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        queue: IntakeQueue | None = None,
        will: Will | None = None,
        password: str | None = None,
        key_passphrase: str | None = None,
        metrics: Metrics | None = None,
        client_id: str | None = None,
        log_interval_s: float = 10.0,
        name: str = "anomalyd-mqtt",
        topics: list[str] | None = None,
    ) -> None:
        self.config = config
        self._queue = queue
        self._metrics = metrics
        self._name = name
        self._topic_filters = topics or [subscription_filter(config.topic_in)]
        self._listeners: list[Callable[[], None]] = []
        self._subscription_listeners: list[Callable[[bool, str], None]] = []
        self._health_listeners: list[Callable[[], None]] = []
        self._drop_log = RateLimitedLog(log, log_interval_s)
        self._connect_log = RateLimitedLog(log, log_interval_s)
        self._refusal_log = RateLimitedLog(log, log_interval_s)
        self._handler_log = RateLimitedLog(log, log_interval_s)
        self._stop = threading.Event()
        self._connected_event = threading.Event()
        self._unsubscribed = threading.Event()
        self._disconnected = threading.Event()
        self._closing = False
        self._connected = False
        self._connected_this_round = False
        self.connects = 0
        self.fatal: BrokerError | None = None
        self.dropped = 0
        self._thread: threading.Thread | None = None
        self._tls: _TrackingContext | None = None
        self._unacked: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self._v5 = config.protocol == "5"
        # Publish acknowledgements. _pending only holds packet ids of messages paho still
        # has in its out-queue (bounded by _MAX_QUEUED_OUT); it is guarded by paho's
        # out-message lock (see publish).
        self._pending: dict[int, _Pending] = {}
        # Replaced, never mutated: the pipeline thread reads it without a lock.
        self._denied_kinds: frozenset[str] = frozenset()
        self._canary_next: dict[str, float] = {}
        # Kinds whose next QoS>0 publish is a canary; the canary in flight per kind, and
        # the QoS 0 messages of that kind handed over since, which its verdict will judge.
        self._canary_armed: set[str] = set()
        self._canary_mid: dict[str, int] = {}
        self._judged_by_canary: dict[str, int] = {}
        # Subscriptions: once started, all of this is the network thread's, except
        # _intake_stopped.
        self._extra: list[_Sub] = []
        self._sub_mids: dict[int, list[_Sub]] = {}
        self._telemetry_refused: frozenset[str] = frozenset()
        self._extra_refused: set[str] = set()
        self._served = False  # a telemetry subscription was granted once
        self._intake_stopped = False
        self._sub_retry_at = math.inf
        self._health_changed = False
        self._degraded_told = False

        self._client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or config.effective_client_id(),
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            # 3.1.1 takes the clean-session flag here; MQTT 5 takes clean_start in connect().
            clean_session=None if self._v5 else config.clean_start,
        )
        self._client.max_queued_messages_set(_MAX_QUEUED_OUT)
        if config.username is not None:
            self._client.username_pw_set(config.username, password)
        if config.tls is not None:
            self._tls = self._tls_context(key_passphrase)
            self._client.tls_set_context(self._tls)
            if config.tls.insecure:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_publish = self._on_publish
        self._client.on_pubrec = self._on_pubrec
        # Our own thread runs client.loop(). Without an external-loop callback, paho's
        # publish() writes to the socket from the *calling* thread when it sees no
        # loop_start() thread, racing our network thread on the same deque of partial
        # writes. With this no-op callback set, publish() only queues the packet and wakes
        # select() through paho's socket pair; the network thread does all socket writes.
        self._client.on_socket_register_write = lambda _client, _userdata, _sock: None
        if metrics is not None and queue is not None:
            for topic_filter in self._topic_filters:
                metrics.mqtt_subscription_refusals.labels(topic_filter=topic_filter)

    def _tls_context(self, key_passphrase: str | None) -> _TrackingContext:
        tls = self.config.tls
        assert tls is not None
        # PROTOCOL_TLS_CLIENT: certificate and host name verification on, as in
        # ssl.create_default_context().
        ctx = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        else:
            ctx.load_default_certs()
        if tls.cert_file is not None and tls.key_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=key_passphrase)
        if tls.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # ------------------------------------------------------------------ public API

    def add_connect_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the network thread after every accepted connection."""
        self._listeners.append(callback)

    def add_subscription_listener(self, callback: Callable[[bool, str], None]) -> None:
        """Call ``callback(granted, topic_filter)`` on the network thread whenever the
        telemetry subscription turns refused (``granted`` False) or granted again, once we
        have served; ``topic_filter`` is the filter whose SUBACK changed it."""
        self._subscription_listeners.append(callback)

    def add_health_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the network thread whenever ``degraded`` changes."""
        self._health_listeners.append(callback)

    def add_subscription(
        self,
        topic_filter: str,
        handler: Callable[[str, bytes, bool], None],
        qos: int = 1,
        *,
        retain_as_published: bool = False,
    ) -> None:
        """Subscribe to ``topic_filter`` as well (on every connect, before ``start``).

        Its messages go to ``handler(topic, payload, retain)`` on the network thread, not
        to the intake queue; an exception in the handler is logged (rate-limited), never
        raised. A filter that also matches telemetry topics takes those messages away from
        the intake queue (paho hands a message to the matching filters' callbacks only).
        With MQTT 5 the subscription has the No Local option: messages we publish
        ourselves are not sent back to us (MQTT 3.1.1 has no such option).
        ``retain`` is true for a message the broker held retained when we subscribed; with
        ``retain_as_published`` (MQTT 5) it is the publisher's flag, also for live ones.
        """
        if self._thread is not None:
            raise RuntimeError("MqttLink.add_subscription() must be called before start()")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        _check_filter(topic_filter)
        taken = {s.topic_filter for s in self._extra}
        if self._queue is not None:
            taken.update(self._topic_filters)
        if topic_filter in taken:
            raise ValueError(f"already subscribed to {topic_filter!r}")
        self._extra.append(_Sub(topic_filter, qos, telemetry=False, retain_as_published=retain_as_published))
        if self._metrics is not None:
            self._metrics.mqtt_subscription_refusals.labels(topic_filter=topic_filter)
        handler_log = self._handler_log

        def deliver(_client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            # paho re-raises what a callback raises, which would end the network thread.
            try:
                handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                handler_log.log(
                    logging.ERROR,
                    topic_filter,
                    "the handler of subscription %r failed:\n%s",
                    topic_filter,
                    traceback.format_exc().rstrip(),
                )

        self._client.message_callback_add(topic_filter, deliver)

    def start(self) -> None:
        """Start the network thread; it keeps trying to connect until ``close``."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run_mqtt_loop, name=self._name, daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True between an accepted CONNACK and the loss of that connection."""
        return self._connected

    @property
    def alive(self) -> bool:
        """True while the network thread runs (it only ends on close or a fatal refusal)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def subscription_denied(self) -> bool:
        """True while the broker refuses a telemetry subscription (after we have served)."""
        return bool(self._telemetry_refused)

    def denied(self, kind: str) -> bool:
        """True while the newest acknowledgement of a ``kind`` message was a refusal."""
        return kind in self._denied_kinds

    @property
    def degraded(self) -> bool:
        """True while some kind of publish is denied or a telemetry subscription is refused."""
        return bool(self._denied_kinds) or bool(self._telemetry_refused)

    def canary_due(self, kind: str) -> bool:
        """Whether the caller should send its next ``kind`` message at QoS 1 instead of 0.

        True at most once every ``CANARY_INTERVAL_S`` per kind, and only while connected
        with MQTT 5 (a 3.1.1 acknowledgement carries no verdict). The next QoS>0 publish
        of ``kind`` is then the canary: the QoS 0 ``kind`` messages handed over while it
        awaits its acknowledgement are counted by its verdict, and the verdict sets
        ``denied(kind)``, which decides how later ones are counted until the next canary.
        """
        if not self._v5 or not self._connected:
            return False
        now = time.monotonic()
        if now < self._canary_next.get(kind, 0.0):
            return False
        self._canary_next[kind] = now + CANARY_INTERVAL_S
        self._canary_armed.add(kind)
        return True

    def wait_connected(self, timeout: float | None) -> bool:
        """Wait for an accepted connection (and, when subscribing, the SUBACK of the first
        subscription). Raises ``BrokerError`` if the broker refused our credentials before
        we were ever connected, or refused the telemetry subscription before it was ever
        granted. False on timeout."""
        self._connected_event.wait(timeout)
        if self.fatal is not None:
            raise self.fatal
        return self._connected

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, kind: str = "other"
    ) -> bool:
        """Hand a message to the client. False if it will not be sent: QoS 0 while
        disconnected, or the bounded out-queue of QoS>0 messages is full. (QoS>0 messages
        published while disconnected are kept and sent after the reconnect.)

        Counted under ``kind``: QoS 0 now (see ``denied``), QoS>0 once the broker has
        acknowledged it; a failure to hand it over as ``not_connected`` or ``queue_full``.
        """
        client = self._client
        if qos == 0:
            ok = client.publish(topic, payload, qos=0, retain=retain).rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            self._count_handed(kind, 1, ok)
            return ok
        # Under paho's out-message lock, which paho holds while it handles a PUBACK: the
        # acknowledgement cannot be settled before its packet id is recorded here.
        with client._out_message_mutex:
            info = client.publish(topic, payload, qos=qos, retain=retain)
            rc = info.rc
            ok = rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
            if ok:
                self._track(info, kind, topic)
        if not ok:
            self._count_failed(
                kind, 1, "queue_full" if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE else "not_connected"
            )
        return ok

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged (before a
        ``close`` that must not lose them: paho sends DISCONNECT ahead of QoS>0 messages
        still waiting for an in-flight slot). True if all were."""
        deadline = time.monotonic() + timeout
        pending = self._unacked
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                pending[0].wait_for_publish(left)
            except (RuntimeError, ValueError):
                return False
            if pending[0].is_published():
                pending.popleft()
        return True

    def publish_many(self, messages: list[tuple[str, bytes]], kind: str = "other") -> bool:
        """Publish QoS 0 messages (topic, payload), not retained, as one write. False (none
        sent) when not connected. Counted under ``kind`` like ``publish`` at QoS 0.

        ``publish`` costs tens of microseconds a message (paho takes a lock, builds the
        packet and wakes the network thread through a socket pair, every time), as much as
        scoring a window. Here the PUBLISH packets are built in one go and handed to paho as
        a single outgoing packet: one wake, one write. Only for QoS 0, where paho keeps no
        per-message state (no packet id, no acknowledgement); what paho does with it is
        what it does with its own QoS 0 packets.
        """
        if not messages:
            return True
        if not self._connected:
            self._count_handed(kind, len(messages), False)
            return False
        blob = bytearray()
        v5 = self._v5
        for topic, payload in messages:
            encoded = topic.encode()
            # Variable header: topic (2-byte length + UTF-8) and, in MQTT 5, an empty
            # property list; then the payload.
            remaining = 2 + len(encoded) + (1 if v5 else 0) + len(payload)
            blob.append(0x30)  # PUBLISH, QoS 0, not retained, not a duplicate
            while True:  # remaining length: base-128 varint
                byte, remaining = remaining & 0x7F, remaining >> 7
                blob.append(byte | (0x80 if remaining else 0))
                if not remaining:
                    break
            blob += len(encoded).to_bytes(2, "big")
            blob += encoded
            if v5:
                blob.append(0)
            blob += payload
        info = mqtt.MQTTMessageInfo(0)
        ok = (
            self._client._packet_queue(mqtt.PUBLISH, bytes(blob), 0, 0, info)
            == MQTTErrorCode.MQTT_ERR_SUCCESS
        )
        self._count_handed(kind, len(messages), ok)
        return ok

    def publish_and_wait(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 5.0,
        *,
        kind: str = "other",
    ) -> bool:
        """Publish and wait until the broker acknowledged it (QoS>0) or it was written
        (QoS 0). False if not connected, not acknowledged in time, or refused by the broker.
        Counted under ``kind`` like ``publish``."""
        if not self._connected:
            self._count_failed(kind, 1, "not_connected")
            return False
        client = self._client
        entry: _Pending | None = None
        with client._out_message_mutex:
            info = client.publish(topic, payload, qos=qos, retain=retain)
            ok = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            if ok and qos > 0:
                entry = self._track(info, kind, topic)
        if qos == 0:
            self._count_handed(kind, 1, ok)
        elif not ok:
            self._count_failed(kind, 1, "not_connected")
        if not ok:
            return False
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False  # connection lost or queue full meanwhile
        # paho marks a message published on any acknowledgement, refusals included.
        return info.is_published() and (entry is None or entry.refused is False)

    def stop_intake(self, timeout: float = 2.0) -> bool:
        """Unsubscribe from telemetry and wait for the broker's UNSUBACK.

        Messages are delivered in order on one connection, so once the UNSUBACK is in,
        every telemetry message the broker sent us is already in the intake queue.
        """
        self._intake_stopped = True  # no more retries of a refused telemetry subscription
        if self._queue is None or not self._connected:
            return False
        self._unsubscribed.clear()
        rc, _mid = self._client.unsubscribe(self._topic_filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        return self._unsubscribed.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._closing = True
        if self._connected:
            self._disconnected.clear()
            self._client.disconnect()
            self._disconnected.wait(timeout)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._set_connected(False)

    # ------------------------------------------------------------------ counting

    def _track(self, info: mqtt.MQTTMessageInfo, kind: str, topic: str) -> _Pending:
        """Remember a QoS>0 message until its acknowledgement (caller holds paho's lock)."""
        entry = self._pending[info.mid] = _Pending(kind, topic)
        if kind in self._canary_armed:
            self._canary_armed.discard(kind)
            self._canary_mid[kind] = info.mid
        # Remember unacknowledged QoS>0 messages for flush(); forget the acknowledged
        # ones from the front as we go, so this stays about as long as paho's queue.
        unacked = self._unacked
        unacked.append(info)
        while unacked and unacked[0].is_published():
            unacked.popleft()
        return entry

    def _count_handed(self, kind: str, n: int, ok: bool) -> None:
        """Count QoS 0 messages handed to the client (``ok``) or not (not connected): by
        the verdict of the kind's canary in flight, if there is one, else the newest."""
        if not ok:
            self._count_failed(kind, n, "not_connected")
            return
        if kind in self._canary_mid:  # unlocked look first: once per call, usually no canary
            with self._client._out_message_mutex:
                if kind in self._canary_mid:
                    self._judged_by_canary[kind] = self._judged_by_canary.get(kind, 0) + n
                    return
        if kind in self._denied_kinds:
            # Sent, but the broker's newest verdict on this kind was a refusal: it drops
            # QoS 0 messages it refuses without a word, so these are most likely lost.
            self._refusal_log.log(
                logging.WARNING,
                kind,
                "the broker refuses %s messages (newest acknowledgement); %d sent at QoS 0 "
                "counted as not_authorized",
                kind,
                n,
            )
            self._count_failed(kind, n, "not_authorized")
        elif self._metrics is not None:
            self._metrics.published.labels(kind=kind).inc(n)

    def _count_failed(self, kind: str, n: int, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.publish_failures.labels(kind=kind, reason=reason).inc(n)

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        # Called with paho's out-message lock held: for a QoS 1 PUBACK, for a QoS 2 PUBCOMP
        # (already settled by its PUBREC) and when a QoS 0 message was written (nothing to
        # settle; paho keeps no QoS 0 message in _out_messages).
        msg = client._out_messages.get(mid)
        if msg is None or msg.qos != 1:
            return
        self._settle(mid, reason.value, _reason_text(PacketTypes.PUBACK, reason.value))

    def _on_pubrec(self, mid: int, code: int) -> None:
        with self._client._out_message_mutex:
            self._settle(mid, code, _reason_text(PacketTypes.PUBREC, code))

    def _settle(self, mid: int, code: int, reason: str) -> None:
        """The broker acknowledged packet ``mid`` with ``code`` (network thread, paho's lock)."""
        entry = self._pending.pop(mid, None)
        if entry is None:
            return  # not ours to count (a PUBREC resent after a reconnect, say)
        refused = code >= _FIRST_FAILURE
        entry.refused = refused
        kind = entry.kind
        metrics = self._metrics
        if refused:
            if metrics is not None:
                metrics.publish_failures.labels(kind=kind, reason=failure_reason(code)).inc()
            self._refusal_log.log(
                logging.WARNING,
                kind,
                "the broker refused a %s message on %r: %s; check the broker's ACL for %s",
                kind,
                entry.topic,
                reason,
                self._who(),
            )
        elif metrics is not None:
            metrics.published.labels(kind=kind).inc()
        if self._canary_mid.get(kind) == mid:
            del self._canary_mid[kind]
            self._release_judged(kind, refused, failure_reason(code))
        if refused == (kind in self._denied_kinds):
            return
        self._denied_kinds = self._denied_kinds | {kind} if refused else self._denied_kinds - {kind}
        if metrics is not None:
            metrics.publish_denied.labels(kind=kind).set(1 if refused else 0)
        if not refused:
            log.info("the broker accepts %s messages again (on %r)", kind, entry.topic)
        self._health_changed = True

    def _release_judged(self, kind: str, refused: bool, reason: str) -> None:
        """Count the QoS 0 messages that waited for a canary's verdict (paho's lock held)."""
        n = self._judged_by_canary.pop(kind, 0)
        if n:
            if refused:
                self._count_failed(kind, n, reason)
            elif self._metrics is not None:
                self._metrics.published.labels(kind=kind).inc(n)

    def _who(self) -> str:
        user = self.config.username
        return f"user {user!r}" if user is not None else "anonymous clients"

    # ------------------------------------------------------------------ network thread

    def _run_mqtt_loop(self) -> None:
        cfg = self.config
        attempt = 0
        properties = None
        if cfg.protocol == "5" and not cfg.clean_start:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = _SESSION_EXPIRY_S
        while not self._stop.is_set() and not self._closing:
            self._connected_this_round = False
            try:
                if cfg.protocol == "5":
                    self._client.connect(
                        cfg.host,
                        cfg.port,
                        cfg.keepalive_s,
                        clean_start=cfg.clean_start,
                        properties=properties,
                    )
                else:
                    self._client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            except OSError as exc:  # refused, unreachable, DNS, TLS handshake (SSLError)
                if self._tls is not None and self._tls.last_socket is not None:
                    self._tls.last_socket.close()
                    self._tls.last_socket = None
                self._count_failure("network")
                self._connect_log.log(
                    logging.WARNING,
                    "connect",
                    "cannot connect to MQTT broker %s:%d: %s",
                    cfg.host,
                    cfg.port,
                    exc,
                )
            else:
                rc = self._serve_connection()
                self._set_connected(False)
                if self.fatal is not None:
                    # Gone without a DISCONNECT: the broker publishes our last will
                    # (offline), which is what we are about to be.
                    self._client._sock_close()
                elif not self._closing and not self._stop.is_set():
                    log.warning("lost connection to MQTT broker %s:%d (%s)", cfg.host, cfg.port, rc.name)
            if self.fatal is not None:
                self._connected_event.set()  # wake wait_connected to raise
                return
            if self._connected_this_round:
                attempt = 0
            delay = backoff_delay(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s)
            attempt += 1
            log.debug("reconnecting in %.2f s (attempt %d)", delay, attempt)
            self._stop.wait(delay)

    def _serve_connection(self) -> MQTTErrorCode:
        """Run paho's loop on the connection just made until it ends; returns why it ended.

        paho reads one packet per ``loop()``: a ``select()`` and three or four ``recv()``
        calls for every message, which under a flood of small telemetry messages is most of
        the network thread's time. So its socket is wrapped in a ``_ReadAhead`` that reads
        the broker's stream in large chunks, and the packets already read are handed to
        paho with ``loop_read()`` (no ``select()``, no system call) before the next
        ``loop()``, which also writes what is queued and keeps the connection alive.
        Between loops, and never inside paho's callbacks (where paho holds its locks), the
        health listeners are told of changes and refused subscriptions are retried.
        """
        client = self._client
        sock = client._sock
        reader = _ReadAhead(sock) if sock is not None else None
        if reader is not None:
            client._sock = reader
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = ok
        stop = self._stop
        while rc == ok and not stop.is_set():
            rc = client.loop(timeout=1.0)
            if reader is not None:
                while rc == ok and reader.buffered:
                    rc = client.loop_read()
            if self._health_changed or time.monotonic() >= self._sub_retry_at:
                self._chores()
        return rc

    def _chores(self) -> None:
        if time.monotonic() >= self._sub_retry_at:
            self._sub_retry_at = math.inf
            retry = [s for s in self._extra if s.topic_filter in self._extra_refused]
            if not self._intake_stopped:
                retry += [_Sub(f, self.config.qos_in, True) for f in sorted(self._telemetry_refused)]
            if retry:
                log.info("asking the broker again for %s", ", ".join(repr(s.topic_filter) for s in retry))
                self._subscribe(retry)
        if self._health_changed:
            self._health_changed = False
            degraded = self.degraded
            if degraded != self._degraded_told:
                self._degraded_told = degraded
                for listener in self._health_listeners:
                    try:
                        listener()
                    except Exception:
                        log.exception("health listener failed")

    def _subscribe(self, subs: list[_Sub]) -> bool:
        """Send one SUBSCRIBE for ``subs``; its SUBACK goes to ``_on_subscribe``."""
        topics: list[tuple[str, Any]] = []
        for s in subs:
            if self._v5 and not s.telemetry:
                options = SubscribeOptions(qos=s.qos, noLocal=True, retainAsPublished=s.retain_as_published)
                topics.append((s.topic_filter, options))
            else:
                topics.append((s.topic_filter, s.qos))
        rc, mid = self._client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return False
        self._sub_mids[mid] = subs
        return True

    def _count_failure(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.mqtt_connect_failures.labels(kind=kind).inc()

    def _set_connected(self, value: bool) -> None:
        self._connected = value
        if not value and self.fatal is None:
            self._connected_event.clear()
        if self._metrics is not None:
            self._metrics.mqtt_connected.set(1 if value else 0)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        # A CONNACK can refuse us: that is not "connected" (Frigate treated it as such).
        if reason.is_failure:
            self._count_failure("refused")
            if reason.value in _AUTH_FAILURES and self.connects == 0:
                self.fatal = BrokerError(
                    f"MQTT broker {self.config.host}:{self.config.port} refused the connection: "
                    f"{reason} (check mqtt.username and the password file or credential)"
                )
                self._stop.set()
                log.error("%s", self.fatal)
            else:
                log.error(
                    "MQTT broker %s:%d refused the connection: %s", self.config.host, self.config.port, reason
                )
            return
        self.connects += 1
        self._connected_this_round = True
        if self.connects > 1 and self._metrics is not None:
            self._metrics.mqtt_reconnects.inc()
        self._set_connected(True)
        log.info(
            "connected to MQTT broker %s:%d (MQTT %s, session present: %s)",
            self.config.host,
            self.config.port,
            self.config.protocol,
            flags.session_present,
        )
        with self._client._out_message_mutex:
            # Acknowledgements only come for what paho still holds (it resends those).
            out = self._client._out_messages
            for mid in [m for m in self._pending if m not in out]:
                del self._pending[mid]
            for kind, mid in list(self._canary_mid.items()):
                if mid not in self._pending:  # a verdict that will not come: use the last one
                    del self._canary_mid[kind]
                    self._release_judged(kind, kind in self._denied_kinds, "not_authorized")
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("on-connect listener failed")
        # Subscribing here, not once after connect(), is what makes every reconnect
        # resubscribe (a clean session forgets subscriptions). wait_connected() returns
        # after the SUBACK, so "ready" means "receiving".
        self._sub_mids.clear()  # the SUBACKs of an earlier connection will not come
        self._sub_retry_at = math.inf
        subs: list[_Sub] = []
        if self._queue is not None and not self._intake_stopped:
            subs = [_Sub(f, self.config.qos_in, True) for f in self._topic_filters]
        subs += self._extra
        if not subs or not self._subscribe(subs):
            self._connected_event.set()

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._set_connected(False)
        self._disconnected.set()

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        subs = self._sub_mids.pop(mid, None)
        if subs is None:
            return
        refused = set(self._telemetry_refused)
        changed_filter = ""
        telemetry_answered = False
        for sub, reason in zip(subs, reasons, strict=False):
            topic_filter = sub.topic_filter
            if not reason.is_failure:
                if topic_filter in refused or topic_filter in self._extra_refused:
                    log.info(
                        "the broker granted the subscription to %r again%s",
                        topic_filter,
                        ": telemetry arrives again" if sub.telemetry else "",
                    )
                    refused.discard(topic_filter)
                    self._extra_refused.discard(topic_filter)
                    changed_filter = changed_filter or topic_filter
                else:
                    log.info("subscribed to %r (granted QoS %d)", topic_filter, reason.value)
                telemetry_answered |= sub.telemetry
                continue
            if self._metrics is not None:
                self._metrics.mqtt_subscription_refusals.labels(topic_filter=topic_filter).inc()
            if sub.telemetry and not self._served:
                self._fail_subscription(topic_filter, reason)
                return
            if topic_filter in refused or topic_filter in self._extra_refused:
                log.debug("the broker still refuses the subscription to %r: %s", topic_filter, reason)
            elif sub.telemetry:
                refused.add(topic_filter)
                changed_filter = changed_filter or topic_filter
                log.error(
                    "the broker refused the subscription to %r: %s; no telemetry arrives (not ready) "
                    "until the broker's ACL lets %s read it; asking again every %.0f s",
                    topic_filter,
                    reason,
                    self._who(),
                    SUBSCRIBE_RETRY_S,
                )
            else:
                self._extra_refused.add(topic_filter)
                log.error(
                    "the broker refused the subscription to %r: %s; check the broker's ACL for %s; "
                    "asking again every %.0f s",
                    topic_filter,
                    reason,
                    self._who(),
                    SUBSCRIBE_RETRY_S,
                )
            self._sub_retry_at = min(self._sub_retry_at, time.monotonic() + SUBSCRIBE_RETRY_S)
        if refused != self._telemetry_refused:
            was_granted = not self._telemetry_refused
            self._telemetry_refused = frozenset(refused)
            self._health_changed = True
            if self._metrics is not None:
                self._metrics.mqtt_subscription_denied.set(1 if refused else 0)
            if was_granted != (not refused):
                for listener in self._subscription_listeners:
                    try:
                        listener(not refused, changed_filter)
                    except Exception:
                        log.exception("subscription listener failed")
        if telemetry_answered and not self._telemetry_refused:
            self._served = True
        self._connected_event.set()

    def _fail_subscription(self, topic_filter: str, reason: Any) -> None:
        """The telemetry subscription was refused before it was ever granted: a
        configuration problem, like bad credentials (the start fails, exit 76)."""
        self.fatal = BrokerError(
            f"MQTT broker {self.config.host}:{self.config.port} refused the subscription to "
            f"{topic_filter!r}: {reason} (fix the broker's ACL: it must let {self._who()} "
            f"subscribe to {topic_filter!r}; or mqtt.username, mqtt.topic_in)"
        )
        log.error("%s", self.fatal)
        self._stop.set()  # the network thread drops the connection and wakes wait_connected

    def _on_unsubscribe(self, _client: mqtt.Client, _u: Any, _mid: int, _reasons: Any, _p: Any) -> None:
        self._unsubscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # The only work on the network thread: stamp arrival and hand over; decoding is the
        # pipeline thread's job, in bulk.
        queue = self._queue
        if queue is None:
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""  # brokers check UTF-8; if one does not, the decoder rejects it as bad_topic
        payload = msg.payload
        if not isinstance(payload, bytes):  # paho hands bytes; keep RawMessage's type honest
            payload = bytes(payload)
        if queue.put(RawMessage(topic, payload, time.time(), time.monotonic(), bool(msg.retain))):
            return
        self.dropped += 1
        if self._metrics is not None:
            self._metrics.messages_received.inc()
            self._metrics.rejected.labels(reason=Reason.QUEUE_FULL.value).inc()
        self._drop_log.log(
            logging.WARNING,
            "queue_full",
            "intake queue full (%d messages or %s bytes): dropping telemetry; the pipeline is not keeping up",
            queue.maxsize,
            queue.max_bytes,
        )
