"""The warm-up's side of ``anomalyd.pipeline.Pipeline`` (``anomalyd.warmup`` reads the
readings back from JetStream): the replayed readings go into the windows unscored, and for
a while afterwards live readings the replay already wrote are dropped (the horizon).

Separate from the flow (``anomalyd.pipeline``, whose ``ingest`` asks ``_skip_replayed``
while a horizon is open) because replayed readings take another path through the stages:
decoded and buffered, never batched, scored or counted as live.
"""

from __future__ import annotations

import math
import time

import numpy as np

from anomalyd.decode import DecodedBatch, RawMessage, Reason
from anomalyd.pipeline_state import PipelineState, log
from anomalyd.warmup import WarmCounts


class WarmupReplayMixin(PipelineState):
    """``Pipeline``'s warm-up: ``warm`` fills the windows, ``_skip_replayed`` the overlap."""

    def warm(self, messages: list[RawMessage], horizon_s: float, now_mono: float | None = None) -> WarmCounts:
        """Write readings replayed from JetStream (``anomalyd.warmup``) into the windows,
        never scoring them: the instance that owned their devices when they arrived scored
        them, and no reading is scored twice. Windows that become ready are dropped
        (no batch, no score, no detector update).

        Decoded as live messages are, with the same rejections (logged the same way, but
        counted in the returned ``rejected``, not as live rejections: the previous owner
        counted them when they arrived). A reading the window already holds (a snapshot,
        or live readings, had it: the buffers call it a duplicate or out of order) is
        ``already_held``. Afterwards, for ``horizon_s`` seconds at most, a live reading of a
        replayed device stamped at or before its newest replayed one is dropped and counted
        (``anomalyd_warmup_overlap_readings_total``): it was queued while the replay ran and
        is already in the window. A device leaves that horizon at its first newer live
        reading, so the check ends as soon as every replayed device has moved on.
        """
        now = time.monotonic() if now_mono is None else now_mono
        try:
            batch = self.decoder.decode(messages)
        except Exception:
            self.metrics.pipeline_errors.labels(stage="decode").inc()
            log.exception("decoder failed on %d replayed messages (dropped)", len(messages))
            return WarmCounts(rejected=len(messages))
        rejected = list(batch.rejections)
        counts = WarmCounts(devices=len(set(batch.devices)))
        if len(batch.devices):
            result = self.buffers.ingest(batch)
            counts.filled = result.accepted
            for r in result.rejections:
                if r.reason in (Reason.DUPLICATE, Reason.OUT_OF_ORDER):
                    counts.already_held += 1
                else:
                    rejected.append(r)
            # The windows that became ready (result.ready) are dropped: never scored.
            if result.evicted:
                self._forget(result.evicted, "evicted")
                self.metrics.devices_evicted.labels(cause="capacity").inc(len(result.evicted))
            if result.cadence_changes:
                self._cadence_changed(result)
            if result.resets:
                self.metrics.buffer_resets.inc(result.resets)
            horizon = self._horizon
            for device, ts in zip(batch.devices, batch.ts.tolist(), strict=True):
                if ts > horizon.get(device, -math.inf):
                    horizon[device] = ts
            self._horizon_until = now + horizon_s
        counts.rejected = len(rejected)
        self._count_rejections(rejected, count=False)
        return counts

    def _skip_replayed(self, batch: DecodedBatch) -> DecodedBatch:
        """``batch`` without the live readings the warm-up already put in a window."""
        horizon = self._horizon
        if time.monotonic() >= self._horizon_until:
            horizon.clear()
            return batch
        keep = np.ones(len(batch.devices), np.bool_)
        for i, (device, ts) in enumerate(zip(batch.devices, batch.ts.tolist(), strict=True)):
            newest = horizon.get(device)
            if newest is None:
                continue
            if ts <= newest:
                keep[i] = False
            else:
                del horizon[device]  # past the replay: its later readings are all live
        if keep.all():
            return batch
        self.metrics.warmup_overlap.inc(int(np.count_nonzero(~keep)))
        index = np.flatnonzero(keep).tolist()
        topics = batch.topics
        return DecodedBatch(
            [batch.devices[i] for i in index],
            batch.ts[keep],
            batch.values[keep],
            batch.arrival_mono[keep],
            batch.rejections,
            [topics[i] for i in index] if len(topics) == len(batch.devices) else [],
        )
