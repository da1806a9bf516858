"""The daemon's lifecycle: start, run, reload, stop. The stages are wired in ``Pipeline``.

Start, in order (a failure stops the start with one line and its exit code):
config → logging (both done by the CLI) → secrets → model load, contract check, warm-up
of every batch shape → metrics server → the snapshot of per-device state, if one is
usable (``anomalyd.snapshot``) → pipeline thread → MQTT (a broker that is down delays
readiness; it does not kill the start) → ``READY=1``.

On every (re)connect the pipeline re-asserts every device's retained alert state, and
reconciles the alert states the broker retains with its own (``Pipeline.reconcile``); it
also takes operator commands (``anomalyd.commands``) from the command topic.

Several models (``[[models]]``): the pipeline thread runs an ``anomalyd.routing.ModelRouter``
in place of the one ``Pipeline``: one pipeline per model, each message routed by its
device id. Each model is loaded and warmed at the start; a reload loads again only the
models whose file changed, and the others keep serving; each model's per-device state has
a snapshot file of its own (``anomalyd.snapshot``).

Threads: the paho network thread (``anomalyd.mqtt``) only enqueues into the intake queue;
``_run_pipeline_loop`` owns the ``Pipeline`` (decoder, buffers, batcher, model, detector,
publisher: no locks) and feeds it from the queue, in passes; the pipeline's inference
threads only run ONNX Runtime on batches it hands them; the main thread only waits for signals,
pings the watchdog while the pipeline makes progress, and starts reloads; a short-lived
reload thread reads the configuration again and loads and warms a new model beside the
serving one, and the pipeline thread takes both in between two passes.

Reload (SIGHUP, ``systemctl reload``): the configuration file the daemon was started with
is read again, with the command line's overrides on top, and compared with the running one
(``anomalyd.reload``): what may change live changes (``[detector]``, most of ``[output]``,
``[logging]`` level and format, the model file and its session options, ...), every other
changed key is logged as needing a restart and keeps its running value. The model file is
loaded again when it or its options changed. All or nothing: a configuration that does not
load, or a model that does not load and warm up, leaves the running configuration and model
in place, is logged at ERROR with the key path or model at fault, and is counted
(``anomalyd_config_reloads_total{result="failure"}``).

Stop (SIGTERM/SIGINT; a second one forces): ``STOPPING=1`` → unsubscribe (intake stops)
→ the pipeline scores everything queued and pending and publishes it, within
``shutdown.drain_timeout_s`` → a snapshot (or, without a state directory, every device's
alert state becomes ``unknown``/``stopped``: nothing will resume it) → ``stopped``
(retained) → disconnect → exit 0. Whatever is still queued or pending when the drain ends
early (the deadline, or a second signal: exit 130) is dropped, counted and logged. A
pipeline thread that does not end even then is stuck (ONNX Runtime cannot be interrupted):
the stop goes on without it (no snapshot; exit 70), and ``run_service`` ends the process
at once rather than let the interpreter's exit wait for that thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn, cast

from prometheus_client import CollectorRegistry

from anomalyd.alerts import RetainedStates
from anomalyd.commands import CommandInbox
from anomalyd.config import Config, ModelSection, load_config, model_entries
from anomalyd.decode import Reason
from anomalyd.errors import AnomalydError, ConfigError
from anomalyd.homeassistant import HomeAssistantDiscovery, attach_discovery
from anomalyd.intake import IntakeQueue
from anomalyd.logsetup import reconfigure as reconfigure_logging
from anomalyd.metrics import Metrics, MetricsServer
from anomalyd.model import LoadedModel, SessionOptions, load_model
from anomalyd.mqtt import MqttLink, subscription_filter
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import Publisher, last_will
from anomalyd.reload import ReloadPlan, file_digest, plan_reload
from anomalyd.routing import ModelRouter
from anomalyd.sdnotify import Notifier, watchdog_interval
from anomalyd.snapshot import SnapshotKeeper

log = logging.getLogger(__name__)

#: Exit codes besides the errors' own (anomalyd.errors): a forced stop (second signal) and
#: an internal failure (EX_SOFTWARE; systemd restarts it): the pipeline thread died, or a
#: stop had to leave it behind, stuck.
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
#: How long a reload waits for the pipeline thread to take what it hands over.
_HANDOVER_TIMEOUT_S = 30.0
#: How long a stop waits for the pipeline thread once told to drop what is left (the drain
#: deadline passed, or a second signal): it ends within a pass unless it is stuck.
_ABORT_GRACE_S = 2.0
#: How often a stop that waits for the drain looks for a second signal.
_STOP_POLL_S = 0.1


def _session_options(model: ModelSection) -> SessionOptions:
    return SessionOptions(
        providers=model.providers,
        intra_op_threads=model.intra_op_threads,
        allow_spinning=model.allow_spinning,
    )


@dataclass(slots=True)
class _Handover:
    """What a reload hands the pipeline thread: the configuration to run with (None: no
    live change for the pipeline) and a new model (None: keep serving the current one).
    The pipeline thread fills ``error`` if it could not take them (then it changed nothing)."""

    config: Config | None
    model: LoadedModel | None
    error: str | None = None
    #: With several models: the reloaded ones, by name (the others keep serving).
    models: dict[str, LoadedModel] = field(default_factory=dict)


#: What the pipeline thread runs: one model's pipeline, or a router over several.
Stages = Pipeline | ModelRouter


class Service:
    """One anomalyd instance. ``start()`` then ``run_forever()``; ``request_stop()`` /
    ``request_reload()`` from signal handlers or tests.

    ``config`` is what ``load_config(config_path, overrides)`` returned: a reload reads the
    same file with the same overrides again (no ``config_path``: the embedded defaults).
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
        config_path: str | os.PathLike[str] | None = None,
        overrides: dict[str, object] | None = None,
    ) -> None:
        self.config = config
        self._config_path = Path(config_path) if config_path is not None else None
        self._overrides = dict(overrides or {})
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
        self._pipeline_abandoned = False
        self._windows_dropped_at_stop = 0  # by the pipeline thread, when told to drop them
        self._queue = IntakeQueue(
            config.stream.intake_queue_size, int(config.stream.intake_queue_mib * 2**20)
        )
        self.metrics.track_queue(
            lambda: len(self._queue), config.stream.intake_queue_size, lambda: self._queue.nbytes
        )
        self._link: MqttLink | None = None
        self._publisher: Publisher | None = None
        self._discovery: HomeAssistantDiscovery | None = None  # [homeassistant] enabled
        self._pipeline: threading.Thread | None = None
        self._reloader: threading.Thread | None = None
        # A reload's hand-over to the pipeline thread; the lock lets a reload that gave up
        # waiting take it back, so that it is either applied whole or not at all.
        self._handover: _Handover | None = None
        self._handover_lock = threading.Lock()
        self._handed_over = threading.Event()
        self._model_digest: str | None = None  # of the serving model's file, read before loading it
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
        #: The stages of the served model(s); built in start(), run by the pipeline thread.
        self.pipeline: Stages | None = None
        #: With several models: each one served, its file's digest and its publisher, by name.
        self.models: dict[str, LoadedModel] = {}
        self._model_digests: dict[str, str | None] = {}
        self._model_publishers: dict[str, Publisher] = {}

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Begin a graceful stop; a second request forces it (skip the drain)."""
        if self._stop.is_set():
            log.warning(
                "second stop request: stopping now; queued messages and pending windows are dropped "
                "(counted, and logged at the end of the stop)"
            )
            self._force.set()
            self._abort.set()
            self._queue.wake()
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Reload the configuration and the model (SIGHUP); what runs stays until the new
        configuration is checked and the new model (if it changed) is warm."""
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop (twice: force), SIGHUP reloads. Handlers only set events."""

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self.request_stop()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            log.info("received SIGHUP: reloading the configuration and the model")
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
    def pipeline_abandoned(self) -> bool:
        """The stop went on without the pipeline thread, which did not end (stuck)."""
        return self._pipeline_abandoned

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    # ------------------------------------------------------------------ start

    def _load_warm(self, cfg: Config) -> LoadedModel:
        model = load_model(cfg.model.path, _session_options(cfg.model))
        sizes = cfg.batching.warmup_sizes()
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

    def _announce_model(
        self, model: LoadedModel, threshold: float, name: str = "default", primary: bool = True
    ) -> None:
        c = model.contract
        self.metrics.set_model(
            c.model_version,
            kind=c.kind,
            window=c.window_length,
            features=c.feature_names,
            provider=model.active_provider,
            threshold=threshold,
            name=name,
            primary=primary,
        )

    def _announce_models(self) -> None:
        """Every model served, as ``_announce_model`` (the first as the primary one)."""
        pipeline = self.pipeline
        if isinstance(pipeline, ModelRouter):
            thresholds = pipeline.thresholds
            for i, (name, model) in enumerate(self.models.items()):
                self._announce_model(model, thresholds[name], name, primary=i == 0)
        elif pipeline is not None and self.model is not None:
            self._announce_model(self.model, pipeline.threshold)

    def start(self) -> bool:
        """Run the ordered start. True once ready; False if a stop was requested first.

        Raises ``AnomalydError`` (with its exit code) if the start cannot finish.
        """
        cfg = self.config
        password = cfg.mqtt.password()
        passphrase = cfg.mqtt.key_passphrase()
        self.notifier.status("loading model")
        entries = model_entries(cfg)
        if entries is not None:
            for entry in entries:
                self._model_digests[entry.name] = file_digest(entry.path)
                self.models[entry.name] = self._load_warm(cfg.for_model(entry))
            model = next(iter(self.models.values()))
        else:
            # Read before loading: a file replaced meanwhile then differs at the next reload.
            self._model_digest = file_digest(cfg.model.path)
            model = self._load_warm(cfg)
        self.model = model
        if self._stop.is_set():
            return False
        if cfg.metrics.enabled:
            try:
                self.metrics_server = MetricsServer.from_config(
                    cfg.metrics, self.metrics, liveness=self.liveness, readiness=self.readiness
                )
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
        self._discovery = attach_discovery(
            cfg.homeassistant,
            cfg.output,
            model.contract.model_version,
            link,
            self._publisher,
            wake=self._queue.wake,
            log_interval_s=cfg.logging.rejection_log_interval_s,
        )
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
        if entries is not None:
            router = self._build_router(cfg, link, self._publisher)
            self.pipeline = router
            self._announce_models()
            for name, member in router.pipelines.items():
                self.snapshots.restore(member, name)  # each model from its own file
        else:
            self.pipeline = Pipeline(cfg, model, self.metrics, self._publisher, wake=self._queue.wake)
            self._announce_models()
            self.snapshots.restore(self.pipeline)
        self._pipeline = threading.Thread(
            target=self._run_pipeline_loop, name="anomalyd-pipeline", daemon=True
        )
        self.heartbeat = time.monotonic()  # /healthz: the loading above was no stall
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

    def _build_router(self, cfg: Config, link: MqttLink, primary: Publisher) -> ModelRouter:
        """Several models: a publisher per model (the first model's is the daemon's own,
        which also says the status), all on the one link, and the router over them."""
        for i, (name, model) in enumerate(self.models.items()):
            if i == 0:
                publisher = primary
            else:
                publisher = Publisher(
                    link,
                    cfg.output,
                    self.metrics,
                    feature_names=model.contract.feature_names,
                    model_version=model.contract.model_version,
                    log_interval_s=cfg.logging.rejection_log_interval_s,
                )
                publisher.discovery = primary.discovery  # every model's devices are announced
            self._model_publishers[name] = publisher
        return ModelRouter(
            cfg,
            self.models,
            self.metrics,
            dict(self._model_publishers),
            status_sink=primary,
            wake=self._queue.wake,
        )

    # ------------------------------------------------------------------ alert states, commands

    def _on_connected(self) -> None:
        """Network thread, after every accepted connection: re-assert every alert state."""
        self._reconnected.set()
        self._queue.wake()

    def _handle_side_inputs(self, pipeline: Stages) -> None:
        """Pipeline thread: re-assert after a connect (or when Home Assistant discovery
        wants every device announced again), reconcile retained states, commands."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            pipeline.request_reassert()
        if self._discovery is not None and self._discovery.take_reannounce():
            pipeline.request_reassert()  # the configs go out with the re-asserted states
        retained = self.retained_states.take()
        if retained:
            pipeline.reconcile(retained)
        # A router takes commands as a pipeline does (apply_all only calls apply_command).
        self.commands.apply_all(cast(Pipeline, pipeline))

    def _final_state(self) -> None:
        """After the drain: snapshot, or say every alert state is unknown from now on."""
        pipeline = self.pipeline
        if pipeline is None or self._pipeline_failed:
            return
        if isinstance(pipeline, ModelRouter):
            # Each model's own snapshot: a model whose write failed forgets its states alone.
            for name, member in pipeline.pipelines.items():
                if not self.snapshots.save_final(member, name):
                    member.forget_all("stopped")  # nothing will resume these states
        elif not self.snapshots.save_final(pipeline):
            pipeline.forget_all("stopped")  # nothing will resume these states

    def _status_line(self) -> str:
        m = self.model
        if m is None:
            return "starting"
        more = f" and {len(self.models) - 1} more model(s)" if len(self.models) > 1 else ""
        return (
            f"model {m.contract.model_version} on {m.active_provider}{more}, "
            f"subscribed to {self.config.mqtt.topic_in} at {self.config.mqtt.host}:{self.config.mqtt.port}"
        )

    # ------------------------------------------------------------------ health (HTTP /healthz, /readyz)

    def liveness(self) -> dict[str, bool]:
        """``/healthz`` checks (True: passing): the pipeline thread lives and its loop turned
        within ``metrics.stall_timeout_s``, no batch has been in ONNX Runtime longer, the MQTT
        network thread lives. A part not started yet passes; so do threads ended by a stop."""
        now = time.monotonic()
        stall_s = self.config.metrics.stall_timeout_s
        thread, pipeline, link = self._pipeline, self.pipeline, self._link
        return {
            "pipeline_thread": thread is None or thread.is_alive() or self._draining.is_set(),
            "pipeline_loop": thread is None or not thread.is_alive() or now - self.heartbeat < stall_s,
            "inference": pipeline is None or pipeline.inference_age(now) < stall_s,
            "mqtt_thread": link is None or link.alive or self._stop.is_set(),
        }

    def readiness(self) -> dict[str, bool]:
        """``/readyz`` checks (True: passing): the start is complete (model warm, broker
        connected, telemetry subscription granted) and no stop has begun; the broker is
        connected and grants the telemetry subscription now; the daemon is not overloaded. With
        several models, ``model_loaded:<name>`` for each in place of ``model_loaded``."""
        link, pipeline, running = self._link, self.pipeline, self.ready.is_set()
        configured = model_entries(self.config)
        loaded: dict[str, bool] = (
            {f"model_loaded:{e.name}": e.name in self.models for e in configured}
            if configured is not None
            else {"model_loaded": self.model is not None}
        )
        return {
            **loaded,
            "running": running,
            "broker_connected": link is not None and link.connected,
            "subscription_granted": running and link is not None and not link.subscription_denied,
            "not_overloaded": pipeline is None or not pipeline.overloaded,
        }

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
                        target=self._run_reload, name="anomalyd-reload", daemon=True
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

    def shutdown(self, exit_code: int | None = None) -> int:
        """Stop in order; safe to call after a partial start. Returns the exit code: that of
        the failed start when ``exit_code`` is given (the log line must say what the process
        exits with); else 70 if the pipeline thread died or had to be left behind, stuck
        (``pipeline_abandoned``), 130 after a second stop request, 0 otherwise."""
        deadline = time.monotonic() + self.config.shutdown.drain_timeout_s
        self.notifier.stopping("draining")
        self.metrics.ready.set(0)
        self.ready.clear()
        link = self._link
        if link is not None and link.connected and not self._force.is_set():
            link.stop_intake(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        self._draining.set()
        self._queue.wake()
        if self._pipeline is not None and not self._await_pipeline(deadline):
            self._abandon_pipeline()
        if self._pipeline_done.is_set() and not self._force.is_set():
            # The pipeline thread has ended: its state can be read from here.
            self._final_state()
        if link is not None:
            if self._publisher is not None and link.connected:
                link.flush(timeout=max(0.5, deadline - time.monotonic()))
                self._publisher.stopped(timeout=max(0.5, deadline - time.monotonic()))
            link.close(timeout=max(0.5, deadline - time.monotonic()))
        self._account_for_dropped()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()
        if self._pipeline_failed:
            return EXIT_INTERNAL
        if exit_code is not None:
            code = exit_code
        elif self._force.is_set():
            code = EXIT_FORCED
        elif self._pipeline_abandoned:
            code = EXIT_INTERNAL
        else:
            code = EXIT_OK
        log.info("stopped (exit %d)", code)
        return code

    def _await_pipeline(self, deadline: float) -> bool:
        """Wait for the pipeline thread to drain and end, until the drain deadline or a
        second stop request; then tell it to drop what is left and wait ``_ABORT_GRACE_S``
        more. True once it has ended."""
        done = self._pipeline_done
        # In short waits, not one long one: a second signal must cut the drain short.
        while not done.is_set() and not self._force.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done.wait(min(left, _STOP_POLL_S))
        if done.is_set():
            return True
        forced = self._force.is_set()
        pending = self._pending_windows()
        self._abort.set()  # the pipeline thread drops (and counts) its pending windows
        self._queue.wake()
        ended = done.wait(_ABORT_GRACE_S)
        if not forced:  # a forced stop says what it dropped at its end (_account_for_dropped)
            queued = self._drop_queued()
            log.warning(
                "drain deadline (%.1f s) passed: dropped %d queued messages and about %d pending windows",
                self.config.shutdown.drain_timeout_s,
                queued,
                pending,
            )
        return ended

    def _pending_windows(self) -> int:
        pipeline = self.pipeline
        return pipeline.pending + pipeline.in_flight_windows if pipeline is not None else 0

    def _abandon_pipeline(self) -> None:
        """The pipeline thread did not end when told to: it is stuck, most likely in ONNX
        Runtime, which cannot be interrupted. The stop goes on without it."""
        self._pipeline_abandoned = True
        now = time.monotonic()
        pipeline = self.pipeline
        stuck_s = max(now - self.heartbeat, pipeline.inference_age(now) if pipeline is not None else 0.0)
        # It may be stuck before it dropped (and counted) its pending windows, waiting for a
        # batch's scores, or after, shutting its inference threads down. The windows it
        # still holds are not counted in the metrics (it may still touch them); the log
        # says how many there are.
        self._windows_dropped_at_stop += self._pending_windows()
        log.error(
            "the pipeline thread did not end: stuck for %.0f s (a batch in ONNX Runtime cannot be "
            "interrupted); stopping without it: about %d windows lost, no last snapshot, the alert "
            "states are left as they are",
            stuck_s,
            self._windows_dropped_at_stop,
        )

    def _drop_queued(self) -> int:
        """Take every message left in the intake queue and count it as dropped at shutdown.

        Only once the pipeline thread was told to drop what is left (or has ended): it then
        takes nothing more from the queue (it looks at that order before every take), so
        this thread may take its place as the queue's one consumer."""
        n = 0
        while len(self._queue):
            n += len(self._queue.drain(_DRAIN_MAX))
        if n:
            self.metrics.messages_dropped.labels(reason="shutdown").inc(n)
        return n

    def _account_for_dropped(self) -> None:
        """After the disconnect, when nothing more can arrive: count and log what the stop
        did not score (a forced stop's queue and pending windows; messages that arrived
        after the drain or the pipeline thread's end)."""
        queued = self._drop_queued()
        if self._force.is_set():
            log.warning(
                "forced stop: dropped %d queued messages and %s%d pending windows",
                queued,
                "about " if self._pipeline_abandoned else "",
                self._windows_dropped_at_stop,
            )
        elif queued:
            log.warning("dropped %d queued messages that the stop did not score", queued)

    # ------------------------------------------------------------------ reload

    def _run_reload(self) -> None:
        """The reload thread: read the configuration again, load the model if it changed, and
        hand what changes live to the pipeline thread; all of it, or on any failure none."""
        self.notifier.reloading()
        source = str(self._config_path) if self._config_path is not None else "embedded defaults"
        try:
            new = load_config(self._config_path, self._overrides)
        except ConfigError as exc:
            why = str(exc) if source in str(exc) else f"{source}: {exc}"
            self._reload_failed("configuration reload", why)
            return
        plan = plan_reload(self.config, new)
        if (model_entries(new) is None) != (model_entries(self.config) is None):
            # The pipelines are built for one or for several models at the start.
            self._reload_failed(
                "reload", f"{source}: switching between [model] and [[models]] needs a restart"
            )
            return
        if model_entries(plan.config) is not None:
            self._run_reload_models(plan, source)
            return
        # The model file is read again only when it (or how it is run) changed; an
        # unreadable one is loaded anyway, so that the error says what is wrong with it.
        digest = file_digest(plan.config.model.path)
        model: LoadedModel | None = None
        if plan.live_in("model") or digest is None or digest != self._model_digest:
            try:
                model = self._load_warm(plan.config)
            except AnomalydError as exc:
                self._reload_failed("model reload", str(exc), model=True)
                return
            except Exception as exc:  # anything ORT throws must not take the server down
                log.exception("model reload failed")
                self._reload_failed("model reload", repr(exc), model=True)
                return
        if plan.unchanged and model is None:
            log.info(
                "reload: nothing changed (configuration: %s; model file %s)", source, plan.config.model.path
            )
            self.metrics.config_reloads.labels(result="success").inc()
            self.notifier.ready(self._status_line())
            return
        error = self._hand_over(_Handover(plan.config if plan.live else None, model))
        if error is not None:
            self._reload_failed(
                "model reload" if model is not None else "reload", error, model=model is not None
            )
            return
        self._reload_done(plan, model, digest)

    def _run_reload_models(self, plan: ReloadPlan, source: str) -> None:
        """The reload thread, with several models: load again each model whose file changed
        (or cannot be read: the error then says why), and hand them over with the live
        configuration changes. ``[[models]]`` itself needs a restart to change (the plan
        keeps the running entries), so the same models keep their names."""
        entries = model_entries(plan.config)
        assert entries is not None
        loaded: dict[str, LoadedModel] = {}
        digests: dict[str, str | None] = {}
        for entry in entries:
            digest = file_digest(entry.path)
            if digest is not None and digest == self._model_digests.get(entry.name):
                continue
            try:
                loaded[entry.name] = self._load_warm(plan.config.for_model(entry))
            except Exception as exc:  # AnomalydError, or anything ORT throws
                if not isinstance(exc, AnomalydError):
                    log.exception("model %s reload failed", entry.name)
                self._reload_failed(f"model {entry.name} reload", str(exc), model=True)
                return
            digests[entry.name] = digest
        if plan.unchanged and not loaded:
            log.info("reload: nothing changed (configuration: %s; no model file changed)", source)
            self.metrics.config_reloads.labels(result="success").inc()
            self.notifier.ready(self._status_line())
            return
        error = self._hand_over(_Handover(plan.config if plan.live else None, None, models=loaded))
        if error is not None:
            self._reload_failed("model reload" if loaded else "reload", error, model=bool(loaded))
            return
        self._model_digests.update(digests)
        for name, model in loaded.items():
            log.info("model %s reloaded: now serving %s", name, model.contract.model_version)
        self._reload_done(plan, None, None, models_reloaded=bool(loaded))

    def _hand_over(self, handover: _Handover) -> str | None:
        """Give the pipeline thread what a reload changes and wait until it has taken it.
        Returns None once it is applied, else why not (then none of it was applied)."""
        self._handed_over.clear()
        with self._handover_lock:
            self._handover = handover
        self._queue.wake()
        if not self._handed_over.wait(_HANDOVER_TIMEOUT_S):
            with self._handover_lock:
                if self._handover is handover:  # never taken: take it back
                    self._handover = None
                    return f"the pipeline thread did not take it within {_HANDOVER_TIMEOUT_S:.0f} s"
            self._handed_over.wait()  # taken meanwhile: the pipeline thread is applying it
        return handover.error

    def _take_handover(self, pipeline: Stages) -> None:
        """On the pipeline thread, between two passes: apply what a reload handed over."""
        with self._handover_lock:
            handover, self._handover = self._handover, None
        if handover is None:
            return
        applied = False
        try:
            if isinstance(pipeline, ModelRouter):
                self._take_models_handover(pipeline, handover)
                applied = True
                return
            if handover.config is not None:
                try:
                    pipeline.apply_config(handover.config)
                except ValueError as exc:  # Detector.reconfigure checks before it changes anything
                    handover.error = f"the detector refused the new [detector]: {exc}"
                    return
                if self._publisher is not None:
                    self._publisher.set_output(handover.config.output)
            new = handover.model
            if new is not None:
                pipeline.swap_model(new)  # pending windows are scored by the old model first
                self.model = new
                if self._publisher is not None:
                    self._publisher.set_model(new.contract.feature_names, new.contract.model_version)
            self._announce_models()
            applied = True
        finally:
            if not applied and handover.error is None:
                handover.error = "the pipeline thread failed while applying it (see above)"
            self._handed_over.set()

    def _take_models_handover(self, router: ModelRouter, handover: _Handover) -> None:
        """``_take_handover`` with several models: the configuration, then each new model."""
        if handover.config is not None:
            try:
                router.apply_config(handover.config)
            except ValueError as exc:  # checked for every model before any changed
                handover.error = f"the detector refused the new [detector]: {exc}"
                return
            for publisher in self._model_publishers.values():
                publisher.set_output(handover.config.output)
        for name, new in handover.models.items():
            router.swap_model(name, new)  # its pending windows are scored by its old model first
            self.models[name] = new
            self._model_publishers[name].set_model(new.contract.feature_names, new.contract.model_version)
        self.model = next(iter(self.models.values()))
        self._announce_models()

    def _reload_done(
        self,
        plan: ReloadPlan,
        model: LoadedModel | None,
        digest: str | None,
        *,
        models_reloaded: bool = False,
    ) -> None:
        """The reload thread, once the pipeline thread took its part: the rest, and the log."""
        cfg = plan.config
        if plan.live_in("logging"):
            reconfigure_logging(cfg.logging.level, cfg.logging.format)
        self.config = cfg
        for change in plan.restart:
            log.warning("reload: needs a restart: %s (the running value stays until then)", change.describe())
        if plan.live:
            log.info("reload: applied %s", "; ".join(c.describe() for c in plan.live))
        if model is not None:
            self._model_digest = digest
            log.info("model reloaded: now serving %s", model.contract.model_version)
        log.info(
            "reload done: %s, static threshold %.6g%s",
            self._status_line(),
            self.threshold,
            f"; {len(plan.restart)} change(s) wait for a restart" if plan.restart else "",
        )
        # Counted last: whoever watches the counters finds everything above done.
        if model is not None or models_reloaded:
            self.metrics.model_reloads.labels(result="success").inc()
        self.metrics.config_reloads.labels(result="success").inc()
        self.notifier.ready(self._status_line())

    def _reload_failed(self, what: str, why: str, *, model: bool = False) -> None:
        """Nothing of the reload was applied: say why at ERROR, count it (``model``: the
        model part failed, which ``anomalyd_model_reloads_total`` counts too)."""
        serving = self.model.contract.model_version if self.model else "?"
        log.error("%s failed, still serving %s with the running configuration: %s", what, serving, why)
        if model:
            self.metrics.model_reloads.labels(result="failure").inc()
        self.metrics.config_reloads.labels(result="failure").inc()
        self.notifier.ready(self._status_line())

    # ------------------------------------------------------------------ pipeline thread

    def _run_pipeline_loop(self) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            while not self._abort.is_set():
                self.heartbeat = now = time.monotonic()
                if self._handover is not None:
                    self._take_handover(pipeline)
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
                    self.snapshots.maybe_save(
                        pipeline.pipelines if isinstance(pipeline, ModelRouter) else pipeline, now
                    )
        except Exception:
            log.exception("pipeline thread failed")
            self._pipeline_failed = True
            self._wake.set()
        finally:
            if self._abort.is_set():
                self._windows_dropped_at_stop = pipeline.drop_pending()
            pipeline.close()
            self._pipeline_done.set()

    def _drain_all(self, pipeline: Stages) -> None:
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


def run_service(
    config: Config,
    registry: CollectorRegistry | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, object] | None = None,
) -> int:
    """Start and run until stopped (the ``anomalyd run`` command). Returns the exit code,
    except after a stop that had to leave a stuck pipeline thread behind: then it ends the
    process with that code itself (``_exit_now``).

    ``config_path`` and ``overrides`` are what ``config`` was loaded from: SIGHUP reads them again.
    """
    service = Service(config, registry=registry, config_path=config_path, overrides=overrides)
    service.install_signal_handlers()
    try:
        started = service.start()
    except AnomalydError as exc:
        service.shutdown(exc.exit_code)
        raise
    code = service.run_forever() if started else service.shutdown()
    if service.pipeline_abandoned:
        _exit_now(code)
    return code


def _exit_now(code: int) -> NoReturn:
    """End the process with ``code`` now, once the log is written out.

    For a stop that left the pipeline thread behind, stuck (in ONNX Runtime, or waiting for
    an inference thread that is). Returning would not end the process: at the interpreter's
    exit ``concurrent.futures`` joins every inference thread, the stuck one too, so the
    process would hang until systemd's ``TimeoutStopSec`` kills it, and a second signal
    could not help. Daemon inference threads are no better way out: they would take an
    executor of our own (``concurrent.futures`` joins its workers, daemon or not), and the
    interpreter and the C++ runtime would still be torn down under a thread inside ONNX
    Runtime. Nothing is left that needs a clean exit: the stop has told the broker, closed
    the link and logged ``stopped (exit N)``."""
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        # A closed or broken stream: nothing more can be saved from it.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
