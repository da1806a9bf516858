"""``anomalyd.broker``: the private Mosquitto the demo, the benchmark and the tests start."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalyd import broker as broker_module
from anomalyd.broker import PrivateBroker, find_mosquitto, port_open
from anomalyd.errors import BrokerError
from tests.broker import publish_many


def test_missing_mosquitto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(tmp_path / "sbin"),))
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        find_mosquitto()
    with pytest.raises(BrokerError, match="not installed"):
        PrivateBroker(tmp_path / "b")


def test_config_restart_on_the_same_port_and_log(tmp_path: Path) -> None:
    b = PrivateBroker(tmp_path / "b", max_queued_messages=1234, extra_config=["max_inflight_messages 7"])
    conf = b.config_path.read_text()
    assert f"listener {b.port} 127.0.0.1" in conf
    assert "max_queued_messages 1234" in conf
    assert "persistence false" in conf
    assert conf.rstrip().endswith("max_inflight_messages 7")
    try:
        b.start()
        assert b.running
        assert b.pid is not None
        publish_many(b, [("t/x", b"1")])
        first_pid = b.pid
        b.restart()
        assert b.running
        assert b.pid != first_pid
        assert port_open(b.port)
        b.kill()
        assert not b.running
        assert b.pid is None
        assert not port_open(b.port)
    finally:
        b.close()
    assert "mosquitto version" in b.log_text()
    assert (tmp_path / "b").is_dir()  # a given directory is the caller's: close() leaves it


def test_a_broker_that_cannot_listen_fails_with_its_log(tmp_path: Path) -> None:
    with PrivateBroker(tmp_path / "a") as a:
        taken = PrivateBroker(tmp_path / "b", port=a.port)
        try:
            with pytest.raises(BrokerError, match="could not start mosquitto"):
                taken.start(timeout=5)
            assert not taken.running
        finally:
            taken.close()
