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

import collections
import logging
import re
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import orjson
from prometheus_client import CollectorRegistry

from anomalyd.commands import CommandError, CommandTopic, parse_command
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
from anomalyd.snapshot import Snapshot, SnapshotError, load_snapshot, save_snapshot

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
#: Operator commands and retained alert states waiting for the pipeline thread (both are
#: rare; a flood beyond this is refused and counted rather than queued without bound).
_SIDE_QUEUE_MAX = 10000


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
        # Filled on the network thread, emptied by the pipeline thread (deque appends and
        # pops are atomic): operator commands, alert states the broker retains, and the
        # "reconnected" flag that makes the pipeline re-assert every alert state.
        self._commands: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._retained_alerts: collections.deque[tuple[str, str]] = collections.deque()
        self._reconnected = threading.Event()
        self._command_topic = CommandTopic(config.commands.topic)
        self._device_pattern = re.compile(config.stream.device_id_pattern)
        alert_pre, _, alert_post = config.output.alert_topic.partition("{device}")
        self._alert_affixes = (alert_pre, alert_post)
        self.state_dir: Path | None = config.state.resolved_directory()
        self._last_snapshot = time.monotonic()
        self._snapshot_writer: threading.Thread | None = None
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
        link.add_subscription(subscription_filter(cfg.output.alert_topic), self._on_retained_alert, qos=1)
        if cfg.commands.enabled:
            # Retain As Published: a command published retained is refused at once, not only
            # when the broker replays it after a reconnect.
            link.add_subscription(
                self._command_topic.subscription, self._on_command, qos=1, retain_as_published=True
            )
        self._link = link
        self.pipeline = Pipeline(cfg, model, self.metrics, self._publisher, wake=self._queue.wake)
        self._announce_model(model, self.pipeline.threshold)
        self._restore_snapshot(self.pipeline)
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

    def _on_retained_alert(self, topic: str, payload: bytes, retain: bool) -> None:
        """Network thread: an alert state the broker holds. Only retained ones are the
        broker's memory; live ones are publications (ours, in MQTT 3.1.1, which has no
        No Local option) and say nothing new."""
        if not retain or not payload:
            return
        pre, post = self._alert_affixes
        if not (topic.startswith(pre) and topic.endswith(post)) or len(topic) <= len(pre) + len(post):
            return
        device = topic[len(pre) : len(topic) - len(post)]
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        # A message from an older anomalyd has "alert" but no "state": it is still a claim.
        state = (
            doc.get("state", "anomalous" if doc.get("alert") else "normal") if isinstance(doc, dict) else "?"
        )
        if len(self._retained_alerts) < _SIDE_QUEUE_MAX:
            self._retained_alerts.append((device, str(state)))
            self._queue.wake()

    def _on_command(self, topic: str, payload: bytes, retain: bool) -> None:
        """Network thread: an operator command, handled on the pipeline thread."""
        if len(self._commands) >= _SIDE_QUEUE_MAX:
            self.metrics.commands_rejected.labels(reason="queue_full").inc()
            return
        self._commands.append((topic, payload, retain))
        self._queue.wake()

    def _handle_side_inputs(self, pipeline: Pipeline) -> None:
        """Pipeline thread: re-assert after a connect, reconcile retained states, commands."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            pipeline.request_reassert()
        retained = self._retained_alerts
        if retained:
            batch = [retained.popleft() for _ in range(len(retained))]
            pipeline.reconcile(batch)
        commands = self._commands
        while commands:
            self._handle_command(pipeline, *commands.popleft())

    def _handle_command(self, pipeline: Pipeline, topic: str, payload: bytes, retain: bool) -> None:
        cfg = self.config.commands
        try:
            command = parse_command(
                self._command_topic,
                topic,
                payload,
                retain,
                device_pattern=self._device_pattern,
                default_shelve_s=cfg.default_shelve_s,
                max_shelve_s=cfg.max_shelve_s,
            )
            if not pipeline.apply_command(command):
                raise CommandError(
                    "unknown_device", f"device {command.device!r} is not tracked by this daemon"
                )
        except CommandError as exc:
            self.metrics.commands_rejected.labels(reason=exc.reason).inc()
            log.warning("command on %r refused (%s): %s", topic[:200], exc.reason, exc)
            return
        self.metrics.commands.labels(verb=command.verb).inc()
        extra = f" for {command.duration_s:g} s" if command.duration_s is not None else ""
        log.info("command %s%s on %s by %r: %s", command.verb, extra, command.device, command.by, command.why)

    # ------------------------------------------------------------------ snapshots

    def _restore_snapshot(self, pipeline: Pipeline) -> None:
        """Before the pipeline thread starts: resume from the snapshot if it is usable."""
        directory = self.state_dir
        if directory is None:
            log.info("no state directory (state.directory, $STATE_DIRECTORY): no snapshots")
            return
        c = pipeline.model.contract
        try:
            snap = load_snapshot(
                directory,
                model_version=c.model_version,
                feature_names=c.feature_names,
                window_length=c.window_length,
                max_age_s=self.config.state.max_age_s,
            )
            n = pipeline.restore_snapshot(snap)
        except SnapshotError as exc:
            self.metrics.snapshot_restores.labels(result=exc.result).inc()
            level = logging.INFO if exc.result == "missing" else logging.WARNING
            log.log(level, "snapshot not used (%s): %s; starting without per-device state", exc.result, exc)
            return
        except ValueError as exc:
            self.metrics.snapshot_restores.labels(result="corrupt").inc()
            log.warning("snapshot not used (corrupt): %s; starting without per-device state", exc)
            return
        self.metrics.snapshot_restores.labels(result="restored").inc()
        log.info(
            "restored %d devices from the snapshot of %.0f s ago (%s)",
            n,
            time.time() - snap.created,
            directory,
        )

    def _write_snapshot(self, snap: Snapshot) -> bool:
        assert self.state_dir is not None
        t0 = time.perf_counter()
        try:
            path = save_snapshot(self.state_dir, snap)
        except OSError as exc:
            self.metrics.snapshot_saves.labels(result="failed").inc()
            log.error("cannot write the snapshot in %s: %s", self.state_dir, exc)
            return False
        self.metrics.snapshot_saves.labels(result="ok").inc()
        self.metrics.snapshot_last_success.set(snap.created)
        log.debug("snapshot of %d devices in %s (%.3f s)", snap.n_devices, path, time.perf_counter() - t0)
        return True

    def _maybe_snapshot(self, pipeline: Pipeline, now: float) -> None:
        """Pipeline thread: the periodic snapshot, written on a thread of its own."""
        interval = self.config.state.snapshot_interval_s
        if self.state_dir is None or interval <= 0 or now - self._last_snapshot < interval:
            return
        if self._snapshot_writer is not None and self._snapshot_writer.is_alive():
            return  # the previous one is still being written (a slow disk): skip this round
        self._last_snapshot = now
        snap = pipeline.export_snapshot()  # a copy: the writer never touches live state
        self._snapshot_writer = threading.Thread(
            target=self._write_snapshot, args=(snap,), name="anomalyd-snapshot", daemon=True
        )
        self._snapshot_writer.start()

    def _final_state(self) -> None:
        """After the drain: snapshot, or say every alert state is unknown from now on."""
        pipeline = self.pipeline
        if pipeline is None or self._pipeline_failed:
            return
        if self._snapshot_writer is not None:
            self._snapshot_writer.join(10.0)
        if self.state_dir is not None and self._write_snapshot(pipeline.export_snapshot()):
            return  # the states stay: the next start restores and re-asserts them
        pipeline.forget_all("stopped")

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
                    self._maybe_snapshot(pipeline, now)
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
