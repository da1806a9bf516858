"""Configuration: defaults, TOML loading, overrides, error key paths, secrets, example file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from anomalyd.config import (
    Config,
    MqttConfig,
    config_errors,
    load_config,
    read_secret,
)
from anomalyd.config_example import render_example_config
from anomalyd.errors import ConfigError
from anomalyd.model import DEFAULT_MODEL_PATH

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "anomalyd.toml"


def write(tmp_path: Path, text: str, name: str = "anomalyd.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def keys(errors: list[ConfigError]) -> list[str | None]:
    return [e.key_path for e in errors]


# --------------------------------------------------------------------------- defaults and loading


def test_no_file_gives_the_embedded_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.protocol) == ("127.0.0.1", 1883, "5")
    assert cfg.model.path == DEFAULT_MODEL_PATH
    assert cfg.metrics.port == 9847
    assert cfg.mqtt.tls is None


def test_file_values_and_overrides_merge(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '[mqtt]\nhost = "broker.plant"\nport = 8883\n[stream]\nhop = 5\n[detector]\nthreshold = 2.5\n',
    )
    cfg = load_config(p, {"mqtt.port": 1884, "metrics.port": 0, "batching.max_batch": 8})
    assert cfg.mqtt.host == "broker.plant"
    assert cfg.mqtt.port == 1884  # override beats file
    assert cfg.stream.hop == 5
    assert cfg.detector.threshold == 2.5
    assert cfg.metrics.port == 0
    assert cfg.batching.max_batch == 8


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "pw").write_text("s3cret\n")
    p = write(sub, '[model]\npath = "models/m.onnx"\n[mqtt]\npassword_file = "pw"\n')
    cfg = load_config(p)
    assert cfg.model.path == sub.resolve() / "models" / "m.onnx"
    assert cfg.mqtt.password_file == sub.resolve() / "pw"


def test_relative_override_paths_stay_as_given(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), {"model.path": "x.onnx"})
    assert cfg.model.path == Path("x.onnx")


def test_protocol_accepts_the_number_5() -> None:
    assert load_config(overrides={"mqtt.protocol": 5}).mqtt.protocol == "5"
    assert load_config(overrides={"mqtt.protocol": "3.1.1"}).mqtt.protocol == "3.1.1"


def test_client_id_default_is_derived() -> None:
    assert re.fullmatch(r"anomalyd-.+-\d+", MqttConfig().effective_client_id())
    assert MqttConfig(client_id="x").effective_client_id() == "x"


def test_warmup_sizes() -> None:
    cfg = load_config(overrides={"batching.max_batch": 4})
    assert cfg.batching.warmup_sizes() == [1, 2, 3, 4]
    cfg = load_config(overrides={"batching.warmup_batch_sizes": [8, 1, 8]})
    assert cfg.batching.warmup_sizes() == [1, 8]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"mqtt.port": 70000}, "mqtt.port", "less than or equal to 65535"),
        ({"mqtt.port": "1883"}, "mqtt.port", "valid integer"),
        ({"mqtt.port": True}, "mqtt.port", "valid integer"),
        ({"metrics.enabled": "yes"}, "metrics.enabled", "valid boolean"),
        ({"mqtt.protocol": "4"}, "mqtt.protocol", "'5' or '3.1.1'"),
        ({"mqtt.qos_in": 3}, "mqtt.qos_in", "0, 1 or 2"),
        ({"mqtt.portt": 1}, "mqtt.portt", "did you mean 'port'"),
        ({"mqtt.topic_in": "sensors/telemetry"}, "mqtt.topic_in", "exactly one '{device}'"),
        ({"mqtt.topic_in": "s/{device}/{device}"}, "mqtt.topic_in", "exactly one '{device}'"),
        ({"mqtt.topic_in": "s/dev-{device}/t"}, "mqtt.topic_in", "whole topic level"),
        ({"mqtt.topic_in": "s/{device}/#"}, "mqtt.topic_in", "wildcards"),
        ({"mqtt.topic_in": "s/{device}/{x}"}, "mqtt.topic_in", "no placeholder other"),
        ({"output.status_topic": "a/{device}"}, "output.status_topic", "no '{device}'"),
        ({"mqtt.reconnect_min_s": 5.0, "mqtt.reconnect_max_s": 1.0}, "mqtt.reconnect_max_s", ">="),
        ({"mqtt.reconnect_min_s": 0}, "mqtt.reconnect_min_s", "greater than 0"),
        ({"stream.device_id_pattern": "(["}, "stream.device_id_pattern", "does not compile"),
        ({"stream.hop": 0}, "stream.hop", "greater than or equal to 1"),
        ({"batching.warmup_batch_sizes": [1, 100]}, "batching.warmup_batch_sizes", "between 1 and"),
        ({"batching.warmup_batch_sizes": [1, "x"]}, "batching.warmup_batch_sizes[1]", "valid integer"),
        ({"detector.threshold": float("nan")}, "detector.threshold", "finite"),
        ({"detector.ewma_alpha": 0}, "detector.ewma_alpha", "greater than 0"),
        ({"logging.level": "TRACE"}, "logging.level", "'DEBUG'"),
        ({"mqtt.password_credential": "../etc/shadow"}, "mqtt.password_credential", "no '/'"),
        ({"mqtt.tls.ca_file": "/nonexistent/ca.pem"}, "mqtt.tls.ca_file", "existing readable file"),
        ({"mqtt.password_file": "/nonexistent/pw"}, "mqtt.password_file", "existing readable file"),
    ],
)
def test_errors_name_the_key_and_what_was_expected(
    overrides: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert info.value.key_path == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{key}: ")
    assert info.value.exit_code == 78


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    errors = config_errors(write(tmp_path, "[mqttt]\nhost = 'x'\n"))
    assert keys(errors) == ["mqttt"]
    assert "unknown section" in str(errors[0])
    assert "did you mean 'mqtt'" in str(errors[0])


def test_password_in_toml_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    p = write(tmp_path, '[mqtt]\nusername = "u"\npassword = "hunter2"\n[mqtt.tls]\nkey_passphrase = "pp42"\n')
    errors = config_errors(p)
    assert keys(errors) == ["mqtt.password", "mqtt.tls.key_passphrase"]
    assert "password_file" in str(errors[0])
    assert "password_credential" in str(errors[0])
    assert "key_passphrase_file" in str(errors[1])
    assert all("hunter2" not in str(e) and "pp42" not in str(e) for e in errors)
    with pytest.raises(ConfigError, match=r"mqtt\.password"):
        load_config(p)


def test_password_sources_are_exclusive(tmp_path: Path) -> None:
    pw = write(tmp_path, "x", "pw")
    errors = config_errors(None, {"mqtt.password_file": str(pw), "mqtt.password_credential": "mqtt"})
    assert keys(errors) == ["mqtt.password_credential"]
    assert "not both" in str(errors[0])


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    cert = write(tmp_path, "c", "c.pem")
    errors = config_errors(None, {"mqtt.tls.cert_file": str(cert)})
    assert keys(errors) == ["mqtt.tls.key_file"]
    key = write(tmp_path, "k", "k.pem")
    cfg = load_config(overrides={"mqtt.tls.cert_file": str(cert), "mqtt.tls.key_file": str(key)})
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.key_file == key


def test_config_errors_returns_all_and_load_config_counts_them(tmp_path: Path) -> None:
    p = write(tmp_path, "[mqtt]\nport = 0\nqos_in = 7\n[stream]\nhop = -1\n[bogus]\n")
    errors = config_errors(p)
    assert sorted(keys(errors), key=str) == ["bogus", "mqtt.port", "mqtt.qos_in", "stream.hop"]
    with pytest.raises(ConfigError, match=r"and 3 more"):
        load_config(p)


def test_valid_file_has_no_errors(tmp_path: Path) -> None:
    assert config_errors(write(tmp_path, "[mqtt]\nport = 1884\n")) == []


def test_file_level_errors(tmp_path: Path) -> None:
    missing = config_errors(tmp_path / "nope.toml")
    assert len(missing) == 1
    assert missing[0].key_path is None
    assert "cannot read" in str(missing[0])
    bad = config_errors(write(tmp_path, "[mqtt\nport = 1"))
    assert len(bad) == 1
    assert "not valid TOML" in str(bad[0])
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe[mqtt]")
    assert "not UTF-8" in str(config_errors(binary)[0])


def test_override_through_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"mqtt.host.x": 1})
    assert info.value.key_path == "mqtt.host"


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(ValueError, match="frozen"):
        cfg.mqtt.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- secrets


def test_read_secret_from_file(tmp_path: Path) -> None:
    p = write(tmp_path, "s3cret\nignored second line\n", "pw")
    assert read_secret(p, None, "mqtt.password") == "s3cret"
    assert read_secret(None, None, "mqtt.password") is None


def test_read_secret_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "from-systemd", "mqtt-password")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(None, "mqtt-password", "mqtt.password") == "from-systemd"


def test_read_secret_failures_name_the_key_but_not_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY") as info:
        read_secret(None, "mqtt-password", "mqtt.password")
    assert info.value.key_path == "mqtt.password"
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(tmp_path / "missing", None, "mqtt.password")
    with pytest.raises(ConfigError, match="empty"):
        read_secret(write(tmp_path, "", "empty"), None, "mqtt.password")


def test_secrets_never_appear_in_the_config_repr(tmp_path: Path) -> None:
    pw = write(tmp_path, "hunter2\n", "pw")
    cfg = load_config(overrides={"mqtt.password_file": str(pw), "mqtt.username": "u"})
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(cfg.model_dump())


# --------------------------------------------------------------------------- the example file


def test_example_file_is_generated_from_the_models() -> None:
    assert EXAMPLE.read_text() == render_example_config(), (
        "systemd/anomalyd.toml is stale: run `python -m anomalyd.config_example > systemd/anomalyd.toml`"
    )


def test_example_file_loads_to_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


def _all_fields(model: type, prefix: str) -> set[str]:
    from pydantic import BaseModel

    out: set[str] = set()
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        sub = next(
            (
                c
                for c in (info.annotation, *getattr(info.annotation, "__args__", ()))
                if isinstance(c, type) and issubclass(c, BaseModel)
            ),
            None,
        )
        out |= _all_fields(sub, f"{prefix}{name}.") if sub is not None else {f"{prefix}{name}"}
    return out


def test_example_file_documents_every_key_with_its_default() -> None:
    text = render_example_config()
    section = ""
    shown: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"#?\[([a-z_.]+)\]", line):
            section = m.group(1)
        elif m := re.fullmatch(r"#([a-z_]+) = (.*?)(  # example.*)?", line):
            shown[f"{section}.{m.group(1)}"] = m.group(2)
    assert set(shown) == _all_fields(Config, "")
    # Every shown value (default, or example for unset keys) is valid, and uncommenting the
    # non-example lines reproduces the defaults exactly.
    uncommented = "\n".join(
        line[1:] if re.fullmatch(r"#\[[a-z_.]+\]|#[a-z_]+ = .*", line) else line for line in text.splitlines()
    )
    raw = tomllib.loads(uncommented)
    assert raw["model"]["path"] == "/var/lib/anomalyd/model.onnx"
    tls = raw["mqtt"].pop("tls")
    assert set(tls) == {f.split(".")[-1] for f in shown if f.startswith("mqtt.tls.")}
    # [cluster] is an example of its own (absent by default): valid once one of its two ways
    # of owning partitions is taken out (and with the only MQTT version NATS speaks).
    cluster = raw.pop("cluster")
    cluster.pop("owned")
    assert Config.model_validate({"mqtt": {"protocol": "3.1.1"}, "cluster": cluster}).cluster is not None
    for sect, key in [
        ("mqtt", "username"),
        ("mqtt", "password_file"),
        ("mqtt", "password_credential"),
        ("model", "path"),
        ("batching", "warmup_batch_sizes"),
        ("detector", "threshold"),
        ("state", "directory"),
        ("stream", "probation_slots"),
    ]:
        raw[sect].pop(key)  # examples for keys whose default is unset / machine-specific
    assert Config.model_validate(raw) == Config()


def test_state_directory_from_the_key_else_systemds_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert load_config(None).state.resolved_directory() is None
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/anomalyd:/var/lib/other")
    assert load_config(None).state.resolved_directory() == Path("/var/lib/anomalyd")
    cfg = load_config(None, {"state.directory": str(tmp_path)})
    assert cfg.state.resolved_directory() == tmp_path


@pytest.mark.parametrize(
    "topic",
    [
        "anomalyd/cmd/{device}",
        "anomalyd/{verb}",
        "a/{device}{verb}",
        "a/+/{device}/{verb}",
        "a/{x}/{device}/{verb}",
    ],
)
def test_command_topic_needs_device_and_verb_levels(topic: str) -> None:
    with pytest.raises(ConfigError, match=r"commands\.topic"):
        load_config(None, {"commands.topic": topic})


# --------------------------------------------------------------------------- broker addresses


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("broker.plant", ("broker.plant", 1883, False)),
        ("10.0.0.7", ("10.0.0.7", 1883, False)),
        ("::1", ("::1", 1883, False)),
        ("mosquitto_1", ("mosquitto_1", 1883, False)),  # container names resolve with '_'
        ("broker.plant:1884", ("broker.plant", 1884, False)),
        ("[fd00::7]:1884", ("fd00::7", 1884, False)),
        ("mqtt://broker.example:1883", ("broker.example", 1883, False)),
        ("mqtt://127.0.0.1:18831", ("127.0.0.1", 18831, False)),
        ("tcp://broker.example", ("broker.example", 1883, False)),
        ("mqtt://[::1]:1999/", ("::1", 1999, False)),
        ("mqtts://broker.example", ("broker.example", 8883, True)),
        ("ssl://broker.example:9883", ("broker.example", 9883, True)),
        ("MQTTS://Broker.Example", ("Broker.Example", 8883, True)),
    ],
)
def test_broker_addresses_become_host_port_and_tls(host: str, expected: tuple[str, int, bool]) -> None:
    cfg = load_config(None, {"mqtt.host": host})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls is not None) == expected


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("not a host!!", "expected a host name or an IP address"),
        ("mqtt://broker.example:1883:1883", "more than one ':'"),
        ("broker:port", "expected a port between 1 and 65535"),
        ("mqtt://broker:0", "expected a port between 1 and 65535"),
        ("mqtt://broker:70000", "expected a port between 1 and 65535"),
        ("1883", "not a valid IPv4"),
        ("300.1.1.1", "not a valid IPv4"),
        ("ws://broker:8080/mqtt", "websockets (ws://) is not supported"),
        ("wss://broker/mqtt", "write mqtts://HOST:8883"),
        ("http://broker", "unknown scheme 'http://'"),
        ("mqtt://user:secret@broker", "does not go in the broker address"),
        ("mqtt://broker/sensors", "with nothing after it"),
        ("mqtt://", "expected a host after mqtt://"),
        ("[not-v6]:1883", "expected an IPv6 address"),
    ],
)
def test_a_broker_address_that_is_not_one_is_refused_at_mqtt_host(host: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"mqtt.host": host})
    assert info.value.key_path == "mqtt.host"
    assert fragment in str(info.value)
    assert "secret" not in str(info.value)


def test_a_port_in_the_address_and_in_mqtt_port_must_agree(tmp_path: Path) -> None:
    p = write(tmp_path, '[mqtt]\nhost = "mqtt://broker:1884"\nport = 1885\n')
    errors = config_errors(p)
    assert keys(errors) == ["mqtt.host"]
    assert "port 1884 but mqtt.port is 1885" in str(errors[0])
    same = load_config(write(tmp_path, '[mqtt]\nhost = "mqtt://broker:1884"\nport = 1884\n', "same.toml"))
    assert same.mqtt.port == 1884
    # A URL without a port takes mqtt.port.
    cfg = load_config(write(tmp_path, '[mqtt]\nhost = "mqtts://broker"\nport = 9999\n', "p.toml"))
    assert (cfg.mqtt.port, cfg.mqtt.tls is not None) == (9999, True)


def test_mqtts_keeps_the_tls_table_and_mqtt_refuses_one(tmp_path: Path) -> None:
    ca = write(tmp_path, "c", "ca.pem")
    cfg = load_config(None, {"mqtt.host": "mqtts://broker", "mqtt.tls.ca_file": str(ca)})
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca_file == ca
    errors = config_errors(None, {"mqtt.host": "mqtt://broker", "mqtt.tls.ca_file": str(ca)})
    assert keys(errors) == ["mqtt.host"]
    assert "write mqtts://broker for TLS, or remove [mqtt.tls]" in str(errors[0])


def test_an_mqtt_config_built_directly_takes_the_address_apart_too() -> None:
    m = MqttConfig(host="mqtts://broker.example:8884")
    assert (m.host, m.port, m.tls is not None) == ("broker.example", 8884, True)
    with pytest.raises(ValueError, match="expected a host name"):
        MqttConfig(host="not a host!!")


# --------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_a_threshold_must_be_positive(threshold: float) -> None:
    with pytest.raises(ConfigError, match=r"^detector\.threshold: expected a threshold > 0"):
        load_config(None, {"detector.threshold": threshold})
    assert load_config(None, {"detector.threshold": 0.5}).detector.threshold == 0.5


@pytest.mark.parametrize(
    "key",
    [
        "shutdown.drain_timeout_s",  # an infinite drain deadline crashed the stop
        "stream.intake_queue_mib",  # ... and an infinite queue size the start
        "mqtt.reconnect_min_s",
        "batching.max_delay_ms",
        "state.snapshot_interval_s",
        "commands.default_shelve_s",
        "logging.rejection_log_interval_s",
    ],
)
def test_infinite_durations_and_sizes_are_refused(key: str) -> None:
    for value in (float("inf"), float("nan")):
        with pytest.raises(ConfigError) as info:
            load_config(None, {key: value})
        assert info.value.key_path == key
        assert "finite number" in str(info.value)


def test_the_intake_queue_must_hold_one_message_of_the_largest_size() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"stream.max_payload_bytes": 8 * 2**20, "stream.intake_queue_mib": 4.0})
    assert info.value.key_path == "stream.intake_queue_mib"
    assert "at least 8.06 MiB, got 4" in str(info.value)
    cfg = load_config(None, {"stream.max_payload_bytes": 8 * 2**20, "stream.intake_queue_mib": 9.0})
    assert cfg.stream.intake_queue_mib == 9.0


def test_the_metrics_host_must_be_an_address_or_a_name() -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.host: expected a host name"):
        load_config(None, {"metrics.host": "local host"})
    assert load_config(None, {"metrics.host": "::"}).metrics.host == "::"
    assert load_config(None, {"metrics.host": ""}).metrics.host == ""  # every interface
