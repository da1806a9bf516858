"""Offline scoring of one device's recorded readings through the daemon's own stages.

No MQTT and no decoder: the rows go as ``DecodedBatch`` chunks through ``DeviceBuffers``,
``Batcher`` (flushed every chunk), the model and the ``Detector``, configured exactly as
the daemon would be from ``config``. So what a replay reports is what the daemon would
have published for the same readings, which is what evaluations (SKAB, issue 4) and
end-to-end-ish tests need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.batcher import Batcher
from anomalyd.buffers import DeviceBuffers
from anomalyd.config import Config
from anomalyd.decode import DecodedBatch, Rejection
from anomalyd.detector import Detector
from anomalyd.model import LoadedModel

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


def replay(  # noqa: PLR0917 - signature fixed by DAEMON_API.md
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
    stream, det_cfg = config.stream, config.detector
    buffers = DeviceBuffers(1, model.window_length, f, stream.hop, stream.warmup, stream.max_gap_s)
    batcher = Batcher(config.batching.max_batch, 0.0, model.window_length, f)
    detector = Detector.from_config(det_cfg, model.contract.threshold.value)

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
        result = buffers.ingest(chunk)
        rejections.extend(result.rejections)
        if not score_it or len(result.ready) == 0:
            return
        batcher.add(result.ready, 0.0)
        for batch in batcher.pop_due(0.0, force=True):
            s, contrib = model.run(batch.windows)
            decisions = detector.update(batch.devices, batch.end_ts, s, contrib, batch.padded)
            rows = first[np.searchsorted(uniq, batch.end_ts)] - history
            for row, d in zip(rows.tolist(), decisions, strict=True):
                score[row], smoothed[row], anomaly[row] = d.score, d.smoothed, d.anomaly
                alert_at[row], padded[row] = d.alert, d.padded
                row_threshold[row] = d.threshold
                contributions[row] = d.contributions

    chunk_rows = max(1, config.batching.max_batch * stream.hop)
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
        detector.threshold,
        rejections,
        row_threshold,
    )
