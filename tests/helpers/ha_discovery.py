"""What Home Assistant makes of a discovery config, for the tests: ``check_config`` asserts
that a config is one it accepts, ``render`` renders its templates.

``check_config`` is written from Home Assistant's MQTT documentation (the MQTT integration's
discovery section and the MQTT binary sensor and sensor pages): the discovery topic's
form, the options each component requires here, and only documented option names, in full
(no abbreviations: the daemon spells every key out).

Jinja2 is not a dependency of the project, so ``render`` evaluates the two template shapes
the daemon emits, ``{{ value_json.<field> }}`` and ``{{ 'a' if value in ('x', ...) else 'b' }}``,
the way Jinja2 does (a value renders as ``str(value)``: a JSON ``true`` as ``True``, ``null``
as ``None``), with ``value`` the payload as text and ``value_json`` the payload parsed. Any
other template fails the test instead of passing unchecked.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["CONFIG_SCHEMA", "PREFIX", "check_config", "render"]

PREFIX = "homeassistant"

#: Options documented for every MQTT entity of the two components (full names).
_ENTITY_OPTIONS = frozenset(
    {
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "default_entity_id",
        "device",
        "device_class",
        "enabled_by_default",
        "encoding",
        "entity_category",
        "entity_picture",
        "expire_after",
        "force_update",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "object_id",
        "origin",
        "payload_available",
        "payload_not_available",
        "platform",
        "qos",
        "state_topic",
        "unique_id",
        "value_template",
    }
)
#: Per component: (documented options, required ones). The score has no unit, so
#: ``unit_of_measurement`` is allowed but not required: ``state_class`` alone makes a sensor
#: numeric (graphs, long-term statistics).
CONFIG_SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "binary_sensor": (
        _ENTITY_OPTIONS | {"off_delay", "payload_off", "payload_on"},
        frozenset(
            {
                "state_topic",
                "unique_id",
                "device",
                "availability",
                "value_template",
                "payload_on",
                "payload_off",
            }
        ),
    ),
    "sensor": (
        _ENTITY_OPTIONS
        | {
            "last_reset_value_template",
            "options",
            "state_class",
            "suggested_display_precision",
            "unit_of_measurement",
        },
        frozenset({"state_topic", "unique_id", "device", "availability", "value_template", "state_class"}),
    ),
}
DEVICE_OPTIONS = frozenset(
    {
        "configuration_url",
        "connections",
        "hw_version",
        "identifiers",
        "manufacturer",
        "model",
        "model_id",
        "name",
        "serial_number",
        "suggested_area",
        "sw_version",
        "via_device",
    }
)
ORIGIN_OPTIONS = frozenset({"name", "sw_version", "support_url"})
AVAILABILITY_OPTIONS = frozenset({"topic", "payload_available", "payload_not_available", "value_template"})
STATE_CLASSES = frozenset({"measurement", "measurement_angle", "total", "total_increasing"})
#: <discovery_prefix>/<component>/<node_id>/<object_id>/config; ids from [a-zA-Z0-9_-].
_CONFIG_TOPIC = r"(binary_sensor|sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config"
#: Home Assistant's valid entity id: domain.object, lower case, no '__', no '_' at the ends.
_ENTITY_ID = re.compile(r"(?!.*__)(?!_)[0-9a-z_]+(?<!_)\.(?!_)[0-9a-z_]+(?<!_)")


def check_config(topic: str, doc: Any, prefix: str = PREFIX) -> str:
    """Assert that ``doc``, retained on ``topic``, is a discovery config Home Assistant
    accepts (under the discovery prefix ``prefix``); returns its component."""
    m = re.fullmatch(re.escape(prefix) + "/" + _CONFIG_TOPIC, topic)
    assert m, f"not a discovery config topic: {topic}"
    component = m.group(1)
    assert isinstance(doc, dict), topic
    allowed, required = CONFIG_SCHEMA[component]
    assert not set(doc) - allowed, f"{topic}: undocumented options {sorted(set(doc) - allowed)}"
    assert required <= set(doc), f"{topic}: missing {sorted(required - set(doc))}"
    assert not ({"availability", "availability_topic"} <= set(doc)), "availability options are exclusive"
    for key in ("state_topic", "unique_id", "value_template", "name", "json_attributes_topic"):
        if key in doc:
            assert isinstance(doc[key], str), (topic, key)
            assert doc[key], (topic, key)
    assert not set("+#") & set(doc["state_topic"]), doc["state_topic"]
    assert _ENTITY_ID.fullmatch(doc["default_entity_id"]), doc["default_entity_id"]
    assert doc["default_entity_id"].startswith(f"{component}."), doc["default_entity_id"]
    device = doc["device"]
    assert isinstance(device, dict), device
    assert not set(device) - DEVICE_OPTIONS, device
    ids = device["identifiers"]
    assert isinstance(ids, list), device
    assert ids, device
    assert all(isinstance(i, str) and i for i in ids), device
    assert not set(doc["origin"]) - ORIGIN_OPTIONS, doc["origin"]
    assert doc["origin"]["name"], doc["origin"]
    assert isinstance(doc["availability"], list), doc["availability"]
    assert doc["availability"]
    for entry in doc["availability"]:
        assert not set(entry) - AVAILABILITY_OPTIONS, entry
        assert isinstance(entry["topic"], str), entry
    if component == "binary_sensor":
        assert isinstance(doc["payload_on"], str)
        assert isinstance(doc["payload_off"], str)
        assert doc["payload_on"] != doc["payload_off"]
    else:
        assert doc["state_class"] in STATE_CLASSES, doc["state_class"]
    return component


_FIELD = re.compile(r"\{\{ value_json\.([A-Za-z_][A-Za-z0-9_]*) \}\}")
_CHOICE = re.compile(r"\{\{ '([^']*)' if value in \(('[^']*'(?:, '[^']*')*)\) else '([^']*)' \}\}")


def render(template: str, payload: bytes) -> str:
    """What Jinja2 renders for ``template`` with ``value`` (the payload as text) and
    ``value_json`` (the payload parsed), for the shapes described in the module docstring."""
    if m := _FIELD.fullmatch(template):
        doc = orjson.loads(payload)
        return str(doc[m.group(1)])  # a missing field fails here (Jinja2 would render "")
    if m := _CHOICE.fullmatch(template):
        words = re.findall(r"'([^']*)'", m.group(2))
        return m.group(1) if payload.decode() in words else m.group(3)
    raise AssertionError(f"this check does not understand the template {template!r}")
