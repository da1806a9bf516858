"""Offline scoring of one device's recorded readings through the daemon's own pipeline.

No MQTT and no decoder: the rows go as ``DecodedBatch`` chunks into a ``Pipeline`` (its
buffers, batcher — flushed every chunk —, model and detector), configured exactly as the
daemon would be from ``config``, with a collector in place of the MQTT publisher. So what
a replay reports is what the daemon would have decided for the same readings, which is
what evaluations (the SKAB benchmark) and end-to-end-ish tests need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from anomalyd.alerts import AlertRecord
from anomalyd.config import Config
from anomalyd.decode import DecodedBatch, Rejection
from anomalyd.detector import Decision
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel
from anomalyd.pipeline import Pipeline

__all__ = ["ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """One entry per input row after ``history``.

    Rows that ended no window (warm-up, between hops, rejected) have ``score`` and
    ``smoothed`` NaN and ``anomaly`` False; ``alert`` is the device's alert state after
    the row, so it carries over such rows.
    """

    ts: npt.NDArray[np.float64]  # (n,)
    score: npt.NDArray[np.float64]  # (n,)
    smoothed: npt.NDArray[np.float64]  # (n,)
    anomaly: npt.NDArray[np.bool_]  # (n,) window level: smoothed > threshold
    alert: npt.NDArray[np.bool_]  # (n,) device level, after hysteresis
    padded: npt.NDArray[np.bool_]  # (n,)
    contributions: npt.NDArray[np.float32]  # (n, F), NaN where no window
    threshold: float  # the static threshold (configured or contract, times threshold_scale)
    rejections: list[Rejection]  # rows the buffers refused (out of order, duplicate, ...)
    row_threshold: npt.NDArray[np.float64]  # (n,) the device's threshold for the row's window; NaN where none

    def __len__(self) -> int:
        return int(self.ts.shape[0])


class _Collector:
    """The replay's decision sink: keeps every decision, in order."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.decisions.extend(decisions)

    def flush_scores(self) -> None:
        pass  # every decision is kept as it comes: nothing is held back

    def forget(self, devices: list[str]) -> None:
        pass  # one device, never evicted: nothing to forget

    def set_overloaded(self, overloaded: bool) -> None:
        pass  # replayed data is old by design: its lag in data time means nothing here

    def publish_states(self, records: list[AlertRecord]) -> None:
        pass  # a replay reports windows, not alert messages


def replay(  # noqa: PLR0917 - positional signature kept for existing callers
    model: LoadedModel,
    config: Config,
    device: str,
    ts: npt.NDArray[np.float64],
    values: npt.NDArray[np.float32],
    history: int = 0,
) -> ReplayResult:
    """Score ``values`` (n, F; raw units, the model's feature order) stamped ``ts`` (n,).

    The first ``history`` rows only fill the device's window (they are not scored and
    not returned). ``ts`` should increase; rows that do not are rejected as the daemon
    would reject them.
    """
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values, np.float32)
    n = ts.shape[0]
    f = model.n_features
    if ts.ndim != 1 or values.shape != (n, f):
        raise ValueError(f"expected ts (n,) and values (n, {f}), got {ts.shape} and {values.shape}")
    if not 0 <= history <= n:
        raise ValueError(f"history must be between 0 and {n} rows, got {history}")
    # One device, and every chunk scored at once (no batching delay in recorded time).
    config = config.model_copy(
        update={
            "stream": config.stream.model_copy(update={"max_devices": 1}),
            "batching": config.batching.model_copy(update={"max_delay_ms": 0.0}),
            # Each chunk is scored and decided before the next: no inference threads.
            "model": config.model.model_copy(update={"concurrent_batches": 1}),
        }
    )
    collector = _Collector()
    pipeline = Pipeline(config, model, Metrics(CollectorRegistry()), collector)

    out_n = n - history
    score = np.full(out_n, np.nan)
    smoothed = np.full(out_n, np.nan)
    anomaly = np.zeros(out_n, np.bool_)
    alert_at = np.full(out_n, -1, np.int8)  # -1: no window ended at this row
    padded = np.zeros(out_n, np.bool_)
    contributions = np.full((out_n, f), np.nan, np.float32)
    row_threshold = np.full(out_n, np.nan)
    rejections: list[Rejection] = []
    # A window's end_ts identifies its row: accepted timestamps strictly increase, and an
    # accepted row is always the first occurrence of its timestamp.
    uniq, first = np.unique(ts, return_index=True)

    def feed(lo: int, hi: int, score_it: bool) -> None:
        chunk = DecodedBatch([device] * (hi - lo), ts[lo:hi], values[lo:hi], ts[lo:hi], [])
        if not score_it:
            # History only fills the window: its windows are taken out unscored.
            result = pipeline.buffers.ingest(chunk)
            rejections.extend(result.rejections)
            return
        result = pipeline.ingest_readings(chunk, now_mono=0.0)
        rejections.extend(result.rejections)
        pipeline.flush(force=True, now_mono=0.0)
        decisions = collector.decisions
        if not decisions:
            return
        end_ts = np.fromiter((d.ts for d in decisions), np.float64, len(decisions))
        rows = first[np.searchsorted(uniq, end_ts)] - history
        for row, d in zip(rows.tolist(), decisions, strict=True):
            score[row], smoothed[row], anomaly[row] = d.score, d.smoothed, d.anomaly
            alert_at[row], padded[row] = d.alert, d.padded
            row_threshold[row] = d.threshold
            contributions[row] = d.contributions
        decisions.clear()

    chunk_rows = max(1, config.batching.max_batch * config.stream.hop)
    for lo in range(0, history, chunk_rows):
        feed(lo, min(lo + chunk_rows, history), score_it=False)
    for lo in range(history, n, chunk_rows):
        feed(lo, min(lo + chunk_rows, n), score_it=True)

    # Carry the alert state over rows that ended no window: index of the last row that did.
    last = np.maximum.accumulate(np.where(alert_at >= 0, np.arange(out_n), -1)) if out_n else alert_at
    alert = (last >= 0) & (alert_at[np.maximum(last, 0)] == 1)
    return ReplayResult(
        ts[history:].copy(),
        score,
        smoothed,
        anomaly,
        alert,
        padded,
        contributions,
        pipeline.threshold,
        rejections,
        row_threshold,
    )
