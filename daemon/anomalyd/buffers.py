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
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from anomalyd.decode import DecodedBatch, Reason, Rejection

__all__ = ["DeviceBuffers", "IngestResult", "ReadyWindows"]


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


class DeviceBuffers:
    """Rolling windows for up to ``max_devices`` devices. Owned by the pipeline thread."""

    def __init__(  # noqa: PLR0917 - positional signature kept for existing callers
        self,
        max_devices: int,
        window_length: int,
        n_features: int,
        hop: int,
        warmup: Literal["wait", "pad"],
        max_gap_s: float,
    ) -> None:
        if max_devices < 1 or window_length < 1 or n_features < 1 or hop < 1:
            raise ValueError("max_devices, window_length, n_features and hop must be >= 1")
        if warmup not in ("wait", "pad"):
            raise ValueError(f"warmup must be 'wait' or 'pad', got {warmup!r}")
        self.max_devices = max_devices
        self.window_length = window_length
        self.n_features = n_features
        self.hop = hop
        self.warmup = warmup
        self.max_gap_s = max_gap_s
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
        self._device: list[str | None] = [None] * max_devices
        self._slot_of: dict[str, int] = {}
        # Least recently seen first; moved to the end when a batch touches the device.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(max_devices - 1, -1, -1))

    @property
    def n_devices(self) -> int:
        """Devices currently tracked."""
        return len(self._slot_of)

    def devices(self) -> list[str]:
        """The devices currently tracked."""
        return list(self._slot_of)

    def readings(self, device: str) -> int:
        """Readings the device holds since it (re)started; 0 if not tracked."""
        slot = self._slot_of.get(device)
        return 0 if slot is None else int(self._count[slot])

    # ------------------------------------------------------------------ slots

    def _release(self, device: str) -> int:
        slot = self._slot_of.pop(device)
        del self._lru[device]
        self._device[slot] = None
        self._count[slot] = 0
        self._last_ts[slot] = -np.inf
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
        rejections: list[Rejection] = []
        evicted: list[str] = []
        if len(batch.devices) == 0:
            return IngestResult(0, rejections, ReadyWindows.empty(self.window_length, self.n_features))
        slot_list, occ_list = self._map_slots(batch.devices, rejections, evicted)
        slots = np.asarray(slot_list, np.int64)
        occ = np.asarray(occ_list, np.int64)
        order = np.argsort(occ, kind="stable")
        order = order[occ[order] >= 0]  # readings without a slot (DEVICE_LIMIT) are already rejected
        # Round r = the r-th reading of each device in this batch: no slot repeats in a round.
        bounds = np.flatnonzero(np.diff(occ[order])) + 1
        accepted = 0
        resets = 0
        out: list[ReadyWindows] = []
        for idx in np.split(order, bounds):
            written, r = self._write_round(batch, idx, slots[idx], rejections)
            accepted += written.size
            resets += r
            ready = self._windows_of(written)
            if len(ready):
                out.append(ready)  # copied now: the next round may overwrite these slots
        return IngestResult(accepted, rejections, self._concat(out), evicted, resets)

    def _write_round(
        self,
        batch: DecodedBatch,
        idx: npt.NDArray[np.int64],
        s: npt.NDArray[np.int64],
        rejections: list[Rejection],
    ) -> tuple[npt.NDArray[np.int64], int]:
        """Write one reading per device (``s`` has no repeats). Returns (slots written, resets)."""
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
                rejections.append(Rejection(reason, "", f"device {device[:64]!r}: ts {t!r} <= last {p!r}"))
            keep = ~bad
            idx, s, ts, prev = idx[keep], s[keep], ts[keep], prev[keep]
        gap = (self._count[s] > 0) & (ts - prev > self.max_gap_s)
        resets = int(np.count_nonzero(gap))
        if resets:
            self._count[s[gap]] = 0  # the device warms up again from this reading
        length = self.window_length
        pos = self._count[s] % length
        values = batch.values[idx]
        self._ring[s, pos] = values
        self._ring[s, pos + length] = values
        self._count[s] += 1
        self._last_ts[s] = ts
        self._last_arrival[s] = batch.arrival_mono[idx]
        return s, resets

    def _windows_of(self, written: npt.NDArray[np.int64]) -> ReadyWindows:
        """Copy out the windows of the just-written slots that are due."""
        c = self._count[written]
        due = (c >= self._start) & ((c - self._start) % self.hop == 0)
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
