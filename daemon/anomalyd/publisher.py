"""Publishing: scores, batched scores, alert changes (retained) and the daemon's status.

The output's cost follows batches, not windows: a batch of windows becomes at most one
score message per device, one batch message and the alert changes, and its metrics are
observed once per batch.

Topics and payloads (defaults; ``[output]`` in the configuration):

- ``anomaly/{device}/score``, QoS ``score_qos``, rate-limited per device: the pipeline
  hands over its decisions batch by batch and calls ``flush_scores`` at the end of each
  pass over the intake queue; then every device whose newest scored window is at least
  ``score_interval_s`` of *data time* after the window its previous message reported gets
  one message (its newest window). So a device at 1 Hz gets about one message a second,
  and a backlog being caught up (many windows per device in one pass) shrinks the output
  instead of multiplying it. Each message reports the newest window and summarises every
  window since the previous message::

    {"device": "pump-7", "ts": 1732440000.5, "score": 0.83, "smoothed": 0.83,
     "threshold": 2.41, "anomaly": false, "alert": false, "padded": false,
     "contributions": {"temperature": 0.5, "pressure": 0.2, "vibration": 0.13},
     "max_score": 1.2, "windows": 20, "anomalous_windows": 0, "model_version": "..."}

  ``score_interval_s = 0`` publishes every window at once (``windows`` is then 1).
- ``anomaly/scores`` (``batched_scores = true``), one message per flush with every score in
  it, column-wise: ``{"model_version": ..., "features": [...], "device": [...], "ts": [...],
  "score": [...], "smoothed": [...], "threshold": [...], "anomaly": [...], "alert": [...],
  "padded": [...], "contributions": [[...], ...]}`` (entry i of each list is window i).
- ``anomaly/{device}/alert``, retained, QoS ``alert_qos``: the device's alert state
  (``anomalyd.alerts``: ``normal``, ``anomalous``, ``unknown``, ``cadence_mismatch``,
  ``shelved``, ``out_of_service``, with since, peak and who acted), at once on every
  change, and again for every device after each (re)connect.
- ``anomaly/status``, retained, QoS ``status_qos``: ``online`` on every connect, ``overloaded``
  while the daemon falls behind (then ``online`` again), ``degraded`` while the broker
  refuses a kind of our messages or the telemetry subscription (``MqttLink.degraded``; it
  wins over ``overloaded``: a daemon whose output is refused is worse than a slow one),
  ``offline`` (the last will, sent by the broker if we vanish), ``stopped`` on a clean
  exit. Republished when the word changes (the service makes ``online`` a health listener
  of the link). A refused status message itself shows only in metrics and logs.
  One instance of a partitioned fleet (``[cluster]``) says it on ``anomaly/status/<name>``
  (``instance_status_topic``): instances never overwrite each other's word, nor their
  last wills; Home Assistant's availability of a device follows its own instance.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from anomalyd.alerts import AlertRecord, alert_payload
from anomalyd.config import OutputConfig
from anomalyd.detector import Decision
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics
from anomalyd.mqtt import MqttLink, Will

if TYPE_CHECKING:
    from anomalyd.homeassistant import HomeAssistantDiscovery

__all__ = [
    "DEGRADED",
    "OFFLINE",
    "ONLINE",
    "OVERLOADED",
    "STOPPED",
    "Publisher",
    "instance_status_topic",
    "last_will",
    "status_output",
]

log = logging.getLogger(__name__)

ONLINE = b"online"
OVERLOADED = b"overloaded"
DEGRADED = b"degraded"
OFFLINE = b"offline"
STOPPED = b"stopped"


def _dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def instance_status_topic(status_topic: str, instance: str | None) -> str:
    """Where this daemon says its status: ``status_topic``, or with the name of its
    ``[cluster]`` instance as one more level (``anomaly/status/0``)."""
    return status_topic if instance is None else f"{status_topic}/{instance}"


def status_output(output: OutputConfig, instance: str | None) -> OutputConfig:
    """``output`` with this daemon's own status topic (``instance_status_topic``): what Home
    Assistant discovery names as every device's availability topic."""
    if instance is None:
        return output
    return output.model_copy(update={"status_topic": instance_status_topic(output.status_topic, instance)})


def last_will(output: OutputConfig, instance: str | None = None) -> Will:
    """The retained ``offline`` status the broker publishes if our connection dies, on the
    status topic of this daemon (``instance``: its ``[cluster]`` instance name)."""
    topic = instance_status_topic(output.status_topic, instance)
    return Will(topic=topic, payload=OFFLINE, qos=output.status_qos, retain=True)


@dataclass(slots=True)
class _Since:
    """What a device's windows did since its previous score message."""

    reported_ts: float = -math.inf  # data time of the window the previous message reported
    max_score: float = -math.inf
    windows: int = 0
    anomalous: int = 0
    newest: Decision | None = None  # the newest window not yet reported


class Publisher:
    """Formats decisions as JSON and publishes them through an ``MqttLink``.

    Called from the pipeline thread only (``online`` also from the network thread, which
    only touches the link). ``instance``: the ``[cluster]`` instance name, whose status
    topic this publisher uses (``instance_status_topic``; None: a lone daemon).
    """

    def __init__(
        self,
        link: MqttLink,
        output: OutputConfig,
        metrics: Metrics,
        *,
        feature_names: list[str],
        model_version: str,
        log_interval_s: float = 10.0,
        instance: str | None = None,
    ) -> None:
        self._link = link
        self._out = output
        self._instance = instance
        self._status_topic = instance_status_topic(output.status_topic, instance)
        self._metrics = metrics
        self._features = list(feature_names)
        self._model_version = model_version
        self._fail_log = RateLimitedLog(log, log_interval_s)
        self._overloaded = False
        # Pre-split templates: str.format per message is slower than a concatenation.
        self._score_parts = output.score_topic.split("{device}")
        self._alert_parts = output.alert_topic.split("{device}")
        self._since: dict[str, _Since] = {}
        self._touched: set[str] = set()  # devices with windows since the last flush_scores
        #: Home Assistant discovery (``anomalyd.homeassistant.attach_discovery``): it sees
        #: every published state, the model and the output settings.
        self.discovery: HomeAssistantDiscovery | None = None

    def set_model(self, feature_names: list[str], model_version: str) -> None:
        """Name contributions and stamp payloads for a newly loaded model."""
        self._features = list(feature_names)
        self._model_version = model_version
        if self.discovery is not None:
            self.discovery.set_model(model_version)

    def set_output(self, output: OutputConfig) -> None:
        """Take reloaded ``[output]`` settings (pipeline thread). Its status topic and QoS and
        its alert topic must be the running ones: the last will and the alert subscription
        carry them, and only a restart changes those (``anomalyd.reload``)."""
        self._out = output
        self._score_parts = output.score_topic.split("{device}")
        self._alert_parts = output.alert_topic.split("{device}")
        if self.discovery is not None:
            self.discovery.set_output(status_output(output, self._instance))

    def forget(self, devices: list[str]) -> None:
        """Drop the rate-limiting state of devices the pipeline no longer tracks."""
        since = self._since
        for device in devices:
            since.pop(device, None)
            self._touched.discard(device)

    # ------------------------------------------------------------------ status

    def online(self) -> None:
        """Publish the retained status word (after every connect: it replaces a last-will
        ``offline`` left by an earlier connection; and whenever the link's health changes):
        ``degraded``, ``overloaded`` or ``online``."""
        # The pipeline thread (overload) and the network thread (health) both call this,
        # without a lock between choosing the word and publishing it: the word is checked
        # again after publishing, so the last one the broker retains is the current one.
        for _ in range(3):
            word = self._status()
            self._send("status", self._status_topic, word, self._out.status_qos, retain=True)
            if self._status() == word:
                return

    def _status(self) -> bytes:
        if self._link.degraded:
            return DEGRADED
        return OVERLOADED if self._overloaded else ONLINE

    def set_overloaded(self, overloaded: bool) -> None:
        """Say in the retained status whether the daemon is falling behind (published only
        if the word changes: ``degraded`` hides ``overloaded``)."""
        if overloaded == self._overloaded:
            return
        before = self._status()
        self._overloaded = overloaded
        if self._status() != before:
            self.online()

    def stopped(self, timeout: float) -> bool:
        """Publish the retained ``stopped`` status and wait up to ``timeout`` for the broker
        to acknowledge it. False if it did not, or refused it."""
        ok = self._link.publish_and_wait(
            self._status_topic,
            STOPPED,
            qos=self._out.status_qos,
            retain=True,
            timeout=timeout,
            kind="status",
        )
        if not ok:
            log.warning("could not publish the 'stopped' status (broker unreachable, or it refused it)")
        return ok

    # ------------------------------------------------------------------ scores

    def _payload(self, d: Decision) -> dict[str, Any]:
        # Scores are float32 from the model: serialised as float32 (shortest repr, via
        # OPT_SERIALIZE_NUMPY), 0.01 rather than 0.010000000707805157.
        doc: dict[str, Any] = {
            "device": d.device,
            "ts": float(d.ts),
            "score": np.float32(d.score),
            "smoothed": np.float32(d.smoothed),
            "threshold": float(d.threshold),
            "anomaly": bool(d.anomaly),
            "alert": bool(d.alert),
            "padded": bool(d.padded),
        }
        if self._out.include_contributions:
            # The model's float32 row: its numpy scalars serialise as float32 too.
            doc["contributions"] = dict(zip(self._features, d.contributions, strict=True))
        return doc

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        """Take one scored batch: the batch message goes out now, scores are
        folded into their devices' summaries for ``flush_scores`` (at once with
        ``score_interval_s = 0``).

        ``arrival_mono`` (one per decision) feeds ``anomalyd_end_to_end_seconds``.
        """
        out = self._out
        if not decisions:
            return
        if out.publish_scores:
            self._publish_scores(decisions)
        if out.batched_scores:
            self._publish_batch(decisions)
        if arrival_mono is not None and len(arrival_mono):
            latency = time.monotonic() - np.asarray(arrival_mono, dtype=np.float64)
            self._metrics.end_to_end_seconds.observe_many(np.maximum(latency, 0.0))

    def publish_states(self, records: list[AlertRecord]) -> None:
        """Publish devices' alert states, retained (``anomalyd.alerts``); discovery, if
        attached, announces or removes the devices they concern."""
        pre, post = self._alert_parts
        qos = self._out.alert_qos
        features, version = self._features, self._model_version
        for record in records:
            doc = alert_payload(record, features, version)
            self._send("alert", pre + record.device + post, _dumps(doc), qos, retain=True)
        if self.discovery is not None:
            self.discovery.observe(records)

    def _publish_scores(self, decisions: list[Decision]) -> None:
        if self._out.score_interval_s <= 0:
            self._send_scores([(d, _Since(d.ts, d.score, 1, int(d.anomaly))) for d in decisions])
            return
        # Fold every window into its device's summary; the messages go in flush_scores.
        since = self._since
        touched = self._touched
        for d in decisions:
            s = since.get(d.device)
            if s is None:
                s = since[d.device] = _Since()
            s.windows += 1
            if d.anomaly:
                s.anomalous += 1
            # max(x, nan) is x: a broken (NaN) score is never the maximum.
            s.max_score = max(s.max_score, d.score)
            s.newest = d
            touched.add(d.device)

    def flush_scores(self) -> None:
        """End of a pipeline pass: one message for every device whose newest window is due."""
        touched = self._touched
        if not touched:
            return
        interval = self._out.score_interval_s
        since = self._since
        due: list[tuple[Decision, _Since]] = []
        for device in touched:
            s = since[device]
            d = s.newest
            if d is not None and d.ts - s.reported_ts >= interval:
                due.append((d, s))
        touched.clear()
        self._send_scores(due)
        for d, s in due:
            s.reported_ts = d.ts
            s.max_score = -math.inf
            s.windows = s.anomalous = 0
            s.newest = None

    def _send_scores(self, messages: list[tuple[Decision, _Since]]) -> None:
        if not messages:
            return
        pre, post = self._score_parts
        qos = self._out.score_qos
        version = self._model_version
        built: list[tuple[str, bytes]] = []
        for d, s in messages:
            doc = self._payload(d)
            doc["max_score"] = np.float32(s.max_score) if math.isfinite(s.max_score) else None
            doc["windows"] = s.windows
            doc["anomalous_windows"] = s.anomalous
            doc["model_version"] = version
            built.append((pre + d.device + post, _dumps(doc)))
        link = self._link
        failed = 0
        if qos == 0:
            if link.canary_due("score"):
                # QoS 0 is never acknowledged, so a broker that drops our scores (its ACL)
                # would go unnoticed: now and then one goes at QoS 1, and its PUBACK says
                # whether the broker takes them (the link counts the rest accordingly). The
                # first goes first, so that a device's windows stay in order.
                topic, body = built[0]
                built = built[1:]
                if not link.publish(topic, body, qos=1, kind="score"):
                    failed += 1
            # One write for the rest of the pass (see MqttLink.publish_many).
            if not link.publish_many(built, kind="score"):
                failed += len(built)
        else:
            failed = sum(1 for topic, body in built if not link.publish(topic, body, qos=qos, kind="score"))
        self._log_failed("score", failed)

    def _publish_batch(self, decisions: list[Decision]) -> None:
        doc: dict[str, Any] = {
            "model_version": self._model_version,
            "features": self._features,
            "device": [d.device for d in decisions],
            "ts": [d.ts for d in decisions],
            "score": np.asarray([d.score for d in decisions], np.float32),
            "smoothed": np.asarray([d.smoothed for d in decisions], np.float32),
            "threshold": [d.threshold for d in decisions],
            "anomaly": [d.anomaly for d in decisions],
            "alert": [d.alert for d in decisions],
            "padded": [d.padded for d in decisions],
        }
        if self._out.include_contributions:
            doc["contributions"] = np.stack([np.asarray(d.contributions, np.float32) for d in decisions])
        self._send("batch", self._out.batch_topic, _dumps(doc), self._out.score_qos, retain=False)

    def _send(self, kind: str, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        # A QoS 0 kind gets its canary here, as the scores do in _send_scores.
        if qos == 0 and self._link.canary_due(kind):
            qos = 1
        ok = self._link.publish(topic, payload, qos=qos, retain=retain, kind=kind)
        if not ok:
            self._log_failed(kind, 1)
        return ok

    def _log_failed(self, kind: str, failed: int) -> None:
        """Log messages the link would not take (it counts them; what the broker refuses
        later, the link counts and logs when the acknowledgement arrives)."""
        if failed:
            self._fail_log.log(
                logging.WARNING,
                kind,
                "could not publish %d %s message(s): not connected to the broker or out-queue full",
                failed,
                kind,
            )
