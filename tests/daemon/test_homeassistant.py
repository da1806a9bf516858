"""Home Assistant discovery: the configs built for a device, when devices are announced and
removed, and the ``[homeassistant]`` keys. End to end with the daemon and a broker:
``tests/e2e/test_homeassistant.py``."""

from __future__ import annotations

import logging
import re

import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.alerts import ANOMALOUS, NORMAL, SHELVED, UNKNOWN, AlertRecord
from anomalyd.config import HomeAssistantConfig, MqttConfig, OutputConfig, load_config
from anomalyd.errors import ConfigError
from anomalyd.homeassistant import (
    AVAILABILITY_TEMPLATE,
    DiscoverySettings,
    HomeAssistantDiscovery,
    attach_discovery,
    discovery_messages,
    entity_slug,
    removal_messages,
    settings_from,
    topic_id,
)
from anomalyd.metrics import Metrics
from anomalyd.mqtt import MqttLink
from anomalyd.publisher import DEGRADED, OFFLINE, ONLINE, OVERLOADED, STOPPED, Publisher, last_will
from tests.helpers.ha_discovery import check_config, render

DEVICES = ["pump-7", "line.2:b", "line_2_b", "Line.2:B", "A", "a", "x" * 64, "..:", "_-_"]


def _settings(**output: object) -> DiscoverySettings:
    return settings_from(HomeAssistantConfig(enabled=True), OutputConfig.model_validate(output), "m-1")


def _record(device: str, state: str, reason: str | None = None) -> AlertRecord:
    return AlertRecord(device, state, state if state != SHELVED else NORMAL, 1.0, 2.0, reason=reason)


# --------------------------------------------------------------------------- the configs


def test_topic_levels_keep_home_assistants_characters_and_never_collide() -> None:
    ids = [topic_id(d) for d in DEVICES]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids), ids
    assert len(set(ids)) == len(DEVICES)  # line.2:b and line_2_b are two devices
    assert topic_id("pump-7") == "pump-7"  # an id that qualifies is kept as it is
    assert topic_id("line.2:b").startswith("line_2_b_")


@pytest.mark.parametrize("node_id", ["anomalyd", "Site-2", "_"])
def test_every_config_is_one_home_assistant_accepts(node_id: str) -> None:
    s = settings_from(HomeAssistantConfig(enabled=True, node_id=node_id), OutputConfig(), "m-1")
    for device in DEVICES:
        for topic, payload in discovery_messages(device, s):
            doc = orjson.loads(payload)
            component = check_config(topic, doc)
            assert topic.split("/")[2] == node_id
            assert doc["device"]["identifiers"] == [f"{node_id}_{device}"]
            assert doc["unique_id"].startswith(f"{node_id}_{device}_")
            assert doc["default_entity_id"] == f"{component}.{doc['object_id']}"
    assert entity_slug("Line.2:B") == "line_2_b"


def test_the_configs_read_the_daemons_own_topics() -> None:
    output = OutputConfig(
        score_topic="plant/{device}/s", alert_topic="plant/{device}/a", status_topic="plant/daemon"
    )
    config = HomeAssistantConfig(enabled=True, discovery_prefix="ha/disc", node_id="site-2")
    (alert_topic, alert), (score_topic, score) = discovery_messages(
        "pump-7", settings_from(config, output, "v9")
    )
    assert alert_topic == "ha/disc/binary_sensor/site-2/pump-7_alert/config"
    assert score_topic == "ha/disc/sensor/site-2/pump-7_score/config"
    a, s = orjson.loads(alert), orjson.loads(score)
    check_config(alert_topic, a, prefix="ha/disc")
    check_config(score_topic, s, prefix="ha/disc")
    assert (a["state_topic"], a["json_attributes_topic"]) == ("plant/pump-7/a", "plant/pump-7/a")
    assert s["state_topic"] == "plant/pump-7/s"
    assert a["availability"][0]["topic"] == s["availability"][0]["topic"] == "plant/daemon"
    assert a["device"] == s["device"]
    assert (a["device"]["model"], a["device"]["manufacturer"], a["device"]["name"]) == (
        "v9",
        "anomalyd",
        "pump-7",
    )
    assert s["state_class"] == "measurement"


def test_the_templates_read_the_alert_and_the_score() -> None:
    (_, alert), (_, score) = discovery_messages("pump-7", _settings())
    a, s = orjson.loads(alert), orjson.loads(score)
    assert render(a["value_template"], orjson.dumps({"state": ANOMALOUS, "alert": True})) == a["payload_on"]
    assert render(a["value_template"], orjson.dumps({"state": SHELVED, "alert": False})) == a["payload_off"]
    assert render(s["value_template"], orjson.dumps({"score": 0.83})) == "0.83"


@pytest.mark.parametrize(
    ("word", "available"),
    [(ONLINE, True), (OVERLOADED, True), (DEGRADED, True), (OFFLINE, False), (STOPPED, False)],
)
def test_the_daemons_status_words_map_onto_availability(word: bytes, available: bool) -> None:
    (_, alert), _ = discovery_messages("pump-7", _settings())
    entry = orjson.loads(alert)["availability"][0]
    assert entry["value_template"] == AVAILABILITY_TEMPLATE
    expected = entry["payload_available"] if available else entry["payload_not_available"]
    assert render(entry["value_template"], word) == expected


def test_without_score_messages_there_is_no_score_sensor() -> None:
    (_, alert), (score_topic, score) = discovery_messages("pump-7", _settings(publish_scores=False))
    assert alert
    assert score_topic.startswith("homeassistant/sensor/")
    assert score == b""  # removes a score sensor announced before


def test_removal_empties_both_config_topics() -> None:
    s = _settings()
    removal = removal_messages("line.2:b", s)
    assert [t for t, _ in removal] == [t for t, _ in discovery_messages("line.2:b", s)]
    assert all(payload == b"" for _, payload in removal)


# --------------------------------------------------------------------------- when


class _Sent:
    """Collects what the discovery hands over for publishing (the link's part is tested
    end to end)."""

    def __init__(self, ok: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.ok = ok
        self.wakes = 0

    def publish(self, topic: str, payload: bytes) -> bool:
        self.messages.append((topic, payload))
        return self.ok

    def wake(self) -> None:
        self.wakes += 1

    def take(self) -> list[tuple[str, bytes]]:
        out, self.messages = self.messages, []
        return out


def _discovery(sent: _Sent, **output: object) -> HomeAssistantDiscovery:
    return HomeAssistantDiscovery(_settings(**output), sent.publish, wake=sent.wake)


def test_a_device_is_announced_once_with_its_first_state() -> None:
    sent = _Sent()
    ha = _discovery(sent)
    ha.observe([_record("a", UNKNOWN, "warming_up"), _record("b", UNKNOWN, "no_state")])
    assert sent.take() == []  # no verdict yet: nothing to show
    ha.observe([_record("a", NORMAL)])
    assert sent.take() == discovery_messages("a", ha.settings)
    ha.observe([_record("a", ANOMALOUS), _record("a", SHELVED)])
    assert sent.take() == []
    assert ha.announced == ["a"]


def test_idle_and_evicted_devices_are_removed_others_kept() -> None:
    sent = _Sent()
    ha = _discovery(sent)
    ha.observe([_record(d, NORMAL) for d in ("a", "b", "c", "d")])
    sent.take()
    ha.observe([_record("a", UNKNOWN, "idle"), _record("b", UNKNOWN, "evicted")])
    assert sent.take() == removal_messages("a", ha.settings) + removal_messages("b", ha.settings)
    ha.observe([_record("c", UNKNOWN, "stopped"), _record("d", UNKNOWN, "model_changed")])
    assert sent.take() == []  # expected back: their entities stay
    # Back with a state: announced again (not counted as announced meanwhile).
    ha.observe([_record("a", NORMAL), _record("c", NORMAL)])
    assert sent.take() == discovery_messages("a", ha.settings) + discovery_messages("c", ha.settings)


def test_a_new_model_or_output_announces_every_device_again() -> None:
    sent = _Sent()
    ha = _discovery(sent)
    ha.observe([_record("a", NORMAL)])
    sent.take()
    assert not ha.take_reannounce()
    ha.set_model("m-1")  # the same model: nothing changes
    ha.set_output(OutputConfig())
    assert not ha.take_reannounce()
    ha.set_model("m-2")
    assert sent.wakes == 1
    assert ha.take_reannounce()
    assert not ha.take_reannounce()  # once
    ha.observe([_record("a", NORMAL)])  # the re-asserted state
    ((_, alert), _) = sent.take()
    assert orjson.loads(alert)["device"]["model"] == "m-2"
    ha.set_output(OutputConfig(publish_scores=False))
    assert ha.take_reannounce()
    ha.observe([_record("a", NORMAL)])
    assert sent.take()[1][1] == b""


def test_home_assistants_birth_message_asks_for_every_device_again() -> None:
    sent = _Sent()
    ha = _discovery(sent)
    ha.on_homeassistant_status("homeassistant/status", b"offline", False)
    assert not ha.take_reannounce()
    ha.on_homeassistant_status("homeassistant/status", b"online", False)
    assert sent.wakes == 1
    assert ha.take_reannounce()


def test_messages_the_link_does_not_take_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    sent = _Sent(ok=False)
    ha = _discovery(sent)
    with caplog.at_level(logging.WARNING, logger="anomalyd.homeassistant"):
        ha.observe([_record("a", NORMAL)])
    assert "could not publish 2 Home Assistant discovery message(s)" in caplog.text


def test_attach_wires_discovery_only_when_enabled() -> None:
    metrics = Metrics(CollectorRegistry())
    link = MqttLink(MqttConfig(), will=last_will(OutputConfig()), metrics=metrics)

    def attach(config: HomeAssistantConfig) -> tuple[HomeAssistantDiscovery | None, Publisher]:
        publisher = Publisher(link, OutputConfig(), metrics, feature_names=["x"], model_version="m-1")
        ha = attach_discovery(
            config, OutputConfig(), "m-1", link, publisher, wake=lambda: None, log_interval_s=1.0
        )
        return ha, publisher

    off, publisher = attach(HomeAssistantConfig())
    assert off is None
    assert publisher.discovery is None
    ha, publisher = attach(HomeAssistantConfig(enabled=True))
    assert ha is not None
    assert publisher.discovery is ha
    publisher.set_model(["x"], "m-2")  # the publisher passes the model on
    assert ha.settings.model_version == "m-2"
    assert ha.take_reannounce()


# --------------------------------------------------------------------------- configuration


def test_discovery_is_off_by_default() -> None:
    cfg = load_config()
    assert cfg.homeassistant == HomeAssistantConfig()
    assert not cfg.homeassistant.enabled
    assert (cfg.homeassistant.discovery_prefix, cfg.homeassistant.node_id) == ("homeassistant", "anomalyd")
    assert load_config(overrides={"homeassistant.status_topic": ""}).homeassistant.status_topic == ""


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("homeassistant.node_id", "a/b", "letters, digits"),
        ("homeassistant.node_id", "", "letters, digits"),
        ("homeassistant.discovery_prefix", "ha/#", "wildcards"),
        ("homeassistant.discovery_prefix", "ha/", "empty topic level"),
        ("homeassistant.discovery_prefix", "$SYS", "not starting with '$'"),
        ("homeassistant.status_topic", "ha/+", "wildcards"),
        ("homeassistant.enabled", "yes", "valid boolean"),
    ],
)
def test_bad_keys_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: value})
    assert info.value.key_path == key
    assert fragment in str(info.value)
