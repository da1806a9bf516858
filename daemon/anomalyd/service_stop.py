"""The end of a stop of ``anomalyd.service.Service``, once the pipeline thread was told to
drain: waiting for it (and giving up on a stuck one), the last snapshot, and accounting
for what the stop could not score.

Separate from the lifecycle (``anomalyd.service``, whose ``shutdown`` runs the stop in
order) because these are the stop's fault paths: the drain deadline, a second signal, a
pipeline thread stuck in ONNX Runtime.
"""

from __future__ import annotations

import time

from anomalyd.routing import ModelRouter
from anomalyd.service_pipeline import _DRAIN_MAX
from anomalyd.service_state import ServiceState, log

#: How long a stop waits for the pipeline thread once told to drop what is left (the drain
#: deadline passed, or a second signal): it ends within a pass unless it is stuck.
_ABORT_GRACE_S = 2.0
#: How often a stop that waits for the drain looks for a second signal.
_STOP_POLL_S = 0.1


class StopMixin(ServiceState):
    """``Service``'s stop past the drain request: wait, abandon, snapshot, count drops."""

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

    def _final_state(self) -> None:
        """After the drain: snapshot, or say every alert state is unknown from now on.

        An instance of a partitioned fleet (``[cluster]``) says nothing instead: its devices'
        next owner (this instance restarted, or another after a rebalance) adopts the states
        the broker retains (``Pipeline.reconcile``), so an alert neither disappears in the
        hand-over nor is raised again; ``unknown``/``stopped`` would end it."""
        pipeline = self.pipeline
        if pipeline is None or self._pipeline_failed:
            return
        hand_over = self.config.cluster is not None
        if isinstance(pipeline, ModelRouter):
            # Each model's own snapshot: a model whose write failed forgets its states alone.
            for name, member in pipeline.pipelines.items():
                if not self.snapshots.save_final(member, name) and not hand_over:
                    member.forget_all("stopped")  # nothing will resume these states
        elif not self.snapshots.save_final(pipeline) and not hand_over:
            pipeline.forget_all("stopped")  # nothing will resume these states
        if hand_over:
            log.info("alert states left as the broker retains them, for the devices' next owner")
