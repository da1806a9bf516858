"""Per-slot cadence bookkeeping for ``DeviceBuffers``: step rings, verdicts, resampling grids.

``anomalyd.cadence`` holds the logic and its reasons (median of recent steps, the band,
``judge``, the grid and the interpolation); this module holds its state, one row per slot
of ``DeviceBuffers``, and the updates the buffers' round loop calls. It never touches the
readings' ring: ``observe`` reports each round's verdict changes, the slots whose
resampling grid starts there and the readings that go to the resampling path, and
``DeviceBuffers`` acts on them (withholds or restarts windows, writes grid readings).

Each slot keeps a ring of its last ``RING_STEPS`` steps between accepted consecutive
readings (a gap restarts it) and two counts: steps below the band and steps above it.
``observe`` updates them with a few array operations over a round's slots and judges
every slot with ``MIN_STEPS`` steps or more from the counts (the median itself is only
computed when exactly half of the steps lie on one side), so a device whose cadence is
fine costs no Python per reading. Each change of verdict is returned once, with the
device's median step; before its first verdict a device has none (it is scored as before).

With ``resample``, a mismatched device's readings go to the resampling path. Its grid is
anchored at the reading that made it mismatched (``observe`` returns these slots: their
window restarts there), and re-anchored at the first reading after a gap. For each later
real reading at ``t1``, ``grid_readings`` gives the grid readings ``anchor + k·P <= t1``
since the previous real one, interpolated linearly between the two. That is a Python call
per real reading (and ``DeviceBuffers`` writes the grid readings one by one, so the cost
grows with the ratio of periods), but only for those devices. The
cadence estimate always comes from the real readings' steps, so a resampled device
becomes ok again when its own cadence does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.cadence import MIN_STEPS, RING_STEPS, grid_points, interpolate, judge, outside_band

__all__ = ["CadenceTracker", "RoundCadence", "SlotChange"]


@dataclass(frozen=True, slots=True)
class SlotChange:
    """A slot's verdict changed at one of the round's readings."""

    slot: int
    mismatched: bool  # True: now outside the band; False: back inside it
    period_s: float  # the slot's median step when the verdict changed
    ts: float  # data time of the reading that changed the verdict


@dataclass(slots=True)
class RoundCadence:
    """What ``observe`` found in one round."""

    changes: list[SlotChange]  # in the order of the round's readings
    anchored: npt.NDArray[np.int64] | None  # slots whose grid starts at this reading (window restarts)
    slow: npt.NDArray[np.bool_] | None  # readings (mask over the round) for ``grid_readings``


class CadenceTracker:
    """Cadence state of ``n_slots`` slots. Owned by ``DeviceBuffers``, which validates the arguments.

    ``band`` None: no check and no verdicts (``observe`` must not be called); a restored
    snapshot's steps and grid state are still kept, and exported again.
    """

    def __init__(
        self,
        n_slots: int,
        n_features: int,
        *,
        band: tuple[float, float] | None,
        sample_period_s: float | None,
        max_gap_s: float,
        resample: bool,
    ) -> None:
        self.band = band
        self.sample_period_s = sample_period_s
        self.max_gap_s = max_gap_s
        self.resample = resample
        # Step ring (float32 is ample for a step), steps seen since the ring restarted
        # (position = n % RING_STEPS), and how many of the ring's steps lie below / above
        # the band.
        self._steps = np.zeros((n_slots, RING_STEPS), np.float32)
        self._n_steps = np.zeros(n_slots, np.int64)
        self._n_below = np.zeros(n_slots, np.int64)
        self._n_above = np.zeros(n_slots, np.int64)
        #: The verdicts; read (never written) by ``DeviceBuffers`` to withhold windows.
        self.mismatched = np.zeros(n_slots, np.bool_)
        # Resampling: grid times are anchor + k·P; k of the newest grid reading written;
        # values of the newest real reading (the start of the next interpolation).
        self._grid_anchor = np.full(n_slots, np.nan)
        self._grid_k = np.zeros(n_slots, np.int64)
        self._last_real = np.zeros((n_slots, n_features), np.float32)
        # The band in the steps' own dtype (float32), compared against as they are stored.
        lo, hi = band if band is not None else (0.0, math.inf)
        self._band_lo, self._band_hi = np.float32(lo), np.float32(hi)
        # A real step is at most max_gap_s, so it spans at most this many grid points; the
        # cap only guards against rounding.
        self._grid_cap = 0 if sample_period_s is None else int(max_gap_s // sample_period_s) + 2

    @property
    def n_mismatched(self) -> int:
        """Slots whose verdict is *mismatched*."""
        return int(np.count_nonzero(self.mismatched))

    def release(self, slot: int) -> None:
        """Forget the slot's cadence (its device left)."""
        self._n_steps[slot] = 0
        self._n_below[slot] = 0
        self._n_above[slot] = 0
        self.mismatched[slot] = False
        self._grid_anchor[slot] = np.nan

    def median_step(self, slot: int) -> float | None:
        """The slot's median recent step (seconds); None without a step since it (re)started."""
        if self._n_steps[slot] == 0:
            return None
        return self._median_step(slot)

    def _median_step(self, slot: int) -> float:
        # Positions 0..n-1 hold the steps until the ring is full, then all of them do.
        return float(np.median(self._steps[slot, : min(int(self._n_steps[slot]), RING_STEPS)]))

    def _classify(
        self, steps: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Below / above the band. The one place that decides: a step leaving the ring must
        be classified exactly as it was when it entered, or the counts would drift."""
        return steps < self._band_lo, steps > self._band_hi

    def observe(
        self,
        s: npt.NDArray[np.int64],
        ts: npt.NDArray[np.float64],
        step: npt.NDArray[np.float64],
        values: npt.NDArray[np.float32],
    ) -> RoundCadence:
        """Record one round's steps (``s`` has no repeats) and update the verdicts.

        Called before the readings are written. ``step`` is each reading's time since the
        slot's previous one (+inf for a slot's first reading); a step above ``max_gap_s``
        restarts the slot's ring instead of entering it.
        """
        band = self.band
        assert band is not None
        big = step > self.max_gap_s  # a gap, or a device's first reading (step +inf)
        brk: npt.NDArray[np.bool_] | None = None  # the gaps, when there are any
        if big.any():
            has_prev = np.isfinite(step)
            brk = big & has_prev
            sb = s[brk]
            self._n_steps[sb] = 0
            self._n_below[sb] = 0
            self._n_above[sb] = 0
            rec = ~big
            sr, st, tr = s[rec], step[rec].astype(np.float32), ts[rec]
        else:  # the usual round: every reading has a step to record
            sr, st, tr = s, step.astype(np.float32), ts
        n = self._n_steps[sr]
        pos = n % RING_STEPS
        n_below = self._n_below[sr]
        n_above = self._n_above[sr]
        full = n >= RING_STEPS
        all_full = bool(full.all())
        if all_full:  # the usual round: every ring is full, the new step replaces the oldest
            old_below, old_above = self._classify(self._steps[sr, pos])
            n_below -= old_below
            n_above -= old_above
        elif full.any():
            old_below, old_above = self._classify(self._steps[sr[full], pos[full]])
            n_below[full] -= old_below
            n_above[full] -= old_above
        below, above = self._classify(st)
        n_below += below
        n_above += above
        self._steps[sr, pos] = st
        self._n_below[sr] = n_below
        self._n_above[sr] = n_above
        n += 1
        self._n_steps[sr] = n
        verdict, undecided = judge(n_below, n_above, RING_STEPS if all_full else np.minimum(n, RING_STEPS))
        if undecided.any():
            for j in np.flatnonzero(undecided).tolist():
                verdict[j] = outside_band(self._median_step(int(sr[j])), band)
        changes: list[SlotChange] = []
        changed = verdict != self.mismatched[sr]
        if changed.any():
            changed &= n >= MIN_STEPS  # no verdict before MIN_STEPS steps
            if changed.any():
                changes = self._apply_changes(sr, tr, np.flatnonzero(changed), verdict)
        if not self.resample:
            return RoundCadence(changes, None, None)
        mis = self.mismatched[s]
        if not mis.any():
            return RoundCadence(changes, None, None)
        # (Re)anchor the grid at this reading: the one that made the device mismatched (its
        # anchor was cleared) or the first after a gap.
        anchor = mis & np.isnan(self._grid_anchor[s])
        if brk is not None:
            anchor |= mis & big
        anchored = None
        if anchor.any():
            anchored = s[anchor]
            self._grid_anchor[anchored] = ts[anchor]
            self._grid_k[anchored] = 0
            self._last_real[anchored] = values[anchor]
        slow = mis & ~anchor
        return RoundCadence(changes, anchored, slow if slow.any() else None)

    def _apply_changes(
        self,
        sr: npt.NDArray[np.int64],
        ts: npt.NDArray[np.float64],
        changed: npt.NDArray[np.intp],
        verdict: npt.NDArray[np.bool_],
    ) -> list[SlotChange]:
        """Flip the verdicts of ``sr[changed]`` (rare: a loop is fine)."""
        out: list[SlotChange] = []
        for j in changed.tolist():
            slot = int(sr[j])
            mismatched = bool(verdict[j])
            self.mismatched[slot] = mismatched
            # Cleared either way: a device turning mismatched is re-anchored by ``observe``
            # (with resample), one turning ok leaves resampling.
            self._grid_anchor[slot] = np.nan
            out.append(SlotChange(slot, mismatched, self._median_step(slot), float(ts[j])))
        return out

    def grid_readings(
        self, slot: int, t0: float, t1: float, v1: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]] | None:
        """A resampled slot's real reading ``(t1, v1)``: the grid readings since its previous one.

        ``(times, values)`` of the grid points after the last one given, up to ``t1``,
        interpolated on the line from the previous real reading (at ``t0``); None when the
        step holds no grid point. Either way ``(t1, v1)`` becomes the line's next start.
        """
        period = self.sample_period_s
        assert period is not None
        v0 = self._last_real[slot].copy()
        self._last_real[slot] = v1
        anchor = float(self._grid_anchor[slot])
        ks = grid_points(anchor, period, int(self._grid_k[slot]), t1, self._grid_cap)
        if ks.size == 0:
            return None
        self._grid_k[slot] = ks[-1]
        times = (anchor + ks * period).astype(np.float64)
        return times, interpolate(t0, v0, t1, v1, times)

    # ------------------------------------------------------------------ state across restarts

    def export(self, slots: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[Any]]:
        """The slots' cadence and resampling state, keyed as in ``DeviceBuffers.export_state``."""
        return {
            "steps": self._steps[slots],
            "n_steps": self._n_steps[slots],
            "mismatched": self.mismatched[slots],
            "grid_anchor": self._grid_anchor[slots],
            "grid_k": self._grid_k[slots],
            "last_values": self._last_real[slots],
        }

    def restore(self, slots: npt.NDArray[np.int64], st: dict[str, npt.NDArray[Any]]) -> None:
        """Load ``export``'s arrays (checked, one row per slot) into ``slots``.

        The step counts are recomputed from the steps under this tracker's band, which
        may differ from the one that exported them (a new model or tolerance).
        """
        self._steps[slots] = st["steps"]
        self._n_steps[slots] = st["n_steps"]
        if self.band is not None:
            below, above = self._classify(st["steps"])
            in_ring = np.arange(RING_STEPS)[None, :] < np.minimum(st["n_steps"], RING_STEPS)[:, None]
            self._n_below[slots] = np.count_nonzero(below & in_ring, axis=1)
            self._n_above[slots] = np.count_nonzero(above & in_ring, axis=1)
            self.mismatched[slots] = st["mismatched"]
        # else: no band, no verdicts (a device left mismatched would never be scored).
        self._grid_anchor[slots] = st["grid_anchor"]
        self._grid_k[slots] = st["grid_k"]
        self._last_real[slots] = st["last_values"]
