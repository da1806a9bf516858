"""Per-device rolling windows in one preallocated doubled ring buffer.

Storage is ``[max_devices, 2L, F]`` float32: reading number ``i`` of a device goes to
positions ``i % L`` and ``i % L + L`` of the device's row, so the newest L readings are
always the contiguous slice ``[c % L, c % L + L)`` (``c`` readings so far) and a batch
of windows is one gather through a strided view, with no modulo per element.

``ingest`` is vectorised across devices. A fancy-index write with repeated indices
keeps only one value (numpy's documented behaviour), so when a batch holds several readings of one
device it is processed in *rounds*: round r writes the r-th reading of every device in
the batch at once, then copies out the windows that became ready, before round r+1 can
overwrite them. A batch of one reading per device is one round.

A device yields a window when it has ``c >= start`` readings and ``(c - start) % hop
== 0``, with ``start = L`` for ``warmup = "wait"`` and ``start = 1`` for ``"pad"``
(windows with fewer than L readings are edge-padded with the first one and marked
``padded``). A reading stamped at or before the device's last one is rejected
(``DUPLICATE`` if equal, ``OUT_OF_ORDER`` if older); a gap longer than ``max_gap_s``
restarts the device (its count goes back to 0, it warms up again).

When all slots are taken, a new device takes the slot of the least recently seen one
(its id is returned in ``evicted`` so the detector forgets it); only if every tracked
device has readings in the same batch is the newcomer rejected (``DEVICE_LIMIT``).

**Cadence** (with ``period_band``; the logic and its reasons are in ``anomalyd.cadence``).
Each slot keeps a ring of its last ``RING_STEPS`` steps between accepted consecutive
readings (a gap restarts it) and two counts: steps below the band and steps above it.
A round updates them with a few array operations over the round's slots and judges
every slot with ``MIN_STEPS`` steps or more from the counts (the median itself is only
computed when exactly half of the steps lie on one side), so a device whose cadence is
fine costs no Python per reading. A device whose verdict is *mismatched* (its median
step outside the band) has its due windows withheld and counted (``skipped_cadence``):
a model fed at the wrong rate scores meaningless windows. Before its first verdict a
device is scored as before. Each change of verdict is reported once
(``cadence_changes``); a device that comes back into the band restarts its window, so
no scored window mixes the two cadences.

With ``resample=True`` a mismatched device is not skipped but resampled: its window
restarts at the reading that made it mismatched (the grid's anchor, ``a``), and each
later real reading at ``t1`` adds the grid readings ``a + k·P <= t1`` since the previous
real one, interpolated linearly between the two, each written and windowed like a real
reading. That is a Python loop per real reading, costing in proportion to
the ratio of periods, and only for those devices. The cadence estimate always comes
from the real readings' steps, so a resampled device becomes ok again when its own
cadence does. A gap re-anchors the grid at the reading after it.

``export_state`` / ``import_state`` carry every tracked device (window, counts, cadence
and resampling state) across a restart of the daemon.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from anomalyd.cadence import (
    MIN_STEPS,
    RING_STEPS,
    CadenceChange,
    grid_points,
    interpolate,
    judge,
    outside_band,
)
from anomalyd.decode import DecodedBatch, Reason, Rejection

__all__ = ["STATE_VERSION", "DeviceBuffers", "IngestResult", "ReadyWindows"]

#: Version of the ``export_state`` layout; ``import_state`` refuses any other.
STATE_VERSION = 1


@dataclass
class ReadyWindows:
    """Windows that became ready, copied out of the rings (safe after further writes)."""

    windows: npt.NDArray[np.float32]  # (k, L, F), oldest sample first
    devices: list[str]
    end_ts: npt.NDArray[np.float64]  # (k,) timestamp of each window's newest reading
    arrival_mono: npt.NDArray[np.float64]  # (k,) arrival of each window's newest reading
    padded: npt.NDArray[np.bool_]  # (k,) edge-padded during warm-up

    def __len__(self) -> int:
        return len(self.devices)

    @classmethod
    def empty(cls, window_length: int, n_features: int) -> ReadyWindows:
        return cls(
            np.empty((0, window_length, n_features), np.float32),
            [],
            np.empty(0, np.float64),
            np.empty(0, np.float64),
            np.empty(0, np.bool_),
        )


@dataclass
class IngestResult:
    """What one ``ingest`` call did."""

    accepted: int
    rejections: list[Rejection]  # OUT_OF_ORDER, DUPLICATE, BAD_TIMESTAMP, DEVICE_LIMIT
    ready: ReadyWindows
    evicted: list[str] = field(default_factory=list)  # LRU-evicted: the detector must forget them
    resets: int = 0  # devices restarted because of a gap > max_gap_s
    skipped_cadence: int = 0  # windows due but withheld: their device's cadence is outside the band
    cadence_changes: list[CadenceChange] = field(default_factory=list)  # verdict changes, in order


@dataclass
class _Round:
    """What the rounds of one ``ingest`` call add up to."""

    rejections: list[Rejection]
    accepted: int = 0
    resets: int = 0
    skipped: int = 0
    changes: list[CadenceChange] = field(default_factory=list)
    out: list[ReadyWindows] = field(default_factory=list)


class DeviceBuffers:
    """Rolling windows for up to ``max_devices`` devices. Owned by the pipeline thread.

    ``period_band`` (from ``anomalyd.cadence.period_band``) turns the cadence check on;
    it needs ``sample_period_s``, the model's period, which changes report and
    ``resample=True`` uses as its grid step.
    """

    def __init__(  # noqa: PLR0917 - positional signature kept for existing callers
        self,
        max_devices: int,
        window_length: int,
        n_features: int,
        hop: int,
        warmup: Literal["wait", "pad"],
        max_gap_s: float,
        *,
        period_band: tuple[float, float] | None = None,
        sample_period_s: float | None = None,
        resample: bool = False,
    ) -> None:
        if max_devices < 1 or window_length < 1 or n_features < 1 or hop < 1:
            raise ValueError("max_devices, window_length, n_features and hop must be >= 1")
        if warmup not in ("wait", "pad"):
            raise ValueError(f"warmup must be 'wait' or 'pad', got {warmup!r}")
        if period_band is not None:
            lo, hi = period_band
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise ValueError(f"period_band must be (low, high) with 0 < low <= high, got {period_band!r}")
            if sample_period_s is None or not (math.isfinite(sample_period_s) and sample_period_s > 0):
                raise ValueError(
                    f"a period_band needs the model's sample_period_s (> 0), got {sample_period_s!r}"
                )
        self.max_devices = max_devices
        self.window_length = window_length
        self.n_features = n_features
        self.hop = hop
        self.warmup = warmup
        self.max_gap_s = max_gap_s
        self.period_band = period_band
        self.sample_period_s = sample_period_s
        # Without a band there is no verdict, so nothing is ever resampled.
        self.resample = resample and period_band is not None
        self._start = window_length if warmup == "wait" else 1
        length = window_length
        self._ring = np.zeros((max_devices, 2 * length, n_features), np.float32)
        # A read-only view [device, start, L, F]: every window is one index into it.
        s0, s1, s2 = self._ring.strides
        self._windows_view = as_strided(
            self._ring, (max_devices, length + 1, length, n_features), (s0, s1, s1, s2), writeable=False
        )
        self._count = np.zeros(max_devices, np.int64)  # readings since (re)start
        self._last_ts = np.full(max_devices, -np.inf)
        self._last_arrival = np.zeros(max_devices)  # arrival_mono of the newest reading
        # Cadence: step ring (float32 is ample for a step), steps seen since the ring
        # restarted (position = n % RING_STEPS), and how many of the ring's steps lie
        # below / above the band.
        self._steps = np.zeros((max_devices, RING_STEPS), np.float32)
        self._n_steps = np.zeros(max_devices, np.int64)
        self._n_below = np.zeros(max_devices, np.int64)
        self._n_above = np.zeros(max_devices, np.int64)
        self._mismatched = np.zeros(max_devices, np.bool_)
        # Resampling: grid times are anchor + k·P; k of the newest grid reading written;
        # values of the newest real reading (the start of the next interpolation).
        self._grid_anchor = np.full(max_devices, np.nan)
        self._grid_k = np.zeros(max_devices, np.int64)
        self._last_real = np.zeros((max_devices, n_features), np.float32)
        # The band in the steps' own dtype (float32), compared against as they are stored.
        lo, hi = period_band if period_band is not None else (0.0, math.inf)
        self._band_lo, self._band_hi = np.float32(lo), np.float32(hi)
        # A real step is at most max_gap_s, so it spans at most this many grid points; the
        # cap only guards against rounding.
        self._grid_cap = 0 if sample_period_s is None else int(max_gap_s // sample_period_s) + 2
        self._device: list[str | None] = [None] * max_devices
        self._slot_of: dict[str, int] = {}
        # Least recently seen first; moved to the end when a batch touches the device.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(max_devices - 1, -1, -1))

    @property
    def n_devices(self) -> int:
        """Devices currently tracked."""
        return len(self._slot_of)

    @property
    def n_cadence_mismatched(self) -> int:
        """Tracked devices whose cadence is outside the band (resampled ones included)."""
        return int(np.count_nonzero(self._mismatched))

    @property
    def n_resampled(self) -> int:
        """Tracked devices being resampled onto the model's period (all mismatched ones, with resample)."""
        return self.n_cadence_mismatched if self.resample else 0

    def devices(self) -> list[str]:
        """The devices currently tracked."""
        return list(self._slot_of)

    def readings(self, device: str) -> int:
        """Readings the device holds since it (re)started; 0 if not tracked."""
        slot = self._slot_of.get(device)
        return 0 if slot is None else int(self._count[slot])

    def is_mismatched(self, device: str) -> bool:
        """Whether the device's cadence verdict is *mismatched*; False if not tracked."""
        slot = self._slot_of.get(device)
        return slot is not None and bool(self._mismatched[slot])

    def median_step(self, device: str) -> float | None:
        """The device's cadence estimate (median of its recent steps, seconds).

        None when it has no step since it (re)started, or without a cadence check.
        """
        slot = self._slot_of.get(device)
        if slot is None or self._n_steps[slot] == 0:
            return None
        return self._median_step(slot)

    def _median_step(self, slot: int) -> float:
        # Positions 0..n-1 hold the steps until the ring is full, then all of them do.
        return float(np.median(self._steps[slot, : min(int(self._n_steps[slot]), RING_STEPS)]))

    # ------------------------------------------------------------------ slots

    def _release(self, device: str) -> int:
        slot = self._slot_of.pop(device)
        del self._lru[device]
        self._device[slot] = None
        self._count[slot] = 0
        self._last_ts[slot] = -np.inf
        self._n_steps[slot] = 0
        self._n_below[slot] = 0
        self._n_above[slot] = 0
        self._mismatched[slot] = False
        self._grid_anchor[slot] = np.nan
        return slot

    def _claim(self, device: str, slot: int) -> None:
        self._slot_of[device] = slot
        self._lru[device] = slot
        self._device[slot] = device

    def evict_idle(self, now_mono: float, idle_s: float) -> list[str]:
        """Forget devices whose newest reading arrived more than ``idle_s`` ago."""
        used = np.fromiter((d is not None for d in self._device), bool, self.max_devices)
        stale = np.flatnonzero(used & (self._last_arrival < now_mono - idle_s))
        gone: list[str] = []
        for slot in stale.tolist():
            device = self._device[slot]
            assert device is not None
            self._release(device)
            self._free.append(slot)
            gone.append(device)
        return gone

    def _map_slots(
        self, devices: list[str], rejections: list[Rejection], evicted: list[str]
    ) -> tuple[list[int], list[int]]:
        """Slot and occurrence number (0 for a device's first reading in the batch) per reading."""
        slots: list[int] = []
        occ: list[int] = []
        seen: dict[int, int] = {}  # slot -> readings of it so far in this batch
        slot_of, lru = self._slot_of, self._lru
        for device in devices:
            slot = slot_of.get(device)
            if slot is None:
                slot = self._new_slot(device, seen, evicted)
                if slot < 0:
                    rejections.append(
                        Rejection(
                            Reason.DEVICE_LIMIT,
                            "",
                            f"device {device[:64]!r}: all {self.max_devices} slots busy in this batch",
                        )
                    )
                    slots.append(-1)
                    occ.append(-1)
                    continue
            k = seen.get(slot, 0)
            if k == 0:
                lru.move_to_end(device)
            seen[slot] = k + 1
            slots.append(slot)
            occ.append(k)
        return slots, occ

    def _new_slot(self, device: str, seen: dict[int, int], evicted: list[str]) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            victim, slot = next(iter(self._lru.items()))
            if slot in seen:
                # The least recent device is in this batch, so all of them are (each one
                # seen moves to the end): evicting one would lose readings already mapped.
                return -1
            self._release(victim)
            evicted.append(victim)
        self._claim(device, slot)
        return slot

    # ------------------------------------------------------------------ ingest

    def ingest(self, batch: DecodedBatch) -> IngestResult:
        """Write a batch of readings and return the windows that became ready.

        Windows come out round by round (each device's windows in time order).
        """
        acc = _Round([])
        evicted: list[str] = []
        if len(batch.devices) == 0:
            return IngestResult(0, acc.rejections, ReadyWindows.empty(self.window_length, self.n_features))
        slot_list, occ_list = self._map_slots(batch.devices, acc.rejections, evicted)
        slots = np.asarray(slot_list, np.int64)
        occ = np.asarray(occ_list, np.int64)
        order = np.argsort(occ, kind="stable")
        order = order[occ[order] >= 0]  # readings without a slot (DEVICE_LIMIT) are already rejected
        # Round r = the r-th reading of each device in this batch: no slot repeats in a round.
        bounds = np.flatnonzero(np.diff(occ[order])) + 1
        for idx in np.split(order, bounds):
            self._write_round(batch, idx, slots[idx], acc)
        return IngestResult(
            acc.accepted,
            acc.rejections,
            self._concat(acc.out),
            evicted,
            acc.resets,
            skipped_cadence=acc.skipped,
            cadence_changes=acc.changes,
        )

    def _write_round(
        self,
        batch: DecodedBatch,
        idx: npt.NDArray[np.int64],
        s: npt.NDArray[np.int64],
        acc: _Round,
    ) -> None:
        """Write one reading per device (``s`` has no repeats) and copy out the windows due."""
        ts = batch.ts[idx]
        prev = self._last_ts[s]
        bad = ~np.isfinite(ts) | (ts <= prev)
        if bad.any():
            for j in np.flatnonzero(bad).tolist():
                t, p = float(ts[j]), float(prev[j])
                if not np.isfinite(t):
                    reason = Reason.BAD_TIMESTAMP
                else:
                    reason = Reason.DUPLICATE if t == p else Reason.OUT_OF_ORDER
                device = batch.devices[int(idx[j])]
                acc.rejections.append(
                    Rejection(reason, "", f"device {device[:64]!r}: ts {t!r} <= last {p!r}")
                )
            keep = ~bad
            idx, s, ts, prev = idx[keep], s[keep], ts[keep], prev[keep]
        step = ts - prev  # +inf for a device's first reading
        gap = (self._count[s] > 0) & (step > self.max_gap_s)
        resets = int(np.count_nonzero(gap))
        if resets:
            self._count[s[gap]] = 0  # the device warms up again from this reading
        acc.resets += resets
        acc.accepted += s.size
        values = batch.values[idx]
        arrival = batch.arrival_mono[idx]
        slow = None if self.period_band is None else self._track_cadence(s, ts, step, values, acc)
        if slow is not None:
            # Resampled devices: their real readings only move the interpolation along.
            self._resample(s[slow], prev[slow], ts[slow], values[slow], arrival=arrival[slow], acc=acc)
            fast = ~slow
            s, ts, values, arrival = s[fast], ts[fast], values[fast], arrival[fast]
        length = self.window_length
        pos = self._count[s] % length
        self._ring[s, pos] = values
        self._ring[s, pos + length] = values
        self._count[s] += 1
        self._last_ts[s] = ts
        self._last_arrival[s] = arrival
        ready = self._windows_of(s, acc)
        if len(ready):
            acc.out.append(ready)  # copied now: the next round may overwrite these slots

    def _classify(
        self, steps: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Below / above the band. The one place that decides: a step leaving the ring must
        be classified exactly as it was when it entered, or the counts would drift."""
        return steps < self._band_lo, steps > self._band_hi

    def _track_cadence(
        self,
        s: npt.NDArray[np.int64],
        ts: npt.NDArray[np.float64],
        step: npt.NDArray[np.float64],
        values: npt.NDArray[np.float32],
        acc: _Round,
    ) -> npt.NDArray[np.bool_] | None:
        """Record this round's steps and update verdicts (before the readings are written).

        Returns the mask of readings that go to the resampling path, or None when none do.
        """
        band = self.period_band
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
        changed = verdict != self._mismatched[sr]
        if changed.any():
            changed &= n >= MIN_STEPS  # no verdict before MIN_STEPS steps
            if changed.any():
                self._apply_changes(sr, tr, np.flatnonzero(changed), verdict=verdict, acc=acc)
        if not self.resample:
            return None
        mis = self._mismatched[s]
        if not mis.any():
            return None
        # (Re)anchor the grid at this reading: the one that made the device mismatched (its
        # anchor was cleared) or the first after a gap.
        anchor = mis & np.isnan(self._grid_anchor[s])
        if brk is not None:
            anchor |= mis & big
        if anchor.any():
            sa = s[anchor]
            self._count[sa] = 0
            self._grid_anchor[sa] = ts[anchor]
            self._grid_k[sa] = 0
            self._last_real[sa] = values[anchor]
        slow = mis & ~anchor
        return slow if slow.any() else None

    def _apply_changes(
        self,
        sr: npt.NDArray[np.int64],
        ts: npt.NDArray[np.float64],
        changed: npt.NDArray[np.intp],
        *,
        verdict: npt.NDArray[np.bool_],
        acc: _Round,
    ) -> None:
        """Flip the verdicts of ``sr[changed]`` and report each (rare: a loop is fine)."""
        assert self.sample_period_s is not None
        for j in changed.tolist():
            slot = int(sr[j])
            mismatched = bool(verdict[j])
            self._mismatched[slot] = mismatched
            # Cleared either way: a device turning mismatched is re-anchored by the caller
            # (with resample), one turning ok leaves resampling.
            self._grid_anchor[slot] = np.nan
            if not mismatched:
                # Back in the band: restart the window, so that no scored window holds
                # readings from before (wrong cadence, or grid readings).
                self._count[slot] = 0
            device = self._device[slot]
            assert device is not None
            acc.changes.append(
                CadenceChange(
                    device,
                    mismatched,
                    self._median_step(slot),
                    self.sample_period_s,
                    float(ts[j]),
                )
            )

    def _resample(
        self,
        s: npt.NDArray[np.int64],
        t0: npt.NDArray[np.float64],
        t1: npt.NDArray[np.float64],
        v1: npt.NDArray[np.float32],
        *,
        arrival: npt.NDArray[np.float64],
        acc: _Round,
    ) -> None:
        """Write the grid readings between each slot's previous real reading and this one."""
        period = self.sample_period_s
        assert period is not None
        length = self.window_length
        for j, slot in enumerate(s.tolist()):
            self._last_ts[slot] = t1[j]
            self._last_arrival[slot] = arrival[j]
            v0 = self._last_real[slot].copy()
            self._last_real[slot] = v1[j]
            anchor = float(self._grid_anchor[slot])
            ks = grid_points(anchor, period, int(self._grid_k[slot]), float(t1[j]), self._grid_cap)
            if ks.size == 0:
                continue
            self._grid_k[slot] = ks[-1]
            times = (anchor + ks * period).astype(np.float64)
            vals = interpolate(float(t0[j]), v0, float(t1[j]), v1[j], times)
            windows: list[npt.NDArray[np.float32]] = []
            end_ts: list[float] = []
            padded: list[bool] = []
            c = int(self._count[slot])
            for i in range(ks.size):
                pos = c % length
                self._ring[slot, pos] = vals[i]
                self._ring[slot, pos + length] = vals[i]
                c += 1
                if c >= self._start and (c - self._start) % self.hop == 0:
                    windows.append(self._window_one(slot, c))
                    end_ts.append(float(times[i]))
                    padded.append(c < length)
            self._count[slot] = c
            if windows:
                device = self._device[slot]
                assert device is not None
                acc.out.append(
                    ReadyWindows(
                        np.stack(windows),
                        [device] * len(windows),
                        np.asarray(end_ts, np.float64),
                        np.full(len(windows), arrival[j], np.float64),
                        np.asarray(padded, np.bool_),
                    )
                )

    def _window_one(self, slot: int, c: int) -> npt.NDArray[np.float32]:
        """A copy of one slot's window after ``c`` readings (edge-padded below L)."""
        length = self.window_length
        if c >= length:
            start = c % length
            return self._ring[slot, start : start + length].copy()
        padded: npt.NDArray[np.float32] = self._ring[slot, np.maximum(np.arange(length) - (length - c), 0)]
        return padded

    def _windows_of(self, written: npt.NDArray[np.int64], acc: _Round) -> ReadyWindows:
        """Copy out the windows of the just-written slots that are due."""
        c = self._count[written]
        due = (c >= self._start) & ((c - self._start) % self.hop == 0)
        if self.period_band is not None and not self.resample:
            withheld = due & self._mismatched[written]
            if withheld.any():
                acc.skipped += int(np.count_nonzero(withheld))
                due &= ~withheld
        s = written[due]
        if s.size == 0:
            return ReadyWindows.empty(self.window_length, self.n_features)
        c = c[due]
        length = self.window_length
        full = c >= length
        if full.all():
            windows = self._windows_view[s, c % length]  # fancy index: a copy, (k, L, F)
        else:
            windows = np.empty((s.size, length, self.n_features), np.float32)
            windows[full] = self._windows_view[s[full], c[full] % length]
            # Warm-up (pad): readings 0..c-1 sit unwrapped at 0..c-1; repeat reading 0 in front.
            cp = c[~full]
            pad_idx = np.maximum(np.arange(length)[None, :] - (length - cp)[:, None], 0)
            windows[~full] = self._ring[s[~full][:, None], pad_idx]
        devices = self._device
        return ReadyWindows(
            windows,
            [devices[i] for i in s.tolist()],
            self._last_ts[s],
            self._last_arrival[s],
            ~full,
        )

    def _concat(self, parts: list[ReadyWindows]) -> ReadyWindows:
        if not parts:
            return ReadyWindows.empty(self.window_length, self.n_features)
        if len(parts) == 1:
            return parts[0]
        return ReadyWindows(
            np.concatenate([p.windows for p in parts]),
            [d for p in parts for d in p.devices],
            np.concatenate([p.end_ts for p in parts]),
            np.concatenate([p.arrival_mono for p in parts]),
            np.concatenate([p.padded for p in parts]),
        )

    # ------------------------------------------------------------------ state across restarts

    def export_state(self) -> dict[str, npt.NDArray[Any]]:
        """Every tracked device's state, least recently seen first, as plain numpy arrays.

        Keys (``n`` devices): ``version`` (0-d int), ``devices`` (n,) unicode, ``windows``
        (n, L, F) float32 — the last ``min(count, L)`` readings, oldest first, unused front
        rows zero —, ``counts`` (n,) int64, ``last_ts`` (n,) float64, ``steps`` (n, K)
        float32 and ``n_steps`` (n,) int64 (the cadence ring as stored: position
        ``i % K`` holds step ``i``), ``mismatched`` (n,) bool, and the resampling state
        ``grid_anchor`` (n,) float64 (NaN: none), ``grid_k`` (n,) int64 and
        ``last_values`` (n, F) float32. Arrival times are not exported: monotonic clocks
        do not survive a restart.
        """
        n = len(self._lru)
        slots = np.fromiter(self._lru.values(), np.int64, n)
        length = self.window_length
        c = self._count[slots]
        reading = c[:, None] - length + np.arange(length)[None, :]  # reading number of each row
        used = reading >= 0
        windows = self._ring[slots[:, None], np.where(used, reading % length, 0)]
        windows[~used] = 0.0
        return {
            "version": np.array(STATE_VERSION, np.int64),
            "devices": np.array(list(self._lru), dtype=np.str_).reshape(n),
            "windows": windows.reshape(n, length, self.n_features),
            "counts": c,
            "last_ts": self._last_ts[slots],
            "steps": self._steps[slots],
            "n_steps": self._n_steps[slots],
            "mismatched": self._mismatched[slots],
            "grid_anchor": self._grid_anchor[slots],
            "grid_k": self._grid_k[slots],
            "last_values": self._last_real[slots],
        }

    def import_state(self, state: dict[str, npt.NDArray[Any]], now_mono: float) -> int:
        """Restore ``export_state``'s devices into this empty instance; returns how many.

        Every restored device arrived at ``now_mono`` (for idle eviction). Beyond
        ``max_devices`` the most recently seen devices are kept. The verdicts are kept,
        and judged again by this instance's band at each device's next reading; with
        another band (a new model or tolerance), the step counts are recomputed from the
        steps. Raises ``ValueError`` naming the problem if the state is malformed or was
        made for another window length or number of features.
        """
        if self._slot_of:
            raise ValueError(f"import_state needs an empty DeviceBuffers; this one tracks {self.n_devices}")
        st = _checked_state(state, self.window_length, self.n_features)
        n = st["devices"].shape[0]
        keep = slice(max(0, n - self.max_devices), n)
        st = {k: v[keep] for k, v in st.items()}
        devices = [str(d) for d in st["devices"].tolist()]
        k = len(devices)
        if k == 0:
            return 0
        slots = np.asarray([self._free.pop() for _ in range(k)], np.int64)
        for device, slot in zip(devices, slots.tolist(), strict=True):
            self._claim(device, slot)
        length = self.window_length
        c = st["counts"]
        reading = c[:, None] - length + np.arange(length)[None, :]
        used = reading >= 0
        rows = np.broadcast_to(slots[:, None], used.shape)[used]
        pos = (reading % length)[used]
        vals = st["windows"][used]
        self._ring[rows, pos] = vals
        self._ring[rows, pos + length] = vals
        self._count[slots] = c
        self._last_ts[slots] = st["last_ts"]
        self._last_arrival[slots] = now_mono
        self._steps[slots] = st["steps"]
        self._n_steps[slots] = st["n_steps"]
        if self.period_band is not None:
            below, above = self._classify(st["steps"])
            in_ring = np.arange(RING_STEPS)[None, :] < np.minimum(st["n_steps"], RING_STEPS)[:, None]
            self._n_below[slots] = np.count_nonzero(below & in_ring, axis=1)
            self._n_above[slots] = np.count_nonzero(above & in_ring, axis=1)
            self._mismatched[slots] = st["mismatched"]
        # else: no band, no verdicts (a device left mismatched would never be scored).
        self._grid_anchor[slots] = st["grid_anchor"]
        self._grid_k[slots] = st["grid_k"]
        self._last_real[slots] = st["last_values"]
        return k


def _checked_state(state: dict[str, npt.NDArray[Any]], length: int, n_features: int) -> dict[str, Any]:
    """The arrays of an exported state, checked and in this module's dtypes."""
    if not isinstance(state, dict):
        raise ValueError(f"buffer state: expected a dict of arrays, got {type(state).__name__}")
    version = state.get("version")
    if not isinstance(version, np.ndarray) or version.shape != () or version.dtype.kind not in "iu":
        raise ValueError("buffer state: 'version' is missing or not an integer scalar")
    if int(version) != STATE_VERSION:
        raise ValueError(f"buffer state: version {int(version)}, this anomalyd reads version {STATE_VERSION}")
    devices = state.get("devices")
    if not isinstance(devices, np.ndarray) or devices.ndim != 1 or devices.dtype.kind != "U":
        raise ValueError("buffer state: 'devices' must be a 1-d unicode array")
    n = devices.shape[0]
    # name: (dtype kinds accepted, shape, dtype to convert to)
    spec: dict[str, tuple[str, tuple[int, ...], type[np.generic]]] = {
        "windows": ("f", (n, length, n_features), np.float32),
        "counts": ("iu", (n,), np.int64),
        "last_ts": ("f", (n,), np.float64),
        "steps": ("f", (n, RING_STEPS), np.float32),
        "n_steps": ("iu", (n,), np.int64),
        "mismatched": ("b", (n,), np.bool_),
        "grid_anchor": ("f", (n,), np.float64),
        "grid_k": ("iu", (n,), np.int64),
        "last_values": ("f", (n, n_features), np.float32),
    }
    out: dict[str, Any] = {"devices": devices}
    for name, (kinds, shape, dtype) in spec.items():
        a = state.get(name)
        if not isinstance(a, np.ndarray):
            raise ValueError(f"buffer state: {name!r} is missing or not an array")
        if a.dtype.kind not in kinds:
            raise ValueError(f"buffer state: {name!r} has dtype {a.dtype}, expected kind {kinds!r}")
        if a.shape != shape:
            raise ValueError(
                f"buffer state: {name!r} has shape {a.shape}, this buffer needs {shape} "
                f"(window length {length}, {n_features} features, {n} devices, "
                f"{RING_STEPS} cadence steps): was it saved with another model?"
            )
        out[name] = a.astype(dtype, copy=False)
    names = devices.tolist()
    if len(set(names)) != n or any(not d for d in names):
        raise ValueError("buffer state: device ids must be unique and non-empty")
    if (out["counts"] < 0).any() or (out["n_steps"] < 0).any() or (out["grid_k"] < 0).any():
        raise ValueError("buffer state: 'counts', 'n_steps' and 'grid_k' must be >= 0")
    for name in ("windows", "steps", "last_values"):
        if not np.isfinite(out[name]).all():
            raise ValueError(f"buffer state: {name!r} holds non-finite values")
    if np.isnan(out["last_ts"]).any() or (out["last_ts"] == np.inf).any():
        raise ValueError("buffer state: 'last_ts' must be finite (or -inf for a device without readings)")
    if np.isinf(out["grid_anchor"]).any():
        raise ValueError("buffer state: 'grid_anchor' must be finite (or NaN: no grid)")
    return out
