"""The MQTT link: one paho client, its connection lifecycle, receive and publish.

``MqttLink`` owns one paho client (callback API version 2) and a network thread
(``_run_mqtt_loop``) that connects, reconnects with capped, jittered exponential
backoff, subscribes in ``on_connect`` (so every reconnect resubscribes) and hands each
telemetry message, stamped with its arrival time, to an ``IntakeQueue`` (``anomalyd.intake``). Nothing else
happens on the network thread: decoding is the pipeline thread's job, in bulk.

``MqttLink`` is the link's only way in, and paho types never leave its modules
(``publisher`` uses ``MqttLink.publish``). This module has the lifecycle (connect,
reconnect, close), the receiving of telemetry and the public API; the rest it delegates:
to ``anomalyd.mqtt_subscribe.Subscriptions`` (the subscriptions, the broker's SUBACKs,
retries of refused filters), ``anomalyd.mqtt_publish.PublishLedger`` (publishing and its
accounting: acknowledgements, the QoS 0 canary, denied kinds) and
``anomalyd.mqtt_transport`` (the paho client, set up and adapted). ``CANARY_INTERVAL_S``,
``SUBSCRIBE_RETRY_S`` and ``failure_reason`` are importable from here too, but are read
in the module that defines them.

Credentials: a broker that refuses our user name or password *before we have ever been
connected* is a configuration problem, so ``wait_connected`` reports it as a
``BrokerError`` and the start fails (exit 76; systemd restarts it after RestartSec, so a
transient refusal still recovers). Once we have served, the same refusal on a reconnect
is logged at ERROR and retried with backoff: a running daemon is not taken down because
the broker's user database is being edited. A telemetry subscription refused before it
was ever granted fails the start the same way (``anomalyd.mqtt_subscribe``); the
connection is then dropped without a DISCONNECT, so the broker publishes our last will.

Health: any publish kind denied (``PublishLedger``) or telemetry subscription refused
(``Subscriptions``) makes the link ``degraded``. Both only raise a flag on the network
thread, inside paho's callbacks; between paho loops the link tells its health listeners
of every change (the publisher republishes its retained status).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from anomalyd.config import MqttConfig
from anomalyd.decode import RawMessage, Reason
from anomalyd.errors import BrokerError
from anomalyd.intake import IntakeQueue
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics
from anomalyd.mqtt_publish import CANARY_INTERVAL_S, PublishLedger, failure_reason
from anomalyd.mqtt_subscribe import SUBSCRIBE_RETRY_S, Subscriptions
from anomalyd.mqtt_transport import ReadAhead, new_client

__all__ = [
    "CANARY_INTERVAL_S",
    "SUBSCRIBE_RETRY_S",
    "MqttLink",
    "Will",
    "backoff_delay",
    "client_id_for",
    "failure_reason",
    "subscription_filter",
]

log = logging.getLogger(__name__)

# CONNACK reason codes that retrying will not fix (MQTT 5 numbering; paho maps the 3.1.1
# return codes 4 and 5 onto these).
_BAD_CREDENTIALS = 134
_NOT_AUTHORIZED = 135
_AUTH_FAILURES = frozenset({_BAD_CREDENTIALS, _NOT_AUTHORIZED})

#: MQTT 5 session expiry when clean_start is false: keep our subscription and queued
#: QoS>0 telemetry at the broker for an hour while we are away.
_SESSION_EXPIRY_S = 3600


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base * 2**attempt)]``.

    Jitter spreads a fleet of daemons that lost the same broker (AWS architecture blog,
    "Exponential Backoff And Jitter"); the cap bounds the wait once the broker is back.
    """
    upper = min(cap, base * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, upper)


def subscription_filter(topic_template: str) -> str:
    """``sensors/{device}/telemetry`` → ``sensors/+/telemetry``."""
    return topic_template.replace("{device}", "+")


def client_id_for(config: MqttConfig, instance: str | None = None) -> str:
    """Our MQTT client id: ``mqtt.client_id`` when set, else ``anomalyd-<hostname>-<pid>``,
    or for an instance of a partitioned fleet ``anomalyd-<instance>-<hostname>-<pid>``: its
    name first, so that instances on one host are told apart at a glance in the broker's
    logs (the pid alone would do for uniqueness). A broker takes a second connection with
    the same id as a takeover and drops the first one, so instances sharing one
    configuration file must leave ``mqtt.client_id`` empty."""
    if config.client_id or instance is None:
        return config.effective_client_id()
    return f"anomalyd-{instance}-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _who(config: MqttConfig) -> str:
    """Our identity at the broker, for logs: "user 'x'" or "anonymous clients"."""
    user = config.username
    return f"user {user!r}" if user is not None else "anonymous clients"


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
        self._health_listeners: list[Callable[[], None]] = []
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
        self._v5 = config.protocol == "5"
        # Set inside paho's callbacks, acted on between loops (_chores).
        self._health_changed = False
        self._degraded_told = False

        self._client, self._tls = new_client(
            config,
            client_id=client_id or config.effective_client_id(),
            password=password,
            key_passphrase=key_passphrase,
        )
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._ledger = PublishLedger(
            self._client,
            v5=self._v5,
            metrics=metrics,
            who=_who(config),
            log_interval_s=log_interval_s,
            on_health_change=self._mark_health_changed,
        )
        self._subs = Subscriptions(
            self._client,
            telemetry_filters=self._topic_filters if queue is not None else [],
            telemetry_qos=config.qos_in,
            v5=self._v5,
            metrics=metrics,
            who=_who(config),
            log_interval_s=log_interval_s,
            on_refused_at_start=self._fail_subscription,
            on_health_change=self._mark_health_changed,
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_publish = self._ledger.on_publish
        self._client.on_pubrec = self._ledger.on_pubrec

    # ------------------------------------------------------------------ public API

    def add_connect_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the network thread after every accepted connection."""
        self._listeners.append(callback)

    def add_subscription_listener(self, callback: Callable[[bool, str], None]) -> None:
        """Call ``callback(granted, topic_filter)`` on the network thread whenever the
        telemetry subscription turns refused (``granted`` False) or granted again, once we
        have served; ``topic_filter`` is the filter whose SUBACK changed it."""
        self._subs.add_listener(callback)

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
        Raises ValueError for an invalid filter or QoS, or a filter already subscribed.
        """
        if self._thread is not None:
            raise RuntimeError("MqttLink.add_subscription() must be called before start()")
        self._subs.add(topic_filter, handler, qos, retain_as_published)

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
        return self._subs.telemetry_refused

    def denied(self, kind: str) -> bool:
        """True while the newest acknowledgement of a ``kind`` message was a refusal."""
        return self._ledger.denied(kind)

    @property
    def degraded(self) -> bool:
        """True while some kind of publish is denied or a telemetry subscription is refused."""
        return self._ledger.any_denied or self._subs.telemetry_refused

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
        return self._ledger.canary_due(kind)

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
        return self._ledger.publish(topic, payload, qos, retain, kind)

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged (before a
        ``close`` that must not lose them: paho sends DISCONNECT ahead of QoS>0 messages
        still waiting for an in-flight slot). True if all were."""
        return self._ledger.flush(timeout)

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
        return self._ledger.publish_many(messages, kind, connected=self._connected)

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
        return self._ledger.publish_and_wait(
            topic, payload, qos=qos, retain=retain, timeout=timeout, kind=kind, connected=self._connected
        )

    def stop_intake(self, timeout: float = 2.0) -> bool:
        """Unsubscribe from telemetry and wait for the broker's UNSUBACK.

        Messages are delivered in order on one connection, so once the UNSUBACK is in,
        every telemetry message the broker sent us is already in the intake queue.
        """
        self._subs.stop_telemetry()  # no more retries of a refused telemetry subscription
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
        the network thread's time. So its socket is wrapped in a ``ReadAhead`` that reads
        the broker's stream in large chunks, and the packets already read are handed to
        paho with ``loop_read()`` (no ``select()``, no system call) before the next
        ``loop()``, which also writes what is queued and keeps the connection alive.
        Between loops, and never inside paho's callbacks (where paho holds its locks), the
        health listeners are told of changes and refused subscriptions are retried.
        """
        client = self._client
        sock = client._sock
        reader = ReadAhead(sock) if sock is not None else None
        if reader is not None:
            client._sock = reader
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = ok
        stop = self._stop
        subs = self._subs
        while rc == ok and not stop.is_set():
            rc = client.loop(timeout=1.0)
            if reader is not None:
                while rc == ok and reader.buffered:
                    rc = client.loop_read()
            if self._health_changed or time.monotonic() >= subs.retry_at:
                self._chores()
        return rc

    def _chores(self) -> None:
        if time.monotonic() >= self._subs.retry_at:
            self._subs.retry_refused()
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

    def _mark_health_changed(self) -> None:
        """Called inside paho's callbacks: ``_chores`` tells the listeners after the loop."""
        self._health_changed = True

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
        self._ledger.reconnected()
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("on-connect listener failed")
        # Subscribing here, not once after connect(), is what makes every reconnect
        # resubscribe (a clean session forgets subscriptions). wait_connected() returns
        # after the SUBACK, so "ready" means "receiving".
        if not self._subs.subscribe_on_connect():
            self._connected_event.set()

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._set_connected(False)
        self._disconnected.set()

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        if self._subs.on_suback(mid, reasons):
            self._connected_event.set()

    def _fail_subscription(self, topic_filter: str, reason: Any) -> None:
        """The telemetry subscription was refused before it was ever granted: a
        configuration problem, like bad credentials (the start fails, exit 76)."""
        self.fatal = BrokerError(
            f"MQTT broker {self.config.host}:{self.config.port} refused the subscription to "
            f"{topic_filter!r}: {reason} (fix the broker's ACL: it must let {_who(self.config)} "
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
