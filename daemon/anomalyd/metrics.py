"""Every Prometheus metric the daemon exports, declared in one place.

``Metrics(registry)`` builds them all on the registry it is given (tests pass a fresh
``CollectorRegistry``; the daemon builds its own, never the global default one, so two
services in one process never collide). Names follow the Prometheus conventions:
``anomalyd_`` prefix, counters end in ``_total``, durations in ``_seconds``, base units.
No metric has a per-device label: device ids are unbounded and come from the network.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from anomalyd.alerts import ANOMALOUS, STATES
from anomalyd.commands import REJECT_REASONS, VERBS
from anomalyd.http_server import Checks, HttpLimits, HttpServer
from anomalyd.snapshot import RESTORE_RESULTS

if TYPE_CHECKING:
    from anomalyd.config_sections import MetricsConfig

log = logging.getLogger(__name__)

#: Rejection reasons are a closed set (``anomalyd.decode.Reason``); model reload results too.
RELOAD_RESULTS = ("success", "failure")
ALERT_DIRECTIONS = ("raised", "cleared")
EVICTION_CAUSES = ("idle", "capacity")
PUBLISH_KINDS = ("score", "batch", "alert", "status", "discovery")
#: Why a message was not published: never handed to the client (not connected, its
#: out-queue full), or refused by the broker in its acknowledgement (not_authorized: an
#: ACL, reason code 0x87; refused: any other failure code).
PUBLISH_FAILURE_REASONS = ("not_connected", "queue_full", "not_authorized", "refused")
PIPELINE_STAGES = ("decode", "model", "publish")
#: Why scored-to-be windows or queued messages were lost inside the daemon (rejected input
#: has its own counter, ``anomalyd_rejected_total``).
WINDOW_DROP_REASONS = ("model_error", "shutdown", "cadence_mismatch")
MESSAGE_DROP_REASONS = ("decode_error", "shutdown")
#: How a warm-up from JetStream ended, and what became of each replayed reading.
WARMUP_RESULTS = ("complete", "timeout", "failed", "no_jetstream")
WARMUP_READING_RESULTS = ("filled", "already_held", "rejected")

# Inference of one batch: ~0.1 ms (batch 1, CPU) to tens of ms (batch 256) or more on a
# busy machine; end to end adds batching delay (max_delay_ms) and queueing.
_INFERENCE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_E2E_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Lag in data time reaches minutes when a backlog builds up in the broker.
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch`` (and max_batch itself): a full batch is its own bucket."""
    out: list[float] = []
    b = 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(out)


class BulkHistogram:
    """A Prometheus histogram observed a whole numpy array at a time.

    ``prometheus_client.Histogram.observe`` takes a lock per value; at tens of thousands of
    windows a second that is a measurable share of the pipeline thread. This one bins a
    batch with one ``searchsorted`` and takes its lock once per batch. It exports the same
    ``_bucket``/``_sum``/``_count`` series as a ``Histogram``.
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._upper = np.asarray([*buckets, math.inf], np.float64)
        self._counts = np.zeros(self._upper.size, np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        """Add every value of ``values`` (NaN values are ignored)."""
        values = np.asarray(values, np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            return
        # Bucket i counts values <= upper[i] (Prometheus "le"): side="left" puts a value
        # equal to a bound into that bound's bucket.
        counts = np.bincount(np.searchsorted(self._upper, values, side="left"), minlength=self._upper.size)
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def observe(self, value: float) -> None:
        """Add one value."""
        self.observe_many(np.asarray([value], np.float64))

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        bounds = [floatToGoString(b) for b in self._upper.tolist()]  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=[(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)],
            sum_value=total,
        )
        yield family


class Metrics:
    """The daemon's metrics, all registered on ``registry``.

    Stages receive this object (or nothing) and update the attributes directly; the
    pipeline thread updates in bulk (``inc(n)``), never once per reading where it can help it.
    """

    def __init__(self, registry: CollectorRegistry, max_batch: int = 64, *, process: bool = False) -> None:
        self.registry = registry
        r = registry
        if process:
            # process_cpu_seconds_total, process_resident_memory_bytes, python_info ...
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.messages_received = Counter(
            "anomalyd_messages_received", "MQTT telemetry messages received (before validation)", registry=r
        )
        self.rejected = Counter(
            "anomalyd_rejected",
            "Messages or readings rejected, by reason (one reading or one whole message each)",
            ["reason"],
            registry=r,
        )
        self.readings_accepted = Counter(
            "anomalyd_readings_accepted", "Readings written into device windows", registry=r
        )
        self.windows_scored = Counter("anomalyd_windows_scored", "Windows scored by the model", registry=r)
        self.anomalous_windows = Counter(
            "anomalyd_anomalous_windows", "Scored windows above the threshold", registry=r
        )
        # Per model (the ``model`` label: ``default`` for a lone [model], else the [[models]]
        # entry's name). New families beside the unlabelled totals above, so that a lone
        # model's series and the queries on them stay as they were.
        self.model_windows_scored = Counter(
            "anomalyd_model_windows_scored", "Windows scored, by model", ["model"], registry=r
        )
        self.model_anomalous_windows = Counter(
            "anomalyd_model_anomalous_windows",
            "Scored windows above the threshold, by model",
            ["model"],
            registry=r,
        )
        self.model_inference_seconds = Histogram(
            "anomalyd_model_inference_seconds",
            "Time in ONNX Runtime per batch, by model",
            ["model"],
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.model_devices_tracked = Gauge(
            "anomalyd_model_devices_tracked", "Devices with a rolling window, by model", ["model"], registry=r
        )
        self.served_model_info = Info(
            "anomalyd_served_model",
            "Every model being served, by name, and the ONNX Runtime provider running it",
            ["model"],
            registry=r,
        )
        self.alert_transitions = Counter(
            "anomalyd_alert_transitions",
            "Alert state changes (raised: normal to anomalous, cleared: back to normal)",
            ["direction"],
            registry=r,
        )
        self.batch_size = Histogram(
            "anomalyd_batch_size",
            "Windows per model batch",
            buckets=_batch_buckets(max_batch),
            registry=r,
        )
        self.inference_seconds = Histogram(
            "anomalyd_inference_seconds",
            "Time in ONNX Runtime per batch",
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = BulkHistogram(
            "anomalyd_end_to_end_seconds",
            "Time from the arrival of a window's newest reading at the daemon to its decision being "
            "published (in-daemon queueing, batching and scoring; a backlog in the broker shows in "
            "anomalyd_data_lag_seconds instead)",
            _E2E_BUCKETS,
            r,
        )
        self.data_lag_seconds = Histogram(
            "anomalyd_data_lag_seconds",
            "Lag in data time, once per pipeline pass: wall clock, once the pass's windows are scored, "
            "minus the newest reading's timestamp taken in (includes time queued in the broker; "
            "assumes device clocks are synchronised)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Gauge(
            "anomalyd_lag_seconds",
            "Lag in data time of the most recent pipeline pass (see anomalyd_data_lag_seconds)",
            registry=r,
        )
        self.overloaded = Gauge(
            "anomalyd_overloaded",
            "1 while the daemon is falling behind: data lag above stream.overload_lag_s, the intake "
            "queue half full, or telemetry dropped because it was full",
            registry=r,
        )
        self.windows_dropped = Counter(
            "anomalyd_windows_dropped",
            "Windows that were due to be scored but were lost inside the daemon, by reason "
            "(model_error: ONNX Runtime failed on their batch; shutdown: the drain deadline passed)",
            ["reason"],
            registry=r,
        )
        self.messages_dropped = Counter(
            "anomalyd_messages_dropped",
            "Telemetry messages accepted from the broker but lost inside the daemon, by reason "
            "(decode_error: the decoder failed on their batch; shutdown: still queued at the drain "
            'deadline); a full intake queue counts under anomalyd_rejected_total{reason="queue_full"}',
            ["reason"],
            registry=r,
        )
        self.intake_queue_depth = Gauge(
            "anomalyd_intake_queue_depth", "Messages waiting in the intake queue", registry=r
        )
        self.intake_queue_capacity = Gauge(
            "anomalyd_intake_queue_capacity", "Size limit of the intake queue", registry=r
        )
        self.intake_queue_bytes = Gauge(
            "anomalyd_intake_queue_bytes",
            "Bytes held by the intake queue (payloads, topics, per-message overhead)",
            registry=r,
        )
        self.pending_windows = Gauge(
            "anomalyd_pending_windows", "Ready windows waiting in the batcher", registry=r
        )
        self.devices_tracked = Gauge("anomalyd_devices_tracked", "Devices with a rolling window", registry=r)
        self.devices_evicted = Counter(
            "anomalyd_devices_evicted",
            "Devices forgotten (idle: silent for stream.idle_evict_s; capacity: max_devices reached, a "
            "device still on probation gave its slot to a new one; established devices only go idle)",
            ["cause"],
            registry=r,
        )
        self.buffer_resets = Counter(
            "anomalyd_buffer_resets", "Device windows restarted after a gap longer than max_gap_s", registry=r
        )
        self.mqtt_connected = Gauge(
            "anomalyd_mqtt_connected", "1 while connected to the broker (CONNACK accepted)", registry=r
        )
        self.mqtt_reconnects = Counter(
            "anomalyd_mqtt_reconnects", "Successful connections to the broker after the first", registry=r
        )
        self.mqtt_connect_failures = Counter(
            "anomalyd_mqtt_connect_failures",
            "Failed connection attempts (network: no TCP/TLS session; refused: CONNACK refused)",
            ["kind"],
            registry=r,
        )
        self.published = Counter(
            "anomalyd_published",
            "Messages published, by kind: QoS 1/2 when the broker acknowledged them with success, "
            "QoS 0 when handed to the MQTT client (unless the broker refuses that kind)",
            ["kind"],
            registry=r,
        )
        self.publish_failures = Counter(
            "anomalyd_publish_failures",
            "Messages not published, by kind and reason (not_connected, queue_full: never handed over; "
            "not_authorized, refused: the broker's acknowledgement refused them, or QoS 0 messages "
            "sent while the broker refuses their kind)",
            ["kind", "reason"],
            registry=r,
        )
        self.publish_denied = Gauge(
            "anomalyd_publish_denied",
            "1 while the broker's newest acknowledgement of a message of this kind was a refusal "
            "(MQTT 5 only)",
            ["kind"],
            registry=r,
        )
        self.mqtt_subscription_denied = Gauge(
            "anomalyd_mqtt_subscription_denied",
            "1 while the broker refuses the telemetry subscription (retried every 30 s; not ready meanwhile)",
            registry=r,
        )
        self.mqtt_subscription_refusals = Counter(
            "anomalyd_mqtt_subscription_refusals",
            "Subscriptions the broker refused in its SUBACK (retries included), by topic filter",
            ["topic_filter"],
            registry=r,
        )
        self.pipeline_errors = Counter(
            "anomalyd_pipeline_errors",
            "Unexpected errors caught in the pipeline loop, by stage (that batch is lost, the daemon lives)",
            ["stage"],
            registry=r,
        )
        self.ready = Gauge("anomalyd_ready", "1 once started (model warm, broker connected)", registry=r)
        self.model_info = Info(
            "anomalyd_model", "The model being served and the ONNX Runtime provider running it", registry=r
        )
        self.model_threshold = Gauge(
            "anomalyd_model_threshold", "Score threshold in use (contract or configuration)", registry=r
        )
        self.model_reloads = Counter(
            "anomalyd_model_reloads", "Model reloads (SIGHUP), by result", ["result"], registry=r
        )
        self.config_reloads = Counter(
            "anomalyd_config_reloads",
            "Reloads (SIGHUP) of the configuration file and the model, by result (failure: nothing "
            "of it was applied; the log names the key or model at fault)",
            ["result"],
            registry=r,
        )
        # ---- alert states (anomalyd.alerts), commands, snapshots
        self.alerts_active = Gauge(
            "anomalyd_alerts_active", "Devices whose published alert state is anomalous", registry=r
        )
        self.alert_oldest_age_seconds = Gauge(
            "anomalyd_alert_oldest_age_seconds",
            "Age of the oldest active alert (now minus its since; 0: none)",
            registry=r,
        )
        self.alert_states = Gauge(
            "anomalyd_alert_states", "Devices per published alert state", ["state"], registry=r
        )
        self.devices_cadence_mismatch = Gauge(
            "anomalyd_devices_cadence_mismatch",
            "Devices whose sample period is outside the model's tolerance",
            registry=r,
        )
        self.commands = Counter(
            "anomalyd_commands", "Operator commands applied, by verb", ["verb"], registry=r
        )
        self.commands_rejected = Counter(
            "anomalyd_commands_rejected", "Operator commands refused, by reason", ["reason"], registry=r
        )
        self.snapshot_saves = Counter(
            "anomalyd_snapshot_saves", "State snapshots written, by result", ["result"], registry=r
        )
        self.snapshot_restores = Counter(
            "anomalyd_snapshot_restores",
            "Snapshot restores at start, by result (restored, missing, stale, model_mismatch, corrupt)",
            ["result"],
            registry=r,
        )
        self.snapshot_last_success = Gauge(
            "anomalyd_snapshot_last_success_timestamp_seconds",
            "UNIX time of the newest snapshot written (0: none yet)",
            registry=r,
        )
        # ---- scale-out ([cluster]; anomalyd.partitions, anomalyd.warmup). The instance a
        # series comes from is the scrape target's; the name is in the info metric too.
        self.cluster_instance = Info(
            "anomalyd_cluster_instance", "This instance of a partitioned fleet: its name", registry=r
        )
        self.cluster_partitions = Gauge(
            "anomalyd_cluster_partitions", "Partitions of the fleet (P of the broker's mapping)", registry=r
        )
        self.cluster_partitions_owned = Gauge(
            "anomalyd_cluster_partitions_owned", "Partitions this instance subscribes to", registry=r
        )
        self.cluster_devices_owned = Gauge(
            "anomalyd_cluster_devices_owned",
            "Devices of this instance's partitions with a window here",
            registry=r,
        )
        self.warmups = Counter(
            "anomalyd_warmups",
            "Warm-ups of the windows from JetStream, by result (complete, timeout, failed, no_jetstream)",
            ["result"],
            registry=r,
        )
        for result in WARMUP_RESULTS:
            self.warmups.labels(result=result)
        self.warmup_readings = Counter(
            "anomalyd_warmup_readings",
            "Readings replayed from JetStream, by result (filled: into a window; already_held: the "
            "snapshot or live data had it; rejected: bad input)",
            ["result"],
            registry=r,
        )
        for result in WARMUP_READING_RESULTS:
            self.warmup_readings.labels(result=result)
        self.warmup_seconds = Gauge(
            "anomalyd_warmup_seconds", "Duration of the latest warm-up from JetStream", registry=r
        )
        self.warmup_overlap = Counter(
            "anomalyd_warmup_overlap_readings",
            "Live readings not taken again because the warm-up replay already put them in a window",
            registry=r,
        )
        # ---- the HTTP endpoint (anomalyd.http_server; MetricsServer feeds these)
        self.http_connections = Gauge(
            "anomalyd_http_connections",
            "HTTP connections to /metrics, /healthz and /readyz being served "
            "(at most metrics.max_connections)",
            registry=r,
        )
        self.http_connections_refused = Counter(
            "anomalyd_http_connections_refused",
            "HTTP connections closed unserved because metrics.max_connections were already open",
            registry=r,
        )
        # Pre-create the labelled children so that every series exists (at 0) from the
        # first scrape: rate() and absent() work, and dashboards do not show "no data".
        for direction in ALERT_DIRECTIONS:
            self.alert_transitions.labels(direction=direction)
        for cause in EVICTION_CAUSES:
            self.devices_evicted.labels(cause=cause)
        for result in RELOAD_RESULTS:
            self.model_reloads.labels(result=result)
            self.config_reloads.labels(result=result)
        for kind in PUBLISH_KINDS:
            self.published.labels(kind=kind)
            self.publish_denied.labels(kind=kind)
            for reason in PUBLISH_FAILURE_REASONS:
                self.publish_failures.labels(kind=kind, reason=reason)
        for kind in ("network", "refused"):
            self.mqtt_connect_failures.labels(kind=kind)
        for stage in PIPELINE_STAGES:
            self.pipeline_errors.labels(stage=stage)
        for state in STATES:
            self.alert_states.labels(state=state)
        for verb in VERBS:
            self.commands.labels(verb=verb)
        for reason in REJECT_REASONS:
            self.commands_rejected.labels(reason=reason)
        for result in ("ok", "failed"):
            self.snapshot_saves.labels(result=result)
        for result in RESTORE_RESULTS:
            self.snapshot_restores.labels(result=result)
        for reason in WINDOW_DROP_REASONS:
            self.windows_dropped.labels(reason=reason)
        for reason in MESSAGE_DROP_REASONS:
            self.messages_dropped.labels(reason=reason)

    def declare_reasons(self, reasons: list[str]) -> None:
        """Create ``anomalyd_rejected_total{reason=...}`` at 0 for every known reason."""
        for reason in reasons:
            self.rejected.labels(reason=reason)

    def set_model(
        self,
        version: str,
        *,
        kind: str,
        window: int,
        features: list[str],
        provider: str,
        threshold: float,
        name: str = "default",
        primary: bool = True,
    ) -> None:
        """Publish which model runs where (``anomalyd_served_model_info{model=name}``);
        the ``primary`` one (a lone model, or the first of several) also in
        ``anomalyd_model_info`` and ``anomalyd_model_threshold``."""
        labels = {
            "version": version,
            "kind": kind,
            "window": str(window),
            "features": ",".join(features),
            "provider": provider,
        }
        self.served_model_info.labels(model=name).info(labels)
        if primary:
            self.model_info.info(labels)
            self.model_threshold.set(threshold)

    def set_alert_states(self, counts: dict[str, int], oldest_since: float | None, now: float) -> None:
        """Refresh the alert-state gauges (housekeeping, about once a second)."""
        for state in STATES:
            self.alert_states.labels(state=state).set(counts.get(state, 0))
        self.alerts_active.set(counts.get(ANOMALOUS, 0))
        self.alert_oldest_age_seconds.set(0.0 if oldest_since is None else max(0.0, now - oldest_since))

    def track_queue(
        self, depth: Callable[[], int], capacity: int, nbytes: Callable[[], int] | None = None
    ) -> None:
        """Read the intake queue depth (and bytes) at scrape time (no per-message updates)."""
        self.intake_queue_depth.set_function(lambda: float(depth()))
        self.intake_queue_capacity.set(capacity)
        if nbytes is not None:
            self.intake_queue_bytes.set_function(lambda: float(nbytes()))


class MetricsServer:
    """The HTTP endpoint (``anomalyd.http_server``): ``/metrics`` serves ``registry``,
    ``/healthz`` and ``/readyz`` the ``liveness`` and ``readiness`` checks (none: always 200).
    With ``metrics``, its connections are counted there."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        limits: HttpLimits | None = None,
        liveness: Checks | None = None,
        readiness: Checks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._server = HttpServer(
            registry,
            host,
            port,
            limits=limits,
            liveness=liveness,
            readiness=readiness,
            on_refused=metrics.http_connections_refused.inc if metrics is not None else None,
        )
        if metrics is not None:
            server = self._server
            metrics.http_connections.set_function(lambda: float(server.open_connections))
        self.host = host
        self.port = self._server.port
        log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", host, self.port)

    @classmethod
    def from_config(
        cls,
        config: MetricsConfig,
        metrics: Metrics,
        *,
        liveness: Checks | None = None,
        readiness: Checks | None = None,
    ) -> MetricsServer:
        """Serve ``metrics.registry`` on ``config.host:config.port`` with its limits.
        Raises ``OSError`` if the address cannot be bound."""
        limits = HttpLimits(
            idle_timeout_s=config.idle_timeout_s,
            header_timeout_s=config.header_timeout_s,
            max_connections=config.max_connections,
        )
        return cls(
            metrics.registry,
            config.host,
            config.port,
            limits=limits,
            liveness=liveness,
            readiness=readiness,
            metrics=metrics,
        )

    def close(self) -> None:
        """Stop serving, release the port, end the open connections."""
        self._server.close()
