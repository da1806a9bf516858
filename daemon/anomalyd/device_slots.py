"""Which device holds which row of ``DeviceBuffers``' arrays, and who may have a row when all are taken.

``DeviceBuffers`` keeps every device's state in rows of preallocated arrays, so a device is
an index (its *slot*) for all the vectorised work, and a name only at the edges. This
module is that mapping, in both directions, with the free slots and the devices in order
of recency (least recently seen first: an ``OrderedDict``, moved to the end when a batch
touches the device).

**Admission.** A device that gets a slot is *on probation* until it has held a full
window (``promote``: the owner reports the slots whose readings since (re)start reached
the window length), and *established* from then on, until it gives the slot up. A full
window is the test because it is the first point at which the device is scored on its own
readings only, and because only a steady sender gets there: L readings in time order,
none more than ``max_gap_s`` after the one before. The ids of a burst (one reading each,
or a few) never do. Once established, a device stays so while it holds its slot, whatever
its later gaps; it loses the slot only by idle eviction (``free``), never to a newcomer.

A newcomer takes a free slot if there is one; otherwise the slot of the least recently
seen device on probation, which is reported as evicted (so the detector forgets it). If
no device is on probation (every slot holds an established one), or every device on
probation already has readings in the same batch (evicting one would lose readings
already mapped to its slot), the newcomer's reading is refused (``DEVICE_LIMIT``). So a
burst of unknown ids churns through the devices on probation, or is refused, and the
established devices keep their slots and every one of their readings.

``reserve`` slots are held back for probation: at most ``n_slots - reserve`` devices are
established at once, so that newcomers still find a slot on probation when the
established fleet has grown to fill the rest. A device with a full window while that many
are established stays on probation (scored, but a newcomer may take its slot) and is
promoted at its first reading with a full window after an established device has gone.

Whenever a device gives up its slot, the owner's ``on_release`` callback clears the row,
so a slot is clean whoever gets it next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from anomalyd.decode import Reason, Rejection

__all__ = ["DeviceSlots"]


class DeviceSlots:
    """Slots ``0..n_slots-1`` for devices; newcomers may push out only devices on probation."""

    def __init__(self, n_slots: int, on_release: Callable[[int], None], reserve: int = 0) -> None:
        if not 0 <= reserve <= n_slots:
            raise ValueError(f"reserve must be between 0 and n_slots ({n_slots}), got {reserve}")
        self.n_slots = n_slots
        #: The most devices established at once: the rest is held back for probation.
        self.max_established = n_slots - reserve
        self._on_release = on_release
        #: The device in each slot (None: free). Read by the owner to name a slot.
        self.device: list[str | None] = [None] * n_slots
        #: Whether each slot holds an established device (False: free, or on probation).
        self.established = np.zeros(n_slots, np.bool_)
        self.n_established = 0
        self._slot_of: dict[str, int] = {}
        # Every device, least recently seen first; moved to the end when a batch touches it.
        self._lru: OrderedDict[str, int] = OrderedDict()
        # The devices on probation only, in the same order: the ones a newcomer may push out.
        self._probation: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(n_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def n_probation(self) -> int:
        """Devices holding a slot on probation."""
        return len(self._probation)

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
        """Release these (used) slots, established or not; returns the devices that held them."""
        gone: list[str] = []
        for slot in slots:
            device = self.device[slot]
            assert device is not None
            self._release(device)
            self._free.append(slot)
            gone.append(device)
        return gone

    def restore(self, devices: list[str], established: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """Give each of these new devices a free slot (the caller checked there are enough).

        ``devices`` come least recently seen first; those marked ``established`` are
        established again, the most recent first while there is room, the others go on
        probation.
        """
        est = np.asarray(established, np.bool_).copy()
        over = int(np.count_nonzero(est)) - (self.max_established - self.n_established)
        if over > 0:
            est[np.flatnonzero(est)[:over]] = False
        slots = np.asarray([self._free.pop() for _ in devices], np.int64)
        for device, slot, e in zip(devices, slots.tolist(), est.tolist(), strict=True):
            self._claim(device, slot, established=e)
        return slots

    def promote(self, slots: npt.NDArray[np.int64]) -> int:
        """Establish the devices of these slots (no repeats; each holds a full window) that are
        on probation, in order, while there is room. Returns how many were promoted."""
        fresh = slots[~self.established[slots]]
        room = self.max_established - self.n_established
        if fresh.size == 0 or room <= 0:
            return 0
        fresh = fresh[:room]
        for slot in fresh.tolist():
            device = self.device[slot]
            assert device is not None
            del self._probation[device]
        self.established[fresh] = True
        self.n_established += int(fresh.size)
        return int(fresh.size)

    def _release(self, device: str) -> int:
        slot = self._slot_of.pop(device)
        del self._lru[device]
        if self.established[slot]:
            self.established[slot] = False
            self.n_established -= 1
        else:
            del self._probation[device]
        self.device[slot] = None
        self._on_release(slot)
        return slot

    def _claim(self, device: str, slot: int, *, established: bool = False) -> None:
        self._slot_of[device] = slot
        self._lru[device] = slot
        self.device[slot] = device
        if established:
            self.established[slot] = True
            self.n_established += 1
        else:
            self._probation[device] = slot

    def assign(
        self,
        devices: list[str],
        rejections: list[Rejection],
        evicted: list[str],
        topic_of: Callable[[int], str] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Slot and occurrence number (0 for a device's first reading in the batch) per reading.

        A reading that gets no slot (``DEVICE_LIMIT``, appended to ``rejections``, with the
        topic ``topic_of`` gives for its index) has slot and occurrence -1; devices on
        probation pushed out to make room are appended to ``evicted``.
        """
        slots: list[int] = []
        occ: list[int] = []
        seen: dict[int, int] = {}  # slot -> readings of it so far in this batch
        slot_of, lru, probation = self._slot_of, self._lru, self._probation
        for device in devices:
            slot = slot_of.get(device)
            if slot is None:
                slot = self._admit(device, seen, evicted)
                if slot < 0:
                    i = len(slots)  # this reading's index in the batch
                    rejections.append(self._refusal(device, "" if topic_of is None else topic_of(i)))
                    slots.append(-1)
                    occ.append(-1)
                    continue
            k = seen.get(slot, 0)
            if k == 0:
                lru.move_to_end(device)
                if probation and device in probation:  # (no lookup at all when none is)
                    probation.move_to_end(device)
            seen[slot] = k + 1
            slots.append(slot)
            occ.append(k)
        return slots, occ

    def _admit(self, device: str, seen: dict[int, int], evicted: list[str]) -> int:
        """A slot for a newcomer (on probation), or -1 when there is none to give."""
        if self._free:
            slot = self._free.pop()
        else:
            if not self._probation:
                return -1  # every slot holds an established device
            victim, slot = next(iter(self._probation.items()))
            if slot in seen:
                # The least recent device on probation is in this batch, so all of them are
                # (each one seen moves to the end): evicting one would lose readings already mapped.
                return -1
            self._release(victim)
            evicted.append(victim)
        self._claim(device, slot)
        return slot

    def _refusal(self, device: str, topic: str) -> Rejection:
        n_probation = len(self._probation)
        return Rejection(
            Reason.DEVICE_LIMIT,
            topic,
            f"device {device[:64]!r}: no slot for a new device: {self.n_established} of "
            f"{self.n_slots} slots hold established devices"
            + (
                f", and all {n_probation} devices on probation sent in this batch"
                if n_probation
                else " (only idle eviction frees them)"
            ),
            device,
        )
