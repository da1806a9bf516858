"""The MQTT link's publish side: handing messages to paho, and accounting for what the
broker accepted and refused, per kind.

``PublishLedger`` does the work behind ``MqttLink.publish``, ``publish_many``,
``publish_and_wait`` and ``flush`` (whose docstrings are the contract), and keeps the books.
Every publish names a ``kind`` (score, alert, status, batch). For QoS>0 the ledger keeps
(kind, topic) per packet id until the broker's PUBACK (QoS 1) or PUBREC (QoS 2) settles
it; an MQTT 5 reason code >= 0x80 means the broker refused the message (0x87 "Not
authorized" from an ACL), which is counted in ``anomalyd_publish_failures_total{kind,
reason}`` and logged, rate-limited per kind. ``anomalyd_published_total{kind}`` counts
QoS>0 messages on a successful acknowledgement and QoS 0 messages when they are handed to
the client (they are never acknowledged).

So that QoS 0 kinds are checked too, the publisher sends one message of a kind at QoS 1
instead of 0 whenever ``MqttLink.canary_due(kind)`` says so (at most every
``CANARY_INTERVAL_S``). The kind's QoS 0 messages handed over while that canary awaits
its acknowledgement are counted by its verdict; later ones by the newest verdict: while it
is a refusal (``denied(kind)``, ``anomalyd_publish_denied{kind}``) they are still sent but
counted as failures (``not_authorized``). A change of the denied kinds is reported to the
link (``on_health_change``), whose ``degraded`` it feeds. MQTT 3.1.1 has no reason codes
(Mosquitto acknowledges a denied 3.1.1 publish as a success), so refused publishes can
only be seen with MQTT 5.

The ack bookkeeping holds paho's out-message lock around ``publish()`` and the recording
of the packet id: paho settles acknowledgements under the same lock, so an ack can never
arrive for a packet id the ledger has not recorded yet.

``publish_many`` hands paho raw PUBLISH packets built by ``encode_qos0_publishes``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics

# The link's log lines keep the one logger name operators filter on, whichever of its
# modules writes them.
log = logging.getLogger("anomalyd.mqtt")

#: MQTT 5: a PUBACK/PUBREC reason code from here up is a failure.
_FIRST_FAILURE = 0x80
_NOT_AUTHORIZED = 0x87
#: At most once per this many seconds per kind, one QoS 0 message goes out at QoS 1 so
#: that the broker's acknowledgement says whether it accepts that kind (see
#: ``MqttLink.canary_due``): an ACL fixed or broken is noticed within this long.
CANARY_INTERVAL_S = 10.0


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


def encode_qos0_publishes(messages: list[tuple[str, bytes]], v5: bool) -> bytes:
    """PUBLISH packets (QoS 0, not retained) for ``messages`` (topic, payload), back to back.

    With ``v5`` each carries the empty property list MQTT 5 requires.
    """
    blob = bytearray()
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
    return bytes(blob)


@dataclass(slots=True)
class _Pending:
    """A QoS>0 message waiting for the broker's PUBACK/PUBREC."""

    kind: str
    topic: str
    refused: bool | None = None  # set when the acknowledgement arrives


class PublishLedger:
    """The link's publishes: hands them to paho, counts them per kind, tracks QoS>0 ones
    until acknowledged.

    ``client`` is the link's paho client (its out-message lock guards the ledger); ``v5``
    whether it speaks MQTT 5; ``who`` names our broker identity in refusal logs ("user
    'x'" or "anonymous clients"); ``on_health_change()`` is called (network thread,
    paho's lock held) when a kind turns denied or accepted again.
    """

    def __init__(
        self,
        client: mqtt.Client,
        *,
        v5: bool,
        metrics: Metrics | None,
        who: str,
        log_interval_s: float,
        on_health_change: Callable[[], None],
    ) -> None:
        self._client = client
        self._lock = client._out_message_mutex
        self._v5 = v5
        self._metrics = metrics
        self._who = who
        self._on_health_change = on_health_change
        self._refusal_log = RateLimitedLog(log, log_interval_s)
        # _pending only holds packet ids of messages paho still has in its out-queue
        # (bounded by anomalyd.mqtt_transport.MAX_QUEUED_OUT); it is guarded by paho's
        # out-message lock (see publish).
        self._pending: dict[int, _Pending] = {}
        self._unacked: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        # Replaced, never mutated: the pipeline thread reads it without a lock.
        self._denied_kinds: frozenset[str] = frozenset()
        self._canary_next: dict[str, float] = {}
        # Kinds whose next QoS>0 publish is a canary; the canary in flight per kind, and
        # the QoS 0 messages of that kind handed over since, which its verdict will judge.
        self._canary_armed: set[str] = set()
        self._canary_mid: dict[str, int] = {}
        self._judged_by_canary: dict[str, int] = {}

    def denied(self, kind: str) -> bool:
        """True while the newest acknowledgement of a ``kind`` message was a refusal."""
        return kind in self._denied_kinds

    @property
    def any_denied(self) -> bool:
        """True while some kind is ``denied``."""
        return bool(self._denied_kinds)

    def canary_due(self, kind: str) -> bool:
        """True at most once every ``CANARY_INTERVAL_S`` per kind; arms the canary when it is.

        The next QoS>0 publish of ``kind`` is then the canary. Whether a canary makes sense
        at all (MQTT 5, connected) is the caller's to check first.
        """
        now = time.monotonic()
        if now < self._canary_next.get(kind, 0.0):
            return False
        self._canary_next[kind] = now + CANARY_INTERVAL_S
        self._canary_armed.add(kind)
        return True

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, kind: str) -> bool:
        """``MqttLink.publish``."""
        client = self._client
        if qos == 0:
            ok = client.publish(topic, payload, qos=0, retain=retain).rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            self._count_handed(kind, 1, ok)
            return ok
        # Under paho's out-message lock, which paho holds while it handles a PUBACK: the
        # acknowledgement cannot be settled before its packet id is recorded here.
        with self._lock:
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

    def publish_many(self, messages: list[tuple[str, bytes]], kind: str, *, connected: bool) -> bool:
        """``MqttLink.publish_many``; ``connected`` is the link's state."""
        if not messages:
            return True
        if not connected:
            self._count_handed(kind, len(messages), False)
            return False
        info = mqtt.MQTTMessageInfo(0)
        ok = (
            self._client._packet_queue(mqtt.PUBLISH, encode_qos0_publishes(messages, self._v5), 0, 0, info)
            == MQTTErrorCode.MQTT_ERR_SUCCESS
        )
        self._count_handed(kind, len(messages), ok)
        return ok

    def publish_and_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        timeout: float,
        kind: str,
        connected: bool,
    ) -> bool:
        """``MqttLink.publish_and_wait``; ``connected`` is the link's state."""
        if not connected:
            self._count_failed(kind, 1, "not_connected")
            return False
        client = self._client
        entry: _Pending | None = None
        with self._lock:  # as in publish
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

    def flush(self, timeout: float) -> bool:
        """``MqttLink.flush``: wait until every QoS>0 message tracked so far is acknowledged."""
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
            with self._lock:
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

    # ------------------------------------------------------------------ acknowledgements

    def reconnected(self) -> None:
        """Forget what will not be acknowledged after a reconnect (network thread)."""
        with self._lock:
            # Acknowledgements only come for what paho still holds (it resends those).
            out = self._client._out_messages
            for mid in [m for m in self._pending if m not in out]:
                del self._pending[mid]
            for kind, mid in list(self._canary_mid.items()):
                if mid not in self._pending:  # a verdict that will not come: use the last one
                    del self._canary_mid[kind]
                    self._release_judged(kind, kind in self._denied_kinds, "not_authorized")

    def on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        """paho's ``on_publish``."""
        # Called with paho's out-message lock held: for a QoS 1 PUBACK, for a QoS 2 PUBCOMP
        # (already settled by its PUBREC) and when a QoS 0 message was written (nothing to
        # settle; paho keeps no QoS 0 message in _out_messages).
        msg = client._out_messages.get(mid)
        if msg is None or msg.qos != 1:
            return
        self._settle(mid, reason.value, _reason_text(PacketTypes.PUBACK, reason.value))

    def on_pubrec(self, mid: int, code: int) -> None:
        """``Client.on_pubrec``: a QoS 2 message's verdict."""
        with self._lock:
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
                self._who,
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
        self._on_health_change()

    def _release_judged(self, kind: str, refused: bool, reason: str) -> None:
        """Count the QoS 0 messages that waited for a canary's verdict (paho's lock held)."""
        n = self._judged_by_canary.pop(kind, 0)
        if n:
            if refused:
                self._count_failed(kind, n, reason)
            elif self._metrics is not None:
                self._metrics.published.labels(kind=kind).inc(n)
