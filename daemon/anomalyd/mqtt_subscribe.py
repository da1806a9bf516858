"""The MQTT link's subscriptions: what it asks the broker for, and what the broker answers.

The broker answers each topic filter of a SUBSCRIBE with a granted QoS or a refusal (its
ACL, usually: "Not authorized"). A telemetry subscription refused before it was ever
granted is a configuration problem like bad credentials: the link turns it into a
``BrokerError`` (exit 76) and drops the connection without a DISCONNECT, so the broker
publishes our last will (``offline``) instead of leaving ``online`` behind. Refused after
we have served (a reconnect to a broker whose ACL changed), it is logged at ERROR, shown
in ``anomalyd_mqtt_subscription_denied`` and the link's ``degraded``, reported to the
subscription listeners (the service takes readiness away) and asked for again every
``SUBSCRIBE_RETRY_S`` until granted.

Extra filters (``add``) sit beside the telemetry one and are subscribed in the same
SUBSCRIBE on every connect, with MQTT 5's No Local option (we are not sent our own
publications back); their messages go to their handler through paho's per-filter
callbacks and never reach the intake queue, so the telemetry path does no extra work for
them. A refused extra filter is logged and counted
(``anomalyd_mqtt_subscription_refusals_total{topic_filter}``), retried like telemetry,
and does not touch readiness.

``Subscriptions`` keeps that state for one link. The link calls ``subscribe_on_connect``
from paho's ``on_connect`` (so every reconnect resubscribes), ``on_suback`` from
``on_subscribe``, and ``retry_refused`` between loops once ``retry_at`` has passed: all on
the network thread.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics

# The link's log lines keep the one logger name operators filter on, whichever of its
# modules writes them.
log = logging.getLogger("anomalyd.mqtt")

#: How often a subscription the broker refused is asked for again while connected.
SUBSCRIBE_RETRY_S = 30.0


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


#: Granted telemetry filters are logged one a line up to this many; more (a partitioned
#: fleet's instance has a filter per partition it owns) in one line, not one per partition
#: on every reconnect.
_GRANTED_ONE_A_LINE = 4


def _log_granted(granted: list[tuple[str, int]]) -> None:
    if len(granted) <= _GRANTED_ONE_A_LINE:
        for topic_filter, qos in granted:
            log.info("subscribed to %r (granted QoS %d)", topic_filter, qos)
        return
    qos_levels = sorted({qos for _, qos in granted})
    log.info(
        "subscribed to %d telemetry filters, %r ... %r (granted QoS %s)",
        len(granted),
        granted[0][0],
        granted[-1][0],
        "/".join(str(q) for q in qos_levels),
    )


@dataclass(frozen=True, slots=True)
class _Sub:
    """One topic filter of a SUBSCRIBE: telemetry (to the intake queue) or an extra one."""

    topic_filter: str
    qos: int
    telemetry: bool
    retain_as_published: bool = False


class Subscriptions:
    """The telemetry and extra subscriptions of one link, and the broker's answers to them.

    ``telemetry_filters`` is empty for a link without an intake queue. ``who`` names our
    broker identity in logs. ``on_refused_at_start(topic_filter, reason)`` is called when
    a telemetry filter is refused before one was ever granted (the link fails);
    ``on_health_change()`` when the telemetry subscription turns refused or granted again.
    """

    def __init__(
        self,
        client: mqtt.Client,
        *,
        telemetry_filters: list[str],
        telemetry_qos: int,
        v5: bool,
        metrics: Metrics | None,
        who: str,
        log_interval_s: float,
        on_refused_at_start: Callable[[str, Any], None],
        on_health_change: Callable[[], None],
    ) -> None:
        self._client = client
        self._telemetry_filters = telemetry_filters
        self._telemetry_qos = telemetry_qos
        self._v5 = v5
        self._metrics = metrics
        self._who = who
        self._handler_log = RateLimitedLog(log, log_interval_s)
        self._on_refused_at_start = on_refused_at_start
        self._on_health_change = on_health_change
        self._listeners: list[Callable[[bool, str], None]] = []
        # Once the link has started, all of this is the network thread's, except
        # _intake_stopped.
        self._extra: list[_Sub] = []
        self._sub_mids: dict[int, list[_Sub]] = {}
        self._telemetry_refused: frozenset[str] = frozenset()
        self._extra_refused: set[str] = set()
        self._served = False  # a telemetry subscription was granted once
        self._intake_stopped = False
        #: ``time.monotonic()`` at which refused filters are asked for again (inf: none).
        self.retry_at = math.inf
        if metrics is not None:
            for topic_filter in telemetry_filters:
                metrics.mqtt_subscription_refusals.labels(topic_filter=topic_filter)

    def add_listener(self, callback: Callable[[bool, str], None]) -> None:
        """See ``MqttLink.add_subscription_listener``."""
        self._listeners.append(callback)

    def add(
        self,
        topic_filter: str,
        handler: Callable[[str, bytes, bool], None],
        qos: int,
        retain_as_published: bool,
    ) -> None:
        """Validate and add an extra filter (see ``MqttLink.add_subscription``)."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        _check_filter(topic_filter)
        taken = {s.topic_filter for s in self._extra}
        taken.update(self._telemetry_filters)
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

    @property
    def telemetry_refused(self) -> bool:
        """True while the broker refuses a telemetry subscription (after we have served)."""
        return bool(self._telemetry_refused)

    def stop_telemetry(self) -> None:
        """Never ask for telemetry again (the link is unsubscribing from it)."""
        self._intake_stopped = True

    def subscribe_on_connect(self) -> bool:
        """Send the SUBSCRIBE of a new connection; False if none was sent (nothing to
        subscribe to, or paho would not send it), so no SUBACK is to come."""
        self._sub_mids.clear()  # the SUBACKs of an earlier connection will not come
        self.retry_at = math.inf
        subs: list[_Sub] = []
        if not self._intake_stopped:
            subs = [_Sub(f, self._telemetry_qos, True) for f in self._telemetry_filters]
        subs += self._extra
        return bool(subs) and self._subscribe(subs)

    def retry_refused(self) -> None:
        """Ask the broker again for every filter it refused (``retry_at`` has passed)."""
        self.retry_at = math.inf
        retry = [s for s in self._extra if s.topic_filter in self._extra_refused]
        if not self._intake_stopped:
            retry += [_Sub(f, self._telemetry_qos, True) for f in sorted(self._telemetry_refused)]
        if retry:
            log.info("asking the broker again for %s", ", ".join(repr(s.topic_filter) for s in retry))
            self._subscribe(retry)

    def _subscribe(self, subs: list[_Sub]) -> bool:
        """Send one SUBSCRIBE for ``subs``; its SUBACK goes to ``on_suback``."""
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

    def on_suback(self, mid: int, reasons: list[Any]) -> bool:
        """Take the broker's answer to SUBSCRIBE ``mid``. True when it answered one of ours
        and no telemetry filter was refused at start (``on_refused_at_start`` was called)."""
        subs = self._sub_mids.pop(mid, None)
        if subs is None:
            return False
        refused = set(self._telemetry_refused)
        changed_filter = ""
        telemetry_answered = False
        granted_telemetry: list[tuple[str, int]] = []
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
                elif sub.telemetry:
                    granted_telemetry.append((topic_filter, reason.value))
                else:
                    log.info("subscribed to %r (granted QoS %d)", topic_filter, reason.value)
                telemetry_answered |= sub.telemetry
                continue
            if self._metrics is not None:
                self._metrics.mqtt_subscription_refusals.labels(topic_filter=topic_filter).inc()
            if sub.telemetry and not self._served:
                self._on_refused_at_start(topic_filter, reason)
                return False
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
                    self._who,
                    SUBSCRIBE_RETRY_S,
                )
            else:
                self._extra_refused.add(topic_filter)
                log.error(
                    "the broker refused the subscription to %r: %s; check the broker's ACL for %s; "
                    "asking again every %.0f s",
                    topic_filter,
                    reason,
                    self._who,
                    SUBSCRIBE_RETRY_S,
                )
            self.retry_at = min(self.retry_at, time.monotonic() + SUBSCRIBE_RETRY_S)
        _log_granted(granted_telemetry)
        if refused != self._telemetry_refused:
            was_granted = not self._telemetry_refused
            self._telemetry_refused = frozenset(refused)
            self._on_health_change()
            if self._metrics is not None:
                self._metrics.mqtt_subscription_denied.set(1 if refused else 0)
            if was_granted != (not refused):
                for listener in self._listeners:
                    try:
                        listener(not refused, changed_filter)
                    except Exception:
                        log.exception("subscription listener failed")
        if telemetry_answered and not self._telemetry_refused:
            self._served = True
        return True
