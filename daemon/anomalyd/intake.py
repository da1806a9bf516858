"""The intake queue: the hand-over from the MQTT network thread to the pipeline thread.

The network thread (``anomalyd.mqtt``) only stamps each telemetry message with its arrival
time and puts it here; the pipeline thread takes them in bulk. Bounded: when it is full the
message is dropped and counted (``queue_full``), never blocking the network thread.
"""

from __future__ import annotations

import collections
import threading

from anomalyd.decode import RawMessage

__all__ = ["IntakeQueue"]


class IntakeQueue:
    """Bounded single-producer (network thread), single-consumer (pipeline thread) queue.

    ``put`` never blocks: when full it returns False and the caller counts the drop.
    A deque's append/popleft are atomic, so no lock is taken per message; the event only
    wakes a consumer that is waiting (setting it costs a lock, so only when clear).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[RawMessage] = collections.deque()
        self._nonempty = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: RawMessage) -> bool:
        """Append ``item``; False if the queue is full (the item is not added)."""
        # Only this producer appends, so the length can only shrink between check and append.
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        if not self._nonempty.is_set():
            self._nonempty.set()
        return True

    def wait(self, timeout: float | None) -> bool:
        """Block until something may be queued or ``timeout`` passes; True if woken."""
        return self._nonempty.wait(timeout)

    def wake(self) -> None:
        """Wake a waiting consumer (shutdown, reload) without queueing anything."""
        self._nonempty.set()

    def drain(self, max_items: int, max_bytes: int | None = None) -> list[RawMessage]:
        """Take up to ``max_items`` messages, oldest first, stopping once their payloads add
        up to ``max_bytes`` (at least one message is taken)."""
        # Clear before taking: a put after this point sets the event again, so no
        # wake-up is lost; a put before it is taken below.
        self._nonempty.clear()
        items = self._items
        out: list[RawMessage] = []
        pop = items.popleft
        budget = max_bytes if max_bytes is not None else -1
        for _ in range(min(max_items, len(items))):
            msg = pop()
            out.append(msg)
            if budget >= 0:
                budget -= len(msg.payload)
                if budget <= 0:
                    break
        if items:
            self._nonempty.set()
        return out
