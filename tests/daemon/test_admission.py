"""Admission: a burst of unknown device ids cannot push out established devices.

At the buffer level, time is driven explicitly (a reading's arrival time is its timestamp,
and ``evict_idle`` runs once a simulated second, as the daemon's housekeeping does), so a
flood of 200,000 ids takes a second or two of real time. One smaller test goes through the
whole pipeline (decoder, buffers, ONNX Runtime, detector, Prometheus counters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.alerts import AlertRecord
from anomalyd.buffers import DeviceBuffers
from anomalyd.config import load_config
from anomalyd.decode import DecodedBatch, RawMessage, Reason
from anomalyd.detector import Decision
from anomalyd.errors import ConfigError
from anomalyd.metrics import Metrics
from anomalyd.model import load_model
from anomalyd.pipeline import Pipeline

L = 8  # window length
F = 2
STEADY = [f"steady-{i:02d}" for i in range(20)]
IDLE_S = 30.0  # stream.idle_evict_s of these tests


def make_batch(rows: list[tuple[str, float]]) -> DecodedBatch:
    """(device, ts) rows; the reading's value is [ts, -ts] and it arrives at ts."""
    ts = np.asarray([r[1] for r in rows], np.float64)
    values = np.stack([ts, -ts], axis=1).astype(np.float32).reshape(len(rows), F)
    return DecodedBatch([r[0] for r in rows], ts, values, ts.copy())


@dataclass
class Run:
    """What a stretch of simulated seconds did to the buffers."""

    windows: dict[str, list[npt.NDArray[np.float32]]] = field(default_factory=dict)
    accepted: int = 0
    offered: dict[str, int] = field(default_factory=dict)  # readings offered per device
    refused: list[tuple[str, Reason]] = field(default_factory=list)  # (device, reason)
    evicted_capacity: list[str] = field(default_factory=list)
    evicted_idle: list[str] = field(default_factory=list)
    max_established: int = 0


def run_seconds(  # noqa: PLR0917
    b: DeviceBuffers,
    seconds: range,
    senders: list[str],
    flood_per_second: int = 0,
    batches_per_second: int = 4,
    seed: int = 0,
    run: Run | None = None,
) -> Run:
    """Each second t: every sender sends one reading stamped t, and ``flood_per_second``
    ids never seen before send one each (stamped t + 0.5), all shuffled together and cut
    into ``batches_per_second`` batches; then idle eviction runs, as housekeeping would."""
    out = Run() if run is None else run
    rng = np.random.default_rng(seed)
    for t in seconds:
        rows = [(d, float(t)) for d in senders]
        rows += [(f"flood-{t}-{k}", t + 0.5) for k in range(flood_per_second)]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        for d, _ in rows:
            out.offered[d] = out.offered.get(d, 0) + 1
        for part in np.array_split(np.arange(len(rows)), batches_per_second):
            r = b.ingest(make_batch([rows[i] for i in part.tolist()]))
            out.accepted += r.accepted
            out.refused += [(x.device, x.reason) for x in r.rejections]
            out.evicted_capacity += r.evicted
            for dev, w in zip(r.ready.devices, r.ready.windows, strict=True):
                out.windows.setdefault(dev, []).append(w)
        out.evicted_idle += b.evict_idle(now_mono=t + 1.0, idle_s=IDLE_S)
        out.max_established = max(out.max_established, b.n_established)
    return out


def buffers(max_devices: int, probation_slots: int | None) -> DeviceBuffers:
    return DeviceBuffers(max_devices, L, F, 1, "wait", 10.0, probation_slots=probation_slots)


def test_a_flood_of_200000_new_ids_cannot_push_out_established_devices() -> None:
    flood_seconds, per_second = 100, 2000  # 200,000 one-off ids
    b = buffers(max_devices=64, probation_slots=8)
    control = buffers(max_devices=64, probation_slots=8)  # the same steady fleet, no flood
    warm = range(L)
    run_seconds(b, warm, STEADY)
    run_seconds(control, warm, STEADY)
    assert all(b.is_established(d) for d in STEADY)

    flood = range(L, L + flood_seconds)
    got = run_seconds(b, flood, STEADY, flood_per_second=per_second, seed=1)
    want = run_seconds(control, flood, STEADY, seed=1)

    # The established devices: still established, every reading accepted, every window
    # produced, and the same windows as without the flood.
    assert all(b.is_established(d) for d in STEADY)
    assert got.max_established == b.n_established == 20  # no flood id ever got established
    assert not [d for d, _ in got.refused if d in STEADY]
    assert not set(STEADY) & set(got.evicted_capacity + got.evicted_idle)
    flood_total = flood_seconds * per_second
    admitted = flood_total - len(got.refused)
    assert got.accepted == 20 * flood_seconds + admitted
    for d in STEADY:
        assert len(got.windows[d]) == len(want.windows[d]) == flood_seconds  # one per second
        np.testing.assert_array_equal(np.stack(got.windows[d]), np.stack(want.windows[d]))

    # The flood: refused, or churned through the slots on probation; all of it counted.
    assert {reason for _, reason in got.refused} == {Reason.DEVICE_LIMIT}
    assert all(d.startswith("flood-") for d, _ in got.refused)
    assert not [d for d in got.windows if d.startswith("flood-")]  # one reading: never a window
    assert len(got.refused) > 0
    assert len(got.evicted_capacity) > 0
    assert b.n_probation == 64 - 20  # the flood holds every slot the established do not
    still_tracked = b.n_probation
    assert admitted == len(got.evicted_capacity) + len(got.evicted_idle) + still_tracked
    assert b.n_devices == 64


def test_after_a_flood_a_new_device_that_keeps_sending_gets_established() -> None:
    b = buffers(max_devices=32, probation_slots=4)
    run_seconds(b, range(L), STEADY)
    flood = run_seconds(b, range(L, L + 20), STEADY, flood_per_second=1000, seed=2)
    assert len(flood.refused) > 0
    assert b.n_probation == 12  # flood ids on probation, in every slot left
    # After the flood: a new device takes the slot of the least recent flood id, and once
    # it has a full window it is established like the others.
    after = run_seconds(b, range(L + 20, L + 20 + L), [*STEADY, "newcomer"], seed=3)
    assert after.refused == []
    assert len(after.evicted_capacity) == 1
    assert after.evicted_capacity[0].startswith("flood-")
    assert b.is_established("newcomer")
    assert len(after.windows["newcomer"]) == 1
    assert b.n_established == 21
    # The flood ids left go idle and are forgotten; the fleet is untouched.
    later = run_seconds(b, range(L + 20 + L, L + 20 + L + int(IDLE_S) + 2), [*STEADY, "newcomer"])
    assert sorted(later.evicted_idle) == sorted(set(later.evicted_idle))
    assert all(d.startswith("flood-") for d in later.evicted_idle)
    assert b.n_probation == 0
    assert b.n_devices == b.n_established == 21


def test_with_every_slot_established_a_newcomer_waits_for_an_idle_one() -> None:
    # No probation slots, and every slot holds an established device: nothing can be pushed
    # out, so newcomers (a flood, then a real one) are refused, counted, until idle
    # eviction frees a slot.
    b = buffers(max_devices=24, probation_slots=0)
    leaving = [f"leaving-{i}" for i in range(4)]
    run_seconds(b, range(L), [*STEADY, *leaving])
    assert b.n_established == 24
    flood = run_seconds(b, range(L, L + 5), STEADY, flood_per_second=4000, seed=4)
    assert len(flood.refused) == 20_000
    assert flood.evicted_capacity == []
    assert {reason for _, reason in flood.refused} == {Reason.DEVICE_LIMIT}
    # A real newcomer, from the end of the flood: refused while the four that stopped
    # sending at L - 1 are not idle (IDLE_S after their last reading arrived).
    start = L + 5
    wait = run_seconds(b, range(start, int(L - 1 + IDLE_S) + 1), [*STEADY, "newcomer"])
    assert {d for d, _ in wait.refused} == {"newcomer"}
    assert len(wait.refused) == wait.offered["newcomer"]
    assert sorted(wait.evicted_idle) == leaving  # freed by the last housekeeping pass
    # From the next second on it is admitted, on probation, and established after L readings.
    now = int(L - 1 + IDLE_S) + 1
    joined = run_seconds(b, range(now, now + L), [*STEADY, "newcomer"])
    assert joined.refused == []
    assert b.is_established("newcomer")
    assert len(joined.windows["newcomer"]) == 1
    assert all(len(joined.windows[d]) == L for d in STEADY)


def test_probation_slots_are_held_back_for_newcomers() -> None:
    # 10 slots, 3 held back: at most 7 established. Nine devices with full windows: the
    # first seven (in batch order) are established; the other two are scored but stay on
    # probation, where a newcomer may take their slot.
    b = buffers(max_devices=10, probation_slots=3)
    fleet = [f"d{i}" for i in range(9)]
    r = b.ingest(make_batch([(d, float(t)) for t in range(L) for d in fleet]))
    assert len(r.ready) == 9
    assert [b.is_established(d) for d in fleet] == [True] * 7 + [False] * 2
    assert (b.n_established, b.n_probation) == (7, 2)
    r = b.ingest(make_batch([("x", 100.0)]))  # the free slot
    assert r.evicted == []
    r = b.ingest(make_batch([("y", 101.0)]))  # d7 is the least recent on probation
    assert r.evicted == ["d7"]
    r = b.ingest(make_batch([("z", 102.0), ("x", 103.0)]))  # d8 goes; x has just been seen
    assert r.evicted == ["d8"]
    # An established device goes idle: the next full window on probation takes its place.
    r = b.ingest(make_batch([(d, 1000.0 + t) for t in range(3) for d in [*fleet[1:7], "x", "y", "z"]]))
    assert b.evict_idle(now_mono=1000.0, idle_s=IDLE_S) == ["d0"]
    assert b.n_established == 6
    b.ingest(make_batch([("y", 1003.0 + t) for t in range(L)]))
    assert b.is_established("y")
    assert not b.is_established("x")


def test_a_refusal_names_the_device_and_its_topic() -> None:
    b = buffers(max_devices=1, probation_slots=0)
    b.ingest(make_batch([("a", float(t)) for t in range(L)]))
    batch = make_batch([("a", 100.0), ("b", 100.0)])
    batch.topics = ["sensors/a/telemetry", "sensors/b/telemetry"]
    [refusal] = b.ingest(batch).rejections
    assert (refusal.reason, refusal.device) == (Reason.DEVICE_LIMIT, "b")
    assert refusal.topic == "sensors/b/telemetry"
    assert "1 of 1 slots hold established devices" in refusal.detail


def test_probation_slots_arguments() -> None:
    with pytest.raises(ValueError, match="probation_slots"):
        buffers(max_devices=4, probation_slots=-1)
    assert buffers(max_devices=100, probation_slots=None).probation_slots == 10  # a tenth
    assert buffers(max_devices=5, probation_slots=None).probation_slots == 0
    # All slots on probation: no device is ever established, and a newcomer pushes out the
    # least recently seen one, whatever it sent (the behaviour before admission existed).
    b = buffers(max_devices=2, probation_slots=9)
    assert b.probation_slots == 2
    b.ingest(make_batch([("a", float(t)) for t in range(3 * L)] + [("b", 0.0)]))
    assert b.n_established == 0
    b.ingest(make_batch([("b", 1.0)]))
    assert b.ingest(make_batch([("c", 0.0)])).evicted == ["a"]


def test_config_key() -> None:
    assert load_config(None, {}).stream.probation_slots is None
    assert load_config(None, {"stream.probation_slots": 50}).stream.probation_slots == 50
    with pytest.raises(ConfigError, match="probation_slots"):
        load_config(None, {"stream.probation_slots": -1})


# --------------------------------------------------------------------------- snapshots


def fleet_state() -> dict[str, np.ndarray]:
    """Three established devices and two on probation, the probation ones most recent."""
    a = buffers(max_devices=16, probation_slots=4)
    a.ingest(make_batch([(d, float(t)) for t in range(L) for d in ("e0", "e1", "e2")]))
    a.ingest(make_batch([(d, 100.0 + t) for t in range(2) for d in ("p0", "p1")]))
    return a.export_state()


def test_a_snapshot_keeps_who_is_established() -> None:
    state = fleet_state()
    assert state["established"].tolist() == [True, True, True, False, False]
    b = buffers(max_devices=5, probation_slots=0)
    assert b.import_state(state, now_mono=0.0) == 5
    assert [b.is_established(d) for d in ("e0", "e1", "e2", "p0", "p1")] == [True, True, True, False, False]
    # Restored established devices keep their slots against newcomers; p0 (least recent on
    # probation) gives up its own.
    r = b.ingest(make_batch([("new", 200.0)]))
    assert r.evicted == ["p0"]
    assert b.n_established == 3


def test_a_smaller_restore_keeps_established_devices_before_newer_ones_on_probation() -> None:
    b = buffers(max_devices=4, probation_slots=0)
    assert b.import_state(fleet_state(), now_mono=0.0) == 4
    assert b.devices() == ["e0", "e1", "e2", "p1"]  # p0, on probation and less recent, left out
    assert b.n_established == 3


def test_established_beyond_the_room_restore_on_probation() -> None:
    b = buffers(max_devices=5, probation_slots=3)  # room for 2 established
    b.import_state(fleet_state(), now_mono=0.0)
    assert [b.is_established(d) for d in ("e0", "e1", "e2")] == [False, True, True]  # the most recent


def test_a_snapshot_from_before_admission_derives_it_from_full_windows() -> None:
    state = fleet_state()
    del state["established"]
    b = buffers(max_devices=16, probation_slots=4)
    b.import_state(state, now_mono=0.0)
    assert sorted(d for d in b.devices() if b.is_established(d)) == ["e0", "e1", "e2"]


# --------------------------------------------------------------------------- pipeline

FEATURES = ("temperature", "pressure", "vibration")


class Sink:
    """Records what the pipeline hands its output."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.forgotten: list[str] = []
        self.states: list[AlertRecord] = []

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.decisions.extend(decisions)

    def flush_scores(self) -> None:
        pass

    def forget(self, devices: list[str]) -> None:
        self.forgotten.extend(devices)

    def set_overloaded(self, overloaded: bool) -> None:
        pass

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.states.extend(records)


def message(device: str, ts: float) -> RawMessage:
    doc = {"ts": ts, "temperature": 0.1, "pressure": -0.1, "vibration": 0.05}
    return RawMessage(f"sensors/{device}/telemetry", orjson.dumps(doc), time.time(), time.monotonic())


@pytest.fixture
def pipeline_factory(
    tiny_model: Callable[..., Path], registry: CollectorRegistry
) -> Iterator[Callable[..., tuple[Pipeline, Sink]]]:
    made: list[Pipeline] = []
    model = load_model(tiny_model(window_length=L, threshold=1.0))

    def make(**overrides: object) -> tuple[Pipeline, Sink]:
        cfg = load_config(None, {"batching.max_delay_ms": 0.0, **overrides})
        sink = Sink()
        p = Pipeline(cfg, model, Metrics(registry), sink)
        made.append(p)
        return p, sink

    yield make
    for p in made:
        p.close()  # stops the inference threads


def test_through_the_pipeline_the_fleet_is_scored_and_the_flood_counted(
    pipeline_factory: Callable[..., tuple[Pipeline, Sink]], registry: CollectorRegistry
) -> None:
    pipeline, sink = pipeline_factory(**{"stream.max_devices": 16, "stream.probation_slots": 2})
    fleet = [f"m{i}" for i in range(5)]
    t0 = time.time() - 100
    rng = np.random.default_rng(5)
    offered = 0
    for t in range(40):  # a flood of 300 new ids a second from second 10 on
        msgs = [message(d, t0 + t) for d in fleet]
        msgs += [message(f"junk-{t}-{k}", t0 + t) for k in range(300 if t >= 10 else 0)]
        offered += len(msgs)
        pipeline.ingest([msgs[i] for i in rng.permutation(len(msgs))])
    pipeline.flush(force=True)

    scored = [d.device for d in sink.decisions]
    for d in fleet:
        assert scored.count(d) == 40 - L + 1  # every window, flood or not
    assert not [d for d in scored if d.startswith("junk-")]

    def value(name: str, **labels: str) -> float:
        v = registry.get_sample_value(name, labels)
        assert v is not None, name
        return v

    refused = value("anomalyd_rejected_total", reason="device_limit")
    evicted = value("anomalyd_devices_evicted_total", cause="capacity")
    accepted = value("anomalyd_readings_accepted_total")
    assert refused > 0
    assert evicted > 0
    assert accepted + refused == offered  # nothing lost without a count
    assert accepted >= 40 * len(fleet)
    # The detector and the sink were told about every device pushed out.
    assert len(sink.forgotten) == evicted
    assert all(d.startswith("junk-") for d in sink.forgotten)
    assert pipeline.buffers.n_established == len(fleet)


def test_a_device_on_probation_with_a_state_becomes_unknown_evicted(
    pipeline_factory: Callable[..., tuple[Pipeline, Sink]],
) -> None:
    # With warmup "pad" a device on probation is scored (padded windows) and has a state;
    # when a newcomer takes its slot, its state becomes unknown, reason "evicted".
    pipeline, sink = pipeline_factory(**{"stream.max_devices": 2, "stream.warmup": "pad"})
    t0 = time.time() - 100
    pipeline.ingest([message("young", t0 + t) for t in range(3)])
    pipeline.ingest([message("old", t0 + t) for t in range(L)])  # established
    pipeline.flush(force=True)
    assert {r.device for r in sink.states} >= {"young", "old"}
    pipeline.ingest([message("new", t0 + 50)])
    last = [r for r in sink.states if r.device == "young"][-1]
    assert (last.state, last.reason) == ("unknown", "evicted")
    assert "old" not in sink.forgotten
