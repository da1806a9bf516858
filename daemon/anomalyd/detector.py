"""Per-device decisions: optional smoothing, threshold, and an alert state machine.

For each scored window of a device:

1. ``smoothed`` is the score itself (``smoothing = "none"``) or an exponentially
   weighted moving average (``"ewma"``: ``s = alpha * score + (1 - alpha) * s_prev``,
   started at the first score);
2. ``anomaly = smoothed > threshold`` (window level);
3. the alert (device level) is raised after ``k_enter`` consecutive anomalous windows
   and cleared after ``k_exit`` consecutive normal ones (hysteresis, so a score hovering
   at the threshold does not flap); ``alert_changed`` is true exactly on those windows.

Padded (warm-up) windows take part like any other: ``warmup = "pad"`` exists to score
early. A non-finite score (NaN, inf) means a broken model or input, not a verdict on the
machine: that window is reported with ``anomaly = False``, it leaves the smoothing state
and both counters untouched, so it can neither raise nor clear an alert, and it is
counted in ``non_finite`` for the service to export and log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Decision", "Detector"]


@dataclass
class Decision:
    """The verdict on one window."""

    device: str
    ts: float
    score: float
    smoothed: float
    threshold: float
    anomaly: bool  # smoothed > threshold (this window)
    alert: bool  # the device's alert state after this window
    alert_changed: bool  # this window raised or cleared the alert
    contributions: npt.NDArray[np.float32]  # (F,) per-feature share of the score
    padded: bool


@dataclass
class _DeviceState:
    smoothed: float = math.nan
    above: int = 0  # consecutive anomalous windows
    below: int = 0  # consecutive normal windows
    alert: bool = False


class Detector:
    """Turns scores into decisions. Owned by the pipeline thread."""

    def __init__(
        self, threshold: float, smoothing: str, ewma_alpha: float, k_enter: int, k_exit: int
    ) -> None:
        if smoothing not in ("none", "ewma"):
            raise ValueError(f"smoothing must be 'none' or 'ewma', got {smoothing!r}")
        if not 0 < ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        if k_enter < 1 or k_exit < 1:
            raise ValueError(f"k_enter and k_exit must be >= 1, got {k_enter}, {k_exit}")
        self.set_threshold(threshold)
        self.smoothing = smoothing
        self.ewma_alpha = ewma_alpha
        self.k_enter = k_enter
        self.k_exit = k_exit
        self.non_finite = 0  # windows whose score was NaN or infinite, since start
        self._states: dict[str, _DeviceState] = {}

    def set_threshold(self, threshold: float) -> None:
        """Use a new threshold from the next window on (model reload); states are kept."""
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.threshold = float(threshold)

    @property
    def n_devices(self) -> int:
        return len(self._states)

    @property
    def active_alerts(self) -> int:
        """Devices currently in alert."""
        return sum(1 for s in self._states.values() if s.alert)

    def alert_state(self, device: str) -> bool:
        """Whether ``device`` is in alert (False for a device never seen or forgotten)."""
        state = self._states.get(device)
        return state is not None and state.alert

    def forget(self, devices: list[str]) -> None:
        """Drop the state of evicted devices (their next window starts afresh)."""
        for device in devices:
            self._states.pop(device, None)

    def update(
        self,
        devices: list[str],
        ts: npt.NDArray[np.float64],
        scores: npt.NDArray[np.float32],
        contributions: npt.NDArray[np.float32],
        padded: npt.NDArray[np.bool_],
    ) -> list[Decision]:
        """Decide on a batch of windows, in order (a device's windows must come oldest first)."""
        threshold = self.threshold
        ewma = self.smoothing == "ewma"
        alpha = self.ewma_alpha
        states = self._states
        out: list[Decision] = []
        # Python floats in the loop: numpy scalar arithmetic costs several times more.
        for i, (device, t, score, pad) in enumerate(
            zip(devices, ts.tolist(), scores.tolist(), padded.tolist(), strict=True)
        ):
            state = states.get(device)
            if state is None:
                state = states[device] = _DeviceState()
            if not math.isfinite(score):
                self.non_finite += 1
                out.append(
                    Decision(
                        device,
                        t,
                        score,
                        math.nan,
                        threshold,
                        False,
                        state.alert,
                        False,
                        contributions[i],
                        pad,
                    )
                )
                continue
            if ewma and not math.isnan(state.smoothed):
                smoothed = alpha * score + (1.0 - alpha) * state.smoothed
            else:
                smoothed = score
            state.smoothed = smoothed
            anomaly = smoothed > threshold
            changed = False
            if anomaly:
                state.above += 1
                state.below = 0
                if not state.alert and state.above >= self.k_enter:
                    state.alert = changed = True
            else:
                state.below += 1
                state.above = 0
                if state.alert and state.below >= self.k_exit:
                    state.alert = False
                    changed = True
            out.append(
                Decision(
                    device,
                    t,
                    score,
                    smoothed,
                    threshold,
                    anomaly,
                    state.alert,
                    changed,
                    contributions[i],
                    pad,
                )
            )
        return out
