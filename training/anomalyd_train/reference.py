"""The bar a learned model must clear: a detector without a neural network.

An LSTM earns its place only if it beats something an engineer could write in an
afternoon. The reference here is that something, for the SKAB benchmark (run beside the
model on the same files, same protocol, same scoring):

1. per channel, z-score the readings with the mean and standard deviation of the file's
   training rows (the first ``benchmark.train_rows``, as the model's scaler);
2. smooth each channel's z-score with an exponentially weighted moving average (``alpha``),
   *signed*, so that a lasting shift of the level accumulates while noise averages out;
3. the row's score is the largest absolute smoothed z-score over the channels;
4. the threshold is ``factor`` times the ``quantile`` of the training rows' scores;
5. an alert is raised after ``k_enter`` consecutive rows above it and cleared after
   ``k_exit`` consecutive rows at or below it (the daemon's hysteresis).

The defaults (alpha 0.1, factor 1.75 on the 0.99 quantile, on 1 / off 30) are the
reference the detection targets were set against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ReferenceConfig", "ReferenceResult", "reference_detector"]

#: A channel that did not move during the training rows still gets a finite z-score.
_STD_FLOOR = 1e-6


class ReferenceConfig(BaseModel):
    """``[reference]`` in the benchmark config: the no-network detector's settings."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    enabled: bool = Field(default=True, description="run the reference beside the model")
    alpha: float = Field(default=0.1, gt=0, le=1, description="EWMA weight of the newest z-score")
    quantile: float = Field(default=0.99, gt=0, lt=1, description="quantile of the training rows' scores")
    factor: float = Field(default=1.75, gt=0, description="threshold = factor x that quantile")
    k_enter: int = Field(default=1, ge=1, description="rows above the threshold that raise an alert")
    k_exit: int = Field(default=30, ge=1, description="rows at or below it that clear it")


@dataclass
class ReferenceResult:
    """Per row: the score, the threshold (one per file) and the alert state."""

    score: npt.NDArray[np.float64]
    threshold: float
    alert: npt.NDArray[np.bool_]


def _ewma(z: npt.NDArray[np.float64], alpha: float) -> npt.NDArray[np.float64]:
    out = np.empty_like(z)
    level = np.zeros(z.shape[1])
    for i in range(z.shape[0]):  # a few thousand rows per file: a loop is plenty
        level = alpha * z[i] + (1.0 - alpha) * level
        out[i] = level
    return out


def _hysteresis(above: npt.NDArray[np.bool_], k_enter: int, k_exit: int) -> npt.NDArray[np.bool_]:
    alert = np.zeros(above.shape, bool)
    on = False
    run_above = run_below = 0
    for i, a in enumerate(above.tolist()):
        if a:
            run_above, run_below = run_above + 1, 0
            on = on or run_above >= k_enter
        else:
            run_below, run_above = run_below + 1, 0
            on = on and run_below < k_exit
        alert[i] = on
    return alert


def reference_detector(
    values: npt.NDArray[np.floating], train_rows: int, cfg: ReferenceConfig
) -> ReferenceResult:
    """Run the reference over every row of one file (``values``: rows x channels); the
    first ``train_rows`` rows set the scaling and the threshold."""
    x = np.asarray(values, np.float64)
    if x.ndim != 2 or x.shape[0] <= train_rows or train_rows < 2:
        raise ValueError(f"need more than {train_rows} rows of 2-D values, got shape {x.shape}")
    train = x[:train_rows]
    z = (x - train.mean(axis=0)) / np.maximum(train.std(axis=0), _STD_FLOOR)
    score = np.abs(_ewma(z, cfg.alpha)).max(axis=1)
    threshold = float(cfg.factor * np.quantile(score[:train_rows], cfg.quantile))
    alert = _hysteresis(score > threshold, cfg.k_enter, cfg.k_exit)
    return ReferenceResult(score, threshold, alert)
