"""The daemon's lifecycle: start, run, reload, stop. The stages are wired in ``Pipeline``.

Start, in order (a failure stops the start with one line and its exit code):
config → logging (both done by the CLI) → secrets → model load, contract check, warm-up
of every batch shape → metrics server → the snapshot of per-device state, if one is
usable (``anomalyd.snapshot``) → pipeline thread → MQTT (a broker that is down delays
readiness; it does not kill the start) → ``READY=1``.

On every (re)connect the pipeline re-asserts every device's retained alert state, and
reconciles the alert states the broker retains with its own (``Pipeline.reconcile``); it
also takes operator commands (``anomalyd.commands``) from the command topic.

Threads: the paho network thread (``anomalyd.mqtt``) only enqueues into the intake queue;
``_run_pipeline_loop`` owns the ``Pipeline`` (decoder, buffers, batcher, model, detector,
publisher: no locks) and feeds it from the queue, in passes; the pipeline's inference
threads only run ONNX Runtime on batches it hands them; the main thread only waits for signals,
pings the watchdog while the pipeline makes progress, and starts reloads; a short-lived
reload thread loads and warms a new model beside the serving one, and the pipeline
thread swaps it in.

Stop (SIGTERM/SIGINT; a second one forces): ``STOPPING=1`` → unsubscribe (intake stops)
→ the pipeline scores everything queued and pending and publishes it, within
``shutdown.drain_timeout_s`` → a snapshot (or, without a state directory, every device's
alert state becomes ``unknown``/``stopped``: nothing will resume it) → ``stopped``
(retained) → disconnect → exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from prometheus_client import CollectorRegistry

from anomalyd.alerts import RetainedStates
from anomalyd.commands import CommandInbox
from anomalyd.config import Config
from anomalyd.decode import Reason
from anomalyd.errors import AnomalydError, ConfigError
from anomalyd.intake import IntakeQueue
from anomalyd.metrics import Metrics, MetricsServer
from anomalyd.model import LoadedModel, SessionOptions, load_model
from anomalyd.mqtt import MqttLink, subscription_filter
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import Publisher, last_will
from anomalyd.sdnotify import Notifier, watchdog_interval
from anomalyd.snapshot import SnapshotKeeper

log = logging.getLogger(__name__)

#: Exit codes besides the errors' own (anomalyd.errors): a forced stop (second signal) and
#: an internal failure of the pipeline thread (EX_SOFTWARE; systemd restarts it).
EXIT_OK = 0
EXIT_FORCED = 130
EXIT_INTERNAL = 70

#: Longest the pipeline thread sleeps with nothing to do: bounds the watchdog heartbeat age.
_IDLE_TICK_S = 0.25
#: Messages taken from the intake queue per pass (keeps batches flowing under a flood),
#: and the payload bytes that end a pass early. A pass is decoded and buffered before its
#: windows are scored, and its score messages go out at its end, so a pass of large array
#: messages is kept short: the inference threads get work sooner, scores go out sooner, the
#: loop comes back to the watchdog and housekeeping, and the copies stay in the CPU caches.
_DRAIN_MAX = 4096
_DRAIN_MAX_BYTES = 256 * 1024
#: How often the pipeline evicts idle devices and refreshes gauges.
_HOUSEKEEPING_S = 1.0
#: How often the start re-announces itself to systemd while waiting for the broker.
_BROKER_WAIT_TICK_S = 5.0


class Service:
    """One anomalyd instance. ``start()`` then ``run_forever()``; ``request_stop()`` /
    ``request_reload()`` from signal handlers or tests."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics = Metrics(self.registry, config.batching.max_batch, process=registry is None)
        self.metrics.declare_reasons([r.value for r in Reason])
        self.ready = threading.Event()
        self.metrics_server: MetricsServer | None = None
        self.model: LoadedModel | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()  # wakes the main loop (signals)
        self._draining = threading.Event()
        self._abort = threading.Event()
        self._pipeline_done = threading.Event()
        self._pipeline_failed = False
        self._queue = IntakeQueue(
            config.stream.intake_queue_size, int(config.stream.intake_queue_mib * 2**20)
        )
        self.metrics.track_queue(
            lambda: len(self._queue), config.stream.intake_queue_size, lambda: self._queue.nbytes
        )
        self._link: MqttLink | None = None
        self._publisher: Publisher | None = None
        self._pipeline: threading.Thread | None = None
        self._reloader: threading.Thread | None = None
        self._pending_model: LoadedModel | None = None
        self._swapped = threading.Event()
        self.heartbeat = time.monotonic()
        self._watchdog_s = watchdog_interval() if self.notifier.enabled else None
        # The idle pipeline still turns (and beats) four times per ping interval, so an
        # idle daemon is never mistaken for a stuck one.
        self._idle_tick = min(_IDLE_TICK_S, self._watchdog_s / 8) if self._watchdog_s else _IDLE_TICK_S
        self._last_housekeeping = 0.0
        # Side inputs, filled on the network thread and taken by the pipeline thread:
        # operator commands, the alert states the broker retains, and the "connected" flag
        # that makes the pipeline re-assert every alert state.
        self.commands = CommandInbox(
            config.commands, config.stream.device_id_pattern, self.metrics, self._queue.wake
        )
        self.retained_states = RetainedStates(config.output.alert_topic, self._queue.wake)
        self._reconnected = threading.Event()
        self.snapshots = SnapshotKeeper(config.state.resolved_directory(), config.state, self.metrics)
        #: The stages of the served model; built in start(), run by the pipeline thread.
        self.pipeline: Pipeline | None = None

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Begin a graceful stop; a second request forces it (skip the drain)."""
        if self._stop.is_set():
            log.warning("second stop request: stopping now, pending windows are dropped")
            self._force.set()
            self._abort.set()
            self._queue.wake()
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Reload the model file (SIGHUP); the old model serves until the new one is warm."""
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop (twice: force), SIGHUP reloads. Handlers only set events."""

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self.request_stop()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            log.info("received SIGHUP: reloading the model")
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    @property
    def threshold(self) -> float | None:
        """The static threshold in use (configured, else the model contract's, times the scale)."""
        return self.pipeline.threshold if self.pipeline is not None else None

    @property
    def windows_scored(self) -> int:
        """Windows scored since start (the pipeline thread counts; tests and logs read it)."""
        return self.pipeline.windows_scored if self.pipeline is not None else 0

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    # ------------------------------------------------------------------ start

    def _session_options(self) -> SessionOptions:
        m = self.config.model
        return SessionOptions(
            providers=m.providers, intra_op_threads=m.intra_op_threads, allow_spinning=m.allow_spinning
        )

    def _load_warm(self) -> LoadedModel:
        model = load_model(self.config.model.path, self._session_options())
        sizes = self.config.batching.warmup_sizes()
        t0 = time.perf_counter()
        model.warm_up(sizes)
        log.info(
            "model %s warm: %d batch shapes in %.2f s on %s (ONNX Runtime providers %s)",
            model.contract.model_version,
            len(sizes),
            time.perf_counter() - t0,
            model.active_provider,
            model.providers,
        )
        return model

    def _announce_model(self, model: LoadedModel, threshold: float) -> None:
        c = model.contract
        self.metrics.set_model(
            c.model_version,
            kind=c.kind,
            window=c.window_length,
            features=c.feature_names,
            provider=model.active_provider,
            threshold=threshold,
        )

    def start(self) -> bool:
        """Run the ordered start. True once ready; False if a stop was requested first.

        Raises ``AnomalydError`` (with its exit code) if the start cannot finish.
        """
        cfg = self.config
        password = cfg.mqtt.password()
        passphrase = cfg.mqtt.key_passphrase()
        self.notifier.status("loading model")
        model = self._load_warm()
        self.model = model
        if self._stop.is_set():
            return False
        if cfg.metrics.enabled:
            try:
                self.metrics_server = MetricsServer(self.registry, cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: {exc.strerror or exc}",
                    "metrics.port",
                ) from None
        link = MqttLink(
            cfg.mqtt,
            queue=self._queue,
            will=last_will(cfg.output),
            password=password,
            key_passphrase=passphrase,
            metrics=self.metrics,
            log_interval_s=max(cfg.logging.rejection_log_interval_s, 1.0),
        )
        self._publisher = Publisher(
            link,
            cfg.output,
            self.metrics,
            feature_names=model.contract.feature_names,
            model_version=model.contract.model_version,
            log_interval_s=cfg.logging.rejection_log_interval_s,
        )
        link.add_connect_listener(self._publisher.online)
        link.add_health_listener(self._publisher.online)  # the status word follows refusals

        def follow_subscription(granted: bool, _topic_filter: str) -> None:
            # Ready means receiving: a telemetry subscription the broker refuses after we
            # served (its ACL changed) takes readiness away until a retry is granted.
            if self.ready.is_set():
                self.metrics.ready.set(1 if granted else 0)

        link.add_subscription_listener(follow_subscription)
        link.add_connect_listener(self._on_connected)
        # The broker's retained alert states (reconciled with ours on every connect), and
        # operator commands.
        link.add_subscription(subscription_filter(cfg.output.alert_topic), self.retained_states.put, qos=1)
        if cfg.commands.enabled:
            # Retain As Published: a command published retained is refused at once, not only
            # when the broker replays it after a reconnect.
            link.add_subscription(
                self.commands.topic.subscription, self.commands.put, qos=1, retain_as_published=True
            )
        self._link = link
        self.pipeline = Pipeline(cfg, model, self.metrics, self._publisher, wake=self._queue.wake)
        self._announce_model(model, self.pipeline.threshold)
        self.snapshots.restore(self.pipeline)
        self._pipeline = threading.Thread(
            target=self._run_pipeline_loop, name="anomalyd-pipeline", daemon=True
        )
        self._pipeline.start()
        link.start()
        started = time.monotonic()
        next_note = started + _BROKER_WAIT_TICK_S
        while not link.wait_connected(0.25):  # BrokerError: credentials or subscription refused
            if self._stop.is_set():
                return False
            if time.monotonic() >= next_note:
                next_note += _BROKER_WAIT_TICK_S
                waited = time.monotonic() - started
                # Under systemd the start would time out (TimeoutStartSec) while the broker
                # is down; we are alive and trying, so ask for more time and say why.
                self.notifier.extend_timeout(3 * _BROKER_WAIT_TICK_S)
                self.notifier.status(
                    f"waiting for MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port} ({waited:.0f} s)"
                )
                log.warning(
                    "still waiting for MQTT broker %s:%d after %.0f s", cfg.mqtt.host, cfg.mqtt.port, waited
                )
        if self._stop.is_set():
            return False
        self.metrics.ready.set(1)
        self.ready.set()
        self.notifier.ready(self._status_line())
        log.info("ready: scoring %s", self._status_line())
        return True

    # ------------------------------------------------------------------ alert states, commands

    def _on_connected(self) -> None:
        """Network thread, after every accepted connection: re-assert every alert state."""
        self._reconnected.set()
        self._queue.wake()

    def _handle_side_inputs(self, pipeline: Pipeline) -> None:
        """Pipeline thread: re-assert after a connect, reconcile retained states, commands."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            pipeline.request_reassert()
        retained = self.retained_states.take()
        if retained:
            pipeline.reconcile(retained)
        self.commands.apply_all(pipeline)

    def _final_state(self) -> None:
        """After the drain: snapshot, or say every alert state is unknown from now on."""
        pipeline = self.pipeline
        if pipeline is None or self._pipeline_failed:
            return
        if not self.snapshots.save_final(pipeline):
            pipeline.forget_all("stopped")  # nothing will resume these states

    def _status_line(self) -> str:
        m = self.model
        if m is None:
            return "starting"
        return (
            f"model {m.contract.model_version} on {m.active_provider}, "
            f"subscribed to {self.config.mqtt.topic_in} at {self.config.mqtt.host}:{self.config.mqtt.port}"
        )

    # ------------------------------------------------------------------ main loop

    def run_forever(self) -> int:
        """Wait for stop/reload requests and ping the watchdog; then stop. Returns the exit code."""
        wd = self._watchdog_s
        tick = wd / 2 if wd else 1.0
        try:
            while not self._stop.is_set():
                self._wake.wait(tick)
                self._wake.clear()
                if self._pipeline_done.is_set() and not self._stop.is_set():
                    log.error(
                        "pipeline thread ended unexpectedly; exiting so that the supervisor restarts us"
                    )
                    self._pipeline_failed = True
                    break
                if self._reload.is_set() and (self._reloader is None or not self._reloader.is_alive()):
                    self._reload.clear()
                    self._reloader = threading.Thread(
                        target=self._reload_model, name="anomalyd-reload", daemon=True
                    )
                    self._reloader.start()
                if wd and self._progressing(wd / 2):
                    self.notifier.watchdog()
        finally:
            code = self.shutdown()
        return code

    def _progressing(self, max_age_s: float) -> bool:
        """The pipeline loop turned recently and the network thread lives."""
        pipeline_ok = self._pipeline is not None and self._pipeline.is_alive()
        link_ok = self._link is not None and self._link.alive
        now = time.monotonic()
        # A batch stuck in ONNX Runtime on an inference thread stalls scoring even though
        # the pipeline thread itself still turns.
        inference_ok = self.pipeline is None or self.pipeline.inference_age(now) < max_age_s
        return pipeline_ok and link_ok and inference_ok and now - self.heartbeat < max_age_s

    def shutdown(self) -> int:
        """Stop in order; safe to call after a partial start. Returns the exit code."""
        deadline = time.monotonic() + self.config.shutdown.drain_timeout_s
        self.notifier.stopping("draining")
        self.metrics.ready.set(0)
        self.ready.clear()
        link = self._link
        if link is not None and link.connected and not self._force.is_set():
            link.stop_intake(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        self._draining.set()
        self._queue.wake()
        if self._pipeline is not None and not self._pipeline_done.wait(max(0.0, deadline - time.monotonic())):
            pending = self.pipeline.pending + self.pipeline.in_flight if self.pipeline is not None else 0
            self._abort.set()  # the pipeline thread drops (and counts) its pending windows
            self._queue.wake()
            self._pipeline_done.wait(2.0)
            queued = len(self._queue)
            self.metrics.messages_dropped.labels(reason="shutdown").inc(queued)
            log.warning(
                "drain deadline (%.1f s) passed: dropped %d queued messages and about %d pending windows",
                self.config.shutdown.drain_timeout_s,
                queued,
                pending,
            )
        if self._pipeline_done.is_set() and not self._force.is_set():
            # The pipeline thread has ended: its state can be read from here.
            self._final_state()
        if link is not None:
            if self._publisher is not None and link.connected:
                link.flush(timeout=max(0.5, deadline - time.monotonic()))
                self._publisher.stopped(timeout=max(0.5, deadline - time.monotonic()))
            link.close(timeout=max(0.5, deadline - time.monotonic()))
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()
        if self._pipeline_failed:
            return EXIT_INTERNAL
        code = EXIT_FORCED if self._force.is_set() else EXIT_OK
        log.info("stopped (exit %d)", code)
        return code

    # ------------------------------------------------------------------ reload

    def _reload_model(self) -> None:
        self.notifier.reloading()
        try:
            new = self._load_warm()
        except AnomalydError as exc:
            self._reload_failed(str(exc))
            return
        except Exception as exc:  # anything ORT throws must not take the server down
            log.exception("model reload failed")
            self._reload_failed(repr(exc))
            return
        self._swapped.clear()
        self._pending_model = new
        self._queue.wake()
        if not self._swapped.wait(30.0):
            self._reload_failed("the pipeline did not take the new model within 30 s")
            return
        self.metrics.model_reloads.labels(result="success").inc()
        self.notifier.ready(self._status_line())
        log.info("model reloaded: now serving %s", new.contract.model_version)

    def _reload_failed(self, why: str) -> None:
        self.metrics.model_reloads.labels(result="failure").inc()
        old = self.model.contract.model_version if self.model else "?"
        log.error("model reload failed, still serving %s: %s", old, why)
        self.notifier.ready(self._status_line())

    def _swap_model(self, new: LoadedModel) -> None:
        """On the pipeline thread: finish pending windows with the old model, then switch."""
        assert self.pipeline is not None
        self.pipeline.swap_model(new)
        self.model = new
        if self._publisher is not None:
            self._publisher.set_model(new.contract.feature_names, new.contract.model_version)
        self._announce_model(new, self.pipeline.threshold)
        self._swapped.set()

    # ------------------------------------------------------------------ pipeline thread

    def _run_pipeline_loop(self) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            while not self._abort.is_set():
                self.heartbeat = now = time.monotonic()
                pending = self._pending_model
                if pending is not None:
                    self._pending_model = None
                    self._swap_model(pending)
                if self._draining.is_set():
                    self._drain_all(pipeline)
                    return
                due = pipeline.time_until_due(now)
                timeout = self._idle_tick if due is None else min(due, self._idle_tick)
                if timeout > 0:
                    self._queue.wait(timeout)
                messages = self._queue.drain(_DRAIN_MAX, _DRAIN_MAX_BYTES)
                if messages:
                    pipeline.ingest(messages)
                pipeline.flush()
                self._handle_side_inputs(pipeline)
                if now - self._last_housekeeping >= _HOUSEKEEPING_S:
                    self._last_housekeeping = now
                    link = self._link
                    pipeline.housekeeping(
                        now,
                        queue_fill=self._queue.fill,
                        queue_dropped=link.dropped if link is not None else 0,
                    )
                    self.snapshots.maybe_save(pipeline, now)
        except Exception:
            log.exception("pipeline thread failed")
            self._pipeline_failed = True
            self._wake.set()
        finally:
            if self._abort.is_set():
                pipeline.drop_pending()
            pipeline.close()
            self._pipeline_done.set()

    def _drain_all(self, pipeline: Pipeline) -> None:
        """Shutdown: ingest what is queued, score everything pending, publish."""
        scored_before = pipeline.windows_scored
        while not self._abort.is_set():
            self.heartbeat = time.monotonic()
            messages = self._queue.drain(_DRAIN_MAX, _DRAIN_MAX_BYTES)
            if not messages:
                break
            pipeline.ingest(messages)
        if not self._abort.is_set():
            pipeline.flush(force=True)
        log.info("drained: %d windows scored during shutdown", pipeline.windows_scored - scored_before)


def run_service(config: Config, registry: CollectorRegistry | None = None) -> int:
    """Start and run until stopped (the ``anomalyd run`` command). Returns the exit code."""
    service = Service(config, registry=registry)
    service.install_signal_handlers()
    try:
        started = service.start()
    except AnomalydError:
        service.shutdown()
        raise
    if not started:
        return service.shutdown()
    return service.run_forever()
