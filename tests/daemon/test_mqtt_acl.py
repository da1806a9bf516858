"""Broker refusals against a real Mosquitto: refused publishes (PUBACK/PUBREC reason codes),
the QoS 0 canary, refused subscriptions (SUBACK), extra subscriptions.

Two ways of making Mosquitto refuse: an ACL file (``MosquittoBroker(acl=...)``), which
refuses publishes but grants every subscription (it only withholds what may not be
read), and the dynamic security plugin (``dynsec_broker``), which refuses subscriptions
in the SUBACK and can be changed while the broker runs (``dynsec_command``; a change to a
role disconnects that role's clients, so they reconnect under the new rules). All test
clients are anonymous: the ACL's anonymous section, or dynsec's anonymous group, applies
to the link and the test's own clients alike.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from anomalyd import mqtt_publish, mqtt_subscribe
from anomalyd.broker import PrivateBroker
from anomalyd.config import MqttConfig, OutputConfig, load_config
from anomalyd.detector import Decision
from anomalyd.errors import BrokerError
from anomalyd.intake import IntakeQueue
from anomalyd.metrics import Metrics
from anomalyd.mqtt import MqttLink, Will
from anomalyd.publisher import Publisher, last_will
from anomalyd.sdnotify import Notifier
from anomalyd.service import Service
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for

TELEMETRY = "sensors/+/telemetry"
FEATURES = ["temperature", "pressure", "vibration"]
_DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"


#: Where Mosquitto 2's packages put the plugin: Debian and Ubuntu (multiarch), Fedora
#: (lib64), Homebrew, builds from source.
_DYNSEC_PATTERNS = (
    f"/usr/lib/*/{_DYNSEC_PLUGIN}",
    f"/usr/lib/{_DYNSEC_PLUGIN}",
    f"/usr/lib64/{_DYNSEC_PLUGIN}",
    f"/opt/homebrew/lib/{_DYNSEC_PLUGIN}",
    f"/usr/local/lib/{_DYNSEC_PLUGIN}",
)


def dynsec_plugin() -> str:
    """Path of Mosquitto's dynamic security plugin. It ships with Mosquitto 2 (Debian's
    ``mosquitto`` package, which scripts/bootstrap.sh installs, has it), so a missing one
    fails the test: a skipped test would pass for one that never ran."""
    for pattern in _DYNSEC_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    pytest.fail(
        f"Mosquitto's dynamic security plugin ({_DYNSEC_PLUGIN}) is not installed; looked for "
        f"{', '.join(_DYNSEC_PATTERNS)}. It ships with Mosquitto 2: install the distribution's "
        "package (Debian/Ubuntu: `sudo apt-get install mosquitto`, as scripts/bootstrap.sh does; "
        "Fedora: `sudo dnf install mosquitto`; macOS: `brew install mosquitto`); a Mosquitto "
        "1.x or one built without plugins lacks it.",
        pytrace=False,
    )


def dynsec_broker(workdir: Path, acls: list[tuple[str, str]]) -> PrivateBroker:
    """A started Mosquitto whose anonymous clients get exactly ``acls``: (acltype, topic)
    pairs allowed, everything else sent or subscribed refused (received: allowed). The
    role, "anomalyd", may also be changed while the broker runs (``dynsec_command``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    control = [
        ("publishClientSend", "$CONTROL/dynamic-security/#"),
        ("subscribePattern", "$CONTROL/dynamic-security/#"),
    ]
    config = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "anomalyd"}]}],
        "roles": [
            {
                "rolename": "anomalyd",
                "acls": [{"acltype": t, "topic": topic, "allow": True} for t, topic in [*acls, *control]],
            }
        ],
        "anonymousGroup": "anonymous",
    }
    path = workdir / "dynamic-security.json"
    path.write_text(json.dumps(config))
    broker = PrivateBroker(
        workdir, extra_config=[f"plugin {dynsec_plugin()}", f"plugin_opt_config_file {path}"]
    )
    broker.start()
    return broker


def dynsec_command(broker: PrivateBroker, command: str, **args: object) -> None:
    """Send one dynamic-security command (what ``mosquitto_ctrl dynsec`` sends) and wait for
    the broker's PUBACK. Not for its answer: a change to the role disconnects this
    anonymous client too (``mosquitto_ctrl`` would wait for its timeout)."""
    body = json.dumps({"commands": [{"command": command, **args}]}).encode()
    publish_many(broker, [("$CONTROL/dynamic-security/v1", body)])  # type: ignore[arg-type]


@pytest.fixture
def dynsec(tmp_path: Path) -> Iterator[Callable[[list[tuple[str, str]]], PrivateBroker]]:
    made: list[PrivateBroker] = []

    def make(acls: list[tuple[str, str]]) -> PrivateBroker:
        made.append(dynsec_broker(tmp_path / f"dynsec{len(made)}", acls))
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.close(2.0)


def _cfg(broker: PrivateBroker, **kw: Any) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3, **kw)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _decision(device: str, ts: float = 1_767_225_600.5) -> Decision:
    return Decision(
        device=device,
        ts=ts,
        score=0.5,
        smoothed=0.5,
        threshold=2.0,
        anomaly=False,
        alert=False,
        alert_changed=False,
        contributions=np.array([0.25, 0.125, 0.125], dtype=np.float32),
        padded=False,
    )


# --------------------------------------------------------------------------- publishes

# Anonymous clients (the link and the test's subscriber) may read everything under
# anomaly/ and write only the status and anomaly/ok/...
PUBLISH_ACL = """\
topic read anomaly/#
topic write anomaly/status
topic write anomaly/ok/#
"""


def test_refused_publishes_are_counted_not_authorized_and_accepted_ones_published(
    broker_factory: Callable[..., MosquittoBroker],
    links: list[MqttLink],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = broker_factory(acl=PUBLISH_ACL)
    link = MqttLink(_cfg(broker), metrics=Metrics(registry))
    links.append(link)
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/#"])
    try:
        with caplog.at_level(logging.WARNING, logger="anomalyd.mqtt"):
            for qos in (1, 2):  # PUBACK and PUBREC carry the verdict
                assert link.publish("anomaly/pump-1/score", b"{}", qos=qos, kind="score")
                assert link.publish("anomaly/ok/pump-1", b"{}", qos=qos, kind="alert")
            wait_for(
                lambda: (
                    _value(registry, "anomalyd_publish_failures_total", kind="score", reason="not_authorized")
                    == 2
                    and _value(registry, "anomalyd_published_total", kind="alert") == 2
                ),
                10,
                what="both acknowledgements of each kind",
            )
            assert not link.publish_and_wait("anomaly/pump-2/score", b"{}", qos=1, timeout=5, kind="score")
        sub.wait_until(lambda ms: len(ms) == 2, 10, "the two accepted messages")
        time.sleep(0.2)  # a refused message that got through anyway would show up by now
        assert [m.topic for m in sub.snapshot()] == ["anomaly/ok/pump-1"] * 2
    finally:
        sub.close()
    assert _value(registry, "anomalyd_publish_failures_total", kind="score", reason="not_authorized") == 3
    assert _value(registry, "anomalyd_published_total", kind="score") == 0
    assert _value(registry, "anomalyd_publish_failures_total", kind="alert", reason="not_authorized") == 0
    assert _value(registry, "anomalyd_publish_denied", kind="score") == 1
    assert _value(registry, "anomalyd_publish_denied", kind="alert") == 0
    assert link.denied("score")
    assert not link.denied("alert")
    assert link.degraded
    refusals = [r.getMessage() for r in caplog.records if "refused a score message" in r.getMessage()]
    assert refusals, caplog.text
    assert "'anomaly/pump-1/score'" in refusals[0]
    assert "Not authorized (0x87)" in refusals[0]
    # Rate-limited per kind: three refusals in well under log_interval_s, one line.
    assert len(refusals) == 1


def test_mqtt_311_cannot_see_refusals(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], registry: CollectorRegistry
) -> None:
    """Why detection needs MQTT 5: Mosquitto acknowledges a refused 3.1.1 publish as a success."""
    broker = broker_factory(acl=PUBLISH_ACL)
    link = MqttLink(_cfg(broker, protocol="3.1.1"), metrics=Metrics(registry))
    links.append(link)
    link.start()
    assert link.wait_connected(10)
    assert not link.canary_due("score")  # a 3.1.1 acknowledgement has no verdict to give
    assert link.publish_and_wait("anomaly/pump-1/score", b"{}", qos=1, timeout=5, kind="score")
    assert _value(registry, "anomalyd_published_total", kind="score") == 1
    assert not link.denied("score")


def test_canary_one_message_per_interval_goes_at_qos1(
    broker: MosquittoBroker, links: list[MqttLink], registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    link = MqttLink(_cfg(broker), metrics=metrics)
    links.append(link)
    pub = Publisher(
        link, OutputConfig(score_interval_s=0.0), metrics, feature_names=FEATURES, model_version="m"
    )
    link.start()
    assert link.wait_connected(10)
    sub = Subscriber(broker, ["anomaly/+/score"])  # QoS 1: what arrives at QoS 1 was sent at QoS 1
    try:
        pub.publish_decisions([_decision(d) for d in ("a", "b", "c")])
        pub.publish_decisions([_decision(d) for d in ("d", "e")])  # within the interval: no canary
        sub.wait_until(lambda ms: len(ms) == 5, 10, "five scores")
        got = [(m.topic.split("/")[1], m.qos) for m in sub.snapshot()]
    finally:
        sub.close()
    assert sorted(got) == [("a", 1), ("b", 0), ("c", 0), ("d", 0), ("e", 0)]
    wait_for(lambda: _value(registry, "anomalyd_published_total", kind="score") == 5, 10, what="5 published")
    assert _value(registry, "anomalyd_publish_denied", kind="score") == 0


def test_while_the_canary_is_refused_qos0_scores_count_as_not_authorized_and_status_is_degraded(
    broker_factory: Callable[..., MosquittoBroker],
    links: list[MqttLink],
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short interval, so that the check after the ACL is fixed comes soon.
    monkeypatch.setattr(mqtt_publish, "CANARY_INTERVAL_S", 0.5)
    broker = broker_factory(acl=PUBLISH_ACL)
    metrics = Metrics(registry)
    link = MqttLink(_cfg(broker), metrics=metrics, will=last_will(OutputConfig()))
    links.append(link)
    pub = Publisher(
        link, OutputConfig(score_interval_s=0.0), metrics, feature_names=FEATURES, model_version="m"
    )
    link.add_connect_listener(pub.online)
    link.add_health_listener(pub.online)
    status = Subscriber(broker, ["anomaly/status"])
    try:
        link.start()
        assert link.wait_connected(10)
        status.wait_until(lambda ms: bool(ms) and ms[-1].payload == b"online", 10, "online")

        def not_authorized() -> float:
            return _value(registry, "anomalyd_publish_failures_total", kind="score", reason="not_authorized")

        # One pass: "a" is the canary (QoS 1), "b" and "c" go at QoS 0 before its verdict
        # is in, and are counted by it.
        pub.publish_decisions([_decision(d) for d in ("a", "b", "c")])
        wait_for(lambda: not_authorized() == 3, 10, what="3 scores not authorized")
        assert link.denied("score")
        assert _value(registry, "anomalyd_published_total", kind="score") == 0
        # Later passes, counted by the newest verdict (or by the next canary's, if one is due).
        pub.publish_decisions([_decision(d) for d in ("d", "e")])
        wait_for(lambda: not_authorized() == 5, 10, what="5 scores not authorized")
        assert _value(registry, "anomalyd_published_total", kind="score") == 0
        assert _value(registry, "anomalyd_publish_denied", kind="score") == 1
        status.wait_until(lambda ms: ms[-1].payload == b"degraded", 10, "degraded")
        # Overload does not change the word while degraded (it wins).
        n = len(status.snapshot())
        pub.set_overloaded(True)

        # Fix the ACL; Mosquitto rereads its ACL file on SIGHUP.
        (broker.workdir / "acl").write_text(PUBLISH_ACL + "topic write anomaly/+/score\n")
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)

        def scores_accepted() -> bool:
            pub.publish_decisions([_decision("e")])  # each pass may carry the next canary
            time.sleep(0.05)
            return not link.denied("score")

        wait_for(scores_accepted, 15, interval=0.1, what="a canary accepted after the ACL fix")
        status.wait_until(lambda ms: ms[-1].payload == b"overloaded", 10, "overloaded, no longer degraded")
        payloads = [m.payload for m in status.snapshot()[n:]]
    finally:
        status.close()
    assert payloads == [b"overloaded"]  # set_overloaded(True) published nothing while degraded
    assert _value(registry, "anomalyd_publish_denied", kind="score") == 0
    before = _value(registry, "anomalyd_published_total", kind="score")
    pub.publish_decisions([_decision(d) for d in ("f", "g")])
    wait_for(lambda: _value(registry, "anomalyd_published_total", kind="score") == before + 2, 10)


def test_publishing_while_disconnected_counts_not_connected(
    broker: MosquittoBroker, links: list[MqttLink], registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    link = MqttLink(_cfg(broker), metrics=metrics)  # never started
    links.append(link)
    pub = Publisher(
        link, OutputConfig(score_interval_s=0.0), metrics, feature_names=FEATURES, model_version="m"
    )
    pub.publish_decisions([_decision("a"), _decision("b")])
    assert not pub.stopped(timeout=0.1)
    assert _value(registry, "anomalyd_publish_failures_total", kind="score", reason="not_connected") == 2
    assert _value(registry, "anomalyd_publish_failures_total", kind="status", reason="not_connected") == 1
    # Every (kind, reason) series exists from the start.
    for kind in ("score", "batch", "alert", "status"):
        for reason in ("not_connected", "queue_full", "not_authorized", "refused"):
            assert (
                registry.get_sample_value("anomalyd_publish_failures_total", {"kind": kind, "reason": reason})
                is not None
            )


# --------------------------------------------------------------------------- extra subscriptions


def test_extra_subscription_gets_retained_messages_but_not_our_own_nor_telemetry(
    broker: MosquittoBroker, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    publish_many(broker, [("anomaly/a/alert", b"retained-a")], retain=True)
    got: list[tuple[str, bytes, bool]] = []
    queue = IntakeQueue(100, 2**20)
    link = MqttLink(_cfg(broker), queue=queue)
    links.append(link)
    link.add_subscription("anomaly/+/alert", lambda t, p, r: got.append((t, p, r)))

    def broken(_topic: str, _payload: bytes, _retain: bool) -> None:
        raise RuntimeError("handler bug")

    link.add_subscription("anomalyd/cmd/+/+", broken)
    link.start()
    assert link.wait_connected(10)
    wait_for(lambda: got, 10, what="the retained alert")
    assert got == [("anomaly/a/alert", b"retained-a", True)]

    sub = Subscriber(broker, ["anomaly/+/alert"])
    try:
        assert link.publish("anomaly/b/alert", b"ours", qos=1, kind="alert")
        sub.wait_until(
            lambda ms: any(m.topic == "anomaly/b/alert" for m in ms), 10, "our alert at the broker"
        )
    finally:
        sub.close()
    with caplog.at_level(logging.ERROR, logger="anomalyd.mqtt"):
        publish_many(broker, [("anomalyd/cmd/x/shelve", b"{}")])  # the broken handler
        publish_many(broker, [("sensors/x/telemetry", b"{}"), ("anomaly/c/alert", b"theirs")])
        wait_for(lambda: len(got) == 2, 10, what="the other client's alert")
    # No Local: our own publication on a filter we subscribe to did not come back.
    assert got[1] == ("anomaly/c/alert", b"theirs", False)
    queue.wait(1.0)
    assert [m.topic for m in queue.drain(100)] == ["sensors/x/telemetry"]  # telemetry only
    assert "handler of subscription 'anomalyd/cmd/+/+' failed" in caplog.text
    assert "RuntimeError: handler bug" in caplog.text
    assert link.alive
    assert link.connected


def test_add_subscription_checks_its_arguments(broker: MosquittoBroker, links: list[MqttLink]) -> None:
    link = MqttLink(_cfg(broker), queue=IntakeQueue(10, 2**20))
    links.append(link)
    for bad in ("", "a/#/b", "a/b+", "a/#x"):
        with pytest.raises(ValueError, match="topic filter"):
            link.add_subscription(bad, lambda *_: None)
    with pytest.raises(ValueError, match="qos"):
        link.add_subscription("a/b", lambda *_: None, qos=3)
    with pytest.raises(ValueError, match="already subscribed"):
        link.add_subscription(TELEMETRY, lambda *_: None)
    link.start()
    with pytest.raises(RuntimeError, match="before start"):
        link.add_subscription("a/b", lambda *_: None)


# --------------------------------------------------------------------------- refused subscriptions


def test_refused_extra_subscription_is_counted_and_leaves_telemetry_and_readiness_alone(
    dynsec: Callable[[list[tuple[str, str]]], PrivateBroker],
    links: list[MqttLink],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = dynsec([("subscribePattern", TELEMETRY), ("publishClientSend", "sensors/#")])
    queue = IntakeQueue(100, 2**20)
    link = MqttLink(_cfg(broker), queue=queue, metrics=Metrics(registry))
    links.append(link)
    link.add_subscription("anomaly/+/alert", lambda *_: None)
    with caplog.at_level(logging.ERROR, logger="anomalyd.mqtt"):
        link.start()
        assert link.wait_connected(10)  # no BrokerError: only the extra one was refused
    assert _value(registry, "anomalyd_mqtt_subscription_refusals_total", topic_filter="anomaly/+/alert") == 1
    assert _value(registry, "anomalyd_mqtt_subscription_refusals_total", topic_filter=TELEMETRY) == 0
    assert _value(registry, "anomalyd_mqtt_subscription_denied") == 0
    assert not link.degraded
    assert not link.subscription_denied
    assert "refused the subscription to 'anomaly/+/alert': Not authorized" in caplog.text
    publish_many(broker, [("sensors/x/telemetry", b"{}")])  # type: ignore[arg-type]
    queue.wait(5.0)
    assert [m.topic for m in queue.drain(10)] == ["sensors/x/telemetry"]


def test_telemetry_subscription_refused_at_start_is_fatal_and_leaves_the_last_will(
    dynsec: Callable[[list[tuple[str, str]]], PrivateBroker], links: list[MqttLink]
) -> None:
    broker = dynsec([("publishClientSend", "anomaly/#"), ("subscribePattern", "anomaly/#")])
    link = MqttLink(_cfg(broker), queue=IntakeQueue(10, 2**20), will=Will("anomaly/status", b"offline"))
    links.append(link)
    link.start()
    with pytest.raises(BrokerError) as info:
        link.wait_connected(10)
    message = str(info.value)
    assert "refused the subscription to 'sensors/+/telemetry'" in message
    assert "Not authorized" in message
    assert "ACL" in message
    assert info.value.exit_code == 76
    wait_for(lambda: not link.alive, 5, what="the network thread to end")
    # Dropped without a DISCONNECT: the broker published our last will.
    late = Subscriber(broker, ["anomaly/status"])  # type: ignore[arg-type]
    try:
        late.wait_until(lambda ms: [m.payload for m in ms] == [b"offline"], 10, "the retained will")
    finally:
        late.close()


def test_telemetry_subscription_refused_after_serving_takes_readiness_until_granted(
    dynsec: Callable[[list[tuple[str, str]]], PrivateBroker],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service end to end, in-process: a reconnect to a broker whose ACL no longer
    grants the telemetry subscription, then a broker that grants it again."""
    monkeypatch.setattr(mqtt_subscribe, "SUBSCRIBE_RETRY_S", 0.2)
    broker = dynsec(
        [
            ("subscribePattern", TELEMETRY),
            ("publishClientSend", "anomaly/#"),
            ("subscribePattern", "anomaly/#"),
            ("subscribePattern", "anomalyd/cmd/#"),
        ]
    )
    cfg = load_config(
        None,
        {
            "mqtt.host": broker.host,
            "mqtt.port": broker.port,
            "mqtt.reconnect_min_s": 0.05,
            "mqtt.reconnect_max_s": 0.3,
            "model.path": str(tiny_model(window_length=4)),
            "metrics.enabled": False,
        },
    )
    registry = CollectorRegistry()
    svc = Service(cfg, registry=registry, notifier=Notifier(""))
    status = Subscriber(broker, ["anomaly/status"])  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.INFO, logger="anomalyd.mqtt"):
            assert svc.start()
            assert _value(registry, "anomalyd_ready") == 1
            status.wait_until(lambda ms: bool(ms) and ms[-1].payload == b"online", 10, "online")

            # Revoking the role's ACL disconnects its clients; the daemon reconnects.
            dynsec_command(
                broker, "removeRoleACL", rolename="anomalyd", acltype="subscribePattern", topic=TELEMETRY
            )
            wait_for(lambda: _value(registry, "anomalyd_ready") == 0, 10, what="ready 0")
            assert _value(registry, "anomalyd_mqtt_subscription_denied") == 1
            status.wait_until(lambda ms: ms[-1].payload == b"degraded", 10, "degraded")
            # Asked again every SUBSCRIBE_RETRY_S on the same connection: more refusals, no reconnect.
            reconnects = _value(registry, "anomalyd_mqtt_reconnects_total")
            wait_for(
                lambda: (
                    _value(registry, "anomalyd_mqtt_subscription_refusals_total", topic_filter=TELEMETRY) >= 2
                ),
                10,
                what="retries",
            )
            assert _value(registry, "anomalyd_mqtt_reconnects_total") == reconnects
            assert svc.ready.is_set()  # started; only the gauge follows the subscription

            dynsec_command(
                broker,
                "addRoleACL",
                rolename="anomalyd",
                acltype="subscribePattern",
                topic=TELEMETRY,
                allow=True,
            )
            wait_for(lambda: _value(registry, "anomalyd_ready") == 1, 10, what="ready again")
            assert _value(registry, "anomalyd_mqtt_subscription_denied") == 0
            status.wait_until(lambda ms: ms[-1].payload == b"online", 10, "online again")
    finally:
        status.close()
        assert svc.shutdown() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        re.search(r"refused the subscription to 'sensors/\+/telemetry': Not authorized.*not ready", e)
        for e in errors
    ), errors
    assert "granted the subscription to 'sensors/+/telemetry' again" in caplog.text


def test_documented_acl_file_lets_the_daemon_do_its_work(
    broker_factory: Callable[..., MosquittoBroker], links: list[MqttLink], registry: CollectorRegistry
) -> None:
    """The ACL in docs/operations.md ("Broker permissions (ACL)") is enough: no refusal."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = doc.split("### Broker permissions (ACL)", 1)[1]
    acl = re.search(r"```\n(user anomalyd\n.*?)```", section, re.S)
    assert acl is not None, "no ACL file example in the section"
    broker = broker_factory(users={"anomalyd": "pw"}, acl=acl.group(1))
    link = MqttLink(
        _cfg(broker, username="anomalyd"),
        password="pw",
        queue=IntakeQueue(10, 2**20),
        metrics=Metrics(registry),
    )
    links.append(link)
    link.add_subscription("anomaly/+/alert", lambda *_: None)
    link.add_subscription("anomalyd/cmd/+/+", lambda *_: None)
    link.start()
    assert link.wait_connected(10)
    for kind, topic in (
        ("score", "anomaly/p/score"),
        ("alert", "anomaly/p/alert"),
        ("status", "anomaly/status"),
        ("batch", "anomaly/scores"),
    ):
        assert link.publish_and_wait(topic, b"{}", qos=1, timeout=5, kind=kind), kind
    assert not link.degraded
