"""The daemon's lifecycle: start, run, reload, stop. The stages are wired in ``Pipeline``.

Start, in order (a failure stops the start with one line and its exit code):
config → logging (both done by the CLI) → secrets → model load, contract check, warm-up
of every batch shape → metrics server → the snapshot of per-device state, if one is
usable (``anomalyd.snapshot``) → pipeline thread → MQTT (a broker that is down delays
readiness; it does not kill the start) → ``READY=1``.

On every (re)connect the pipeline re-asserts every device's retained alert state, and
reconciles the alert states the broker retains with its own (``Pipeline.reconcile``); it
also takes operator commands (``anomalyd.commands``) from the command topic. With
``[cluster.jetstream]``, every connect first refills the windows from JetStream
(``anomalyd.warmup``): the pipeline thread takes no live reading until that replay is in.

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
alert state becomes ``unknown``/``stopped``: nothing will resume it; with ``[cluster]`` the
states are left for the devices' next owner to adopt) → ``stopped``
(retained) → disconnect → exit 0. Whatever is still queued or pending when the drain ends
early (the deadline, or a second signal: exit 130) is dropped, counted and logged. A
pipeline thread that does not end even then is stuck (ONNX Runtime cannot be interrupted):
the stop goes on without it (no snapshot; exit 70), and ``run_service`` ends the process
at once rather than let the interpreter's exit wait for that thread.

The parts of ``Service`` live in modules of their own, as mixins over the state they share
(``anomalyd.service_state``): this module keeps the lifecycle (start, main loop, the stop
in order) and ``run_service``; ``anomalyd.service_reload`` the reload thread and its
hand-over to the pipeline thread; ``anomalyd.service_pipeline`` the pipeline thread's loop,
its drain and side inputs; ``anomalyd.service_health`` the ``/healthz`` and ``/readyz``
checks and the watchdog's progress check; ``anomalyd.service_stop`` the stop's waiting,
abandoning, last snapshot and accounting for drops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from prometheus_client import CollectorRegistry

from anomalyd.alerts import RetainedStates
from anomalyd.commands import CommandInbox
from anomalyd.config import Config, ModelSection, model_entries
from anomalyd.decode import RawMessage, Reason
from anomalyd.errors import AnomalydError, ConfigError
from anomalyd.homeassistant import HomeAssistantDiscovery, attach_discovery
from anomalyd.intake import IntakeQueue
from anomalyd.metrics import Metrics, MetricsServer
from anomalyd.model import LoadedModel, SessionOptions, load_model
from anomalyd.mqtt import MqttLink, client_id_for, subscription_filter
from anomalyd.partitions import Partitioning
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import Publisher, last_will, status_output
from anomalyd.reload import file_digest
from anomalyd.routing import ModelRouter
from anomalyd.sdnotify import Notifier, watchdog_interval
from anomalyd.service_health import HealthMixin
from anomalyd.service_pipeline import PipelineThreadMixin
from anomalyd.service_reload import ReloadMixin, _Handover
from anomalyd.service_state import Stages, log
from anomalyd.service_stop import StopMixin
from anomalyd.snapshot import SnapshotKeeper
from anomalyd.warmup import JetStreamSource, WarmUp, announce_no_jetstream

#: Exit codes besides the errors' own (anomalyd.errors): a forced stop (second signal) and
#: an internal failure (EX_SOFTWARE; systemd restarts it): the pipeline thread died, or a
#: stop had to leave it behind, stuck.
EXIT_OK = 0
EXIT_FORCED = 130
EXIT_INTERNAL = 70

#: Longest the pipeline thread sleeps with nothing to do: bounds the watchdog heartbeat age.
_IDLE_TICK_S = 0.25
#: How often the start re-announces itself to systemd while waiting for the broker.
_BROKER_WAIT_TICK_S = 5.0


def _session_options(model: ModelSection) -> SessionOptions:
    return SessionOptions(
        providers=model.providers,
        intra_op_threads=model.intra_op_threads,
        allow_spinning=model.allow_spinning,
    )


class Service(ReloadMixin, HealthMixin, PipelineThreadMixin, StopMixin):
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
        # The warm-up from JetStream on every (re)connect ([cluster.jetstream]), built in
        # start(); live messages the pipeline thread took just as one was asked for.
        self._warmup: WarmUp | None = None
        self._held_live: list[RawMessage] = []
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
        # One instance of a partitioned fleet subscribes to its partitions only, and says its
        # status under its own name (instances must not overwrite each other's).
        partitioning = self._announce_cluster(cfg)
        instance = partitioning.name if partitioning is not None else None
        link = MqttLink(
            cfg.mqtt,
            queue=self._queue,
            will=last_will(cfg.output, instance),
            password=password,
            key_passphrase=passphrase,
            metrics=self.metrics,
            client_id=client_id_for(cfg.mqtt, instance),
            log_interval_s=max(cfg.logging.rejection_log_interval_s, 1.0),
            topics=partitioning.topic_filters() if partitioning is not None else None,
        )
        self._publisher = Publisher(
            link,
            cfg.output,
            self.metrics,
            feature_names=model.contract.feature_names,
            model_version=model.contract.model_version,
            log_interval_s=cfg.logging.rejection_log_interval_s,
            instance=instance,
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
            status_output(cfg.output, instance),  # availability: this instance's status
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
        # After the snapshot, before the first connect: each connect's warm-up replays what
        # is newer than the windows hold before the pipeline thread takes a live reading.
        self._warmup = self._build_warmup(cfg, link)
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

    def _announce_cluster(self, cfg: Config) -> Partitioning | None:
        """With ``[cluster]``: this instance's partitions, logged and in the metrics (None:
        a lone daemon, which scores every device)."""
        if cfg.cluster is None:
            return None
        partitioning = Partitioning(cfg.cluster, cfg.mqtt.topic_in)
        owned = sorted(partitioning.owned)
        m = self.metrics
        m.cluster_instance.info({"name": partitioning.name})
        m.cluster_partitions.set(partitioning.partitions)
        m.cluster_partitions_owned.set(len(owned))
        # Readings of other instances' devices are rejected (foreign_partition), so every
        # device with a window here is one of this instance's: the same count as
        # anomalyd_devices_tracked, read from it when scraped.
        tracked = m.devices_tracked

        def devices_owned() -> float:
            return next(iter(tracked.collect())).samples[0].value

        m.cluster_devices_owned.set_function(devices_owned)
        shown = ", ".join(str(p) for p in owned[:32]) + (", ..." if len(owned) > 32 else "")
        filters = partitioning.topic_filters()
        log.info(
            "cluster instance %s owns %d of %d partitions (%s): subscribing to %s%s",
            partitioning.name,
            len(owned),
            partitioning.partitions,
            shown,
            filters[0],
            f" ... {filters[-1]}" if len(filters) > 1 else "",
        )
        return partitioning

    def _build_warmup(self, cfg: Config, link: MqttLink) -> WarmUp | None:
        """With ``[cluster.jetstream]``: a warm-up on every (re)connect, asked for by a
        connect listener (``anomalyd.warmup``). A ``[cluster]`` without it says once that
        windows fill from live readings. None for both, and for a lone daemon."""
        cluster = cfg.cluster
        if cluster is None:
            return None
        if cluster.jetstream is None:
            announce_no_jetstream(self.metrics)
            return None
        models = list(self.models.values()) if self.models else [self.model]
        window = max(m.contract.window_length for m in models if m is not None)
        warmup = WarmUp(
            JetStreamSource(cluster, cfg.mqtt.topic_in, window),
            self.metrics,
            wait_subscribed=link.wait_connected,
            wake=self._queue.wake,
        )
        link.add_connect_listener(warmup.request)
        return warmup

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
                    # It shares the discovery, which must keep this instance's status topic.
                    instance=cfg.cluster.instance_name() if cfg.cluster is not None else None,
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

    # ------------------------------------------------------------------ status

    def _status_line(self) -> str:
        m = self.model
        if m is None:
            return "starting"
        more = f" and {len(self.models) - 1} more model(s)" if len(self.models) > 1 else ""
        return (
            f"model {m.contract.model_version} on {m.active_provider}{more}, "
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
                        target=self._run_reload, name="anomalyd-reload", daemon=True
                    )
                    self._reloader.start()
                if wd and self._progressing(wd / 2):
                    self.notifier.watchdog()
        finally:
            code = self.shutdown()
        return code

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
