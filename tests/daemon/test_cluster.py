"""One instance of a partitioned fleet ([cluster]), piece by piece: the configuration it
needs (MQTT 3.1.1, a status topic of its own), the decoder's partition rules, routing with
several models, its identity at the broker (status topic, last will, client id), the
``--instance N`` the template unit passes, and the template unit itself.

The fleet against a real NATS server is tests/e2e/test_cluster_nats.py."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.cli import _instance_overrides, build_parser, main
from anomalyd.config import ClusterConfig, OutputConfig, config_errors, load_config
from anomalyd.config_mqtt import MqttConfig
from anomalyd.decode import DecodedBatch, Decoder, RawMessage, Reason
from anomalyd.errors import ConfigError, ModelContractError, UsageError
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel, load_model
from anomalyd.mqtt import client_id_for
from anomalyd.partitions import nats_partition
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import OFFLINE, instance_status_topic, last_will, status_output
from anomalyd.routing import ModelRouter
from anomalyd.systemd_unit import read_unit

FEATURES = ["temperature", "pressure", "vibration"]
P = 8
#: Instance 0 of 2 owns the even partitions.
CLUSTER = ClusterConfig(partitions=P, instance=0, instances=2)
OWNED = {0, 2, 4, 6}
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "systemd" / "anomalyd@.service"
SINGLE_UNIT = REPO / "systemd" / "anomalyd.service"
ANOMALYD = str(Path(sys.executable).parent / "anomalyd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
INSTALLED_EXEC = "/opt/anomalyd/venv/bin/anomalyd"
CLUSTER_TOML = '[mqtt]\nprotocol = "3.1.1"\n[cluster]\npartitions = 8\ninstances = 2\n'


def device_in(partition: int, prefix: str = "dev") -> str:
    """A device id the broker's mapping puts in ``partition`` (of ``P``)."""
    return next(d for i in itertools.count() if nats_partition(d := f"{prefix}-{i}", P) == partition)


def reading(ts: float) -> bytes:
    return orjson.dumps({"ts": ts, "temperature": 71.25, "pressure": 101.5, "vibration": 0.042})


def decoder(cluster: ClusterConfig | None = CLUSTER) -> Decoder:
    return Decoder(
        FEATURES, "sensors/{device}/telemetry", 65536, 10, r"^[A-Za-z0-9_.:\-]{1,64}$", 5.0, cluster=cluster
    )


def decode(topic: str, dec: Decoder | None = None) -> DecodedBatch:
    now = time.time()
    return (dec or decoder()).decode([RawMessage(topic, reading(now - 1), now, time.monotonic())])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- configuration


def test_a_cluster_needs_mqtt_3_1_1_reported_at_mqtt_protocol(tmp_path: Path) -> None:
    cfg = write(tmp_path / "a.toml", "[cluster]\npartitions = 8\ninstance = 0\ninstances = 2\n")
    errors = config_errors(cfg)
    assert [e.key_path for e in errors] == ["mqtt.protocol"]
    assert 'speaks MQTT 3.1.1 only: set protocol = "3.1.1"' in str(errors[0])
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.key_path == "mqtt.protocol"
    # Said once it is set, and not at all without [cluster] (MQTT 5 stays the default).
    assert config_errors(cfg, {"mqtt.protocol": "3.1.1"}) == []
    assert config_errors(None) == []


def test_check_config_shows_the_protocol_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path / "a.toml", '[mqtt]\nprotocol = "5"\n[cluster]\npartitions = 8\nowned = [1]\n')
    assert main(["check-config", str(cfg)]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert f"{cfg}: mqtt.protocol: a [cluster] instance talks to NATS's MQTT gateway" in err
    assert f"{cfg}: 1 error(s)" in err


def test_an_instance_name_that_makes_its_status_topic_a_device_topic_is_refused(tmp_path: Path) -> None:
    # "anomaly/status/alert" would be read back as the alert state of a device "status".
    for name, key in (("alert", "alert_topic"), ("score", "score_topic")):
        cfg = write(tmp_path / "a.toml", CLUSTER_TOML + f'name = "{name}"\ninstance = 0\n')
        errors = config_errors(cfg)
        assert [e.key_path for e in errors] == ["cluster.name"], errors
        assert f"'anomaly/status/{name}', is also a topic of output.{key}" in str(errors[0])
    assert config_errors(write(tmp_path / "b.toml", CLUSTER_TOML + 'name = "east-1"\ninstance = 0\n')) == []


# --------------------------------------------------------------------------- decoding


def test_a_reading_on_its_own_owned_partition_is_accepted() -> None:
    dec = decoder()
    for p in sorted(OWNED):
        device = device_in(p)
        batch = decode(f"sensors/{device}/telemetry/{p}", dec)
        assert batch.devices == [device], batch.rejections
        assert batch.topics == [f"sensors/{device}/telemetry/{p}"]


def test_a_reading_of_a_partition_this_instance_does_not_own_is_foreign() -> None:
    device = device_in(3)
    batch = decode(f"sensors/{device}/telemetry/3")
    assert batch.devices == []
    [rej] = batch.rejections
    assert rej.reason == Reason.FOREIGN_PARTITION
    assert rej.device == device  # a valid id: named in the log line
    assert "partition 3 is not one of instance 0's" in rej.detail


def test_a_foreign_device_on_an_owned_partition_topic_is_foreign() -> None:
    # Published straight to partition 2 (ours) by a client, but the device hashes to 5,
    # another instance's: scoring it here would score it in two places.
    device = device_in(5)
    [rej] = decode(f"sensors/{device}/telemetry/2").rejections
    assert rej.reason == Reason.FOREIGN_PARTITION
    assert "is in partition 5, not this instance's (the topic says 2)" in rej.detail


def test_an_owned_device_on_another_owned_partition_is_a_mismatch() -> None:
    device = device_in(2)
    [rej] = decode(f"sensors/{device}/telemetry/4").rejections
    assert rej.reason == Reason.PARTITION_MISMATCH
    assert rej.device == device
    assert "is in partition 2 but came on 4" in rej.detail


@pytest.mark.parametrize(
    "level",
    [
        "",
        "8",
        "99",
        "-1",
        "06",
        "00",
        "+2",
        " 2",
        "2 ",
        "2.0",
        "0x2",
        "\u0662",
        "\uff12",
        "two",
        "#",
        "9" * 5000,
    ],
)
def test_a_partition_level_that_is_not_a_partition_is_a_bad_topic(level: str) -> None:
    device = device_in(2)
    [rej] = decode(f"sensors/{device}/telemetry/{level}").rejections
    assert rej.reason == Reason.BAD_TOPIC
    assert "no partition level 0..7" in rej.detail
    assert len(rej.topic) <= 256


def test_a_topic_without_the_partition_level_is_a_bad_topic() -> None:
    device = device_in(2)
    for topic in (f"sensors/{device}/telemetry", "sensors", "", f"sensors/{device}/telemetry/2/2"):
        [rej] = decode(topic).rejections
        assert rej.reason == Reason.BAD_TOPIC, topic


def test_the_device_id_rules_still_apply_before_the_partition() -> None:
    for device in ("..", "a b", "dév"):
        [rej] = decode(f"sensors/{device}/telemetry/0").rejections
        assert rej.reason == Reason.BAD_DEVICE_ID, device
        assert rej.device == ""
    [rej] = decode("sensors/a/b/telemetry/0").rejections
    assert rej.reason == Reason.BAD_TOPIC


def test_verdicts_are_the_same_from_the_topic_cache() -> None:
    dec = decoder()
    ours, theirs = device_in(6), device_in(1)
    topics = [f"sensors/{ours}/telemetry/6", f"sensors/{theirs}/telemetry/1", f"sensors/{ours}/telemetry/9"]
    first = [(b.devices, [r.reason for r in b.rejections]) for b in (decode(t, dec) for t in topics)]
    again = [(b.devices, [r.reason for r in b.rejections]) for b in (decode(t, dec) for t in topics)]
    assert first == again == [([ours], []), ([], [Reason.FOREIGN_PARTITION]), ([], [Reason.BAD_TOPIC])]


def test_without_a_cluster_a_partition_level_is_a_bad_topic() -> None:
    device = device_in(2)
    dec = decoder(cluster=None)
    assert decode(f"sensors/{device}/telemetry", dec).devices == [device]
    [rej] = decode(f"sensors/{device}/telemetry/2", dec).rejections
    assert rej.reason == Reason.BAD_TOPIC


def test_an_explicit_owned_list_is_what_the_decoder_takes() -> None:
    dec = decoder(ClusterConfig(partitions=P, owned=[1, 7]))
    one, two, seven = device_in(1), device_in(2), device_in(7)
    assert decode(f"sensors/{one}/telemetry/1", dec).devices == [one]
    assert decode(f"sensors/{seven}/telemetry/7", dec).devices == [seven]
    [rej] = decode(f"sensors/{two}/telemetry/2", dec).rejections
    assert rej.reason == Reason.FOREIGN_PARTITION
    assert "partition 2 is not one of instance p1-7's" in rej.detail


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> LoadedModel:
    return load_model(tiny_model(window_length=8, threshold=1.0))


@pytest.fixture
def pipelines() -> Iterator[list[Pipeline | ModelRouter]]:
    made: list[Pipeline | ModelRouter] = []
    yield made
    for p in made:
        p.close()


def cluster_overrides(**more: object) -> dict[str, object]:
    return {
        "mqtt.protocol": "3.1.1",
        "cluster.partitions": P,
        "cluster.instance": 0,
        "cluster.instances": 2,
        "batching.max_delay_ms": 0.0,
        "logging.rejection_log_interval_s": 60.0,
        **more,
    }


def test_the_pipeline_counts_and_logs_foreign_readings_through_the_rejection_path(
    model: LoadedModel,
    registry: CollectorRegistry,
    pipelines: list[Pipeline | ModelRouter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = Pipeline(load_config(None, cluster_overrides()), model, Metrics(registry))
    pipelines.append(pipeline)
    ours, theirs, mismatched = device_in(4), device_in(3), device_in(2)
    now = time.time()
    msgs = [
        RawMessage(f"sensors/{ours}/telemetry/4", reading(now - 20 + i), now, time.monotonic())
        for i in range(10)
    ]
    msgs += [
        RawMessage(f"sensors/{theirs}/telemetry/3", reading(now - 5 + i), now, time.monotonic())
        for i in range(3)
    ]
    msgs += [RawMessage(f"sensors/{theirs}/telemetry/4", reading(now - 1), now, time.monotonic())]
    msgs += [RawMessage(f"sensors/{mismatched}/telemetry/6", reading(now - 1), now, time.monotonic())]
    with caplog.at_level(logging.WARNING, logger="anomalyd.pipeline"):
        pipeline.ingest(msgs)
        pipeline.flush(force=True)
    get = registry.get_sample_value
    assert get("anomalyd_rejected_total", {"reason": "foreign_partition"}) == 4
    assert get("anomalyd_rejected_total", {"reason": "partition_mismatch"}) == 1
    assert get("anomalyd_readings_accepted_total") == 10
    assert pipeline.buffers.n_devices == 1
    assert pipeline.windows_scored == 3
    # One line per reason per interval (rate-limited like every rejection), naming the device.
    foreign = [r for r in caplog.records if "rejected (foreign_partition)" in r.getMessage()]
    assert len(foreign) == 1
    assert getattr(foreign[0], "device", None) == theirs
    assert sum("rejected (partition_mismatch)" in r.getMessage() for r in caplog.records) == 1


def test_several_models_route_by_the_device_level_of_a_partitioned_topic(
    tmp_path: Path,
    tiny_model: Callable[..., Path],
    registry: CollectorRegistry,
    pipelines: list[Pipeline | ModelRouter],
) -> None:
    pumps, fans = tiny_model("pumps.onnx", window_length=8), tiny_model("fans.onnx", window_length=8)
    cfg_file = write(
        tmp_path / "m.toml",
        f"{CLUSTER_TOML}instance = 0\n[batching]\nmax_delay_ms = 0.0\n"
        f'[[models]]\nname = "pumps"\npath = "{pumps}"\ndevices = ["pump-*"]\n'
        f'[[models]]\nname = "fans"\npath = "{fans}"\ndevices = ["fan-*"]\n',
    )
    config = load_config(cfg_file)
    router = ModelRouter(config, {"pumps": load_model(pumps), "fans": load_model(fans)}, Metrics(registry))
    pipelines.append(router)
    pump, fan, foreign_fan = device_in(0, "pump"), device_in(2, "fan"), device_in(1, "fan")
    now = time.time()
    msgs = []
    for device, p in ((pump, 0), (fan, 2), (foreign_fan, 1)):
        msgs += [
            RawMessage(f"sensors/{device}/telemetry/{p}", reading(now - 20 + i), now, time.monotonic())
            for i in range(8)
        ]
    msgs.append(RawMessage("sensors/valve-1/telemetry/0", reading(now - 1), now, time.monotonic()))
    router.ingest(msgs)
    router.flush(force=True)
    assert list(router.pipelines["pumps"].buffers.devices()) == [pump]
    assert list(router.pipelines["fans"].buffers.devices()) == [fan]
    get = registry.get_sample_value
    assert get("anomalyd_rejected_total", {"reason": "foreign_partition"}) == 8
    assert get("anomalyd_rejected_total", {"reason": "no_model"}) == 1


# --------------------------------------------------------------------------- identity


def test_the_status_topic_and_last_will_carry_the_instance_name() -> None:
    output = OutputConfig()
    assert instance_status_topic("anomaly/status", "0") == "anomaly/status/0"
    assert instance_status_topic("anomaly/status", None) == "anomaly/status"
    will = last_will(output, "east-1")
    assert (will.topic, will.payload, will.retain) == ("anomaly/status/east-1", OFFLINE, True)
    assert last_will(output).topic == "anomaly/status"
    # Home Assistant's availability topic is the instance's status topic.
    assert status_output(output, "1").status_topic == "anomaly/status/1"
    assert status_output(output, None) is output


def test_the_default_client_id_names_the_instance_and_an_explicit_one_is_kept() -> None:
    import socket

    mqtt = MqttConfig(protocol="3.1.1")
    assert client_id_for(mqtt, "1") == f"anomalyd-1-{socket.gethostname()}-{os.getpid()}"
    assert client_id_for(mqtt) == f"anomalyd-{socket.gethostname()}-{os.getpid()}"
    assert client_id_for(MqttConfig(client_id="fixed"), "1") == "fixed"


# --------------------------------------------------------------------------- --instance N


def test_instance_sets_cluster_instance_and_shifts_the_metrics_port(tmp_path: Path) -> None:
    cfg = write(tmp_path / "a.toml", CLUSTER_TOML + "[metrics]\nport = 9200\n")
    overrides = _instance_overrides(cfg, 1, {}, keep_port=False)
    assert overrides == {"cluster.instance": 1, "metrics.port": 9201}
    config = load_config(cfg, overrides)
    assert config.cluster is not None
    assert config.cluster.owned_partitions() == [1, 3, 5, 7]
    assert config.cluster.instance_name() == "1"
    # An explicit --metrics-addr is taken as given; port 0 (any free port) stays 0.
    assert _instance_overrides(cfg, 1, {"metrics.port": 9300}, keep_port=True) == {
        "metrics.port": 9300,
        "cluster.instance": 1,
    }
    zero = write(tmp_path / "z.toml", CLUSTER_TOML + "[metrics]\nport = 0\n")
    assert _instance_overrides(zero, 1, {}, keep_port=False) == {"cluster.instance": 1}
    assert _instance_overrides(cfg, None, {"x": 1}, keep_port=False) == {"x": 1}


def test_instance_without_a_cluster_table_or_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.toml", "[metrics]\nport = 9200\n")
    with pytest.raises(ConfigError) as info:
        _instance_overrides(plain, 0, {}, keep_port=False)
    assert info.value.key_path == "--instance"
    assert "no [cluster] table" in str(info.value)
    cfg = write(tmp_path / "a.toml", CLUSTER_TOML)
    with pytest.raises(ConfigError) as info:
        load_config(cfg, _instance_overrides(cfg, 2, {}, keep_port=False))
    assert info.value.key_path == "cluster"
    assert "expected instance < instances" in str(info.value)


def test_run_and_check_config_take_instance() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "--config", "x.toml", "--instance", "3"])
    assert args.instance == 3
    assert parser.parse_args(["check-config", "x.toml", "--instance", "0"]).instance == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--instance", "-1"])


def test_check_config_as_instance_of_the_template_unit(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    model = tiny_model("m.onnx", window_length=8)
    cfg = write(tmp_path / "a.toml", CLUSTER_TOML + f'[model]\npath = "{model}"\n')
    # The shipped template, with a drop-in for this machine: no broker password to load, and
    # the test's private temporary directory readable (no dynamic user).
    unit = tmp_path / "anomalyd@.service"
    shutil.copy(TEMPLATE, unit)
    (tmp_path / "anomalyd@.service.d").mkdir()
    write(tmp_path / "anomalyd@.service.d" / "test.conf", "[Service]\nLoadCredential=\nDynamicUser=no\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
    out = subprocess.run(
        [ANOMALYD, "check-config", str(cfg), "--unit", str(unit), "--instance", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"{cfg} (instance 1): OK, as {unit} would run it"
    assert "broker mqtt://127.0.0.1:1883 (MQTT 3.1.1" in out.stdout
    assert (
        "cluster instance '1': 4 of 8 partitions (1, 3, 5, 7), subscribed as sensors/+/telemetry/1 ..."
        in out.stdout
    )
    assert "status on anomaly/status/1" in out.stdout
    assert "snapshots in /var/lib/anomalyd/1 (StateDirectory=" in out.stdout


# --------------------------------------------------------------------------- the template unit


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_template_is_the_single_unit_but_for_the_instance() -> None:
    template, single = _directives(TEMPLATE.read_text()), _directives(SINGLE_UNIT.read_text())
    assert template["ExecStart"] == [
        f"{INSTALLED_EXEC} run --config /etc/anomalyd/anomalyd.toml --instance %i"
    ]
    assert template["StateDirectory"] == ["anomalyd/%i"]
    assert "%i" in template["Description"][0]
    assert template["After"] == ["network-online.target nats-server.service"]
    # What the daemon relies on, hardening included, exactly as in anomalyd.service.
    differ = {"ExecStart", "StateDirectory", "Description", "After"}
    assert {k: v for k, v in template.items() if k not in differ} == {
        k: v for k, v in single.items() if k not in differ
    }
    no_restart = {UsageError.exit_code, ConfigError.exit_code, ModelContractError.exit_code}
    assert {int(code) for code in template["RestartPreventExitStatus"][0].split()} == no_restart


def test_the_template_is_read_as_one_instance_with_its_own_drop_ins(tmp_path: Path) -> None:
    unit = tmp_path / "anomalyd@.service"
    shutil.copy(TEMPLATE, unit)
    own = tmp_path / "anomalyd@2.service.d"
    own.mkdir()
    (own / "override.conf").write_text("[Service]\nLoadCredential=\nLoadCredential=pw:/etc/anomalyd/pw-%i\n")
    two, three = read_unit(unit, instance="2"), read_unit(unit, instance="3")
    assert two.state_directory() == Path("/var/lib/anomalyd/2")
    assert two.load_credentials == {"pw": "/etc/anomalyd/pw-2"}
    assert three.state_directory() == Path("/var/lib/anomalyd/3")
    assert three.load_credentials == {"mqtt_password": "/etc/anomalyd/mqtt_password"}
    assert three.dynamic_user
    assert three.protect_system == "strict"


def test_systemd_analyze_verifies_the_template_and_rates_it_as_the_single_unit(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("anomalyd")
    copy = tmp_path / "anomalyd@.service"
    copy.write_text(TEMPLATE.read_text().replace(INSTALLED_EXEC, str(exe)))
    for name in ("anomalyd@.service", "anomalyd@0.service"):
        out = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", str(tmp_path / name)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr.strip() == ""
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(tmp_path / "anomalyd@0.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    rating = [
        line for line in out.stdout.splitlines() if "Overall exposure level for anomalyd@0.service" in line
    ]
    assert rating, out.stdout[-2000:] + out.stderr
    assert float(rating[0].split(":")[1].split()[0]) <= 1.5
