"""The pipeline thread of ``anomalyd.service.Service``: its loop, the drain at a stop,
and the side inputs it takes between two passes (re-asserting alert states after a
connect, the broker's retained alert states, operator commands), and the warm-up from
JetStream after each connect (``anomalyd.warmup``), which goes before any live reading.

Separate from the lifecycle (``anomalyd.service``) because it is what runs on another
thread: everything here runs on the pipeline thread, except ``_on_connected`` (the
network thread), which only sets an event and wakes the loop.
"""

from __future__ import annotations

import time
from typing import cast

from anomalyd.decode import RawMessage
from anomalyd.pipeline import Pipeline
from anomalyd.routing import ModelRouter
from anomalyd.service_state import ServiceState, Stages, log
from anomalyd.warmup import WarmUp

#: Messages taken from the intake queue per pass (keeps batches flowing under a flood),
#: and the payload bytes that end a pass early. A pass is decoded and buffered before its
#: windows are scored, and its score messages go out at its end, so a pass of large array
#: messages is kept short: the inference threads get work sooner, scores go out sooner, the
#: loop comes back to the watchdog and housekeeping, and the copies stay in the CPU caches.
_DRAIN_MAX = 4096
_DRAIN_MAX_BYTES = 256 * 1024
#: How often the pipeline evicts idle devices and refreshes gauges.
_HOUSEKEEPING_S = 1.0


class PipelineThreadMixin(ServiceState):
    """``Service``'s pipeline thread (``_run_pipeline_loop``) and its side inputs."""

    #: The warm-up from JetStream on every (re)connect (None: no ``[cluster.jetstream]``).
    _warmup: WarmUp | None
    #: Live messages taken just as a warm-up was asked for: they go in after its replay.
    _held_live: list[RawMessage]

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
                messages = self._take_live(pipeline, timeout)
                if messages:
                    pipeline.ingest(messages)
                pipeline.flush()
                if self._warmup is None or not self._warmup.busy:
                    # After the warm-up: a command or a retained state then meets the windows
                    # the replay filled, as it would have at the previous owner.
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

    def _take_live(self, pipeline: Stages, timeout: float) -> list[RawMessage]:
        """The next live messages from the intake queue, waiting up to ``timeout`` for some.

        Nothing while a warm-up (``anomalyd.warmup``) is due or running: live messages wait in
        the intake queue until the replay is in the windows (this thread applies it, in
        ``WarmUp.step``). A connect asks for its warm-up in a connect listener, which runs
        before the new connection's first message can be queued; so messages taken here
        before the request was seen are all older than it, and a request seen only after
        the drain holds them back (``_held_live``) until its replay is done.
        """
        warmup = self._warmup
        if warmup is not None and warmup.busy:
            if warmup.step(pipeline):  # still busy
                warmup.wait(timeout)
                return []
            # The replay is in. What waited with the live readings goes before them: the
            # retained alert states (a device's alert is adopted before its first live
            # window is scored), commands, the re-assertion after the connect.
            self._handle_side_inputs(pipeline)
        held = self._held_live
        if held:
            self._held_live = []
            return held
        if timeout > 0:
            self._queue.wait(timeout)
        messages = self._queue.drain(_DRAIN_MAX, _DRAIN_MAX_BYTES)
        if messages and warmup is not None and warmup.busy:
            self._held_live = messages
            return []
        return messages

    def _drain_all(self, pipeline: Stages) -> None:
        """Shutdown: ingest what is queued, score everything pending, publish. A warm-up
        still running is abandoned (the live messages it held back go first)."""
        scored_before = pipeline.windows_scored
        held, self._held_live = self._held_live, []
        if held:
            pipeline.ingest(held)
        while not self._abort.is_set():
            self.heartbeat = time.monotonic()
            messages = self._queue.drain(_DRAIN_MAX, _DRAIN_MAX_BYTES)
            if not messages:
                break
            pipeline.ingest(messages)
        if not self._abort.is_set():
            pipeline.flush(force=True)
        log.info("drained: %d windows scored during shutdown", pipeline.windows_scored - scored_before)

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
