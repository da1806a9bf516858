"""Which device holds which row of ``DeviceBuffers``' arrays, and who goes when they are full.

``DeviceBuffers`` keeps every device's state in rows of preallocated arrays, so a device is
an index (its *slot*) for all the vectorised work, and a name only at the edges. This
module is that mapping, in both directions, with the free slots and the devices in order
of recency (least recently seen first: an ``OrderedDict``, moved to the end when a batch
touches the device).

When all slots are taken, a new device takes the slot of the least recently seen one
(reported as evicted, so the detector forgets it); only if every tracked device has
readings in the same batch is the newcomer rejected (``DEVICE_LIMIT``). Whenever a device
gives up its slot, the owner's ``on_release`` callback clears the row, so a slot is clean
whoever gets it next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from anomalyd.decode import Reason, Rejection

__all__ = ["DeviceSlots"]


class DeviceSlots:
    """Slots ``0..n_slots-1`` for devices, with least-recently-seen eviction."""

    def __init__(self, n_slots: int, on_release: Callable[[int], None]) -> None:
        self.n_slots = n_slots
        self._on_release = on_release
        #: The device in each slot (None: free). Read by the owner to name a slot.
        self.device: list[str | None] = [None] * n_slots
        self._slot_of: dict[str, int] = {}
        # Least recently seen first; moved to the end when a batch touches the device.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(n_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot(self, device: str) -> int | None:
        """The device's slot; None if not tracked."""
        return self._slot_of.get(device)

    def devices(self) -> list[str]:
        """The tracked devices, in the order they got their slots."""
        return list(self._slot_of)

    def by_recency(self) -> tuple[list[str], npt.NDArray[np.int64]]:
        """The tracked devices and their slots, least recently seen first."""
        return list(self._lru), np.fromiter(self._lru.values(), np.int64, len(self._lru))

    def used(self) -> npt.NDArray[np.bool_]:
        """Which slots hold a device."""
        return np.fromiter((d is not None for d in self.device), bool, self.n_slots)

    def free(self, slots: list[int]) -> list[str]:
        """Release these (used) slots; returns the devices that held them."""
        gone: list[str] = []
        for slot in slots:
            device = self.device[slot]
            assert device is not None
            self._release(device)
            self._free.append(slot)
            gone.append(device)
        return gone

    def claim_free(self, devices: list[str]) -> npt.NDArray[np.int64]:
        """Give each of these new devices a free slot (the caller checked there are enough)."""
        slots = np.asarray([self._free.pop() for _ in devices], np.int64)
        for device, slot in zip(devices, slots.tolist(), strict=True):
            self._claim(device, slot)
        return slots

    def _release(self, device: str) -> int:
        slot = self._slot_of.pop(device)
        del self._lru[device]
        self.device[slot] = None
        self._on_release(slot)
        return slot

    def _claim(self, device: str, slot: int) -> None:
        self._slot_of[device] = slot
        self._lru[device] = slot
        self.device[slot] = device

    def assign(
        self, devices: list[str], rejections: list[Rejection], evicted: list[str]
    ) -> tuple[list[int], list[int]]:
        """Slot and occurrence number (0 for a device's first reading in the batch) per reading.

        A reading that gets no slot (``DEVICE_LIMIT``, appended to ``rejections``) has
        slot and occurrence -1; devices evicted to make room are appended to ``evicted``.
        """
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
                            f"device {device[:64]!r}: all {self.n_slots} slots busy in this batch",
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
