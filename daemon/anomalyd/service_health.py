"""The liveness and readiness checks of ``anomalyd.service.Service``: what ``/healthz``
and ``/readyz`` answer (``anomalyd.metrics.MetricsServer`` calls them), and whether the
daemon makes progress, which decides the systemd watchdog ping.

Separate from the lifecycle (``anomalyd.service``) because they only read its state, from
other threads (the HTTP server's, the main thread's), and change nothing.
"""

from __future__ import annotations

import time

from anomalyd.config import model_entries
from anomalyd.service_state import ServiceState


class HealthMixin(ServiceState):
    """``Service``'s health checks (HTTP ``/healthz``, ``/readyz``) and watchdog condition."""

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

    def _progressing(self, max_age_s: float) -> bool:
        """The pipeline loop turned recently and the network thread lives."""
        pipeline_ok = self._pipeline is not None and self._pipeline.is_alive()
        link_ok = self._link is not None and self._link.alive
        now = time.monotonic()
        # A batch stuck in ONNX Runtime on an inference thread stalls scoring even though
        # the pipeline thread itself still turns.
        inference_ok = self.pipeline is None or self.pipeline.inference_age(now) < max_age_s
        return pipeline_ok and link_ok and inference_ok and now - self.heartbeat < max_age_s
