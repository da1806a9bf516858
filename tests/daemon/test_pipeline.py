"""The Pipeline on its own (real decoder, buffers, batcher, ONNX Runtime, detector): lag in
data time, the overloaded verdict, losses counted under a reason, and model swaps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd import logsetup
from anomalyd.alerts import AlertRecord, RetainedState
from anomalyd.commands import Command
from anomalyd.config import load_config
from anomalyd.decode import RawMessage
from anomalyd.detector import Decision
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel, load_model
from anomalyd.pipeline import Pipeline

L = 8
FEATURES = ("temperature", "pressure", "vibration")


class Sink:
    """Records what the pipeline hands its output."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.forgotten: list[str] = []
        self.overloaded: list[bool] = []
        self.states: list[AlertRecord] = []
        self.passes = 0

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.decisions.extend(decisions)

    def flush_scores(self) -> None:
        self.passes += 1

    def forget(self, devices: list[str]) -> None:
        self.forgotten.extend(devices)

    def set_overloaded(self, overloaded: bool) -> None:
        self.overloaded.append(overloaded)

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.states.extend(records)

    def state_of(self, device: str) -> AlertRecord:
        return [r for r in self.states if r.device == device][-1]


def messages(device: str, t0: float, n: int) -> list[RawMessage]:
    now = time.time()
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        doc = {
            "ts": t0 + i,
            **{f: float(v) for f, v in zip(FEATURES, rng.uniform(-0.3, 0.3, 3), strict=True)},
        }
        out.append(RawMessage(f"sensors/{device}/telemetry", orjson.dumps(doc), now, time.monotonic()))
    return out


@pytest.fixture
def model(tiny_model: Callable[..., Path]) -> LoadedModel:
    return load_model(tiny_model(window_length=L, threshold=1.0))


_made: list[Pipeline] = []


@pytest.fixture(autouse=True)
def _close_pipelines() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()  # stops the inference threads


def make(model: LoadedModel, registry: CollectorRegistry, **overrides: object) -> tuple[Pipeline, Sink]:
    cfg = load_config(None, {"batching.max_delay_ms": 0.0, **overrides})
    sink = Sink()
    pipeline = Pipeline(cfg, model, Metrics(registry), sink)
    _made.append(pipeline)
    return pipeline, sink


def test_lag_in_data_time_is_measured_per_batch(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, sink = make(model, registry)
    # Readings whose newest is 30 s old when scored: a backlog somewhere upstream.
    pipeline.ingest(messages("late", time.time() - 30 - L, L))
    pipeline.flush(force=True)
    assert len(sink.decisions) == 1
    lag = registry.get_sample_value("anomalyd_lag_seconds")
    assert 30.0 <= lag < 32.0
    assert registry.get_sample_value("anomalyd_data_lag_seconds_count") == 1.0
    assert registry.get_sample_value("anomalyd_data_lag_seconds_bucket", {"le": "30.0"}) == 0.0
    assert registry.get_sample_value("anomalyd_data_lag_seconds_bucket", {"le": "60.0"}) == 1.0


def test_overloaded_while_the_data_lag_exceeds_the_limit(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(model, registry, **{"stream.overload_lag_s": 10.0})
    pipeline.ingest(messages("behind", time.time() - 30 - L, L))
    pipeline.flush(force=True)
    pipeline.housekeeping(time.monotonic())
    assert pipeline.overloaded
    assert registry.get_sample_value("anomalyd_overloaded") == 1.0
    assert sink.overloaded == [True]
    # Fresh readings: lag back near zero, the next check clears it.
    pipeline.ingest(messages("fresh", time.time() - L + 1, L))
    pipeline.flush(force=True)
    pipeline.housekeeping(time.monotonic())
    assert not pipeline.overloaded
    assert registry.get_sample_value("anomalyd_overloaded") == 0.0
    assert sink.overloaded == [True, False]
    # An idle interval (nothing scored) is not a lag.
    pipeline.housekeeping(time.monotonic())
    assert sink.overloaded == [True, False]


def test_a_congested_or_overflowing_intake_queue_is_overload(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    pipeline, sink = make(model, registry)
    pipeline.housekeeping(time.monotonic(), queue_fill=0.6)
    assert sink.overloaded == [True]
    pipeline.housekeeping(time.monotonic(), queue_fill=0.1)
    assert sink.overloaded == [True, False]
    pipeline.housekeeping(time.monotonic(), queue_fill=0.0, queue_dropped=3)  # drops since last check
    pipeline.housekeeping(time.monotonic(), queue_fill=0.0, queue_dropped=3)  # none new
    assert sink.overloaded == [True, False, True, False]


def test_a_failing_model_loses_windows_under_a_reason(
    model: LoadedModel, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, sink = make(model, registry)

    def broken(_windows: np.ndarray) -> None:
        raise RuntimeError("injected ONNX Runtime failure")

    # A fault ONNX Runtime cannot be made to produce on demand: injected.
    monkeypatch.setattr(model, "run", broken)
    pipeline.ingest(messages("d", time.time() - 2 * L, L + 2))
    pipeline.flush(force=True)
    assert sink.decisions == []
    assert registry.get_sample_value("anomalyd_windows_dropped_total", {"reason": "model_error"}) == 3.0
    assert registry.get_sample_value("anomalyd_pipeline_errors_total", {"stage": "model"}) >= 1.0


def test_a_model_that_always_fails_is_logged_once_per_interval_and_counted_every_time(
    model: LoadedModel,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    interval = 60.0
    pipeline, sink = make(model, registry, **{"logging.rejection_log_interval_s": interval})

    def broken(_windows: np.ndarray) -> None:
        raise RuntimeError("injected ONNX Runtime failure")

    # A fault ONNX Runtime cannot be made to produce on demand: injected. The limiter's
    # clock is the test's, so that the interval passes when the test says so.
    monkeypatch.setattr(model, "run", broken)
    clock = [1000.0]
    monkeypatch.setattr(logsetup, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    batches = 50
    t0 = time.time() - 2 * (L + batches)
    pipeline.ingest(messages("d", t0, L - 1))
    for i in range(batches):  # one window each, each scored as a batch of its own
        pipeline.ingest(messages("d", t0 + L - 1 + i, 1))
        pipeline.flush(force=True)
    clock[0] += interval
    pipeline.ingest(messages("d", t0 + L - 1 + batches, 1))
    pipeline.flush(force=True)

    assert sink.decisions == []
    assert registry.get_sample_value("anomalyd_pipeline_errors_total", {"stage": "model"}) == batches + 1
    assert (
        registry.get_sample_value("anomalyd_windows_dropped_total", {"reason": "model_error"}) == batches + 1
    )
    lines = [r for r in caplog.records if "model failed on a batch" in r.getMessage()]
    assert len(lines) == 2
    first, summary = lines
    assert first.levelno == summary.levelno == logging.ERROR
    assert first.exc_info is not None
    assert "RuntimeError: injected ONNX Runtime failure" in caplog.text  # the traceback's last line
    assert summary.exc_info is None  # the traceback once, not with every line
    assert summary.getMessage().endswith(f"({batches - 1} similar suppressed)")


def test_drop_pending_counts_the_windows(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, _sink = make(model, registry, **{"batching.max_delay_ms": 60_000.0, "batching.max_batch": 64})
    pipeline.ingest(messages("d", time.time() - 2 * L, L + 4))
    assert pipeline.pending == 5
    assert pipeline.drop_pending() == 5
    assert pipeline.pending == 0
    assert registry.get_sample_value("anomalyd_windows_dropped_total", {"reason": "shutdown"}) == 5.0


def test_a_model_with_another_window_restarts_every_device(
    model: LoadedModel, registry: CollectorRegistry, tiny_model: Callable[..., Path]
) -> None:
    pipeline, sink = make(model, registry)
    pipeline.ingest(messages("a", time.time() - 2 * L, L))
    pipeline.ingest(messages("b", time.time() - 2 * L, 3))
    pipeline.flush(force=True)
    longer = load_model(tiny_model("long.onnx", window_length=2 * L, threshold=1.0))
    pipeline.swap_model(longer)
    assert sorted(sink.forgotten) == ["a", "b"]
    assert pipeline.buffers.n_devices == 0
    assert pipeline.model is longer


def test_the_same_shape_keeps_windows_and_takes_the_new_threshold(
    model: LoadedModel, registry: CollectorRegistry, tiny_model: Callable[..., Path]
) -> None:
    pipeline, sink = make(model, registry, **{"detector.threshold_scale": 2.0})
    pipeline.ingest(messages("a", time.time() - 2 * L, L))
    assert pipeline.threshold == 2.0
    same = load_model(tiny_model("same.onnx", window_length=L, threshold=3.0))
    pipeline.swap_model(same)
    assert pipeline.threshold == 6.0
    assert sink.forgotten == []
    assert pipeline.buffers.readings("a") == L


def test_concurrent_batches_decide_in_order_like_one_at_a_time(
    model: LoadedModel, tiny_model: Callable[..., Path]
) -> None:
    """Batches scored on inference threads are decided in submission order: the same
    decisions, in the same order, as scoring on the pipeline thread."""
    runs = []
    t0 = time.time() - 100
    for concurrent in (1, 3):
        woken: list[int] = []
        cfg = load_config(
            None,
            {
                "batching.max_delay_ms": 0.0,
                "batching.max_batch": 4,
                "model.concurrent_batches": concurrent,
                "detector.k_enter": 2,
            },
        )
        sink = Sink()
        pipeline = Pipeline(cfg, model, Metrics(CollectorRegistry()), sink, wake=partial(woken.append, 1))
        try:
            for device in ("a", "b", "c"):
                pipeline.ingest(messages(device, t0, 40))
            pipeline.flush(force=True)
            assert pipeline.in_flight == 0
        finally:
            pipeline.close()
        runs.append([(d.device, d.ts, d.score, d.alert) for d in sink.decisions])
        assert (len(woken) > 0) == (concurrent > 1)
    assert len(runs[0]) == 3 * (40 - L + 1)
    for x, y in zip(runs[0], runs[1], strict=True):
        assert x == y


def test_one_device_with_a_clock_behind_does_not_make_the_daemon_overloaded(
    model: LoadedModel, registry: CollectorRegistry
) -> None:
    """Overloaded needs every pass of a check to be late: a device whose clock runs 30 s
    behind, alone in some passes, is not a backlog; other devices' passes are on time."""
    pipeline, sink = make(model, registry, **{"stream.overload_lag_s": 10.0})
    pipeline.ingest(messages("behind", time.time() - 30 - L, L))
    pipeline.flush(force=True)
    pipeline.ingest(messages("on-time", time.time() - L + 1, L))
    pipeline.flush(force=True)
    pipeline.housekeeping(time.monotonic())
    assert sink.overloaded == []
    assert registry.get_sample_value("anomalyd_overloaded") == 0.0


def test_an_idle_check_resets_the_lag_gauge(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, _sink = make(model, registry)
    pipeline.ingest(messages("late", time.time() - 30 - L, L))
    pipeline.flush(force=True)
    pipeline.housekeeping(time.monotonic())
    assert registry.get_sample_value("anomalyd_lag_seconds") >= 30.0
    pipeline.housekeeping(time.monotonic(), queue_fill=0.0)  # nothing scored, nothing queued
    assert registry.get_sample_value("anomalyd_lag_seconds") == 0.0
    assert registry.get_sample_value("anomalyd_overloaded") == 0.0


def test_every_path_that_ends_a_state_publishes_the_state_then_true(
    model: LoadedModel, tiny_model: Callable[..., Path], registry: CollectorRegistry
) -> None:
    # Every slot on probation (probation_slots = max_devices): a newcomer may push out any
    # device, even one with a full window (otherwise "c" would be refused; see test_admission).
    overrides = {"stream.max_devices": 2, "stream.probation_slots": 2, "stream.idle_evict_s": 5.0}
    pipeline, sink = make(model, registry, **overrides)
    t0 = time.time() - 100
    pipeline.ingest(messages("a", t0, L) + messages("b", t0, L))
    pipeline.flush(force=True)
    assert [(r.device, r.state) for r in sink.states] == [("a", "normal"), ("b", "normal")]
    pipeline.ingest(messages("c", t0, 1))  # capacity: "a" is the least recent
    assert (sink.state_of("a").state, sink.state_of("a").reason) == ("unknown", "evicted")
    pipeline.housekeeping(time.monotonic() + 10.0)  # everyone idle
    assert (sink.state_of("b").state, sink.state_of("b").reason) == ("unknown", "idle")
    # "c" had no state yet (warming up): nothing to correct
    assert [r.device for r in sink.states].count("c") == 0
    # a model with another window: every known device becomes unknown, model_changed
    pipeline.ingest(messages("d", t0, L))
    pipeline.flush(force=True)
    pipeline.swap_model(load_model(tiny_model("other.onnx", window_length=L + 2)))
    assert (sink.state_of("d").state, sink.state_of("d").reason) == ("unknown", "model_changed")


def test_reassert_and_reconcile(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, sink = make(model, registry)
    t0 = time.time() - 100
    pipeline.ingest(messages("a", t0, L) + messages("warming", t0, 2))
    pipeline.flush(force=True)
    sink.states.clear()
    pipeline.request_reassert()
    pipeline.housekeeping(time.monotonic())
    assert [(r.device, r.state) for r in sink.states] == [("a", "normal")]
    sink.states.clear()
    claims = [("a", "anomalous"), ("gone", "anomalous"), ("warming", "normal"), ("old", "unknown")]
    pipeline.reconcile([RetainedState(device, state) for device, state in claims])
    assert [(r.device, r.state, r.reason) for r in sink.states] == [
        ("gone", "unknown", "no_state"),
        ("warming", "unknown", "warming_up"),
    ]


def test_commands_apply_to_tracked_devices_only(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, sink = make(model, registry)
    pipeline.ingest(messages("a", time.time() - 100, L))
    pipeline.flush(force=True)
    assert pipeline.apply_command(Command("a", "shelve", "me", "why", 60.0), now=1000.0)
    assert (sink.state_of("a").state, sink.state_of("a").shelved_until) == ("shelved", 1060.0)
    assert not pipeline.apply_command(Command("nobody", "shelve", "me", "why", 60.0))
    pipeline.housekeeping(time.monotonic())  # the shelving ended long ago (now >> 1060)
    assert sink.state_of("a").state == "normal"


def test_snapshot_round_trip_through_the_pipeline(model: LoadedModel, registry: CollectorRegistry) -> None:
    pipeline, sink = make(model, registry)
    t0 = time.time() - 100
    pipeline.ingest(messages("a", t0, L + 3))
    pipeline.flush(force=True)
    snap = pipeline.export_snapshot()
    other, other_sink = make(model, CollectorRegistry())
    assert other.restore_snapshot(snap) == 1
    nxt = messages("a", t0 + L + 3, 1)
    pipeline.ingest(nxt)
    other.ingest(nxt)
    pipeline.flush(force=True)
    other.flush(force=True)
    assert other_sink.decisions[-1].score == sink.decisions[-1].score
    assert other_sink.decisions[-1].ts == t0 + L + 3
