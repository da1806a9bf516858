"""Dynamic batching of ready windows, like Triton's dynamic batcher.

Windows queue in a preallocated staging array, oldest first. A batch goes when
``max_batch`` windows are waiting, or when the oldest waiting window has waited
``max_delay_s`` since it was added (then everything waiting goes, up to ``max_batch``).
Batches are *views* into the staging array: no copy between the rings and the model
beyond the one ``DeviceBuffers`` already made. A view stays valid until the next
``add()``, which compacts the staging area; the pipeline thread scores every batch it
popped before it adds more, so that is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.buffers import ReadyWindows

__all__ = ["Batch", "Batcher"]


@dataclass
class Batch:
    """A batch of windows for one ``model.run``; arrays are views valid until the next ``add``."""

    windows: npt.NDArray[np.float32]  # (B, L, F)
    devices: list[str]
    end_ts: npt.NDArray[np.float64]  # (B,)
    arrival_mono: npt.NDArray[np.float64]  # (B,)
    padded: npt.NDArray[np.bool_]  # (B,)

    def __len__(self) -> int:
        return len(self.devices)


class Batcher:
    """FIFO of windows with size and age triggers. Owned by the pipeline thread."""

    def __init__(self, max_batch: int, max_delay_s: float, window_length: int, n_features: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.window_length = window_length
        self.n_features = n_features
        self._head = 0  # index of the oldest pending window
        self._n = 0  # pending windows: [head, head + n)
        self._devices: list[str] = []  # pending devices only (head-relative)
        capacity = 4 * max_batch
        self._windows: npt.NDArray[np.float32] = np.empty((capacity, window_length, n_features), np.float32)
        self._end_ts: npt.NDArray[np.float64] = np.empty(capacity)
        self._arrival: npt.NDArray[np.float64] = np.empty(capacity)
        self._padded: npt.NDArray[np.bool_] = np.zeros(capacity, np.bool_)
        self._added: npt.NDArray[np.float64] = np.empty(capacity)  # now_mono at add()

    def _grow(self, capacity: int) -> None:
        n, h = self._n, self._head
        windows = np.empty((capacity, self.window_length, self.n_features), np.float32)
        windows[:n] = self._windows[h : h + n]
        self._windows = windows
        for name in ("_end_ts", "_arrival", "_padded", "_added"):
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype)
            new[:n] = old[h : h + n]
            setattr(self, name, new)
        self._head = 0

    @property
    def pending(self) -> int:
        """Windows waiting for a batch."""
        return self._n

    def add(self, ready: ReadyWindows, now_mono: float) -> None:
        """Queue windows (copied into staging). Invalidates batches popped earlier."""
        k = len(ready)
        if k == 0:
            return
        n, h = self._n, self._head
        capacity = self._windows.shape[0]
        if n + k > capacity:
            # Grow (amortised doubling): a burst must not be dropped here; the intake
            # queue upstream is what bounds memory.
            new_capacity = capacity
            while new_capacity < n + k:
                new_capacity *= 2
            self._grow(new_capacity)
        elif h + n + k > capacity:
            # Compact: move the pending windows to the front (views handed out are now stale).
            for arr in (self._windows, self._end_ts, self._arrival, self._padded, self._added):
                arr[:n] = arr[h : h + n].copy()
            self._head = 0
        start = self._head + n
        end = start + k
        self._windows[start:end] = ready.windows
        self._end_ts[start:end] = ready.end_ts
        self._arrival[start:end] = ready.arrival_mono
        self._padded[start:end] = ready.padded
        self._added[start:end] = now_mono
        self._devices.extend(ready.devices)
        self._n += k

    def _take(self, b: int) -> Batch:
        h = self._head
        batch = Batch(
            self._windows[h : h + b],
            self._devices[:b],
            self._end_ts[h : h + b],
            self._arrival[h : h + b],
            self._padded[h : h + b],
        )
        del self._devices[:b]
        self._head += b
        self._n -= b
        if self._n == 0:
            # Nothing left: the next add() writes at the front again. Views handed out
            # stay intact until then, as promised.
            self._head = 0
        return batch

    def pop_due(self, now_mono: float, force: bool = False) -> list[Batch]:
        """Batches ready to score, oldest first: every full one, then the partial one if its
        oldest window has waited ``max_delay_s`` (or ``force``: flush everything, for shutdown)."""
        out: list[Batch] = []
        while self._n >= self.max_batch:
            out.append(self._take(self.max_batch))
        # Deadline form, the same comparison as time_until_due(): with `now - added >= delay`
        # rounding could make one say "due" and the other "not yet", and the loop would spin.
        if self._n and (force or now_mono >= self._added[self._head] + self.max_delay_s):
            out.append(self._take(self._n))
        return out

    def time_until_due(self, now_mono: float) -> float | None:
        """Seconds until ``pop_due`` would return a batch (0: now); None when nothing waits."""
        if self._n == 0:
            return None
        if self._n >= self.max_batch:
            return 0.0
        return max(0.0, float(self._added[self._head]) + self.max_delay_s - now_mono)
