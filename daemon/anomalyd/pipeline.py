"""One model's data path: decode → buffers → batcher → model → detector → output.

``Pipeline`` is the only place where the stages are wired together. The service runs one
on its pipeline thread, ``anomalyd.replay`` (and through it the SKAB evaluation) runs one
over recorded readings, ``benchmarks/bench_pipeline.py`` runs one with the real publisher,
and ``anomalyd bench`` runs the service, so what they measure is what production runs,
publisher and metrics included.

One thread owns a pipeline, so nothing in it takes a lock. The stages know nothing of
each other beyond the values passed between them; where their decisions go is the
``DecisionSink`` given to the pipeline (the MQTT ``Publisher`` in the service, a collector
in a replay).

Besides the flow, the pipeline owns:

* the model swap (a reload): windows pending for the old model are scored with it
  first; a new window length or feature list restarts every device's window;
* the warm-up's replay (``warm``, ``anomalyd.warmup``): readings read back from JetStream
  go into the windows unscored, and live readings the replay already wrote are dropped;
* the devices' alert states (``anomalyd.alerts``): every change goes to the sink, and so
  does the ``unknown`` state of every device it stops tracking (evicted, idle, a model
  with another window shape); operator commands, shelving expiry, the cadence check's
  verdicts, re-asserting every state after a reconnect and reconciling the states the
  broker retains; snapshots of the per-device state (``anomalyd.snapshot``);
* housekeeping: idle eviction, shelving expiry, gauges, and the *overloaded* verdict,
  checked about once a second. The daemon is overloaded when every pass since the previous check was late —
  its newest reading older than ``stream.overload_lag_s`` in data time when its windows
  were scored (a backlog in the broker, where the daemon's own queues cannot see it) —,
  or its intake queue is at least half full, or telemetry was dropped because that
  queue was full.

``Pipeline`` is put together from mixins, one module per part, as ``anomalyd.service`` is:

* ``anomalyd.pipeline`` (here): the flow (``ingest``, ``ingest_readings``, ``flush``),
  scoring and deciding, the cadence check's verdicts, snapshots, the model swap and
  housekeeping;
* ``anomalyd.pipeline_alerts``: publishing alert states, operator commands, re-asserting,
  reconciling the retained states and the handover between a fleet's instances;
* ``anomalyd.pipeline_warmup``: the warm-up's replay and the live-overlap horizon;
* ``anomalyd.pipeline_state``: the state those parts share, declared once for the type
  checker, and ``DecisionSink`` (re-exported here, where the rest of the daemon takes it).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import AlertRecord
from anomalyd.batcher import Batch, Batcher
from anomalyd.buffers import DeviceBuffers, IngestResult
from anomalyd.cadence import period_band
from anomalyd.config import Config
from anomalyd.decode import DecodedBatch, Decoder, RawMessage, Rejection
from anomalyd.detector import Detector, Sweep
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel
from anomalyd.partitions import Partitioning
from anomalyd.pipeline_alerts import AlertStatesMixin
from anomalyd.pipeline_state import DecisionSink, log
from anomalyd.pipeline_warmup import WarmupReplayMixin
from anomalyd.snapshot import Snapshot

__all__ = ["DecisionSink", "Pipeline"]

#: The intake queue counts as congested from this fill fraction on.
_QUEUE_CONGESTED = 0.5

#: What an inference thread hands back: scores, contributions, seconds inside ONNX Runtime.
_RunResult = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]


def _timed_run(model: LoadedModel, windows: npt.NDArray[np.float32]) -> _RunResult:
    t0 = time.perf_counter()
    scores, contributions = model.run(windows)
    return scores, contributions, time.perf_counter() - t0


class Pipeline(AlertStatesMixin, WarmupReplayMixin):
    """The stages of one model, run by one thread."""

    def __init__(
        self,
        config: Config,
        model: LoadedModel,
        metrics: Metrics,
        sink: DecisionSink | None = None,
        *,
        wake: Callable[[], None] | None = None,
        name: str = "default",
    ) -> None:
        """``wake`` is called (from an inference thread) when a batch's scores are in, so a
        thread that waits for input can come back and take them. ``name`` is the model's
        ``model`` label in the per-model metrics (``anomalyd.routing`` runs several)."""
        self.config = config
        self.metrics = metrics
        self.name = name
        self._scored_counter = metrics.model_windows_scored.labels(model=name)
        self._anomalous_counter = metrics.model_anomalous_windows.labels(model=name)
        self._inference_histogram = metrics.model_inference_seconds.labels(model=name)
        self._devices_gauge = metrics.model_devices_tracked.labels(model=name)
        #: The last housekeeping's alert-state sweep (a router sums its pipelines' sweeps).
        self.last_sweep: Sweep | None = None
        self.sink = sink
        self.model = model
        self.windows_scored = 0
        self.overloaded = False
        self._reject_log = RateLimitedLog(log, config.logging.rejection_log_interval_s)
        # Smallest pass lag since the previous overload check (inf: no pass measured). The
        # smallest, not the largest: one device whose clock runs behind makes the passes it
        # is alone in look late, but a real backlog makes *every* pass late.
        self._min_lag_since_check = math.inf
        self._newest_ts = -math.inf  # newest reading taken in since the lag was last observed
        self._dropped_seen = 0
        self._wake = wake
        self._reassert: list[str] = []  # devices whose alert state is still to re-assert
        # [cluster]: whether a device is this instance's (the broker's partition of its id);
        # None: a single daemon, every device is its own. Fixed for the process ([cluster]
        # changes only with a restart).
        self._owns: Callable[[str], bool] | None = None
        if config.cluster is not None:
            self._owns = Partitioning(config.cluster, config.mqtt.topic_in).owns_device
        # Devices whose alert state was adopted (``reconcile``) before they had a window here,
        # by the monotonic time at which they count as idle if no reading came meanwhile.
        self._adopted: dict[str, float] = {}
        # The warm-up's horizon (``warm``): device -> newest replayed reading's timestamp, until
        # ``_horizon_until`` (monotonic). Empty, as it is but shortly after a warm-up, it costs
        # ``ingest`` one test.
        self._horizon: dict[str, float] = {}
        self._horizon_until = 0.0
        self._cadence_log = RateLimitedLog(log, config.logging.rejection_log_interval_s)
        # A model that fails on every batch must not flood the journal either: its first
        # failure is logged with the traceback, then at most one line per interval says how
        # many more failed meanwhile (every failure is still counted).
        self._model_error_log = RateLimitedLog(log, config.logging.rejection_log_interval_s)
        self._model_error_traced = False
        # Twice as many batches in flight as threads: while the pipeline thread decodes the
        # next pass, the inference threads still have queued batches to score.
        self._max_in_flight = 2 * config.model.concurrent_batches
        # (batch, its scores to come, monotonic time it was handed to ONNX Runtime)
        self._in_flight: collections.deque[tuple[Batch, Future[_RunResult], float]] = collections.deque()
        self._executor = (
            ThreadPoolExecutor(config.model.concurrent_batches, thread_name_prefix="anomalyd-inference")
            if config.model.concurrent_batches > 1
            else None
        )
        self._build_stages(model)

    # ------------------------------------------------------------------ stages

    def _build_stages(self, model: LoadedModel) -> None:
        cfg = self.config
        c = model.contract
        self.decoder = Decoder(
            c.feature_names,
            cfg.mqtt.topic_in,
            cfg.stream.max_payload_bytes,
            cfg.stream.max_readings_per_message,
            cfg.stream.device_id_pattern,
            cfg.stream.max_future_skew_s,
            cluster=cfg.cluster,
        )
        data = c.training_data
        self.buffers = DeviceBuffers(
            cfg.stream.max_devices,
            c.window_length,
            c.n_features,
            cfg.stream.hop,
            cfg.stream.warmup,
            cfg.stream.max_gap_s,
            period_band=period_band(
                data.sample_period_s,
                data.sample_period_p05_s,
                data.sample_period_p95_s,
                cfg.stream.cadence_tolerance,
            )
            if cfg.stream.cadence_check
            else None,
            sample_period_s=data.sample_period_s,
            resample=cfg.stream.resample == "linear",
            probation_slots=cfg.stream.probation_slots,
        )
        self.batcher = Batcher(
            cfg.batching.max_batch, cfg.batching.max_delay_ms / 1000.0, c.window_length, c.n_features
        )
        self.detector = Detector.from_config(cfg.detector, c.threshold.value, len(c.scored_feature_names))

    @property
    def threshold(self) -> float:
        """The static threshold in use (the detector's; per-device adaptive ones may be higher)."""
        return self.detector.threshold

    @property
    def pending(self) -> int:
        """Windows waiting in the batcher."""
        return self.batcher.pending

    def time_until_due(self, now_mono: float) -> float | None:
        """Seconds until a batch is due (0: now); None when no window waits."""
        return self.batcher.time_until_due(now_mono)

    # ------------------------------------------------------------------ flow

    def ingest(self, messages: list[RawMessage]) -> None:
        """Decode MQTT messages and feed their readings in; scores every batch that fills."""
        m = self.metrics
        m.messages_received.inc(len(messages))
        try:
            batch = self.decoder.decode(messages)
        except Exception:
            m.pipeline_errors.labels(stage="decode").inc()
            m.messages_dropped.labels(reason="decode_error").inc(len(messages))
            log.exception("decoder failed on %d messages (dropped)", len(messages))
            return
        self._count_rejections(batch.rejections)
        if self._horizon:
            batch = self._skip_replayed(batch)
        if len(batch.devices):
            self.ingest_readings(batch)

    def ingest_readings(self, batch: DecodedBatch, now_mono: float | None = None) -> IngestResult:
        """Feed decoded readings into the device windows; score every batch that fills."""
        m = self.metrics
        result = self.buffers.ingest(batch)
        if result.accepted:
            m.readings_accepted.inc(result.accepted)
            self._newest_ts = max(self._newest_ts, float(batch.ts.max()))
        self._count_rejections(result.rejections)
        if result.evicted:
            self._forget(result.evicted, "evicted")
            m.devices_evicted.labels(cause="capacity").inc(len(result.evicted))
        if result.cadence_changes:
            self._cadence_changed(result)
        if result.skipped_cadence:
            m.windows_dropped.labels(reason="cadence_mismatch").inc(result.skipped_cadence)
        if result.resets:
            m.buffer_resets.inc(result.resets)
        if len(result.ready.devices):
            # A batch's windows are views into the batcher's staging area, valid until the
            # next add(): score what is due before adding more.
            self.batcher.add(result.ready, time.monotonic() if now_mono is None else now_mono)
            self.flush()
        return result

    def flush(self, force: bool = False, now_mono: float | None = None) -> int:
        """Score every batch that is due (``force``: everything pending, and wait for every
        batch in flight). Returns the windows decided on in this call."""
        now = time.monotonic() if now_mono is None else now_mono
        decided = 0
        for batch in self.batcher.pop_due(now, force=force):
            decided += self._submit(batch)
        decided += self._collect(wait_all=force)
        if decided and self._newest_ts > -math.inf:
            self._observe_lag()
        if decided and self.sink is not None:
            # One pass over the intake queue ends here: its windows are summarised in one
            # score message per device, so the output follows passes, not windows.
            try:
                self.sink.flush_scores()
            except Exception:
                self.metrics.pipeline_errors.labels(stage="publish").inc()
                log.exception("publishing scores failed")
        return decided

    def _observe_lag(self) -> None:
        """Lag in data time, once per pass: how old the newest reading taken in since the
        previous observation already is now that its windows are scored. A backlog in the
        broker shows here and nowhere else in the daemon's own figures. Per pass, not per
        batch: a batch may hold only the older readings of an array message, which are old
        by design (the device sent them late), not because the daemon is behind."""
        lag = max(0.0, time.time() - self._newest_ts)
        self._newest_ts = -math.inf
        self.metrics.data_lag_seconds.observe(lag)
        self.metrics.lag_seconds.set(lag)
        self._min_lag_since_check = min(self._min_lag_since_check, lag)

    @property
    def in_flight(self) -> int:
        """Batches handed to ONNX Runtime whose scores have not been taken yet."""
        return len(self._in_flight)

    @property
    def in_flight_windows(self) -> int:
        """Windows in those batches. Other threads may read it (a stop that gives up on the
        pipeline thread says how many are lost): the deque is copied in one step first."""
        return sum(len(batch.devices) for batch, _future, _started in tuple(self._in_flight))

    def inference_age(self, now_mono: float) -> float:
        """Seconds the oldest batch in flight has been in ONNX Runtime (0: none). The
        service's watchdog reads it: a hung inference thread stalls the pipeline even while
        the pipeline thread itself still turns."""
        in_flight = self._in_flight
        try:
            started = in_flight[0][2]
        except IndexError:
            return 0.0
        return max(0.0, now_mono - started)

    def drop_pending(self) -> int:
        """Discard every pending window (a forced stop); they are counted as dropped."""
        n = self.batcher.pending
        if n:
            self.batcher.pop_due(time.monotonic(), force=True)
        for batch, future, _started in self._in_flight:
            future.cancel()
            n += len(batch.devices)
        self._in_flight.clear()
        if n:
            self.metrics.windows_dropped.labels(reason="shutdown").inc(n)
        return n

    def close(self) -> None:
        """Stop the inference threads (after a flush(force=True) or drop_pending())."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ scoring

    def _submit(self, batch: Batch) -> int:
        """Start scoring ``batch``; returns the windows decided on meanwhile.

        With ``model.concurrent_batches = 1`` the batch is scored and decided here. Otherwise
        it runs on an inference thread (ONNX Runtime releases the GIL) while this thread
        goes on decoding and buffering; its decisions are taken, in submission order, once
        its scores are in (``_collect``), so each device's windows are decided oldest first.
        """
        if self._executor is None:
            return self._decide(batch, _timed_run(self.model, batch.windows))
        decided = 0
        while len(self._in_flight) >= self._max_in_flight:
            decided += self._collect_oldest()
        # The batch's arrays are views into the batcher's staging area, which the next
        # add() overwrites: the inference thread gets copies.
        own = Batch(
            batch.windows.copy(),
            batch.devices,
            batch.end_ts.copy(),
            batch.arrival_mono.copy(),
            batch.padded.copy(),
        )
        future = self._executor.submit(_timed_run, self.model, own.windows)
        if self._wake is not None:
            future.add_done_callback(self._wake_on_done)
        self._in_flight.append((own, future, time.monotonic()))
        return decided

    def _wake_on_done(self, _future: Future[_RunResult]) -> None:
        if self._wake is not None:
            self._wake()

    def _collect(self, wait_all: bool) -> int:
        """Decide on the batches in flight whose scores are in (all of them: ``wait_all``)."""
        decided = 0
        in_flight = self._in_flight
        while in_flight and (wait_all or in_flight[0][1].done()):
            decided += self._collect_oldest()
        return decided

    def _collect_oldest(self) -> int:
        # Taken off the deque only once its scores are in: while this thread waits for them,
        # the batch still counts as in ONNX Runtime (inference_age, in_flight_windows).
        batch, future, _started = self._in_flight[0]
        result: _RunResult | Exception
        try:
            result = future.result()
        except Exception as exc:
            result = exc
        self._in_flight.popleft()
        return self._decide(batch, result)

    def _decide(self, batch: Batch, result: _RunResult | Exception) -> int:
        m = self.metrics
        n = len(batch.devices)
        if isinstance(result, Exception):
            m.pipeline_errors.labels(stage="model").inc()
            m.windows_dropped.labels(reason="model_error").inc(n)
            self._model_error_log.log(
                logging.ERROR,
                "model_error",
                "model failed on a batch of %d windows (dropped): %r",
                n,
                result,
                exc_info=None if self._model_error_traced else result,
            )
            self._model_error_traced = True
            return 0
        scores, contributions, seconds = result
        m.inference_seconds.observe(seconds)
        self._inference_histogram.observe(seconds)
        m.batch_size.observe(n)
        decisions = self.detector.update(batch.devices, batch.end_ts, scores, contributions, batch.padded)
        m.windows_scored.inc(n)
        self._scored_counter.inc(n)
        self.windows_scored += n
        anomalies = sum(1 for d in decisions if d.anomaly)
        if anomalies:
            m.anomalous_windows.inc(anomalies)
            self._anomalous_counter.inc(anomalies)
        # Every change of a device's alert state, in order, each as it was at its window: an
        # alert raised and cleared within one batch (a backlog caught up) is still told.
        changed: list[AlertRecord] = []
        for d in decisions:
            if d.alert_changed:
                direction = "raised" if d.alert else "cleared"
                m.alert_transitions.labels(direction=direction).inc()
                # No state message for this change: an overlay (shelved, out of service) hides it.
                hidden = "" if d.record is not None else " (not shown: the device's alerts are suppressed)"
                log.info(
                    "alert %s for %s (score %.4g, threshold %.4g)%s",
                    direction,
                    d.device,
                    d.score,
                    d.threshold,
                    hidden,
                    extra={"device": d.device, "score": float(d.score), "threshold": float(d.threshold)},
                )
            if d.record is not None:
                changed.append(d.record)
        if self.sink is not None:
            try:
                self.sink.publish_decisions(decisions, batch.arrival_mono)
                if changed:
                    self.sink.publish_states(changed)
            except Exception:
                m.pipeline_errors.labels(stage="publish").inc()
                log.exception("publishing %d decisions failed", n)
        return n

    def _count_rejections(self, rejections: list[Rejection], *, count: bool = True) -> None:
        """Count and log rejections; ``count=False`` for replayed readings (``warm``), which
        are logged the same way but counted by the warm-up (the live count had them)."""
        if not rejections:
            return
        if count:
            counts = collections.Counter(r.reason for r in rejections)
            for reason, n in counts.items():
                self.metrics.rejected.labels(reason=str(reason)).inc(n)
        # One line per reason per interval (the first of each batch): hostile input
        # cannot flood the journal, and every rejection is still counted.
        first = {r.reason: r for r in reversed(rejections)}
        what = "rejected" if count else "rejected a replayed reading"
        for reason, r in first.items():
            self._reject_log.log(
                logging.WARNING,
                str(reason),
                "%s (%s) on %r: %s",
                what,
                reason,
                r.topic[:200],
                r.detail,
                extra={"reason": str(reason), "topic": r.topic, "device": r.device},
            )

    def _cadence_changed(self, result: IngestResult) -> None:
        resampled = self.config.stream.resample != "off"
        records: list[AlertRecord] = []
        for change in result.cadence_changes:
            self._cadence_log.log(
                logging.WARNING if change.mismatched else logging.INFO,
                "cadence",
                "device %r: median sample period %.4g s, the model expects %.4g s: %s",
                change.device[:64],
                change.period_s,
                change.expected_s,
                ("resampled onto the model's period" if resampled else "not scored until it returns")
                if change.mismatched
                else "back within the model's tolerance (its window restarts)",
                extra={"device": change.device},
            )
            if not resampled:
                record = self.detector.set_cadence(
                    change.device, change.mismatched, change.period_s, change.expected_s, change.ts
                )
                if record is not None:
                    records.append(record)
        self._publish_states(records)

    # ------------------------------------------------------------------ snapshots

    def export_snapshot(self) -> Snapshot:
        """A copy of every device's window and detector state (see ``anomalyd.snapshot``)."""
        c = self.model.contract
        return Snapshot(
            c.model_version,
            c.feature_names,
            c.window_length,
            self.buffers.export_state(),
            self.detector.export_state(),
        )

    def restore_snapshot(self, snap: Snapshot, now_mono: float | None = None) -> int:
        """Load a snapshot (checked by ``load_snapshot``) into empty stages. ValueError if it
        is malformed (nothing is kept then). Returns the devices restored."""
        now = time.monotonic() if now_mono is None else now_mono
        c = self.model.contract
        snap = self._owned_part(snap)  # [cluster]: only the devices this instance owns now
        try:
            n = self.buffers.import_state(snap.buffers, now)
            # Only the devices whose windows came back (a smaller stream.max_devices keeps the
            # established ones, then the most recent): a detector state without a window would
            # never be evicted.
            kept = set(self.buffers.devices())
            self.detector.import_state(
                [s for s in snap.detector if not isinstance(s, dict) or s.get("device") in kept], c.n_features
            )
        except ValueError:
            self._build_stages(self.model)  # nothing half-restored
            raise
        self.metrics.devices_tracked.set(self.buffers.n_devices)
        self._devices_gauge.set(self.buffers.n_devices)
        return n

    # ------------------------------------------------------------------ model swap

    def apply_config(self, config: Config) -> None:
        """Take a reloaded configuration whose differences from the running one may all change
        live (``anomalyd.reload.plan_reload`` keeps the running values of the rest). Every
        pending window is decided under the old ``[detector]``, then the detector is
        reconfigured in place (``Detector.reconfigure``); the keys read at every pass
        (``stream.idle_evict_s``, ``stream.overload_lag_s``) apply from the next one."""
        if config.detector != self.config.detector:
            self.flush(force=True)
            self.detector.reconfigure(config.detector, self.model.contract.threshold.value)
        self.config = config

    def swap_model(self, new: LoadedModel) -> None:
        """Finish pending windows with the current model, then serve ``new``."""
        old = self.model
        self.flush(force=True)
        same_shape = (
            old.contract.feature_names == new.contract.feature_names
            and old.contract.window_length == new.contract.window_length
        )
        self.model = new
        # A failure of the new model is news: its first one is logged with the traceback.
        self._model_error_log = RateLimitedLog(log, self.config.logging.rejection_log_interval_s)
        self._model_error_traced = False
        if same_shape:
            self.detector.set_threshold(
                Detector.configured_base(self.config.detector, new.contract.threshold.value)
            )
        else:
            log.warning(
                "new model has window %d and features %s (was %d, %s): every device's window restarts",
                new.contract.window_length,
                new.contract.feature_names,
                old.contract.window_length,
                old.contract.feature_names,
            )
            self._publish_states(self.detector.forget(self.detector.devices(), "model_changed", time.time()))
            if self.sink is not None:
                self.sink.forget(list(self.buffers.devices()))
            self._build_stages(new)
            self._horizon.clear()  # the replayed readings went with the old windows

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(
        self, now_mono: float, queue_fill: float = 0.0, queue_dropped: int = 0, *, gauges: bool = True
    ) -> None:
        """Evict idle devices, refresh gauges and decide whether the daemon is overloaded.

        ``queue_fill`` is the intake queue's fill fraction, ``queue_dropped`` the number of
        messages it refused since start (both from the caller, who owns the queue).
        ``gauges=False`` leaves the daemon-wide gauges (devices, pending windows, alert
        states) to the caller, who sums several pipelines (``anomalyd.routing``).
        """
        evicted = self.buffers.evict_idle(now_mono, self.config.stream.idle_evict_s)
        if evicted:
            self._forget(evicted, "idle")
            self.metrics.devices_evicted.labels(cause="idle").inc(len(evicted))
            log.info("forgot %d idle devices", len(evicted))
        self._expire_adopted(now_mono)  # adopted alert states of devices that never came
        now = time.time()
        sweep = self.detector.sweep(now)
        self._publish_states(sweep.expired)
        self._reassert_some()
        self.last_sweep = sweep
        m = self.metrics
        self._devices_gauge.set(self.buffers.n_devices)
        if gauges:
            m.devices_tracked.set(self.buffers.n_devices)
            m.pending_windows.set(self.batcher.pending)
            m.set_alert_states(sweep.counts, sweep.oldest_alert_since, now)
            m.devices_cadence_mismatch.set(self.buffers.n_cadence_mismatched)
        self._check_overload(queue_fill, queue_dropped)

    def _check_overload(self, queue_fill: float, queue_dropped: int) -> None:
        lag = self._min_lag_since_check
        self._min_lag_since_check = math.inf
        dropped = queue_dropped - self._dropped_seen
        self._dropped_seen = queue_dropped
        if math.isinf(lag) and queue_fill == 0:
            # Nothing was scored and nothing waits: no backlog that the daemon could see,
            # so the gauge must not keep showing an old pass's lag.
            self.metrics.lag_seconds.set(0.0)
        limit = self.config.stream.overload_lag_s
        late = not math.isinf(lag) and lag > limit
        overloaded = late or queue_fill >= _QUEUE_CONGESTED or dropped > 0
        if overloaded == self.overloaded:
            return
        self.overloaded = overloaded
        self.metrics.overloaded.set(1 if overloaded else 0)
        lag_text = "none scored" if math.isinf(lag) else f"{lag:.1f} s"
        if overloaded:
            log.warning(
                "overloaded: data lag %s (limit %.1f s), intake queue %.0f %% full, %d messages "
                "dropped since the last check",
                lag_text,
                limit,
                100 * queue_fill,
                dropped,
            )
        else:
            log.info(
                "no longer overloaded: data lag %s, intake queue %.0f %% full", lag_text, 100 * queue_fill
            )
        if self.sink is not None:
            self.sink.set_overloaded(overloaded)
