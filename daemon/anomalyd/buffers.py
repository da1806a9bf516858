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

A device's row is its *slot*, given out by ``DeviceSlots`` (``anomalyd.device_slots``,
where admission is explained). A new device is *on probation* until its readings since
(re)start reach the window length (checked after every round, and after resampled
writes), then *established*. When all slots are taken, a new device takes the slot of the
least recently seen device on probation (its id is returned in ``evicted`` so the detector
forgets it), or, when there is none it may take, its reading is rejected
(``DEVICE_LIMIT``). Established devices give up their slot only in ``evict_idle``.

**Cadence** (with ``period_band``): each round's steps go to a ``CadenceTracker``
(``anomalyd.cadence_tracker``; the logic and its reasons are in ``anomalyd.cadence``)
before its readings are written. A device whose verdict is *mismatched* (its median
step outside the band) has its due windows withheld and counted (``skipped_cadence``):
a model fed at the wrong rate scores meaningless windows. Before its first verdict a
device is scored as before. Each change of verdict is reported once
(``cadence_changes``); a device that comes back into the band restarts its window, so
no scored window mixes the two cadences.

With ``resample=True`` a mismatched device is not skipped but resampled: its window
restarts at the reading that made it mismatched (the grid's anchor), and each later real
reading is replaced by the grid readings the tracker interpolates up to it, each written
and windowed here like a real reading, one at a time. That is the slow path, only for
those devices; every other device of the round is written by the vectorised one.

``export_state`` / ``import_state`` carry every tracked device (window, counts, cadence
and resampling state) across a restart of the daemon; the layout and its checks are in
``anomalyd.buffer_state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from anomalyd.buffer_state import STATE_VERSION, checked_state, unroll, write_unrolled
from anomalyd.cadence import CadenceChange
from anomalyd.cadence_tracker import CadenceTracker, RoundCadence
from anomalyd.decode import DecodedBatch, Reason, Rejection
from anomalyd.device_slots import DeviceSlots

__all__ = ["STATE_VERSION", "DeviceBuffers", "IngestResult", "ReadyWindows"]


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
    # Devices on probation whose slot went to a newcomer: the detector must forget them.
    evicted: list[str] = field(default_factory=list)
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

    ``probation_slots`` of the slots are held back for devices on probation (None: a tenth
    of ``max_devices``, rounded down; more than ``max_devices``: all of them, and then no
    device is ever established, every one may be pushed out by a newcomer).
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
        probation_slots: int | None = None,
    ) -> None:
        if max_devices < 1 or window_length < 1 or n_features < 1 or hop < 1:
            raise ValueError("max_devices, window_length, n_features and hop must be >= 1")
        if probation_slots is not None and probation_slots < 0:
            raise ValueError(f"probation_slots must be >= 0, got {probation_slots}")
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
        self._cadence = CadenceTracker(
            max_devices,
            n_features,
            band=period_band,
            sample_period_s=sample_period_s,
            max_gap_s=max_gap_s,
            resample=self.resample,
        )
        self.probation_slots = (
            max_devices // 10 if probation_slots is None else min(probation_slots, max_devices)
        )
        self._slots = DeviceSlots(max_devices, self._clear, reserve=self.probation_slots)

    @property
    def n_devices(self) -> int:
        """Devices currently tracked."""
        return len(self._slots)

    @property
    def n_established(self) -> int:
        """Tracked devices that have held a full window (only idle eviction removes them)."""
        return self._slots.n_established

    @property
    def n_probation(self) -> int:
        """Tracked devices on probation (a newcomer may take their slot)."""
        return self._slots.n_probation

    def is_established(self, device: str) -> bool:
        """Whether the device is tracked and established."""
        slot = self._slots.slot(device)
        return slot is not None and bool(self._slots.established[slot])

    @property
    def n_cadence_mismatched(self) -> int:
        """Tracked devices whose cadence is outside the band (resampled ones included)."""
        return self._cadence.n_mismatched

    @property
    def n_resampled(self) -> int:
        """Tracked devices being resampled onto the model's period (all mismatched ones, with resample)."""
        return self.n_cadence_mismatched if self.resample else 0

    def devices(self) -> list[str]:
        """The devices currently tracked."""
        return self._slots.devices()

    def readings(self, device: str) -> int:
        """Readings the device holds since it (re)started; 0 if not tracked."""
        slot = self._slots.slot(device)
        return 0 if slot is None else int(self._count[slot])

    def is_mismatched(self, device: str) -> bool:
        """Whether the device's cadence verdict is *mismatched*; False if not tracked."""
        slot = self._slots.slot(device)
        return slot is not None and bool(self._cadence.mismatched[slot])

    def median_step(self, device: str) -> float | None:
        """The device's cadence estimate (median of its recent steps, seconds).

        None when it has no step since it (re)started, or without a cadence check.
        """
        slot = self._slots.slot(device)
        return None if slot is None else self._cadence.median_step(slot)

    # ------------------------------------------------------------------ slots

    def _clear(self, slot: int) -> None:
        """A device gave up the slot: nothing of it may reach the next one."""
        self._count[slot] = 0
        self._last_ts[slot] = -np.inf
        self._cadence.release(slot)

    def evict_idle(self, now_mono: float, idle_s: float) -> list[str]:
        """Forget devices, established or not, whose newest reading arrived more than ``idle_s`` ago."""
        stale = np.flatnonzero(self._slots.used() & (self._last_arrival < now_mono - idle_s))
        return self._slots.free(stale.tolist())

    # ------------------------------------------------------------------ ingest

    def ingest(self, batch: DecodedBatch) -> IngestResult:
        """Write a batch of readings and return the windows that became ready.

        Windows come out round by round (each device's windows in time order).
        """
        acc = _Round([])
        evicted: list[str] = []
        if len(batch.devices) == 0:
            return IngestResult(0, acc.rejections, ReadyWindows.empty(self.window_length, self.n_features))
        slot_list, occ_list = self._slots.assign(batch.devices, acc.rejections, evicted, batch.topic_of)
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
                    Rejection(
                        reason,
                        batch.topic_of(int(idx[j])),
                        f"device {device[:64]!r}: ts {t!r} <= last {p!r}",
                        device,
                    )
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
        if self.period_band is not None:
            slow = self._apply_cadence(self._cadence.observe(s, ts, step, values), acc)
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
        self._promote(s)
        ready = self._windows_of(s, acc)
        if len(ready):
            acc.out.append(ready)  # copied now: the next round may overwrite these slots

    def _apply_cadence(self, found: RoundCadence, acc: _Round) -> npt.NDArray[np.bool_] | None:
        """Act on what the tracker found in a round; returns its mask for the resampling path."""
        if found.changes:
            assert self.sample_period_s is not None
            for ch in found.changes:
                if not ch.mismatched:
                    # Back in the band: restart the window, so that no scored window holds
                    # readings from before (wrong cadence, or grid readings).
                    self._count[ch.slot] = 0
                device = self._slots.device[ch.slot]
                assert device is not None
                acc.changes.append(
                    CadenceChange(device, ch.mismatched, ch.period_s, self.sample_period_s, ch.ts)
                )
        if found.anchored is not None:
            # A resampled window holds grid readings only: it starts afresh at the grid's anchor.
            self._count[found.anchored] = 0
        return found.slow

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
        """Write, in place of each slot's real reading, the grid readings up to it."""
        for j, slot in enumerate(s.tolist()):
            self._last_ts[slot] = t1[j]
            self._last_arrival[slot] = arrival[j]
            grid = self._cadence.grid_readings(slot, float(t0[j]), float(t1[j]), v1[j])
            if grid is not None:
                ready = self._write_series(slot, *grid, arrival=float(arrival[j]))
                if ready is not None:
                    acc.out.append(ready)
        self._promote(s)

    def _promote(self, written: npt.NDArray[np.int64]) -> None:
        """Establish the just-written slots (no repeats) whose window is full, if on probation."""
        full = written[self._count[written] >= self.window_length]
        if full.size:
            self._slots.promote(full)

    def _write_series(
        self,
        slot: int,
        times: npt.NDArray[np.float64],
        vals: npt.NDArray[np.float32],
        *,
        arrival: float,
    ) -> ReadyWindows | None:
        """Write readings ``(times, vals)`` of one slot one by one, copying out each window due."""
        length = self.window_length
        windows: list[npt.NDArray[np.float32]] = []
        end_ts: list[float] = []
        padded: list[bool] = []
        c = int(self._count[slot])
        for i in range(times.size):
            pos = c % length
            self._ring[slot, pos] = vals[i]
            self._ring[slot, pos + length] = vals[i]
            c += 1
            if c >= self._start and (c - self._start) % self.hop == 0:
                windows.append(self._window_one(slot, c))
                end_ts.append(float(times[i]))
                padded.append(c < length)
        self._count[slot] = c
        if not windows:
            return None
        device = self._slots.device[slot]
        assert device is not None
        return ReadyWindows(
            np.stack(windows),
            [device] * len(windows),
            np.asarray(end_ts, np.float64),
            np.full(len(windows), arrival, np.float64),
            np.asarray(padded, np.bool_),
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
            withheld = due & self._cadence.mismatched[written]
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
        devices = self._slots.device
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
        ``grid_anchor`` (n,) float64 (NaN: none), ``grid_k`` (n,) int64,
        ``last_values`` (n, F) float32, and ``established`` (n,) bool (False: on
        probation). Arrival times are not exported: monotonic clocks do not survive a
        restart.
        """
        devices, slots = self._slots.by_recency()
        c = self._count[slots]
        return {
            "version": np.array(STATE_VERSION, np.int64),
            "devices": np.array(devices, dtype=np.str_).reshape(len(devices)),
            "windows": unroll(self._ring, slots, c),
            "counts": c,
            "last_ts": self._last_ts[slots],
            "established": self._slots.established[slots],
            **self._cadence.export(slots),
        }

    def import_state(self, state: dict[str, npt.NDArray[Any]], now_mono: float) -> int:
        """Restore ``export_state``'s devices into this empty instance; returns how many.

        Every restored device arrived at ``now_mono`` (for idle eviction). Established
        devices are established again (while there is room beside the probation slots:
        the most recent ones; the others restart on probation with their window). Beyond
        ``max_devices``, established devices are kept before those on probation, the most
        recently seen first within each, so a restart during a burst of unknown ids
        does not trade real devices for them. The verdicts are kept,
        and judged again by this instance's band at each device's next reading; with
        another band (a new model or tolerance), the step counts are recomputed from the
        steps. Raises ``ValueError`` naming the problem if the state is malformed or was
        made for another window length or number of features.
        """
        if len(self._slots):
            raise ValueError(f"import_state needs an empty DeviceBuffers; this one tracks {self.n_devices}")
        st = checked_state(state, self.window_length, self.n_features)
        if st["devices"].shape[0] > self.max_devices:
            established = np.flatnonzero(st["established"])[-self.max_devices :]
            probation = np.flatnonzero(~st["established"])
            room = self.max_devices - established.size  # > 0 only if every established one fits
            kept = [established, probation[probation.size - room :]] if room else [established]
            keep = np.sort(np.concatenate(kept))  # still least recently seen first
            st = {k: v[keep] for k, v in st.items()}
        devices = [str(d) for d in st["devices"].tolist()]
        k = len(devices)
        if k == 0:
            return 0
        slots = self._slots.restore(devices, st["established"])
        write_unrolled(self._ring, slots, st["counts"], st["windows"])
        self._count[slots] = st["counts"]
        self._last_ts[slots] = st["last_ts"]
        self._last_arrival[slots] = now_mono
        self._cadence.restore(slots, st)
        return k
