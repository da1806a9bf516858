"""Per-device decisions: optional smoothing, a threshold (static or adaptive), and an alert
state machine.

For each scored window of a device:

1. ``smoothed`` is the score itself (``smoothing = "none"``) or an exponentially
   weighted moving average (``"ewma"``: ``s = alpha * score + (1 - alpha) * s_prev``,
   started at the first score);
2. the device's threshold is the *static* threshold ``threshold * threshold_scale`` (the
   configured or the model's calibrated threshold, times a factor), raised by the
   *adaptive* threshold when that is on and warmed up (below);
3. ``anomaly = smoothed > threshold`` (window level);
4. the alert (device level) is raised after ``k_enter`` consecutive anomalous windows
   and cleared after ``k_exit`` consecutive normal ones (hysteresis, so a score hovering
   at the threshold does not flap); ``alert_changed`` is true exactly on those windows.

**Adaptive threshold** (``adaptive=True``). A model's calibrated threshold describes the
held-out data it was calibrated on; a real machine's normal scores drift away from that
(a new operating point, sensor ageing, a model trained on little data). So each device
learns the distribution of its own recent *normal* smoothed scores, on a log scale where
scores (sums of squared standardised residuals) are close to Gaussian: an exponentially
weighted mean ``m`` and variance ``v`` of ``log(smoothed)`` with a time constant of
``adaptive_windows`` windows (a plain running mean and variance until that many windows
were seen, so the first estimates are not biased towards the first window). Once
``adaptive_min_windows`` windows were learnt, the device's threshold is::

    max(static threshold, exp(m + adaptive_k * sqrt(v)))

so it never falls below the static threshold and rises where the device's normal scores
sit higher. Only windows that say "normal" are learnt: finite, not padded, not anomalous
under the threshold in force, and the device not in alert. An anomaly therefore cannot
teach the detector that it is normal, however long it lasts; the price is that a lasting
*upward* change of the normal level raises an alert that only clears when scores fall back
below the frozen threshold (an operator can raise ``threshold_scale`` live).
``set_threshold`` (a model reload: new scores, new distribution) restarts the learning.

Padded (warm-up) windows take part like any other: ``warmup = "pad"`` exists to score
early. A non-finite score (NaN, inf) means a broken model or input, not a verdict on the
machine: that window is reported with ``anomaly = False``, it leaves the smoothing state,
the adaptive statistics and both counters untouched, so it can neither raise nor clear an
alert, and it is counted in ``non_finite`` for the service to export and log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from anomalyd.config import DetectorConfig

__all__ = ["Decision", "Detector"]

#: Scores are >= 0; their log is taken at this floor so that a perfect 0 stays finite.
_LOG_FLOOR = 1e-12


@dataclass(slots=True)
class Decision:
    """The verdict on one window."""

    device: str
    ts: float
    score: float
    smoothed: float
    threshold: float  # the device's threshold for this window (static, or adaptive if higher)
    anomaly: bool  # smoothed > threshold (this window)
    alert: bool  # the device's alert state after this window
    alert_changed: bool  # this window raised or cleared the alert
    contributions: npt.NDArray[np.float32]  # (F,) per-feature share of the score
    padded: bool


@dataclass(slots=True)
class _DeviceState:
    smoothed: float = math.nan
    above: int = 0  # consecutive anomalous windows
    below: int = 0  # consecutive normal windows
    alert: bool = False
    # adaptive threshold: windows learnt, mean and variance of log(smoothed)
    learnt: int = 0
    log_mean: float = 0.0
    log_var: float = 0.0
    adaptive: float = math.nan  # the device's threshold once warmed up; NaN before


class Detector:
    """Turns scores into decisions. Owned by the pipeline thread."""

    def __init__(  # the first five are positional: existing callers pass them so
        self,
        threshold: float,
        smoothing: str,
        ewma_alpha: float,
        k_enter: int,
        k_exit: int,
        *,
        threshold_scale: float = 1.0,
        adaptive: bool = False,
        adaptive_windows: int = 600,
        adaptive_min_windows: int = 60,
        adaptive_k: float = 4.0,
        adaptive_floor: float = 1.0,
    ) -> None:
        if smoothing not in ("none", "ewma"):
            raise ValueError(f"smoothing must be 'none' or 'ewma', got {smoothing!r}")
        if not 0 < ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        if k_enter < 1 or k_exit < 1:
            raise ValueError(f"k_enter and k_exit must be >= 1, got {k_enter}, {k_exit}")
        if not (math.isfinite(threshold_scale) and threshold_scale > 0):
            raise ValueError(f"threshold_scale must be a positive number, got {threshold_scale}")
        if adaptive_windows < 1 or adaptive_min_windows < 1:
            raise ValueError(
                f"adaptive_windows and adaptive_min_windows must be >= 1, "
                f"got {adaptive_windows}, {adaptive_min_windows}"
            )
        if not (math.isfinite(adaptive_k) and adaptive_k >= 0):
            raise ValueError(f"adaptive_k must be a non-negative number, got {adaptive_k}")
        if not (math.isfinite(adaptive_floor) and adaptive_floor >= 0):
            raise ValueError(f"adaptive_floor must be a non-negative number, got {adaptive_floor}")
        self.threshold_scale = float(threshold_scale)
        self.set_threshold(threshold)
        self.smoothing = smoothing
        self.ewma_alpha = ewma_alpha
        self.k_enter = k_enter
        self.k_exit = k_exit
        self.adaptive = adaptive
        self.adaptive_windows = adaptive_windows
        self.adaptive_min_windows = adaptive_min_windows
        self.adaptive_k = float(adaptive_k)
        self.adaptive_floor = float(adaptive_floor)
        self.non_finite = 0  # windows whose score was NaN or infinite, since start
        self._states: dict[str, _DeviceState] = {}

    @staticmethod
    def configured_base(cfg: DetectorConfig, contract_threshold: float) -> float:
        """The base threshold ``[detector]`` asks for: ``threshold``, else the model contract's.
        (The static threshold is this times ``threshold_scale``: see ``set_threshold``.)"""
        return cfg.threshold if cfg.threshold is not None else contract_threshold

    @classmethod
    def from_config(cls, cfg: DetectorConfig, contract_threshold: float) -> Detector:
        """The detector that ``[detector]`` describes; ``cfg.threshold`` unset: the contract's."""
        return cls(
            cls.configured_base(cfg, contract_threshold),
            cfg.smoothing,
            cfg.ewma_alpha,
            cfg.k_enter,
            cfg.k_exit,
            threshold_scale=cfg.threshold_scale,
            adaptive=cfg.adaptive,
            adaptive_windows=cfg.adaptive_windows,
            adaptive_min_windows=cfg.adaptive_min_windows,
            adaptive_k=cfg.adaptive_k,
            adaptive_floor=cfg.adaptive_floor,
        )

    def set_threshold(self, threshold: float) -> None:
        """Use a new base threshold from the next window on (model reload).

        The static threshold becomes ``threshold * threshold_scale``. Smoothing and alert
        states are kept; what the adaptive threshold learnt is dropped, because it
        described the old model's scores.
        """
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.base_threshold = float(threshold)
        self.threshold = self.base_threshold * self.threshold_scale  # the static threshold
        for state in getattr(self, "_states", {}).values():
            state.learnt = 0
            state.log_mean = state.log_var = 0.0
            state.adaptive = math.nan

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

    def device_threshold(self, device: str) -> float:
        """The threshold the device's next window meets (the static one for an unknown device)."""
        state = self._states.get(device)
        if state is None or math.isnan(state.adaptive):
            return self.threshold
        return state.adaptive

    def forget(self, devices: list[str]) -> None:
        """Drop the state of evicted devices (their next window starts afresh)."""
        for device in devices:
            self._states.pop(device, None)

    def _learn(self, state: _DeviceState, smoothed: float) -> None:
        """Fold one normal window's smoothed score into the device's log-score statistics."""
        x = math.log(max(smoothed, _LOG_FLOOR))
        state.learnt += 1
        # Running mean/variance while fewer than adaptive_windows were seen, then an EWMA
        # with that time constant (West's incremental weighted update).
        lam = 1.0 / min(state.learnt, self.adaptive_windows)
        delta = x - state.log_mean
        state.log_mean += lam * delta
        state.log_var = (1.0 - lam) * (state.log_var + lam * delta * delta)
        if state.learnt >= self.adaptive_min_windows:
            learnt = math.exp(state.log_mean + self.adaptive_k * math.sqrt(state.log_var))
            state.adaptive = max(self.adaptive_floor * self.threshold, learnt)

    def update(
        self,
        devices: list[str],
        ts: npt.NDArray[np.float64],
        scores: npt.NDArray[np.float32],
        contributions: npt.NDArray[np.float32],
        padded: npt.NDArray[np.bool_],
    ) -> list[Decision]:
        """Decide on a batch of windows, in order (a device's windows must come oldest first)."""
        static = self.threshold
        ewma = self.smoothing == "ewma"
        alpha = self.ewma_alpha
        adaptive = self.adaptive
        states = self._states
        out: list[Decision] = []
        # Python floats in the loop: numpy scalar arithmetic costs several times more.
        for i, (device, t, score, pad) in enumerate(
            zip(devices, ts.tolist(), scores.tolist(), padded.tolist(), strict=True)
        ):
            state = states.get(device)
            if state is None:
                state = states[device] = _DeviceState()
            threshold = static if math.isnan(state.adaptive) else state.adaptive
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
            # Warm-up learns every window (SPOT's initialisation step); afterwards only
            # the windows that say "normal" (see the module docstring).
            if (
                adaptive
                and not pad
                and (state.learnt < self.adaptive_min_windows or not (anomaly or state.alert))
            ):
                self._learn(state, smoothed)
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
