"""Per-device decisions: optional smoothing, a threshold (static or adaptive), and an alert
state machine.

For each scored window of a device:

1. ``smoothed`` is the score itself (``smoothing = "none"``), an exponentially
   weighted moving average of it (``"ewma"``: ``s = alpha * score + (1 - alpha) * s_prev``,
   started at the first score), or the largest of per-feature EWMAs (``"channel_ewma"``:
   each scored feature's residual size ``sqrt(n_scored * contribution)``, i.e. its
   standardised residual in units of the training residual's RMS, is averaged on its own,
   and ``smoothed`` is the largest average). A lasting bias in one channel then adds up
   instead of being diluted by the other channels' noise; the threshold is then in those
   units (``detector.threshold``), not the model's calibrated one;
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
``set_threshold`` (a model reload: new scores, new distribution) restarts the learning;
``reconfigure`` (a reload of ``[detector]``: same scores) keeps it.

Padded (warm-up) windows take part like any other: ``warmup = "pad"`` exists to score
early. A non-finite score (NaN, inf) means a broken model or input, not a verdict on the
machine: that window is reported with ``anomaly = False``, it leaves the smoothing state,
the adaptive statistics and both counters untouched, so it can neither raise nor clear an
alert, and it is counted in ``non_finite`` for the service to export and log.

**Published state** (``anomalyd.alerts``). Besides the alert, each device carries the state
its retained alert message shows: ``unknown`` until its first finite window is decided,
then ``normal`` / ``anomalous``, under the overlays an operator (``shelve``,
``out_of_service``) or the cadence check puts on it. ``Decision.state_changed`` marks the
windows that changed it; ``record(device)`` builds the message. While an alert is active
the detector keeps its peak score and the contributions at the peak.

**Operator verbs.** ``shelve`` suppresses a device's alert state until a time (the
detector goes on deciding underneath; ``sweep`` ends it when it expires), ``set_out_of_service``
does the same without end and also stops the adaptive statistics from learning (a
machine under maintenance is not a model of normal), and ``rebaseline`` accepts the
present behaviour as the new normal: smoothing, hysteresis, alert and adaptive statistics
restart, and with ``adaptive`` on no alert is raised until the statistics have warmed up
again on the new behaviour (``adaptive_min_windows`` windows). Without ``adaptive``,
``rebaseline`` clears the alert and the hysteresis only: the static threshold stays, so an
alert comes back if the new behaviour stays above it.

**Hand-over** (a partitioned fleet, ``[cluster]``; ``Pipeline.reconcile`` decides when).
``adopt`` takes over the alert state another instance left retained for a device this
detector holds no state for: an ``anomalous`` one starts in alert with the same ``since``
and peak, its hysteresis as if ``k_enter`` anomalous windows had just been counted, so it
is not raised again (no ``alert_changed`` window, no new ``since``) and clears after
``k_exit`` normal windows as any alert does; an operator's ``shelved`` or
``out_of_service`` is taken with who, why and until when. An adopted state has no window
yet: it fills from the warm-up and live readings. ``claim_is_newer`` tells a state here
that the broker's message has overtaken (a snapshot from before another instance owned
the device), which the pipeline drops (``discard``); ``continue_alert`` keeps the identity of
an alert that this process raised again only because the device's readings were scored
before its retained state arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import (
    ANOMALOUS,
    NORMAL,
    OUT_OF_SERVICE,
    SHELVED,
    UNKNOWN,
    AlertRecord,
    OperatorAction,
    RetainedState,
)
from anomalyd.device_state import DeviceState, state_from_dict, state_to_dict

if TYPE_CHECKING:
    from anomalyd.config import DetectorConfig

__all__ = ["Decision", "Detector", "Sweep"]

#: Scores are >= 0; their log is taken at this floor so that a perfect 0 stays finite.
_LOG_FLOOR = 1e-12


@dataclass(slots=True, frozen=True)
class Sweep:
    """What ``Detector.sweep`` found."""

    expired: list[AlertRecord]  # the new state of each device whose shelving just ended
    counts: dict[str, int]  # devices per published state
    oldest_alert_since: float | None  # ``since`` of the oldest anomalous state; None: none


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
    state_changed: bool = False  # this window changed the device's published state (anomalyd.alerts)
    record: AlertRecord | None = None  # ... and this is the state message it calls for


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
        n_scored: int = 1,
    ) -> None:
        if smoothing not in ("none", "ewma", "channel_ewma"):
            raise ValueError(f"smoothing must be 'none', 'ewma' or 'channel_ewma', got {smoothing!r}")
        if n_scored < 1:
            raise ValueError(f"n_scored must be >= 1, got {n_scored}")
        self.n_scored = n_scored
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
        self._states: dict[str, DeviceState] = {}

    @staticmethod
    def configured_base(cfg: DetectorConfig, contract_threshold: float) -> float:
        """The base threshold ``[detector]`` asks for: ``threshold``, else the model contract's.
        (The static threshold is this times ``threshold_scale``: see ``set_threshold``.)"""
        return cfg.threshold if cfg.threshold is not None else contract_threshold

    @classmethod
    def from_config(cls, cfg: DetectorConfig, contract_threshold: float, n_scored: int = 1) -> Detector:
        """The detector that ``[detector]`` describes; ``cfg.threshold`` unset: the contract's.
        ``n_scored``: the features the model's score is the mean over (``channel_ewma``)."""
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
            n_scored=n_scored,
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

    def reconfigure(self, cfg: DetectorConfig, contract_threshold: float) -> None:
        """Take a changed ``[detector]`` (a configuration reload) from the next window on.

        Checked whole first (as ``from_config`` checks it), so a bad value changes nothing.
        Each device keeps its alert and its hysteresis counts (the new ``k_enter`` and
        ``k_exit`` count on from them), its published and operator states, and what the
        adaptive threshold learnt: the model and its scores are the same, so the learnt
        statistics still describe the device; its adaptive threshold is recomputed from
        them with the new ``adaptive_k``, ``adaptive_floor``, ``adaptive_min_windows`` and
        static threshold. What no longer means the same is dropped: another ``smoothing``
        smooths another quantity, so the smoothing state and the learnt statistics restart;
        ``adaptive`` turned off drops the learnt statistics and ends any re-baselining
        (which waits for them), so that the device can raise alerts again.
        """
        new = Detector.from_config(cfg, contract_threshold, self.n_scored)  # raises before any change
        smoothing_changed = new.smoothing != self.smoothing
        self.threshold_scale = new.threshold_scale
        self.base_threshold, self.threshold = new.base_threshold, new.threshold
        self.smoothing, self.ewma_alpha = new.smoothing, new.ewma_alpha
        self.k_enter, self.k_exit = new.k_enter, new.k_exit
        self.adaptive, self.adaptive_windows = new.adaptive, new.adaptive_windows
        self.adaptive_min_windows = new.adaptive_min_windows
        self.adaptive_k, self.adaptive_floor = new.adaptive_k, new.adaptive_floor
        for state in self._states.values():
            if smoothing_changed:
                state.smoothed = math.nan
                state.channel = None
            if smoothing_changed or not self.adaptive:
                state.learnt = 0
                state.log_mean = state.log_var = 0.0
            if not self.adaptive:
                state.rebaselining = False
            if self.adaptive and state.learnt >= self.adaptive_min_windows:
                state.adaptive = self._learnt_threshold(state)
                state.rebaselining = False
            else:
                state.adaptive = math.nan

    @property
    def n_devices(self) -> int:
        return len(self._states)

    @property
    def active_alerts(self) -> int:
        """Devices whose published state is ``anomalous``."""
        return sum(1 for s in self._states.values() if s.published == ANOMALOUS)

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

    def forget(self, devices: list[str], reason: str, now: float) -> list[AlertRecord]:
        """Drop the state of devices the pipeline stopped tracking (their next window starts
        afresh). Returns the ``unknown`` record (with ``reason``) each of them now has, for
        the ones whose published state was something else."""
        out: list[AlertRecord] = []
        for device in devices:
            state = self._states.pop(device, None)
            if state is not None and state.published != UNKNOWN:
                out.append(AlertRecord(device, UNKNOWN, UNKNOWN, now, now, reason=reason))
        return out

    def knows(self, device: str) -> bool:
        """Whether the detector holds a state for ``device``."""
        return device in self._states

    def devices(self) -> list[str]:
        """Every device with a state."""
        return list(self._states)

    def record(self, device: str, now: float | None = None) -> AlertRecord | None:
        """The device's alert state message (None for a device without a state)."""
        state = self._states.get(device)
        if state is None:
            return None
        newest = state.since if math.isnan(state.last_ts) else state.last_ts
        return self._make_record(device, state, newest if now is None else now)

    def _make_record(self, device: str, state: DeviceState, ts: float) -> AlertRecord:
        condition = state.condition()
        active = state.alert and state.decided
        cadence = state.cadence
        return AlertRecord(
            device,
            state.published,
            condition,
            state.since,
            ts,
            reason="warming_up" if state.published == UNKNOWN else None,
            score=None if math.isnan(state.last_score) else state.last_score,
            threshold=None if math.isnan(state.last_threshold) else state.last_threshold,
            peak_score=state.peak_score if active else None,
            peak_ts=state.peak_ts if active else None,
            peak_contributions=state.peak_contributions if active else None,
            shelved_until=None if math.isnan(state.shelved_until) else state.shelved_until,
            operator=state.operator,
            period_s=cadence[0] if cadence is not None else None,
            expected_period_s=cadence[1] if cadence is not None else None,
        )

    # ------------------------------------------------------------------ overlays and verbs

    def _state(self, device: str) -> DeviceState:
        state = self._states.get(device)
        if state is None:
            state = self._states[device] = DeviceState()
        return state

    def _republish(self, device: str, state: DeviceState, now: float) -> AlertRecord | None:
        """After an overlay changed: the new record if the published state changed."""
        state.refresh_overlay()
        published = state.overlay or state.condition()
        if published == state.published and published not in (SHELVED, OUT_OF_SERVICE):
            return None  # (an operator state is re-published: who and why may have changed)
        if published != state.published:
            state.published = published
            state.since = now
        return self.record(device, now)

    def shelve(self, device: str, until: float, action: OperatorAction) -> AlertRecord | None:
        """Suppress the device's alert state until ``until`` (UNIX time)."""
        state = self._state(device)
        state.shelved_until = until
        state.operator = action
        return self._republish(device, state, action.at)

    def set_out_of_service(self, device: str, out: bool, action: OperatorAction) -> AlertRecord | None:
        """Take the device out of service (``out``) or put it back."""
        state = self._state(device)
        state.out_of_service = out
        if not out:
            state.shelved_until = math.nan  # back in service: whatever was shelved is done too
        state.operator = action if out else None
        return self._republish(device, state, action.at)

    def unshelve(self, device: str, action: OperatorAction) -> AlertRecord | None:
        """End the device's shelving now (an operator's ``unshelve``)."""
        state = self._state(device)
        if math.isnan(state.shelved_until):
            return None
        state.shelved_until = math.nan
        if not state.out_of_service:
            state.operator = action
        return self._republish(device, state, action.at)

    def sweep(self, now: float) -> Sweep:
        """Housekeeping, in one pass over every device: unshelve those whose shelving ended
        by ``now`` (UNIX time), count the devices per published state, and find the oldest
        active alert."""
        expired: list[AlertRecord] = []
        counts: dict[str, int] = {}
        oldest = math.inf
        for device, state in self._states.items():
            if not math.isnan(state.shelved_until) and state.shelved_until <= now:
                state.shelved_until = math.nan
                if not state.out_of_service:
                    state.operator = None
                record = self._republish(device, state, now)
                if record is not None:
                    expired.append(record)
            published = state.published
            counts[published] = counts.get(published, 0) + 1
            if published == ANOMALOUS and state.since < oldest:
                oldest = state.since
        return Sweep(expired, counts, None if math.isinf(oldest) else oldest)

    def rebaseline(self, device: str, action: OperatorAction) -> AlertRecord | None:
        """Accept the device's present behaviour as its new normal (see the module docstring)."""
        state = self._state(device)
        state.smoothed = math.nan
        state.channel = None
        state.above = state.below = 0
        state.alert = False
        state.learnt = 0
        state.log_mean = state.log_var = 0.0
        state.adaptive = math.nan
        state.rebaselining = self.adaptive
        state.peak_score = state.peak_ts = math.nan
        state.peak_contributions = None
        state.operator = action
        published = state.published
        record = self._republish(device, state, action.at)
        if record is None and published in (NORMAL, UNKNOWN):
            return self.record(device, action.at)  # say who re-baselined it, even if it stays normal
        return record

    def set_cadence(
        self, device: str, mismatched: bool, period_s: float, expected_s: float, ts: float
    ) -> AlertRecord | None:
        """The cadence check's verdict on a device changed (data time ``ts``)."""
        state = self._state(device)
        state.cadence = (period_s, expected_s) if mismatched else None
        if not mismatched:
            # Its window restarts: until a full window is decided its condition is unknown.
            state.decided = False
        return self._republish(device, state, ts)

    # ------------------------------------------------------------------ hand-over

    def adopt(self, claim: RetainedState, peak_contributions: npt.NDArray[np.float32] | None = None) -> bool:
        """Take over ``claim``, the alert state the broker retains for a device this detector
        holds no state for (see the module docstring). True if adopted; False (nothing
        changes) for a claim there is nothing to adopt from: a state that is not
        ``anomalous``, ``shelved`` or ``out_of_service``, a claim without a ``since`` (its
        identity), a shelving without its end, or a device that has a state here already.

        ``peak_contributions``: the claim's contributions at the peak, in the model's
        feature order (the caller knows the features); None: unknown."""
        device, published = claim.device, claim.state
        if device in self._states or math.isnan(claim.since):
            return False
        if published not in (ANOMALOUS, SHELVED, OUT_OF_SERVICE):
            return False
        if published == SHELVED and math.isnan(claim.shelved_until):
            return False
        state = DeviceState(published=published, since=claim.since)
        # What a re-assertion publishes before the first window here: the claim's newest report.
        state.last_ts = claim.since if math.isnan(claim.ts) else claim.ts
        state.last_score, state.last_threshold = claim.score, claim.threshold
        if ANOMALOUS in (published, claim.condition):
            # In alert underneath, as if k_enter anomalous windows were just counted: the next
            # anomalous window keeps it (no raise), k_exit normal ones clear it.
            state.alert = state.decided = True
            state.above = self.k_enter
            # NaN when the claim does not tell it: the next window's score is then the peak.
            state.peak_score, state.peak_ts = claim.peak_score, claim.peak_ts
            state.peak_contributions = peak_contributions
        # Otherwise the condition underneath stays unknown until a window is decided here.
        if published in (SHELVED, OUT_OF_SERVICE):
            state.out_of_service = published == OUT_OF_SERVICE
            state.shelved_until = claim.shelved_until
            state.operator = claim.operator
        state.refresh_overlay()
        self._states[device] = state
        return True

    def claim_is_newer(self, claim: RetainedState) -> bool:
        """Whether ``claim``, the broker's retained state of a device this detector holds a
        state for, differs from that state and reports something newer than anything the
        state here knows (its ``ts`` after the newest decided window, the state's ``since``
        and the newest operator action): then another instance decided the device after
        this one last did, and the state here is stale. A claim without a ``ts`` is never
        newer. The times compared are data times and, for commands and expiries, clocks:
        close calls go to the state here."""
        state = self._states.get(claim.device)
        if state is None:
            return True
        if claim.state == state.published and claim.since == state.since:
            return False  # what this detector published (or would)
        op_at = state.operator.at if state.operator is not None else math.nan
        known = [x for x in (state.last_ts, state.since, op_at) if not math.isnan(x)]
        return not math.isnan(claim.ts) and claim.ts > max(known, default=-math.inf)

    def continue_alert(
        self, claim: RetainedState, peak_contributions: npt.NDArray[np.float32] | None = None
    ) -> AlertRecord | None:
        """The broker shows the device's alert raised at ``claim.since``, before this process
        first decided a window of the device, and this process has since raised an alert of
        its own for it (the device's readings were scored before its retained state arrived:
        they come on separate subscriptions, in no guaranteed order). No one cleared the
        alert in between, so it is the same alert: it keeps the claim's ``since`` (its
        identity) and the higher peak. Returns the corrected state message; None (nothing
        changes) when that is not the case. ``peak_contributions``: as for ``adopt``."""
        state = self._states.get(claim.device)
        if (
            state is None
            or claim.state != ANOMALOUS
            or state.published != ANOMALOUS
            or not claim.since < state.since  # (False for a NaN since) nothing to correct
            or not claim.since < state.born
        ):
            return None
        state.since = claim.since
        if claim.peak_score > state.peak_score:  # False for a NaN (unknown) peak
            state.peak_score, state.peak_ts = claim.peak_score, claim.peak_ts
            state.peak_contributions = peak_contributions
        return self.record(claim.device)

    def discard(self, device: str) -> bool:
        """Drop the device's state without a state message (the broker's is newer: the caller
        handles the device as one without a state here). False if there was none."""
        return self._states.pop(device, None) is not None

    # ------------------------------------------------------------------ snapshot

    def export_state(self) -> list[dict[str, Any]]:
        """Every device's state as JSON-ready dicts, for a snapshot (``anomalyd.device_state``)."""
        return [state_to_dict(device, st) for device, st in self._states.items()]

    def import_state(self, states: list[dict[str, Any]], n_features: int) -> int:
        """Restore what ``export_state`` gave (into a detector without states). Raises
        ``ValueError`` on anything malformed, before changing anything. Returns devices restored."""
        restored = dict(state_from_dict(raw, n_features) for raw in states)
        self._states.update(restored)
        return len(restored)

    def _learn(self, state: DeviceState, smoothed: float) -> None:
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
            state.adaptive = self._learnt_threshold(state)
            state.rebaselining = False

    def _learnt_threshold(self, state: DeviceState) -> float:
        """The device's adaptive threshold from its learnt statistics (module docstring)."""
        learnt = math.exp(state.log_mean + self.adaptive_k * math.sqrt(state.log_var))
        return max(self.adaptive_floor * self.threshold, learnt)

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
        channel = self.smoothing == "channel_ewma"
        # Per-feature residual sizes, for the whole batch at once (channel_ewma only).
        sizes = np.sqrt(np.maximum(contributions, 0.0) * self.n_scored) if channel else None
        alpha = self.ewma_alpha
        adaptive = self.adaptive
        min_learnt = self.adaptive_min_windows
        k_enter, k_exit = self.k_enter, self.k_exit
        states = self._states
        out: list[Decision] = []
        # Python floats in the loop: numpy scalar arithmetic costs several times more.
        for i, (device, t, score, pad) in enumerate(
            zip(devices, ts.tolist(), scores.tolist(), padded.tolist(), strict=True)
        ):
            state = states.get(device)
            if state is None:
                state = states[device] = DeviceState(born=t)
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
            if sizes is not None:
                size = sizes[i]
                prev = state.channel
                state.channel = size if prev is None else alpha * size + (1.0 - alpha) * prev
                smoothed = float(state.channel.max())
            elif ewma and not math.isnan(state.smoothed):
                smoothed = alpha * score + (1.0 - alpha) * state.smoothed
            else:
                smoothed = score
            state.smoothed = smoothed
            anomaly = smoothed > threshold
            # Warm-up learns every window (SPOT's initialisation step); afterwards only
            # the windows that say "normal" (see the module docstring). Nothing is learnt
            # from a device out of service.
            if (
                adaptive
                and not pad
                and not state.out_of_service
                and (state.learnt < min_learnt or not (anomaly or state.alert))
            ):
                self._learn(state, smoothed)
            changed = False
            if anomaly:
                # While re-baselining, the static threshold's verdicts do not count towards
                # an alert: the statistics are still learning what the new normal is.
                state.above = 0 if state.rebaselining else state.above + 1
                state.below = 0
                if not state.alert and state.above >= k_enter:
                    state.alert = changed = True
                    state.peak_score = -math.inf
            else:
                state.below += 1
                state.above = 0
                if state.alert and state.below >= k_exit:
                    state.alert = False
                    changed = True
            # A NaN peak (an adopted alert whose peak was not told) gives way to any score.
            if state.alert and (score > state.peak_score or math.isnan(state.peak_score)):
                state.peak_score = score
                state.peak_ts = t
                state.peak_contributions = np.array(contributions[i])
            state.decided = True
            state.last_ts = t
            state.last_score = score
            state.last_threshold = threshold
            published = state.overlay or (ANOMALOUS if state.alert else NORMAL)
            record = None
            if published != state.published:
                state.published = published
                state.since = t
                record = self._make_record(device, state, t)
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
                    record is not None,
                    record,
                )
            )
        return out
