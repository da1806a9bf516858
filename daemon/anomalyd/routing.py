"""Several models in one daemon (``[[models]]``): each device is scored by the model whose
device globs match its id, each model in a ``Pipeline`` of its own.

``ModelRouter`` holds one ``Pipeline`` per ``[[models]]`` entry (its own decoder, with the
model's feature list, its own device windows, batcher, inference threads and detector)
and presents the service the interface of a single pipeline: the service's pipeline
thread feeds it from the one intake queue (one MQTT subscription) and it hands each
message to the pipeline of its device's model, in arrival order.

Routing rule: the device id is read from the telemetry topic (``mqtt.topic_in``) and
matched against every entry's ``devices`` globs (``fnmatch.fnmatchcase``: case-sensitive,
``*``, ``?``, ``[seq]``). A device must match exactly one model:

* no model: the message is rejected, counted as ``anomalyd_rejected_total{reason="no_model"}``
  and logged (rate-limited, like every rejection);
* several models (two globs that overlap, ``pump-*`` and ``*-01``): rejected as
  ``ambiguous_model``, counted and logged the same way. Never the first match: which one
  that is would depend on the order of the entries, and a device that silently changes
  model when the file is reordered is worse than one that is refused. The same glob in
  two entries is refused when the configuration loads (``Config``).

A topic that is not the telemetry template, or a device id the configured pattern refuses,
goes to the first model's pipeline, whose decoder rejects it with the usual reason
(``bad_topic``, ``bad_device_id``). In a partitioned fleet (``[cluster]``) the topic's last
level, the partition, is set aside to find the device; its model's decoder then checks it
(``foreign_partition``, ``partition_mismatch``). Each device's verdict is cached (bounded: the cache
starts over when full, as the decoder's topic cache does).

What is per model and what is shared: decisions and alert states go out through one
publisher per model (its own feature names and model version), on the shared output
topics (a device belongs to one model, so topics never collide); the status message, the
*overloaded* verdict (any model overloaded), the intake queue and the unlabelled metrics
are daemon-wide. The unlabelled gauges (devices tracked, pending windows, alert states)
are summed over the models here; the per-model families carry a ``model`` label.

Snapshots are per model: the service saves and restores each model's pipeline in a file
of its own (``anomalyd.snapshot.snapshot_file_name``; see docs/operations.md, "Several
models").
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import math
import re
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import AlertRecord, RetainedState
from anomalyd.commands import Command
from anomalyd.config import Config, ModelEntry, model_entries
from anomalyd.decode import RawMessage
from anomalyd.detector import Decision, Detector
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel
from anomalyd.pipeline import DecisionSink, Pipeline
from anomalyd.warmup import WarmCounts

__all__ = ["AMBIGUOUS_MODEL", "NO_MODEL", "ROUTING_REASONS", "ModelRouter", "match_models"]

log = logging.getLogger(__name__)

#: Rejection reasons of the router (``anomalyd_rejected_total{reason=...}``).
NO_MODEL = "no_model"
AMBIGUOUS_MODEL = "ambiguous_model"
ROUTING_REASONS = (NO_MODEL, AMBIGUOUS_MODEL)

#: Devices whose routing is cached; the cache starts over when it is full (a flood of
#: distinct ids, which no cache helps with; real devices cost one match each to come back).
_ROUTE_CACHE_MAX = 100_000


def match_models(device: str, entries: list[ModelEntry]) -> list[str]:
    """The names of the entries whose ``devices`` globs match ``device``, in entry order."""
    return [e.name for e in entries if any(fnmatch.fnmatchcase(device, g) for g in e.devices)]


class _ModelSink:
    """One model's decision sink: its own publisher for decisions and alert states; the
    *overloaded* verdict is the router's to give (it is daemon-wide)."""

    def __init__(self, sink: DecisionSink) -> None:
        self.sink = sink

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.sink.publish_decisions(decisions, arrival_mono)

    def flush_scores(self) -> None:
        self.sink.flush_scores()

    def forget(self, devices: list[str]) -> None:
        self.sink.forget(devices)

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.sink.publish_states(records)

    def set_overloaded(self, overloaded: bool) -> None:
        """Ignored: ``ModelRouter.housekeeping`` tells the daemon-wide sink."""


class ModelRouter:
    """Several models' pipelines behind the interface of one (see the module docstring).

    ``models`` and ``sinks`` are keyed by entry name, every entry of ``config.models``
    present; ``status_sink`` takes the daemon-wide *overloaded* verdict. One thread owns it.
    """

    def __init__(
        self,
        config: Config,
        models: Mapping[str, LoadedModel],
        metrics: Metrics,
        sinks: Mapping[str, DecisionSink] | None = None,
        *,
        status_sink: DecisionSink | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        entries = model_entries(config)
        if not entries:
            raise ValueError("a ModelRouter needs a configuration with [[models]]")
        self.config = config
        self.metrics = metrics
        self.entries = list(entries)
        self.pipelines: dict[str, Pipeline] = {}
        for entry in self.entries:
            sink = sinks[entry.name] if sinks is not None else None
            self.pipelines[entry.name] = Pipeline(
                config.for_model(entry),
                models[entry.name],
                metrics,
                _ModelSink(sink) if sink is not None else None,
                wake=wake,
                name=entry.name,
            )
        self.primary = self.pipelines[self.entries[0].name]
        self.overloaded = False
        self._status_sink = status_sink
        prefix, suffix = config.mqtt.topic_in.split("{device}")
        self._prefix, self._suffix = prefix, suffix
        # In a partitioned fleet the broker appends the partition as a last level; the
        # decoder of the device's model judges it (foreign_partition, bad_topic, ...).
        self._partition_level = config.cluster is not None
        self._id_pattern = re.compile(config.stream.device_id_pattern)
        self._routes: dict[str, str] = {}  # device id -> model name, or a routing reason
        self._reject_log = RateLimitedLog(log, config.logging.rejection_log_interval_s)
        metrics.declare_reasons(list(ROUTING_REASONS))

    # ------------------------------------------------------------------ routing

    def route(self, device: str) -> str:
        """The name of the model that scores ``device``, or ``NO_MODEL`` / ``AMBIGUOUS_MODEL``."""
        hit = self._routes.get(device)
        if hit is not None:
            return hit
        names = match_models(device, self.entries)
        hit = names[0] if len(names) == 1 else (NO_MODEL if not names else AMBIGUOUS_MODEL)
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[device] = hit
        return hit

    def _device_of(self, topic: str) -> str | None:
        """The device id in a telemetry topic; None where the decoder must judge the topic."""
        if self._partition_level:
            topic, slash, _partition = topic.rpartition("/")
            if not slash:
                return None
        p, s = self._prefix, self._suffix
        if len(topic) <= len(p) + len(s) or not topic.startswith(p) or not topic.endswith(s):
            return None
        device = topic[len(p) : len(topic) - len(s)]
        if "/" in device or not self._id_pattern.fullmatch(device):
            return None
        return device

    def ingest(self, messages: list[RawMessage]) -> None:
        """Hand each message to its device's model's pipeline (each in arrival order);
        count and log the ones no model, or more than one, takes."""
        by_model: dict[str, list[RawMessage]] = collections.defaultdict(list)
        refused: dict[str, list[tuple[RawMessage, str]]] = collections.defaultdict(list)
        primary = self.entries[0].name
        for msg in messages:
            device = self._device_of(msg.topic)
            name = primary if device is None else self.route(device)
            if name in ROUTING_REASONS:
                assert device is not None
                refused[name].append((msg, device))
            else:
                by_model[name].append(msg)
        for name, batch in by_model.items():
            self.pipelines[name].ingest(batch)
        for reason, rejected in refused.items():
            self._count_refused(reason, rejected)

    # ---- warm-up (anomalyd.warmup): replayed readings, routed as live ones are
    def warm(self, messages: list[RawMessage], horizon_s: float) -> WarmCounts:
        """Hand each replayed message to its device's model's ``Pipeline.warm``; one no
        model (or several) takes is counted as rejected (its live copy was counted and
        logged when it arrived)."""
        by_model: dict[str, list[RawMessage]] = collections.defaultdict(list)
        counts = WarmCounts()
        primary = self.entries[0].name
        for msg in messages:
            device = self._device_of(msg.topic)
            name = primary if device is None else self.route(device)
            if name in ROUTING_REASONS:
                counts.rejected += 1
            else:
                by_model[name].append(msg)
        for name, batch in by_model.items():
            counts += self.pipelines[name].warm(batch, horizon_s)
        return counts

    # ---- end of warm-up

    def _count_refused(self, reason: str, rejected: list[tuple[RawMessage, str]]) -> None:
        m = self.metrics
        m.messages_received.inc(len(rejected))
        m.rejected.labels(reason=reason).inc(len(rejected))
        msg, device = rejected[0]
        matched = match_models(device, self.entries)
        detail = (
            "no [[models]] entry's device globs match it"
            if reason == NO_MODEL
            else f"the device globs of several models match it: {', '.join(matched)}"
        )
        self._reject_log.log(
            logging.WARNING,
            reason,
            "rejected (%s) on %r: device %r: %s",
            reason,
            msg.topic[:200],
            device[:64],
            detail,
            extra={"reason": reason, "topic": msg.topic, "device": device},
        )

    # ------------------------------------------------------------------ the pipeline interface

    @property
    def threshold(self) -> float:
        """The first model's static threshold (each model has its own: ``thresholds``)."""
        return self.primary.threshold

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: p.threshold for name, p in self.pipelines.items()}

    @property
    def windows_scored(self) -> int:
        return sum(p.windows_scored for p in self.pipelines.values())

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.pipelines.values())

    @property
    def in_flight_windows(self) -> int:
        return sum(p.in_flight_windows for p in self.pipelines.values())

    def inference_age(self, now_mono: float) -> float:
        return max(p.inference_age(now_mono) for p in self.pipelines.values())

    def time_until_due(self, now_mono: float) -> float | None:
        dues = [d for p in self.pipelines.values() if (d := p.time_until_due(now_mono)) is not None]
        return min(dues) if dues else None

    def flush(self, force: bool = False, now_mono: float | None = None) -> int:
        return sum(p.flush(force, now_mono) for p in self.pipelines.values())

    def drop_pending(self) -> int:
        return sum(p.drop_pending() for p in self.pipelines.values())

    def close(self) -> None:
        for p in self.pipelines.values():
            p.close()

    def housekeeping(self, now_mono: float, queue_fill: float = 0.0, queue_dropped: int = 0) -> None:
        """Each pipeline's housekeeping, then the daemon-wide gauges (summed) and verdict."""
        for p in self.pipelines.values():
            p.housekeeping(now_mono, queue_fill, queue_dropped, gauges=False)
        pipelines = list(self.pipelines.values())
        m = self.metrics
        m.devices_tracked.set(sum(p.buffers.n_devices for p in pipelines))
        m.pending_windows.set(sum(p.batcher.pending for p in pipelines))
        m.devices_cadence_mismatch.set(sum(p.buffers.n_cadence_mismatched for p in pipelines))
        counts: collections.Counter[str] = collections.Counter()
        oldest = math.inf
        for p in pipelines:
            sweep = p.last_sweep
            if sweep is not None:
                counts.update(sweep.counts)
                if sweep.oldest_alert_since is not None:
                    oldest = min(oldest, sweep.oldest_alert_since)
        m.set_alert_states(dict(counts), None if math.isinf(oldest) else oldest, time.time())
        overloaded = any(p.overloaded for p in pipelines)
        # Every pipeline sets the gauge on its own changes; the daemon-wide value is theirs together.
        m.overloaded.set(1 if overloaded else 0)
        if overloaded != self.overloaded:
            self.overloaded = overloaded
            if self._status_sink is not None:
                self._status_sink.set_overloaded(overloaded)

    def request_reassert(self) -> None:
        for p in self.pipelines.values():
            p.request_reassert()

    def reconcile(self, retained: list[RetainedState]) -> None:
        """Each retained alert state goes to its device's model; a device no model (or
        several) takes goes to the first one, which holds no state for it either."""
        primary = self.entries[0].name
        by_model: dict[str, list[RetainedState]] = collections.defaultdict(list)
        for claim in retained:
            name = self.route(claim.device)
            by_model[primary if name in ROUTING_REASONS else name].append(claim)
        for name, items in by_model.items():
            self.pipelines[name].reconcile(items)

    def apply_command(self, command: Command, now: float | None = None) -> bool:
        """An operator command, applied by the device's model; False if none tracks it."""
        pipeline = self.pipelines.get(self.route(command.device))
        return pipeline is not None and pipeline.apply_command(command, now)

    def forget_all(self, reason: str) -> None:
        for p in self.pipelines.values():
            p.forget_all(reason)

    # ------------------------------------------------------------------ reload

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration (its ``[[models]]`` the running ones: changing them needs
        a restart); each model takes its own view of it, its ``[detector]`` merged anew.
        Every model's new detector is checked before any changes (``Detector.from_config``
        refuses what ``reconfigure`` would), so a refused one changes none."""
        entries = model_entries(config)
        assert entries is not None
        views = {e.name: config.for_model(e) for e in entries}
        for name, view in views.items():
            p = self.pipelines[name]
            if view.detector != p.config.detector:
                Detector.from_config(view.detector, p.model.contract.threshold.value, p.detector.n_scored)
        for name, view in views.items():
            self.pipelines[name].apply_config(view)
        self.config = config

    def swap_model(self, name: str, new: LoadedModel) -> None:
        """Serve ``new`` for model ``name`` (its pending windows go to the old one first)."""
        self.pipelines[name].swap_model(new)
