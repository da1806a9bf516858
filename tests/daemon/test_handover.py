"""Alert hand-over between the instances of a partitioned fleet, below the process: what
``RetainedStates`` reads from retained alert messages, the detector's adoption of another
instance's alert, and ``Pipeline.reconcile`` with ownership (real decoder, buffers, ONNX
Runtime and detector; the tiny model scores a window by the squares of its newest reading,
so readings of 10 are anomalous and readings of 0.1 normal against threshold 1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd import alerts
from anomalyd.alerts import AlertRecord, OperatorAction, RetainedState, RetainedStates, alert_payload
from anomalyd.config import load_config
from anomalyd.decode import RawMessage
from anomalyd.detector import Decision, Detector
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel, load_model
from anomalyd.partitions import nats_partition
from anomalyd.pipeline import Pipeline

L = 4
FEATURES = ["temperature", "pressure", "vibration"]
HOT, COLD = 10.0, 0.1
P = 8
K_ENTER, K_EXIT = 2, 3


# ---------------------------------------------------------------------- RetainedStates


def retained(*messages: tuple[str, bytes, bool]) -> tuple[list[RetainedState], int]:
    """What RetainedStates hands the pipeline for these (topic, payload, retain), and how
    often it woke the pipeline thread."""
    woken = []
    states = RetainedStates("anomaly/{device}/alert", lambda: woken.append(1))
    for topic, payload, retain in messages:
        states.put(topic, payload, retain)
    return states.take(), len(woken)


def test_a_retained_state_message_is_read_back_whole() -> None:
    record = AlertRecord(
        "pump-7",
        "shelved",
        "anomalous",
        since=1000.5,
        ts=1010.0,
        score=41.5,
        threshold=2.0,
        peak_score=50.0,
        peak_ts=1002.0,
        peak_contributions=np.array([0.5, 49.0, 0.5], np.float32),
        shelved_until=5000.0,
        operator=OperatorAction("shelve", "j.smith", "valve", 1001.0),
    )
    payload = orjson.dumps(alert_payload(record, FEATURES, "v1"), option=orjson.OPT_SERIALIZE_NUMPY)
    (claim,), woken = retained(("anomaly/pump-7/alert", payload, True))
    assert woken == 1
    assert claim == RetainedState(
        "pump-7",
        "shelved",
        since=1000.5,
        ts=1010.0,
        condition="anomalous",
        reason=None,
        score=41.5,
        threshold=2.0,
        peak_score=50.0,
        peak_ts=1002.0,
        contributions={"temperature": 0.5, "pressure": 49.0, "vibration": 0.5},
        shelved_until=5000.0,
        operator=OperatorAction("shelve", "j.smith", "valve", 1001.0),
        model_version="v1",
    )


def test_foreign_and_garbled_retained_messages_are_claims_without_details() -> None:
    claims, woken = retained(
        ("anomaly/a/alert", b"\xff not json", True),
        ("anomaly/b/alert", b"[1, 2]", True),
        ("anomaly/c/alert", b'{"alert": true}', True),  # an older anomalyd's message
        ("anomaly/d/alert", b'{"alert": false}', True),
        (
            "anomaly/e/alert",
            b'{"state": "anomalous", "since": "yesterday", "ts": true, "peak_score": null,'
            b' "contributions": {"temperature": "hot"}, "operator": {"verb": 1}, "condition": 5}',
            True,
        ),
        ("anomaly/f/alert", b'{"state": "anomalous", "since": 1.0}', False),  # live: not the broker's memory
        ("anomaly/g/alert", b"", True),  # a cleared retained message
        ("elsewhere/h/alert", b'{"state": "anomalous"}', True),
        ("anomaly//alert", b'{"state": "anomalous"}', True),
    )
    assert [(c.device, c.state) for c in claims] == [
        ("a", "?"),
        ("b", "?"),
        ("c", "anomalous"),
        ("d", "normal"),
        ("e", "anomalous"),
    ]
    assert woken == 5
    e = claims[-1]
    assert math.isnan(e.since)
    assert math.isnan(e.ts)
    assert math.isnan(e.peak_score)
    assert (e.contributions, e.operator, e.condition) == (None, None, None)


def test_the_retained_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "_RETAINED_MAX", 3)
    claims, woken = retained(*[(f"anomaly/d{i}/alert", b'{"state": "normal"}', True) for i in range(5)])
    assert [c.device for c in claims] == ["d0", "d1", "d2"]
    assert woken == 3


# ---------------------------------------------------------------------- the detector


def detector() -> Detector:
    return Detector(1.0, "none", 0.5, K_ENTER, K_EXIT)


def decide(det: Detector, device: str, t0: float, values: list[float]) -> list[Decision]:
    n = len(values)
    scores = np.asarray([v * v for v in values], np.float32)
    contributions = np.repeat(scores[:, None] / 3, 3, axis=1).astype(np.float32)
    ts = t0 + np.arange(n, dtype=np.float64)
    return det.update([device] * n, ts, scores, contributions, np.zeros(n, np.bool_))


def claim_of(device: str, state: str, **fields: object) -> RetainedState:
    return RetainedState(device, state, **fields)  # type: ignore[arg-type]


def record_of(det: Detector, device: str) -> AlertRecord:
    record = det.record(device)
    assert record is not None, f"no state for {device}"
    return record


def test_an_adopted_alert_is_not_raised_again_and_clears_once_after_k_exit_normal_windows() -> None:
    det = detector()
    peak = np.array([1.0, 2.0, 3.0], np.float32)
    claim = claim_of(
        "d", "anomalous", since=1000.0, ts=1005.0, score=90.0, threshold=1.0, peak_score=120.0, peak_ts=1003.0
    )
    assert det.adopt(claim, peak)
    assert det.knows("d")
    assert det.alert_state("d")
    record = det.record("d")
    assert record is not None
    assert (record.state, record.condition, record.since, record.ts) == (
        "anomalous",
        "anomalous",
        1000.0,
        1005.0,
    )
    assert (record.peak_score, record.peak_ts, record.score) == (120.0, 1003.0, 90.0)
    assert record.peak_contributions is peak

    # Anomalous windows: still the same alert (no raise, no new state, same since).
    hot = decide(det, "d", 1010.0, [HOT] * 3)
    assert [(d.alert, d.alert_changed, d.state_changed) for d in hot] == [(True, False, False)] * 3
    assert record_of(det, "d").since == 1000.0
    assert record_of(det, "d").peak_score == 120.0  # 100 < 120
    # k_exit normal windows clear it, once, with a normal state that begins then.
    cold = decide(det, "d", 1020.0, [COLD] * (K_EXIT + 2))
    assert [d.alert_changed for d in cold] == [False] * (K_EXIT - 1) + [True, False, False]
    changed = [d.record for d in cold if d.record is not None]
    assert [(r.state, r.since) for r in changed] == [("normal", 1020.0 + K_EXIT - 1)]


def test_an_adopted_alert_without_a_told_peak_takes_the_next_score_as_its_peak() -> None:
    det = detector()
    assert det.adopt(claim_of("d", "anomalous", since=1000.0, ts=1000.0))
    decide(det, "d", 1001.0, [HOT])
    record = det.record("d")
    assert record is not None
    assert (record.peak_score, record.peak_ts, record.since) == (pytest.approx(100.0), 1001.0, 1000.0)


def test_only_alerts_and_operator_states_with_their_identity_are_adopted() -> None:
    det = detector()
    for claim in [
        claim_of("n", "normal", since=1.0),
        claim_of("u", "unknown", since=1.0),
        claim_of("c", "cadence_mismatch", since=1.0),
        claim_of("g", "?"),
        claim_of("a", "anomalous"),  # no since: no identity to keep
        claim_of("s", "shelved", since=1.0),  # shelved until when?
    ]:
        assert not det.adopt(claim), claim
    assert det.n_devices == 0
    decide(det, "known", 1.0, [COLD])
    assert not det.adopt(claim_of("known", "anomalous", since=1.0))
    assert not det.alert_state("known")


def test_an_operator_state_is_adopted_with_who_why_and_until_when() -> None:
    det = detector()
    op = OperatorAction("shelve", "j.smith", "valve", 990.0)
    assert det.adopt(
        claim_of(
            "s",
            "shelved",
            since=990.0,
            ts=995.0,
            condition="anomalous",
            shelved_until=2000.0,
            operator=op,
            peak_score=80.0,
        )
    )
    oos = OperatorAction("out_of_service", "k.lee", "overhaul", 980.0)
    assert det.adopt(claim_of("o", "out_of_service", since=980.0, ts=985.0, condition="normal", operator=oos))
    s, o = det.record("s"), det.record("o")
    assert s is not None
    assert o is not None
    assert (s.state, s.condition, s.since, s.shelved_until, s.operator) == (
        "shelved",
        "anomalous",
        990.0,
        2000.0,
        op,
    )
    assert (o.state, o.condition, o.since, o.operator) == ("out_of_service", "unknown", 980.0, oos)
    # The shelving ends: the alert underneath shows, and it was not raised again.
    sweep = det.sweep(2001.0)
    assert [(r.device, r.state, r.since) for r in sweep.expired] == [("s", "anomalous", 2001.0)]
    assert decide(det, "s", 2010.0, [HOT])[0].alert_changed is False
    # Out of service: windows are decided underneath, the state stays.
    assert decide(det, "o", 990.0, [HOT] * K_ENTER)[-1].record is None
    assert record_of(det, "o").state == "out_of_service"


def test_a_claim_overtakes_a_state_here_only_when_it_differs_and_is_newer() -> None:
    det = detector()
    decide(det, "d", 1000.0, [HOT] * K_ENTER)  # raised at 1001
    ours = det.record("d")
    assert ours is not None
    assert ours.state == "anomalous"
    assert not det.claim_is_newer(claim_of("d", "anomalous", since=ours.since, ts=5000.0))  # the same state
    assert det.claim_is_newer(claim_of("d", "normal", since=1500.0, ts=1500.0))  # cleared elsewhere since
    assert not det.claim_is_newer(claim_of("d", "normal", since=900.0, ts=900.0))  # older than ours
    assert not det.claim_is_newer(claim_of("d", "normal", since=1500.0))  # no ts: cannot tell
    assert det.discard("d")
    assert not det.knows("d")
    assert not det.discard("d")


def test_an_alert_raised_here_before_the_retained_one_arrived_keeps_the_retained_identity() -> None:
    det = detector()
    decide(det, "d", 1000.0, [HOT] * K_ENTER)  # this process raised it at 1001 (first window 1000)
    record = det.continue_alert(
        claim_of("d", "anomalous", since=900.0, ts=950.0, peak_score=500.0, peak_ts=920.0)
    )
    assert record is not None
    assert (record.state, record.since, record.peak_score, record.peak_ts) == (
        "anomalous",
        900.0,
        500.0,
        920.0,
    )
    # Not for an alert raised after this process first saw the device, nor for an inherited state.
    assert det.continue_alert(claim_of("d", "anomalous", since=1000.5)) is None
    other = detector()
    assert other.adopt(claim_of("x", "anomalous", since=1000.0, ts=1000.0))
    assert other.continue_alert(claim_of("x", "anomalous", since=900.0)) is None


# ---------------------------------------------------------------------- the pipeline


class Sink:
    """Records the alert states the pipeline publishes."""

    def __init__(self) -> None:
        self.states: list[AlertRecord] = []
        self.forgotten: list[str] = []

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        pass

    def flush_scores(self) -> None:
        pass

    def forget(self, devices: list[str]) -> None:
        self.forgotten.extend(devices)

    def set_overloaded(self, overloaded: bool) -> None:
        pass

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.states.extend(records)

    def of(self, device: str) -> list[tuple[str, float, str | None]]:
        return [(r.state, r.since, r.reason) for r in self.states if r.device == device]


def devices_in(partition: int, n: int, prefix: str) -> list[str]:
    """``n`` device ids the broker puts in ``partition``."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{prefix}-{i}"
        if nats_partition(name, P) == partition:
            out.append(name)
        i += 1
    return out


MINE = 3  # the partition the instance under test owns
A, B, C = devices_in(MINE, 3, "pump")
(FOREIGN,) = devices_in(MINE + 1, 1, "pump")


def readings(device: str, t0: float, values: list[float], *, partitioned: bool = True) -> list[RawMessage]:
    topic = f"sensors/{device}/telemetry" + (f"/{nats_partition(device, P)}" if partitioned else "")
    now = time.time()
    return [
        RawMessage(topic, orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, v)}), now, time.monotonic())
        for i, v in enumerate(values)
    ]


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> LoadedModel:
    return load_model(tiny_model(window_length=L, threshold=1.0))


_made: list[Pipeline] = []


@pytest.fixture(autouse=True)
def _close_pipelines() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def make(
    model: LoadedModel, registry: CollectorRegistry, *, cluster: bool = True, **overrides: object
) -> tuple[Pipeline, Sink]:
    settings: dict[str, object] = {
        "batching.max_delay_ms": 0.0,
        "detector.k_enter": K_ENTER,
        "detector.k_exit": K_EXIT,
        **overrides,
    }
    if cluster:
        settings |= {"mqtt.protocol": "3.1.1", "cluster.partitions": P, "cluster.owned": [MINE]}
    sink = Sink()
    pipeline = Pipeline(load_config(None, settings), model, Metrics(registry), sink)
    _made.append(pipeline)
    return pipeline, sink


def raised(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("anomalyd_alert_transitions_total", {"direction": "raised"}) or 0.0


def feed(pipeline: Pipeline, device: str, t0: float, values: list[float]) -> None:
    pipeline.ingest(readings(device, t0, values))
    pipeline.flush(force=True)


def test_reconcile_adopts_the_alerts_of_its_own_devices_and_leaves_the_others_alone(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(model, registry)
    t0 = time.time() - 100
    pipeline.reconcile(
        [
            claim_of(
                A,
                "anomalous",
                since=t0 - 50,
                ts=t0 - 10,
                peak_score=300.0,
                peak_ts=t0 - 40,
                contributions=dict.fromkeys(FEATURES, 100.0),
                model_version="another-model",
            ),
            claim_of(B, "normal", since=t0 - 50, ts=t0 - 10),
            claim_of(C, "unknown", since=t0 - 50, ts=t0 - 10, reason="idle"),
            claim_of(FOREIGN, "anomalous", since=t0 - 50, ts=t0 - 10),  # another instance's
            claim_of(devices_in(MINE + 2, 1, "fan")[0], "normal", since=t0 - 50, ts=t0 - 10),
        ]
    )
    # The alert is adopted silently (the broker shows it already); a normal one becomes
    # unknown, as in a single daemon; unknown needs nothing; other instances' are untouched.
    assert [(r.device, r.state, r.reason) for r in sink.states] == [(B, "unknown", "no_state")]
    assert pipeline.detector.knows(A)
    assert not pipeline.detector.knows(FOREIGN)
    adopted = pipeline.detector.record(A)
    assert adopted is not None
    # Another model version's peak is on another scale: not kept.
    assert adopted.since == t0 - 50
    assert adopted.peak_score is not None
    assert math.isnan(adopted.peak_score)

    feed(pipeline, A, t0, [HOT] * (L + 2))  # still anomalous: the same alert
    assert sink.of(A) == []
    assert raised(registry) == 0.0
    record = pipeline.detector.record(A)
    assert record is not None
    assert (record.state, record.since) == ("anomalous", t0 - 50)
    feed(pipeline, A, t0 + L + 2, [COLD] * K_EXIT)  # cleared once, after k_exit normal windows
    assert sink.of(A) == [("normal", t0 + L + 2 + K_EXIT - 1, None)]
    assert registry.get_sample_value("anomalyd_alert_transitions_total", {"direction": "cleared"}) == 1.0
    assert raised(registry) == 0.0


def test_reconcile_of_a_single_daemon_is_unchanged(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, sink = make(model, registry, cluster=False)
    t0 = time.time() - 100
    pipeline.ingest(readings(B, t0, [COLD] * 2, partitioned=False))
    pipeline.reconcile(
        [
            claim_of(A, "anomalous", since=t0, ts=t0),
            claim_of(FOREIGN, "normal", since=t0, ts=t0),
            claim_of(B, "normal", since=t0, ts=t0),
        ]
    )
    assert [(r.device, r.state, r.reason) for r in sink.states] == [
        (A, "unknown", "no_state"),
        (FOREIGN, "unknown", "no_state"),
        (B, "unknown", "warming_up"),
    ]
    assert not pipeline.detector.knows(A)


def test_an_adopted_device_that_never_sends_becomes_idle(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(model, registry, **{"stream.idle_evict_s": 30.0})
    t0 = time.time() - 100
    pipeline.reconcile([claim_of(A, "anomalous", since=t0, ts=t0), claim_of(B, "anomalous", since=t0, ts=t0)])
    feed(pipeline, B, t0 + 10, [HOT])  # B sends (a window is not even full yet): the buffers track it
    now = time.monotonic()
    pipeline.housekeeping(now)
    assert sink.states == []
    pipeline.housekeeping(now + 31.0)
    assert [(r.device, r.state, r.reason) for r in sink.states if r.device == A] == [(A, "unknown", "idle")]
    assert not pipeline.detector.knows(A)
    assert A in sink.forgotten
    # B idled out through its window, the ordinary way, once.
    assert [(state, reason) for state, _, reason in sink.of(B)] == [("unknown", "idle")]
    assert registry.get_sample_value("anomalyd_devices_evicted_total", {"cause": "idle"}) == 2.0


def test_a_stale_snapshot_gives_way_to_a_newer_retained_state(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    first, _ = make(model, registry)
    t0 = time.time() - 100
    feed(first, A, t0, [HOT] * (L + 1))  # A raised here...
    feed(first, B, t0, [HOT] * (L + 1))  # ... and B
    snap = first.export_snapshot()
    second, sink = make(model, CollectorRegistry())
    assert second.restore_snapshot(snap) == 2
    raised_at = record_of(second.detector, A).since
    second.reconcile(
        [
            # A moved to another instance meanwhile, which cleared it: newer than the snapshot.
            claim_of(A, "normal", since=t0 + 50, ts=t0 + 60),
            # B: the broker holds what this instance published before its stop.
            claim_of(B, "anomalous", since=raised_at, ts=raised_at),
        ]
    )
    assert [(r.device, r.state, r.reason) for r in sink.states] == [(A, "unknown", "warming_up")]
    assert not second.detector.knows(A)
    assert second.detector.alert_state(B)


def test_a_snapshot_from_before_a_rebalance_restores_only_the_devices_owned_now(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    everything, _ = make(model, registry, cluster=False)
    t0 = time.time() - 100
    for device in (A, FOREIGN):
        everything.ingest(readings(device, t0, [HOT] * L, partitioned=False))
    everything.flush(force=True)
    mine, sink = make(model, CollectorRegistry())
    assert mine.restore_snapshot(everything.export_snapshot()) == 1
    assert mine.detector.devices() == [A]
    assert mine.buffers.devices() == [A]
    mine.request_reassert()
    mine.housekeeping(time.monotonic())
    assert [r.device for r in sink.states] == [A]


def test_an_alert_raised_before_the_retained_state_arrived_keeps_the_retained_identity(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(model, registry)
    t0 = time.time() - 100
    feed(pipeline, A, t0, [HOT] * (L + 1))  # scored before the broker's retained states came in
    assert [s for s, _, _ in sink.of(A)] == ["normal", "anomalous"]  # (k_enter = 2)
    pipeline.reconcile(
        [claim_of(A, "anomalous", since=t0 - 500, ts=t0 - 5, peak_score=50.0, peak_ts=t0 - 400)]
    )
    assert sink.of(A)[-1] == ("anomalous", t0 - 500, None)
    assert record_of(pipeline.detector, A).peak_score == pytest.approx(100.0)
    # A later reconnect hands back what this instance published: nothing changes.
    sink.states.clear()
    pipeline.reconcile([claim_of(A, "anomalous", since=t0 - 500, ts=t0 + L)])
    assert sink.states == []
