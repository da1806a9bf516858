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

    Bounded by messages (``maxsize``) and by bytes (``max_bytes``: payload and topic of
    every queued message, plus a fixed overhead each), so that a flood of large array
    messages cannot grow the daemon's memory: past either bound a message is refused, to
    be counted as dropped (``queue_full``), and the lag a flood can build inside the daemon
    stays bounded too. ``put`` never blocks: when full it returns False and the caller
    counts the drop. A deque's append/popleft are atomic, so no lock is taken per message;
    the byte count is two counters each written by one thread only (bytes put, bytes
    taken), so neither needs a lock either; the event only wakes a consumer that is
    waiting (setting it costs a lock, so only when clear).
    """

    def __init__(self, maxsize: int, max_bytes: int | None = None) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._items: collections.deque[RawMessage] = collections.deque()
        self._nonempty = threading.Event()
        self._bytes_put = 0  # written by the producer only
        self._bytes_taken = 0  # written by the consumer only

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held (payloads, topics and per-message overhead), as counted by ``put``."""
        return self._bytes_put - self._bytes_taken

    @property
    def fill(self) -> float:
        """How full the queue is: the larger of its message and byte fractions (0 to 1)."""
        by_count = len(self._items) / self.maxsize
        if self.max_bytes is None:
            return by_count
        return max(by_count, self.nbytes / self.max_bytes)

    def put(self, item: RawMessage) -> bool:
        """Append ``item``; False if the queue is full (the item is not added)."""
        # Only this producer appends, so the length and the bytes can only shrink between
        # the check and the append.
        if len(self._items) >= self.maxsize:
            return False
        size = _size(item)
        if self.max_bytes is not None and self._bytes_put - self._bytes_taken + size > self.max_bytes:
            return False
        self._bytes_put += size
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
        taken = 0
        for _ in range(min(max_items, len(items))):
            msg = pop()
            out.append(msg)
            taken += _size(msg)
            if budget >= 0:
                budget -= len(msg.payload)
                if budget <= 0:
                    break
        self._bytes_taken += taken
        if items:
            self._nonempty.set()
        return out


#: What a queued message costs beyond its payload and topic (the RawMessage, its floats,
#: the deque slot), roughly: enough that a flood of tiny messages is bounded too.
_OVERHEAD_BYTES = 200


def _size(msg: RawMessage) -> int:
    return len(msg.payload) + len(msg.topic) + _OVERHEAD_BYTES
