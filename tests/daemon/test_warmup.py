"""The warm-up from JetStream (``anomalyd.warmup``) and its writing into the windows
(``Pipeline.warm``), against a real nats-server with its MQTT gateway, the partition
mapping and JetStream: readings are published as devices publish them (MQTT 3.1.1 through
the gateway), read back with nats-py, and go through the real decoder, buffers, batcher,
ONNX Runtime and detector."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.alerts import AlertRecord
from anomalyd.config import Config, load_config
from anomalyd.config_cluster import ClusterConfig
from anomalyd.decode import RawMessage
from anomalyd.detector import Decision
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel, load_model
from anomalyd.partitions import nats_partition
from anomalyd.pipeline import Pipeline
from anomalyd.warmup import (
    COMPLETE,
    FAILED,
    TIMEOUT,
    JetStreamSource,
    WarmUp,
    announce_no_jetstream,
    stream_subject,
)
from tests.broker import PrivateNatsServer, publish_many, wait_for

L = 8  # the tiny model's window length
P = 8
TOPIC_IN = "sensors/{device}/telemetry"
DEVICES = [f"pump-{i}" for i in range(20)]


class Sink:
    """Records what a pipeline hands its output."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.states: list[AlertRecord] = []

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.decisions.extend(decisions)

    def flush_scores(self) -> None:
        pass

    def forget(self, devices: list[str]) -> None:
        pass

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.states.extend(records)

    def set_overloaded(self, overloaded: bool) -> None:
        pass


def reading(ts: float, value: float = 0.1) -> bytes:
    return orjson.dumps({"ts": ts, "temperature": value, "pressure": 0.2, "vibration": 0.01})


def publish_readings(server: PrivateNatsServer, devices: list[str], t0: float, n: int) -> None:
    """``n`` readings per device (ts ``t0``, ``t0 + 1``, ...), round after round, as devices
    publish them: MQTT 3.1.1 at QoS 1 through NATS's gateway, acknowledged."""
    publish_many(
        server, [(f"sensors/{d}/telemetry", reading(t0 + k)) for k in range(n) for d in devices], qos=1
    )


def live(device: str, ts: float, value: float = 0.1) -> RawMessage:
    """A live message as the daemon receives it from the gateway (partition level appended)."""
    topic = f"sensors/{device}/telemetry/{nats_partition(device, P)}"
    return RawMessage(topic, reading(ts, value), time.time(), time.monotonic())


def cluster(server: PrivateNatsServer | str, **overrides: Any) -> ClusterConfig:
    url = server if isinstance(server, str) else server.nats_url
    jetstream = {"servers": [url], "timeout_s": 20.0, **overrides.pop("jetstream", {})}
    assignment = {} if "owned" in overrides else {"instance": 0, "instances": 1}
    doc = {"partitions": P, **assignment, "jetstream": jetstream, **overrides}
    return ClusterConfig.model_validate(doc)


def stream_info(server: PrivateNatsServer, name: str = "ANOMALYD_TELEMETRY") -> Any:
    """The stream as the server reports it (nats-py, as an operator's ``nats stream info``);
    None if it does not exist."""
    import nats
    from nats.js.errors import NotFoundError

    async def go() -> Any:
        nc = await nats.connect(server.nats_url)
        try:
            return await nc.jetstream().stream_info(name)
        except NotFoundError:
            return None
        finally:
            await nc.close()

    return asyncio.run(go())


def add_stream(server: PrivateNatsServer, per_subject: int) -> None:
    """Create the stream by hand (as an operator does with ``nats stream add``)."""
    import nats

    async def go() -> None:
        nc = await nats.connect(server.nats_url)
        try:
            await nc.jetstream().add_stream(
                name="ANOMALYD_TELEMETRY",
                subjects=[stream_subject(TOPIC_IN)],
                max_msgs_per_subject=per_subject,
            )
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateNatsServer]:
    s = PrivateNatsServer(tmp_path / "nats", partitions=P)
    s.start()
    yield s
    s.close()


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> LoadedModel:
    return load_model(tiny_model(window_length=L, threshold=1.0))


_made: list[Pipeline] = []


@pytest.fixture(autouse=True)
def _close_pipelines() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def config(server: PrivateNatsServer, **overrides: object) -> Config:
    return load_config(
        None,
        {
            "batching.max_delay_ms": 0.0,
            "mqtt.protocol": "3.1.1",
            "cluster.partitions": P,
            "cluster.instance": 0,
            "cluster.instances": 1,
            "cluster.jetstream.servers": [server.nats_url],
            **overrides,
        },
    )


def make(cfg: Config, model: LoadedModel, registry: CollectorRegistry) -> tuple[Pipeline, Sink]:
    sink = Sink()
    pipeline = Pipeline(cfg, model, Metrics(registry), sink)
    _made.append(pipeline)
    return pipeline, sink


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------- JetStreamSource


def test_the_stream_is_created_and_each_owned_devices_last_window_is_read_back(
    server: PrivateNatsServer,
) -> None:
    source = JetStreamSource(cluster(server, instance=1, instances=2), TOPIC_IN, L)
    first = source.fetch()
    assert (first.result, first.messages) == (COMPLETE, [])  # created, empty
    info = stream_info(server)
    assert info.config.subjects == ["sensors.*.telemetry.*"]
    assert info.config.max_msgs_per_subject == L

    t0 = float(int(time.time()) - 600)
    publish_readings(server, DEVICES, t0, L + 5)
    replay = source.fetch()

    assert replay.result == COMPLETE, replay.reason
    mine = [d for d in DEVICES if nats_partition(d, P) % 2 == 1]
    assert 0 < len(mine) < len(DEVICES)  # both instances own some of these devices
    by_device: dict[str, list[RawMessage]] = {}
    for msg in replay.messages:
        prefix, device, suffix, partition = msg.topic.split("/")
        assert (prefix, suffix) == ("sensors", "telemetry")
        assert int(partition) == nats_partition(device, P)  # the topic in MQTT form, as live
        by_device.setdefault(device, []).append(msg)
    assert sorted(by_device) == sorted(mine)
    for device, msgs in by_device.items():
        # The last L, in order, payloads as published.
        assert [m.payload for m in msgs] == [reading(t0 + k) for k in range(5, L + 5)], device
        assert not any(m.retained for m in msgs)


def test_a_replayed_reading_without_ts_keeps_the_time_the_broker_stored_it(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    cfg = config(server)
    assert cfg.cluster is not None
    source = JetStreamSource(cfg.cluster, TOPIC_IN, L)
    source.fetch()  # creates the stream
    before = time.time()
    publish_many(
        server, [("sensors/no-clock/telemetry", b'{"temperature": 1, "pressure": 2, "vibration": 3}')]
    )
    after = time.time()
    replay = source.fetch()
    assert [m.topic for m in replay.messages] == [
        f"sensors/no-clock/telemetry/{nats_partition('no-clock', P)}"
    ]
    # Not the time it was read back (after ``after``): the time NATS stored it (one clock).
    assert before <= replay.messages[0].arrival <= after
    pipeline, _sink = make(cfg, model, registry)
    assert pipeline.warm(replay.messages, horizon_s=60.0).filled == 1
    assert pipeline._horizon["no-clock"] == replay.messages[0].arrival  # its ts: the stored time


def test_instances_read_disjoint_partitions_that_cover_the_fleet(server: PrivateNatsServer) -> None:
    JetStreamSource(cluster(server), TOPIC_IN, L).fetch()  # creates the stream
    publish_readings(server, DEVICES, float(int(time.time()) - 600), 3)
    seen: Counter[str] = Counter()
    for owned in ([0, 3, 5], [1, 2, 4, 6, 7]):
        replay = JetStreamSource(cluster(server, owned=owned), TOPIC_IN, L).fetch()
        assert replay.result == COMPLETE
        assert {int(m.topic.rsplit("/", 1)[1]) for m in replay.messages} <= set(owned)
        seen.update(m.topic.split("/")[1] for m in replay.messages)
    assert seen == dict.fromkeys(DEVICES, 3)


def test_a_stream_that_keeps_fewer_than_a_window_per_device_is_warned_about(
    server: PrivateNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    add_stream(server, per_subject=3)
    publish_readings(server, DEVICES[:4], float(int(time.time()) - 600), L)
    source = JetStreamSource(cluster(server), TOPIC_IN, L)
    with caplog.at_level(logging.WARNING, logger="anomalyd.warmup"):
        replay = source.fetch()
        source.fetch()
    assert replay.result == COMPLETE
    assert Counter(m.topic.split("/")[1] for m in replay.messages) == dict.fromkeys(DEVICES[:4], 3)
    warnings = [r for r in caplog.records if "cannot be refilled fully" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every warm-up
    assert "keeps 3 messages per device, fewer than the window length 8" in warnings[0].getMessage()


def test_a_missing_stream_is_not_created_without_create_stream(server: PrivateNatsServer) -> None:
    replay = JetStreamSource(cluster(server, jetstream={"create_stream": False}), TOPIC_IN, L).fetch()
    assert replay.result == FAILED
    assert "'ANOMALYD_TELEMETRY' does not exist" in replay.reason
    assert stream_info(server) is None


def test_a_server_that_is_down_fails_at_once(server: PrivateNatsServer) -> None:
    server.stop()
    replay = JetStreamSource(cluster(server, jetstream={"timeout_s": 60.0}), TOPIC_IN, L).fetch()
    assert replay.result == FAILED  # not a wait for the 60 s deadline
    assert replay.messages == []
    assert "cannot connect to nats://127.0.0.1:" in replay.reason
    assert "Connect call failed" in replay.reason or "refused" in replay.reason.lower()


def test_a_server_that_never_answers_is_a_timeout() -> None:
    # A listener that accepts connections and never says a word (a hung server): nats-py
    # waits for the server's INFO, the warm-up's deadline ends it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        source = JetStreamSource(
            cluster(f"nats://127.0.0.1:{port}", jetstream={"timeout_s": 1.0}), TOPIC_IN, L
        )
        replay = source.fetch()
    assert replay.result == TIMEOUT
    assert replay.messages == []
    assert f"no connection to nats://127.0.0.1:{port} within 1.0 s" in replay.reason


def test_a_daemon_without_jetstream_never_imports_nats() -> None:
    probe = (
        "import sys, anomalyd.service, anomalyd.warmup, anomalyd.pipeline, anomalyd.routing; "
        "print(sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_cluster_without_jetstream_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="anomalyd.warmup"):
        announce_no_jetstream(Metrics(registry))
    assert sample(registry, "anomalyd_warmups_total", result="no_jetstream") == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "no [cluster.jetstream]: windows fill from live readings"
    ]


# ---------------------------------------------------------------------- Pipeline.warm


def test_replayed_readings_fill_the_windows_and_are_never_scored(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    cfg = config(server)
    assert cfg.cluster is not None
    JetStreamSource(cfg.cluster, TOPIC_IN, L).fetch()  # creates the stream
    t0 = float(int(time.time()) - 600)
    publish_readings(server, DEVICES, t0, L + 5)
    replay = JetStreamSource(cfg.cluster, TOPIC_IN, L).fetch()
    assert len(replay.messages) == len(DEVICES) * L

    pipeline, sink = make(cfg, model, registry)
    counts = pipeline.warm(replay.messages, horizon_s=60.0)
    pipeline.flush(force=True)

    assert (counts.filled, counts.already_held, counts.rejected, counts.devices) == (
        len(DEVICES) * L,
        0,
        0,
        20,
    )
    assert sink.decisions == []  # windows became ready (hop 1): none was scored
    assert pipeline.windows_scored == 0
    assert sample(registry, "anomalyd_windows_scored_total") == 0.0
    assert all(pipeline.buffers.readings(d) == L for d in DEVICES)
    assert all(pipeline.buffers.is_established(d) for d in DEVICES)
    assert sum(pipeline.detector.knows(d) for d in DEVICES) == 0  # no detector update either

    # The first live reading of each device is scored at once, on a full window.
    last = t0 + L + 4
    pipeline.ingest([live(d, last + 1) for d in DEVICES])
    pipeline.flush(force=True)
    assert sorted((d.device, d.ts, d.padded) for d in sink.decisions) == sorted(
        (d, last + 1, False) for d in DEVICES
    )


def test_live_readings_the_replay_had_are_dropped_counted_and_not_scored_twice(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(config(server), model, registry)
    t0 = float(int(time.time()) - 600)
    replayed = [live(d, t0 + k) for k in range(L) for d in DEVICES[:3]]
    pipeline.warm(replayed, horizon_s=60.0)
    # What the intake queue held when the replay was done: the last three replayed
    # readings of each device (they arrived live while the stream was read), then newer ones.
    queued = [live(d, t0 + k) for k in range(L - 3, L + 2) for d in DEVICES[:3]]
    pipeline.ingest(queued)
    pipeline.flush(force=True)

    assert sample(registry, "anomalyd_warmup_overlap_readings_total") == 9.0
    assert sorted((d.device, d.ts) for d in sink.decisions) == sorted(
        (d, t0 + k) for k in (L, L + 1) for d in DEVICES[:3]
    )
    for reason in ("duplicate", "out_of_order"):
        assert sample(registry, "anomalyd_rejected_total", reason=reason) == 0.0


def test_the_overlap_check_ends_once_every_replayed_device_moved_on(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, _sink = make(config(server), model, registry)
    t0 = float(int(time.time()) - 600)
    pipeline.warm([live(d, t0 + k) for k in range(L) for d in DEVICES[:2]], horizon_s=60.0)
    pipeline.ingest([live(DEVICES[0], t0 + L)])  # moved on; the other has not
    pipeline.ingest([live(DEVICES[0], t0 + 1), live(DEVICES[1], t0 + 1)])
    # The device that moved on is out of the horizon: its old reading is out of order, as
    # any live one would be; the other's is still an overlap.
    assert sample(registry, "anomalyd_warmup_overlap_readings_total") == 1.0
    assert sample(registry, "anomalyd_rejected_total", reason="out_of_order") == 1.0
    pipeline.ingest([live(DEVICES[1], t0 + L)])
    assert pipeline._horizon == {}  # nothing left to check: ingest is back to one test


def test_the_overlap_check_ends_after_its_bound_for_devices_that_fell_silent(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, _sink = make(config(server), model, registry)
    t0 = float(int(time.time()) - 600)
    pipeline.warm([live("quiet", t0 + k) for k in range(L)], horizon_s=0.0)
    pipeline.ingest([live("quiet", t0 + 2)])
    assert sample(registry, "anomalyd_warmup_overlap_readings_total") == 0.0
    assert sample(registry, "anomalyd_rejected_total", reason="out_of_order") == 1.0
    assert pipeline._horizon == {}


def test_readings_a_snapshot_already_holds_are_counted_as_already_held(
    server: PrivateNatsServer, model: LoadedModel, registry: CollectorRegistry
) -> None:
    t0 = float(int(time.time()) - 600)
    before, _ = make(config(server), model, CollectorRegistry())
    before.ingest([live("p", t0 + k) for k in range(L + 2)])
    before.flush(force=True)
    pipeline, sink = make(config(server), model, registry)
    assert pipeline.restore_snapshot(before.export_snapshot()) == 1
    # The stream holds the last L readings, the last three of them newer than the snapshot.
    counts = pipeline.warm([live("p", t0 + k) for k in range(5, L + 5)], horizon_s=60.0)
    pipeline.flush(force=True)
    assert (counts.filled, counts.already_held, counts.rejected) == (3, L - 3, 0)
    assert sink.decisions == []
    assert pipeline.buffers.readings("p") == L + 5
    for reason in ("duplicate", "out_of_order"):
        assert sample(registry, "anomalyd_rejected_total", reason=reason) == 0.0


def test_bad_replayed_input_is_rejected_and_logged_but_not_counted_as_a_live_rejection(
    server: PrivateNatsServer,
    model: LoadedModel,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline, sink = make(config(server), model, registry)
    t0 = float(int(time.time()) - 600)
    good = [live("p", t0 + k) for k in range(L)]
    bad = RawMessage(good[0].topic, b'{"ts": 1, "temperature":', time.time(), time.monotonic())
    with caplog.at_level(logging.WARNING, logger="anomalyd.pipeline"):
        counts = pipeline.warm([*good[:3], bad, *good[3:]], horizon_s=60.0)
    assert (counts.filled, counts.rejected) == (L, 1)
    assert sample(registry, "anomalyd_rejected_total", reason="malformed_json") == 0.0
    assert any("rejected a replayed reading (malformed_json)" in r.getMessage() for r in caplog.records)
    assert sink.decisions == []


# ---------------------------------------------------------------------- WarmUp


def test_a_warm_up_runs_beside_the_pipeline_thread_and_is_counted_and_logged(
    server: PrivateNatsServer,
    model: LoadedModel,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(server)
    assert cfg.cluster is not None
    pipeline, sink = make(cfg, model, registry)
    warmup = WarmUp(JetStreamSource(cfg.cluster, TOPIC_IN, L), pipeline.metrics)
    assert not warmup.busy
    t0 = float(int(time.time()) - 600)
    warmup.request()  # the first connect: creates the stream, finds it empty
    with caplog.at_level(logging.INFO, logger="anomalyd.warmup"):
        while warmup.busy:
            warmup.step(pipeline)
            warmup.wait(0.25)
        publish_readings(server, DEVICES, t0, L + 5)
        warmup.request()  # a reconnect
        while warmup.busy:
            warmup.step(pipeline)
            warmup.wait(0.25)

    assert sample(registry, "anomalyd_warmups_total", result="complete") == 2.0
    assert sample(registry, "anomalyd_warmup_readings_total", result="filled") == len(DEVICES) * L
    assert sample(registry, "anomalyd_warmup_seconds") > 0.0
    lines = [r for r in caplog.records if r.getMessage().startswith("warm-up from JetStream")]
    assert [r.levelno for r in lines] == [logging.INFO, logging.INFO]
    assert lines[0].getMessage().startswith("warm-up from JetStream (start): 0 readings of 0 devices")
    assert (
        lines[1]
        .getMessage()
        .startswith(
            f"warm-up from JetStream (reconnect): {len(DEVICES) * L} readings of {len(DEVICES)} devices"
        )
    )
    assert lines[1].getMessage().endswith(": complete")
    assert sink.decisions == []
    assert all(pipeline.buffers.readings(d) == L for d in DEVICES)


def test_a_failed_warm_up_is_one_warning_and_the_daemon_goes_on(
    server: PrivateNatsServer,
    model: LoadedModel,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(server)
    assert cfg.cluster is not None
    pipeline, _sink = make(cfg, model, registry)
    warmup = WarmUp(JetStreamSource(cfg.cluster, TOPIC_IN, L), pipeline.metrics)
    server.stop()
    with caplog.at_level(logging.DEBUG):
        warmup.request()
        wait_for(lambda: not warmup.step(pipeline), 30, interval=0.05, what="the warm-up")
    assert sample(registry, "anomalyd_warmups_total", result="failed") == 1.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith("warm-up from JetStream (start) failed: cannot connect to nats://")
    )
    assert warnings[0].getMessage().endswith("windows fill from live readings")
    assert all(r.exc_info is None for r in caplog.records)  # no traceback anywhere


# ---------------------------------------------------------------------- the pipeline thread


def test_live_messages_wait_in_the_intake_queue_until_the_replay_is_in(
    server: PrivateNatsServer, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalyd.service import Service

    cfg = config(server)
    assert cfg.cluster is not None
    JetStreamSource(cfg.cluster, TOPIC_IN, L).fetch()  # creates the stream
    t0 = float(int(time.time()) - 600)
    publish_readings(server, DEVICES, t0, L)
    registry = CollectorRegistry()
    service = Service(cfg, registry=registry)
    sink = Sink()
    pipeline = Pipeline(cfg, model, service.metrics, sink)
    _made.append(pipeline)
    warmup = WarmUp(JetStreamSource(cfg.cluster, TOPIC_IN, L), pipeline.metrics, wake=service._queue.wake)
    service._warmup = warmup

    def take() -> list[RawMessage]:
        """What the pipeline thread's loop takes in one turn (and ingests)."""
        messages = service._take_live(pipeline, 0.25)
        if messages:
            pipeline.ingest(messages)
            pipeline.flush(force=True)
        return messages

    # A connect: the warm-up is asked for before its first live message is queued.
    warmup.request()
    for d in DEVICES:
        assert service._queue.put(live(d, t0 + L))
    taken: list[RawMessage] = []
    while not taken:
        taken = take()
        assert not taken or not warmup.busy  # nothing live while the warm-up is due or running
    assert len(taken) == len(DEVICES)
    assert sample(registry, "anomalyd_warmup_readings_total", result="filled") == len(DEVICES) * L
    # The replay went first: each live reading went onto a full window and was scored at
    # once, and no replayed reading was older than a live one already taken.
    assert sorted((d.device, d.ts) for d in sink.decisions) == sorted((d, t0 + L) for d in DEVICES)
    assert sample(registry, "anomalyd_warmup_readings_total", result="already_held") == 0

    # A reconnect whose request is seen only once the pass has been taken from the queue
    # (the network thread runs the connect listener meanwhile): the pass waits for the
    # replay too. The race is made to happen here, at the one point it can.
    for d in DEVICES:
        assert service._queue.put(live(d, t0 + L + 1))
    drain = service._queue.drain

    def drain_during_a_connect(max_items: int, max_bytes: int | None = None) -> list[RawMessage]:
        out = drain(max_items, max_bytes)
        warmup.request()
        return out

    monkeypatch.setattr(service._queue, "drain", drain_during_a_connect)
    assert take() == []
    monkeypatch.setattr(service._queue, "drain", drain)
    assert len(service._held_live) == len(DEVICES)
    taken = []
    while not taken:
        taken = take()
        assert not taken or not warmup.busy
    assert sample(registry, "anomalyd_warmups_total", result="complete") == 2.0
    assert len(taken) == len(DEVICES)  # the held pass, after the replay
    assert service._held_live == []
    scored = Counter((d.device, d.ts) for d in sink.decisions)
    assert scored == dict.fromkeys([(d, t0 + k) for k in (L, L + 1) for d in DEVICES], 1)


def test_several_models_each_take_their_devices_replayed_readings(
    tmp_path: Path, tiny_model: Callable[..., Path], registry: CollectorRegistry
) -> None:
    from anomalyd.routing import ModelRouter

    pumps, fans = tiny_model("pumps.onnx", window_length=L), tiny_model("fans.onnx", window_length=L)
    cfg_file = tmp_path / "models.toml"
    cfg_file.write_text(
        '[mqtt]\nprotocol = "3.1.1"\n[batching]\nmax_delay_ms = 0.0\n'
        f"[cluster]\npartitions = {P}\ninstance = 0\ninstances = 1\n"
        f'[[models]]\nname = "pumps"\npath = "{pumps}"\ndevices = ["pump-*"]\n'
        f'[[models]]\nname = "fans"\npath = "{fans}"\ndevices = ["fan-*"]\n'
    )
    router = ModelRouter(
        load_config(cfg_file), {"pumps": load_model(pumps), "fans": load_model(fans)}, Metrics(registry)
    )
    _made.extend(router.pipelines.values())
    t0 = float(int(time.time()) - 600)
    replayed = [live(d, t0 + k) for k in range(L) for d in ("pump-1", "fan-1", "valve-1")]
    counts = router.warm(replayed, horizon_s=60.0)
    assert (counts.filled, counts.rejected, counts.devices) == (2 * L, L, 2)  # valve-1: no model
    assert router.pipelines["pumps"].buffers.devices() == ["pump-1"]
    assert router.pipelines["fans"].buffers.devices() == ["fan-1"]
    assert sample(registry, "anomalyd_rejected_total", reason="no_model") == 0.0  # not a live rejection
    router.ingest([live("pump-1", t0 + L - 1), live("pump-1", t0 + L)])
    router.flush(force=True)
    assert router.windows_scored == 1  # the first live reading, on a full window; the overlap is dropped
    assert sample(registry, "anomalyd_warmup_overlap_readings_total") == 1.0
