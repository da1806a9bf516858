"""End to end: the daemon (a real subprocess) against a Mosquitto whose ACL refuses it part
of what it needs. Refused score publishes show in /metrics, the retained status and the
log; a refused telemetry subscription ends the start with exit code 76.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from tests.broker import MosquittoBroker, Subscriber, publish_many
from tests.daemon.test_mqtt_acl import dynsec_broker
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.slow

WINDOW = 4
FEATURES = ("temperature", "pressure", "vibration")
# The daemon's user may read telemetry and write its status, not its scores or alerts;
# the test's own user may do anything.
ACL = """\
user tester
topic readwrite #

user anomalyd
topic read sensors/+/telemetry
topic write anomaly/status
"""
USERS = {"anomalyd": "daemon-secret", "tester": "tester-secret"}


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    made: list[DaemonProcess] = []
    yield made
    for d in made:
        d.close()


def test_refused_score_publishes_show_in_metrics_status_and_log(
    tmp_path: Path,
    broker_factory: Callable[..., MosquittoBroker],
    daemons: list[DaemonProcess],
    tiny_model: Callable[..., Path],
) -> None:
    broker = broker_factory(users=USERS, acl=ACL)
    password = tmp_path / "mqtt_password"
    password.write_text(USERS["anomalyd"] + "\n")
    d = DaemonProcess(
        tmp_path / "daemon",
        broker,
        tiny_model(window_length=WINDOW),
        sections={"mqtt": {"username": "anomalyd", "password_file": str(password)}},
    )
    daemons.append(d)
    d.wait_ready()
    status = Subscriber(broker, ["anomaly/status"], username="tester", password=USERS["tester"])
    try:
        status.wait_until(lambda ms: bool(ms) and ms[-1].payload == b"online", 10, "online")
        t0 = time.time() - 20
        publish_many(
            broker,
            [
                (f"sensors/{device}/telemetry", orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, 0.1)}))
                for device in ("m1", "m2")
                for i in range(WINDOW + 2)
            ],
            username="tester",
            password=USERS["tester"],
        )
        d.wait_metric("anomalyd_publish_denied", lambda v: v == 1.0, 15, kind="score")
        status.wait_until(lambda ms: ms[-1].payload == b"degraded", 10, "degraded")
    finally:
        status.close()
    metrics = d.scrape()

    def m(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert m("anomalyd_windows_scored_total") > 0
    assert m("anomalyd_publish_failures_total", kind="score", reason="not_authorized") >= 1
    assert m("anomalyd_published_total", kind="score") == 0
    assert m("anomalyd_publish_denied", kind="status") == 0
    assert m("anomalyd_ready") == 1  # refused output is degraded, not unready
    log = d.log()
    assert "refused a score message on 'anomaly/m" in log
    assert "Not authorized (0x87)" in log
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_refused_telemetry_subscription_at_start_exits_76_naming_the_topic(
    tmp_path: Path, daemons: list[DaemonProcess], tiny_model: Callable[..., Path]
) -> None:
    # Mosquitto's ACL file grants every subscription; its dynamic security plugin refuses.
    broker = dynsec_broker(tmp_path / "broker", [("publishClientSend", "anomaly/#")])
    try:
        d = DaemonProcess(tmp_path / "daemon", broker, tiny_model(window_length=WINDOW))  # type: ignore[arg-type]
        daemons.append(d)
        assert d.wait(30) == 76
    finally:
        broker.close()
    log = d.log()
    assert "refused the subscription to 'sensors/+/telemetry': Not authorized" in log
    assert "ACL" in log
    assert "READY=1" not in d.notify.lines()
