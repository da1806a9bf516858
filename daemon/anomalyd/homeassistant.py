"""Home Assistant MQTT discovery (``[homeassistant]``, off by default).

For every device with a state, two retained discovery configs make Home Assistant create
the device and its entities, reading the daemon's own topics (nothing is published twice):

- a ``binary_sensor`` (device class ``problem``), its alert: on while the device's alert
  state (``anomaly/{device}/alert``, retained) is ``anomalous``. Its value template reads
  the message's ``alert`` field, which is true exactly then (``anomalyd.alerts``); Jinja
  renders a JSON boolean as ``True`` / ``False``, hence those ``payload_on`` /
  ``payload_off``. The whole state message is its attributes (``json_attributes_topic``):
  ``condition``, ``reason``, ``since``, ``peak_score``, ``contributions``, ...;
- a ``sensor``, its score: ``score`` of ``anomaly/{device}/score``, ``state_class:
  measurement`` (numeric: graphed, long-term statistics). The score has no unit, so the
  config gives none. Only with ``output.publish_scores``: without score messages the
  sensor would never have a value.

Both are available while the daemon's retained status (``anomaly/status``) is
``online``, ``overloaded`` or ``degraded`` (it still scores), and unavailable when it is
``offline`` (the last will) or ``stopped``. An availability entry compares one payload
with ``payload_available`` and another with ``payload_not_available`` and ignores the
rest, so a template maps the five words onto those two.

Topics follow Home Assistant's ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``;
``node_id`` (default ``anomalyd``) also prefixes the unique ids and the device identifier
(``anomalyd_<device>``), so two daemons on one broker need two node ids. A device id may
hold characters a topic level may not (Home Assistant allows ``[a-zA-Z0-9_-]`` there):
they become ``_`` and a hash of the id is appended, so that two ids never share a topic.

When: a device is announced with its first published state other than ``unknown`` (its
first decided window, or an operator or cadence state), and again whenever what its
configs say changes (the model version, which is the device's ``model``; the output
topics). Its configs are removed (empty retained payloads) when the daemon forgets it for
being idle or evicted. A device that becomes ``unknown`` for another reason (a stop
without a snapshot, a model with another window shape) keeps its entities: it is expected
back, and while the daemon is away its entities are unavailable anyway. After every
(re)connect, and whenever Home Assistant says ``online`` on its status topic (it
restarted and may have lost what it knew), every device is announced again: the
configs ride along with the re-assertion of the alert states (``Pipeline.request_reassert``),
which spreads them over a few seconds. The service asks ``take_reannounce`` for that
between two passes.

Messages are retained, QoS 1, counted under the publish kind ``discovery``; a broker that
refuses them (its ACL must let the daemon write ``<discovery_prefix>/#``) makes the status
``degraded`` like any refused kind.

Threads: ``observe``, ``set_model``, ``set_output`` and ``take_reannounce`` run on the
pipeline thread; ``request_reannounce`` and ``on_homeassistant_status`` on the network
thread, and only set an event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from anomalyd import __version__
from anomalyd.alerts import UNKNOWN, AlertRecord
from anomalyd.config import HomeAssistantConfig, OutputConfig
from anomalyd.logsetup import RateLimitedLog
from anomalyd.mqtt import MqttLink

if TYPE_CHECKING:
    from anomalyd.publisher import Publisher

__all__ = [
    "AVAILABILITY_TEMPLATE",
    "BINARY_SENSOR",
    "REMOVED_WHEN",
    "SENSOR",
    "DiscoverySettings",
    "HomeAssistantDiscovery",
    "attach_discovery",
    "binary_sensor_config",
    "config_topic",
    "discovery_messages",
    "entity_slug",
    "removal_messages",
    "sensor_config",
    "settings_from",
    "topic_id",
]

log = logging.getLogger(__name__)

BINARY_SENSOR: Final = "binary_sensor"
SENSOR: Final = "sensor"
#: Why a device is forgotten for good (``unknown`` reasons): its configs are removed.
REMOVED_WHEN: Final = frozenset({"idle", "evicted"})
#: The publish kind of discovery messages (``anomalyd_published_total{kind}``).
KIND: Final = "discovery"
_QOS: Final = 1
_MANUFACTURER: Final = "anomalyd"
#: The daemon's status words (``anomalyd.publisher``) under which it still scores.
_AVAILABLE_WORDS: Final = ("online", "overloaded", "degraded")
#: Renders the status word as ``online`` (available) or ``offline``: the daemon also says
#: ``overloaded`` / ``degraded`` (still scoring) and ``stopped`` (gone, cleanly), which an
#: availability entry without a template would ignore, leaving a stopped daemon "available".
AVAILABILITY_TEMPLATE: Final = (
    "{{ 'online' if value in (" + ", ".join(f"'{w}'" for w in _AVAILABLE_WORDS) + ") else 'offline' }}"
)
_TOPIC_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def topic_id(device: str) -> str:
    """``device`` as a discovery topic level (``[A-Za-z0-9_-]`` only), one per device id:
    the id itself when it qualifies, else with ``_`` for each other character and a hash of
    the id appended (``line.2`` → ``line_2_<8 hex digits>``: never ``line_2``'s topic)."""
    safe = _TOPIC_ID_UNSAFE.sub("_", device)
    return safe if safe == device else f"{safe}_{_digest(device)}"


def entity_slug(device: str) -> str:
    """``device`` as part of an entity id (lower case, ``[a-z0-9_]``, no ``__``, no ``_`` at
    either end: Home Assistant's rule). Several ids may share a slug; Home Assistant then
    numbers the entity ids, and the unique ids keep the entities apart."""
    return _SLUG_UNSAFE.sub("_", device.lower()).strip("_") or _digest(device)


def config_topic(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """``<discovery_prefix>/<component>/<node_id>/<object_id>/config``."""
    return f"{prefix}/{component}/{node_id}/{object_id}/config"


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """What the discovery configs of every device are built from."""

    discovery_prefix: str
    node_id: str
    alert_topic: str  # with '{device}'
    score_topic: str | None  # with '{device}'; None: no score messages, no score sensor
    status_topic: str
    model_version: str
    sw_version: str = __version__


def settings_from(config: HomeAssistantConfig, output: OutputConfig, model_version: str) -> DiscoverySettings:
    """The settings for a configuration and a model."""
    return DiscoverySettings(
        discovery_prefix=config.discovery_prefix,
        node_id=config.node_id,
        alert_topic=output.alert_topic,
        score_topic=output.score_topic if output.publish_scores else None,
        status_topic=output.status_topic,
        model_version=model_version,
    )


def _common(device: str, component: str, suffix: str, s: DiscoverySettings) -> dict[str, Any]:
    """The keys both entities share: ids, availability, device, origin."""
    entity = f"{entity_slug(f'{s.node_id}_{device}')}_{suffix}"
    return {
        "unique_id": f"{s.node_id}_{device}_{suffix}",
        # default_entity_id replaced object_id in Home Assistant 2025.10; older releases
        # read only object_id, newer ones drop it (unknown keys are removed, not refused).
        "default_entity_id": f"{component}.{entity}",
        "object_id": entity,
        "availability": [
            {
                "topic": s.status_topic,
                "value_template": AVAILABILITY_TEMPLATE,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "device": {
            "identifiers": [f"{s.node_id}_{device}"],
            "name": device,
            "model": s.model_version,
            "manufacturer": _MANUFACTURER,
            "sw_version": s.sw_version,
        },
        "origin": {"name": _MANUFACTURER, "sw_version": s.sw_version},
    }


def binary_sensor_config(device: str, s: DiscoverySettings) -> dict[str, Any]:
    """The alert ``binary_sensor``: on while the device's alert state is ``anomalous``."""
    alert_topic = s.alert_topic.replace("{device}", device)
    return {
        "name": "Alert",
        "device_class": "problem",
        "state_topic": alert_topic,
        "value_template": "{{ value_json.alert }}",
        "payload_on": "True",
        "payload_off": "False",
        "json_attributes_topic": alert_topic,
        **_common(device, BINARY_SENSOR, "alert", s),
    }


def sensor_config(device: str, s: DiscoverySettings) -> dict[str, Any] | None:
    """The score ``sensor`` (None without score messages)."""
    if s.score_topic is None:
        return None
    return {
        "name": "Anomaly score",
        "icon": "mdi:chart-bell-curve",
        "state_topic": s.score_topic.replace("{device}", device),
        "value_template": "{{ value_json.score }}",
        "state_class": "measurement",
        **_common(device, SENSOR, "score", s),
    }


def _topics(device: str, s: DiscoverySettings) -> tuple[str, str]:
    """The binary sensor's and the sensor's config topics."""
    object_id = topic_id(device)
    return (
        config_topic(s.discovery_prefix, BINARY_SENSOR, s.node_id, f"{object_id}_alert"),
        config_topic(s.discovery_prefix, SENSOR, s.node_id, f"{object_id}_score"),
    )


def discovery_messages(device: str, s: DiscoverySettings) -> list[tuple[str, bytes]]:
    """(topic, JSON payload) of the device's configs, to publish retained. Without a score
    sensor its topic gets an empty payload: a sensor announced before is removed."""
    alert_topic, score_topic = _topics(device, s)
    score = sensor_config(device, s)
    return [
        (alert_topic, orjson.dumps(binary_sensor_config(device, s))),
        (score_topic, orjson.dumps(score) if score is not None else b""),
    ]


def removal_messages(device: str, s: DiscoverySettings) -> list[tuple[str, bytes]]:
    """(topic, empty payload) for each of the device's config topics: published retained,
    they remove the entities and the retained configs."""
    return [(topic, b"") for topic in _topics(device, s)]


class HomeAssistantDiscovery:
    """Announces devices to Home Assistant, and removes them (see the module docstring).

    ``publish(topic, payload)`` publishes one retained message (``attach_discovery`` binds
    the link's); ``wake()`` wakes the pipeline thread after a re-announcement was requested.
    """

    def __init__(
        self,
        settings: DiscoverySettings,
        publish: Callable[[str, bytes], bool],
        *,
        wake: Callable[[], None] = lambda: None,
        log_interval_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self._publish = publish
        self._wake = wake
        # Device -> the settings its configs were published with, since the last reannounce.
        self._announced: dict[str, DiscoverySettings] = {}
        self._reannounce = threading.Event()
        self._fail_log = RateLimitedLog(log, log_interval_s)

    @property
    def announced(self) -> list[str]:
        """Devices announced since the last re-announcement began (with the current settings
        or, until their next state, older ones)."""
        return list(self._announced)

    def observe(self, records: list[AlertRecord]) -> None:
        """Devices' alert states as they are published: announce the ones not announced
        with the current settings, remove the ones forgotten for good."""
        s = self.settings
        for record in records:
            device = record.device
            if record.state == UNKNOWN:
                if record.reason in REMOVED_WHEN:
                    self._announced.pop(device, None)
                    self._send(removal_messages(device, s))
                else:
                    # Kept in Home Assistant (expected back), but no longer tracked here: a
                    # device that returns is announced again with its first state.
                    self._announced.pop(device, None)
            elif self._announced.get(device) != s:
                self._announced[device] = s
                self._send(discovery_messages(device, s))

    def set_model(self, model_version: str) -> None:
        """A new model: its version is every device's ``model``; re-announce all."""
        self._update(dataclasses.replace(self.settings, model_version=model_version))

    def set_output(self, output: OutputConfig) -> None:
        """Reloaded ``[output]`` settings (the score topic may change live): re-announce
        all if the configs change."""
        self._update(
            dataclasses.replace(
                self.settings,
                alert_topic=output.alert_topic,
                score_topic=output.score_topic if output.publish_scores else None,
                status_topic=output.status_topic,
            )
        )

    def _update(self, new: DiscoverySettings) -> None:
        if new != self.settings:
            self.settings = new
            self.request_reannounce()

    def request_reannounce(self) -> None:
        """Announce every device again, soon (any thread: after a connect, Home Assistant's
        birth message, changed settings)."""
        self._reannounce.set()
        self._wake()

    def on_homeassistant_status(self, _topic: str, payload: bytes, _retain: bool) -> None:
        """A message on Home Assistant's status topic (network thread): ``online`` means it
        (re)started, and it may have lost the configs it had (no retained ones, say)."""
        if payload.strip() == b"online":
            log.info("Home Assistant is online: announcing every device to it again")
            self.request_reannounce()

    def take_reannounce(self) -> bool:
        """Pipeline thread: True once after a re-announcement was requested. Every device
        then counts as not announced, so that the next state published for it (the caller
        re-asserts them all) publishes its configs again."""
        if not self._reannounce.is_set():
            return False
        self._reannounce.clear()
        self._announced.clear()
        return True

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        failed = sum(1 for topic, payload in messages if not self._publish(topic, payload))
        if failed:
            self._fail_log.log(
                logging.WARNING,
                KIND,
                "could not publish %d Home Assistant discovery message(s): not connected to the "
                "broker or out-queue full (every device is announced again after the next connect)",
                failed,
            )


def attach_discovery(
    config: HomeAssistantConfig,
    output: OutputConfig,
    model_version: str,
    link: MqttLink,
    publisher: Publisher,
    *,
    wake: Callable[[], None],
    log_interval_s: float,
) -> HomeAssistantDiscovery | None:
    """Wire discovery into the service's link and publisher (before ``link.start()``);
    None when ``[homeassistant]`` is not enabled."""
    if not config.enabled:
        return None

    def publish(topic: str, payload: bytes) -> bool:
        return link.publish(topic, payload, qos=_QOS, retain=True, kind=KIND)

    discovery = HomeAssistantDiscovery(
        settings_from(config, output, model_version), publish, wake=wake, log_interval_s=log_interval_s
    )
    publisher.discovery = discovery
    link.add_connect_listener(discovery.request_reannounce)
    if config.status_topic:
        link.add_subscription(config.status_topic, discovery.on_homeassistant_status, qos=1)
    return discovery
