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
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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

#: MQTT 5 session expiry when clean_start is false: keep our subscription and queued
#: QoS>0 telemetry at the broker for an hour while we are away.
_SESSION_EXPIRY_S = 3600
#: QoS>0 messages paho keeps while disconnected (alerts, status): bounded, like everything.
_MAX_QUEUED_OUT = 10000
#: Bytes read from the broker per system call (see ``_ReadAhead``): a few hundred small
#: telemetry messages, and short enough that writes and keep-alives are not held back.
_CHUNK = 64 * 1024


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


class MqttLink:
    """One MQTT connection: connect, back off and reconnect, subscribe, receive, publish.

    ``queue`` is None for a publish-only link (the simulator). ``topics`` replaces the
    subscription (default: ``config.topic_in`` with ``{device}`` as ``+``).
    ``on_connected`` listeners run on the network thread after every accepted CONNACK
    (the publisher republishes the retained ``online`` status there).
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
        self._drop_log = RateLimitedLog(log, log_interval_s)
        self._connect_log = RateLimitedLog(log, log_interval_s)
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

        v5 = config.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or config.effective_client_id(),
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1 takes the clean-session flag here; MQTT 5 takes clean_start in connect().
            clean_session=None if v5 else config.clean_start,
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
        # Our own thread runs client.loop(). Without an external-loop callback, paho's
        # publish() writes to the socket from the *calling* thread when it sees no
        # loop_start() thread, racing our network thread on the same deque of partial
        # writes. With this no-op callback set, publish() only queues the packet and wakes
        # select() through paho's socket pair; the network thread does all socket writes.
        self._client.on_socket_register_write = lambda _client, _userdata, _sock: None

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

    def wait_connected(self, timeout: float | None) -> bool:
        """Wait for an accepted connection (and, when subscribing, the SUBACK of the first
        subscription). Raises ``BrokerError`` if the broker refused our credentials before
        we were ever connected. False on timeout."""
        self._connected_event.wait(timeout)
        if self.fatal is not None:
            raise self.fatal
        return self._connected

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Hand a message to the client. False if it will not be sent: QoS 0 while
        disconnected, or the bounded out-queue of QoS>0 messages is full. (QoS>0 messages
        published while disconnected are kept and sent after the reconnect.)"""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        rc = info.rc
        ok = rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)
        if ok and qos > 0:
            # Remember unacknowledged QoS>0 messages for flush(); forget the acknowledged
            # ones from the front as we go, so this stays about as long as paho's queue.
            pending = self._unacked
            pending.append(info)
            while pending and pending[0].is_published():
                pending.popleft()
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

    def publish_many(self, messages: list[tuple[str, bytes]]) -> bool:
        """Publish QoS 0 messages (topic, payload), not retained, as one write. False (none
        sent) when not connected.

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
            return False
        blob = bytearray()
        v5 = self.config.protocol == "5"
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
        rc = self._client._packet_queue(mqtt.PUBLISH, bytes(blob), 0, 0, info)
        return bool(rc == MQTTErrorCode.MQTT_ERR_SUCCESS)

    def publish_and_wait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> bool:
        """Publish and wait until the broker acknowledged it (QoS>0) or it was written (QoS 0)."""
        if not self._connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False  # connection lost or queue full meanwhile
        return info.is_published()

    def stop_intake(self, timeout: float = 2.0) -> bool:
        """Unsubscribe from telemetry and wait for the broker's UNSUBACK.

        Messages are delivered in order on one connection, so once the UNSUBACK is in,
        every telemetry message the broker sent us is already in the intake queue.
        """
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
                if not self._closing and not self._stop.is_set() and self.fatal is None:
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
        return rc

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
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("on-connect listener failed")
        if self._queue is not None:
            # Subscribing here, not once after connect(), is what makes every
            # reconnect resubscribe (a clean session forgets subscriptions).
            # wait_connected() returns after the SUBACK, so "ready" means "receiving".
            qos: int = self.config.qos_in
            client.subscribe([(t, qos) for t in self._topic_filters])
        else:
            self._connected_event.set()

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._set_connected(False)
        self._disconnected.set()

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        for topic, reason in zip(self._topic_filters, reasons, strict=False):
            if reason.is_failure:
                # Connected but deaf (an ACL, usually): loud, but retrying would not help.
                log.error("broker refused the subscription to %r: %s", topic, reason)
            else:
                log.info("subscribed to %r (granted QoS %d)", topic, reason.value)
        self._connected_event.set()

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
