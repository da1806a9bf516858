"""Publishing: scores, batched scores, alert changes (retained) and the daemon's status.

Topics and payloads (defaults; ``[output]`` in the configuration):

- ``anomaly/{device}/score``, one per scored window, QoS ``score_qos``::

    {"device": "pump-7", "ts": 1732440000.5, "score": 0.83, "smoothed": 0.83,
     "threshold": 2.41, "anomaly": false, "alert": false, "padded": false,
     "contributions": {"temperature": 0.5, "pressure": 0.2, "vibration": 0.13},
     "model_version": "..."}

- ``anomaly/scores`` (``batched_scores = true``), one per batch: ``{"model_version": ...,
  "scores": [<score object without model_version>, ...]}``.
- ``anomaly/{device}/alert``, retained, QoS ``alert_qos``, on every change of the alert
  state: the score object plus ``"state": "anomalous" | "normal"``.
- ``anomaly/status``, retained, QoS ``status_qos``: ``online`` on every connect,
  ``offline`` (the last will, sent by the broker if we vanish), ``stopped`` on a clean exit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from anomalyd.config import OutputConfig
from anomalyd.detector import Decision
from anomalyd.intake import MqttLink, Will
from anomalyd.logsetup import RateLimitedLog
from anomalyd.metrics import Metrics

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
STOPPED = b"stopped"


def _dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def last_will(output: OutputConfig) -> Will:
    """The retained ``offline`` status the broker publishes if our connection dies."""
    return Will(topic=output.status_topic, payload=OFFLINE, qos=output.status_qos, retain=True)


class Publisher:
    """Formats decisions as JSON and publishes them through an ``MqttLink``.

    Called from the pipeline thread only (``online`` also from the network thread, which
    only touches the link).
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
    ) -> None:
        self._link = link
        self._out = output
        self._metrics = metrics
        self._features = list(feature_names)
        self._model_version = model_version
        self._fail_log = RateLimitedLog(log, log_interval_s)
        # Pre-split templates: str.format per message is slower than a concatenation.
        self._score_parts = output.score_topic.split("{device}")
        self._alert_parts = output.alert_topic.split("{device}")
        self._scores_ok = metrics.published.labels(kind="score")
        self._scores_failed = metrics.publish_failures.labels(kind="score")

    def set_model(self, feature_names: list[str], model_version: str) -> None:
        """Name contributions and stamp payloads for a newly loaded model."""
        self._features = list(feature_names)
        self._model_version = model_version

    # ------------------------------------------------------------------ status

    def online(self) -> None:
        """Publish the retained ``online`` status (after every connect: it replaces a
        last-will ``offline`` left by an earlier connection)."""
        self._send("status", self._out.status_topic, ONLINE, self._out.status_qos, retain=True)

    def stopped(self, timeout: float) -> bool:
        """Publish the retained ``stopped`` status and wait up to ``timeout`` for the broker."""
        ok = self._link.publish_and_wait(
            self._out.status_topic, STOPPED, qos=self._out.status_qos, retain=True, timeout=timeout
        )
        self._count("status", ok)
        if not ok:
            log.warning("could not publish the 'stopped' status (broker unreachable?)")
        return ok

    # ------------------------------------------------------------------ scores

    def _payload(self, d: Decision, with_version: bool) -> dict[str, Any]:
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
            doc["contributions"] = dict(
                zip(self._features, np.asarray(d.contributions, dtype=np.float32), strict=True)
            )
        if with_version:
            doc["model_version"] = self._model_version
        return doc

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        """Publish scores (per window and/or batched) and alert changes for one batch.

        ``arrival_mono`` (one per decision) feeds ``anomalyd_end_to_end_seconds``.
        """
        out = self._out
        if out.publish_scores:
            ok = failed = 0
            pre, post = self._score_parts
            for d in decisions:
                body = _dumps(self._payload(d, with_version=True))
                if self._link.publish(pre + d.device + post, body, qos=out.score_qos):
                    ok += 1
                else:
                    failed += 1
            self._scores_ok.inc(ok)
            if failed:
                self._scores_failed.inc(failed)
                self._warn_failed("score", failed)
        if out.batched_scores and decisions:
            body = _dumps(
                {
                    "model_version": self._model_version,
                    "scores": [self._payload(d, with_version=False) for d in decisions],
                }
            )
            self._send("batch", out.batch_topic, body, out.score_qos, retain=False)
        pre, post = self._alert_parts
        for d in decisions:
            if d.alert_changed:
                doc = self._payload(d, with_version=True)
                doc["state"] = "anomalous" if d.alert else "normal"
                self._send("alert", pre + d.device + post, _dumps(doc), out.alert_qos, retain=True)
        if arrival_mono is not None and len(arrival_mono):
            now = time.monotonic()
            observe = self._metrics.end_to_end_seconds.observe
            for latency in (now - np.asarray(arrival_mono, dtype=np.float64)).tolist():
                observe(max(latency, 0.0))

    def _send(self, kind: str, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        ok = self._link.publish(topic, payload, qos=qos, retain=retain)
        self._count(kind, ok)
        if not ok:
            self._warn_failed(kind, 1)
        return ok

    def _count(self, kind: str, ok: bool) -> None:
        (self._metrics.published if ok else self._metrics.publish_failures).labels(kind=kind).inc()

    def _warn_failed(self, kind: str, n: int) -> None:
        self._fail_log.log(
            logging.WARNING,
            kind,
            "could not publish %d %s message(s): not connected to the broker or out-queue full",
            n,
            kind,
        )
