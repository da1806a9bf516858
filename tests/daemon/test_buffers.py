"""Device buffers: windows, hop, warm-up, ordering, gaps, eviction, and a reference-model property."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalyd.buffers import DeviceBuffers, ReadyWindows
from anomalyd.decode import DecodedBatch, Reason

F = 2


def batch(rows: list[tuple[str, float, float]]) -> DecodedBatch:
    """(device, ts, value) rows; value v becomes features [v, -v]; arrival_mono = ts + 0.5."""
    ts = np.array([r[1] for r in rows], np.float64)
    vals = np.array([[r[2], -r[2]] for r in rows], np.float32).reshape(len(rows), F)
    return DecodedBatch([r[0] for r in rows], ts, vals, ts + 0.5, [])


def buffers(
    L: int = 4,  # noqa: N803 - L is the window length everywhere in this project
    hop: int = 1,
    warmup: Literal["wait", "pad"] = "wait",
    max_devices: int = 16,
    max_gap_s: float = 100.0,
) -> DeviceBuffers:
    return DeviceBuffers(max_devices, L, F, hop, warmup, max_gap_s)


def firsts(ready: ReadyWindows) -> list[list[float]]:
    return ready.windows[:, :, 0].tolist()


def test_windows_appear_after_l_readings_and_are_the_last_l() -> None:
    b = buffers(L=3)
    r = b.ingest(batch([("a", 1, 1), ("a", 2, 2)]))
    assert r.accepted == 2
    assert len(r.ready) == 0
    r = b.ingest(batch([("a", 3, 3), ("a", 4, 4), ("a", 5, 5)]))
    assert firsts(r.ready) == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert r.ready.windows[:, :, 1].tolist() == [[-1, -2, -3], [-2, -3, -4], [-3, -4, -5]]
    assert r.ready.devices == ["a"] * 3
    assert r.ready.end_ts.tolist() == [3, 4, 5]
    assert r.ready.arrival_mono.tolist() == [3.5, 4.5, 5.5]
    assert not r.ready.padded.any()
    assert r.ready.windows.dtype == np.float32
    assert r.ready.windows.flags.c_contiguous


def test_ring_wraps_many_times() -> None:
    b = buffers(L=3)
    for t in range(1, 50):
        r = b.ingest(batch([("a", t, t)]))
    assert firsts(r.ready) == [[47, 48, 49]]


def test_windows_are_copies() -> None:
    b = buffers(L=2)
    r = b.ingest(batch([("a", 1, 1), ("a", 2, 2)]))
    b.ingest(batch([("a", t, 100 + t) for t in range(3, 10)]))
    assert firsts(r.ready) == [[1, 2]]


def test_many_devices_one_round() -> None:
    b = buffers(L=2)
    b.ingest(batch([(d, 1, i) for i, d in enumerate("abcd")]))
    r = b.ingest(batch([(d, 2, 10 + i) for i, d in enumerate("dcba")]))
    assert r.ready.devices == ["d", "c", "b", "a"]
    assert firsts(r.ready) == [[3, 10], [2, 11], [1, 12], [0, 13]]


def test_hop() -> None:
    b = buffers(L=3, hop=2)
    r = b.ingest(batch([("a", t, t) for t in range(1, 10)]))
    # Windows at 3, 5, 7, 9 readings.
    assert firsts(r.ready) == [[1, 2, 3], [3, 4, 5], [5, 6, 7], [7, 8, 9]]


def test_pad_warmup() -> None:
    b = buffers(L=4, warmup="pad", hop=1)
    r = b.ingest(batch([("a", 1, 5), ("a", 2, 6), ("b", 1, 9)]))
    assert firsts(r.ready) == [[5, 5, 5, 5], [9, 9, 9, 9], [5, 5, 5, 6]]
    assert r.ready.devices == ["a", "b", "a"]
    assert r.ready.padded.tolist() == [True, True, True]
    r = b.ingest(batch([("a", 3, 7), ("a", 4, 8), ("a", 5, 9)]))
    assert firsts(r.ready) == [[5, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9]]
    assert r.ready.padded.tolist() == [True, False, False]


def test_pad_with_hop_starts_at_the_first_reading() -> None:
    b = buffers(L=3, warmup="pad", hop=2)
    r = b.ingest(batch([("a", t, t) for t in range(1, 6)]))
    assert firsts(r.ready) == [[1, 1, 1], [1, 2, 3], [3, 4, 5]]
    assert r.ready.padded.tolist() == [True, False, False]


def test_out_of_order_and_duplicate() -> None:
    b = buffers(L=2)
    r = b.ingest(batch([("a", 5, 1), ("a", 5, 2), ("a", 4, 3), ("a", 6, 4), ("b", 1, 0)]))
    assert r.accepted == 3
    assert [x.reason for x in r.rejections] == [Reason.DUPLICATE, Reason.OUT_OF_ORDER]
    assert "'a'" in r.rejections[0].detail
    assert firsts(r.ready) == [[1, 4]]
    r = b.ingest(batch([("a", 6, 9)]))
    assert [x.reason for x in r.rejections] == [Reason.DUPLICATE]


def test_non_finite_ts_is_rejected() -> None:
    b = buffers(L=2)
    r = b.ingest(batch([("a", float("nan"), 1), ("a", 1, 2)]))
    assert [x.reason for x in r.rejections] == [Reason.BAD_TIMESTAMP]
    assert r.accepted == 1


def test_gap_resets_the_device() -> None:
    b = buffers(L=3, max_gap_s=10)
    r = b.ingest(batch([("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("a", 4, 4)]))
    assert len(r.ready) == 2
    r = b.ingest(batch([("a", 20, 20), ("a", 21, 21)]))
    assert r.resets == 1
    assert len(r.ready) == 0  # warming up again
    assert b.readings("a") == 2
    r = b.ingest(batch([("a", 22, 22)]))
    assert firsts(r.ready) == [[20, 21, 22]]
    assert b.ingest(batch([("a", 32, 0)])).resets == 0  # exactly max_gap_s is not a gap


def test_lru_eviction() -> None:
    b = buffers(L=2, max_devices=2)
    b.ingest(batch([("a", 1, 1), ("b", 1, 1)]))
    b.ingest(batch([("a", 2, 2)]))  # b is now the least recently seen
    r = b.ingest(batch([("c", 1, 1)]))
    assert r.evicted == ["b"]
    assert b.n_devices == 2
    assert b.readings("b") == 0
    r = b.ingest(batch([("b", 5, 5), ("b", 6, 6)]))  # b comes back fresh; a goes
    assert r.evicted == ["a"]
    assert firsts(r.ready) == [[5, 6]]


def test_device_limit_only_when_every_slot_is_in_the_batch() -> None:
    b = buffers(L=2, max_devices=2)
    r = b.ingest(batch([("a", 1, 1), ("b", 1, 1), ("c", 1, 1), ("a", 2, 2)]))
    assert [x.reason for x in r.rejections] == [Reason.DEVICE_LIMIT]
    assert r.evicted == []
    assert r.accepted == 3
    assert r.ready.devices == ["a"]


def test_evict_idle() -> None:
    b = buffers(L=2)
    b.ingest(batch([("a", 1, 1), ("b", 50, 1)]))  # arrival_mono 1.5 and 50.5
    assert b.evict_idle(now_mono=60.0, idle_s=30.0) == ["a"]
    assert b.n_devices == 1
    assert b.evict_idle(now_mono=60.0, idle_s=30.0) == []
    r = b.ingest(batch([("a", 0.5, 1)]))  # a was forgotten: an old ts is fine again
    assert r.accepted == 1


def test_empty_batch() -> None:
    r = buffers().ingest(DecodedBatch.empty(F))
    assert r.accepted == 0
    assert r.ready.windows.shape == (0, 4, F)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hop"):
        DeviceBuffers(1, 4, 2, 0, "wait", 1.0)
    with pytest.raises(ValueError, match="warmup"):
        DeviceBuffers(1, 4, 2, 1, "later", 1.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference model


class Reference:
    """Plain-Python model of DeviceBuffers, reading by reading."""

    def __init__(self, L: int, hop: int, warmup: str, max_devices: int, max_gap: float) -> None:  # noqa: N803
        self.L, self.hop, self.max_devices, self.max_gap = L, hop, max_devices, max_gap
        self.start = L if warmup == "wait" else 1
        self.hist: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()

    def ingest(
        self, rows: list[tuple[str, float, float]]
    ) -> tuple[dict[str, list[tuple[list[float], bool]]], dict[str, int]]:
        windows: dict[str, list[tuple[list[float], bool]]] = {}
        counts = {"accepted": 0, "resets": 0, "evicted": 0}
        touched: set[str] = set()
        keep: list[tuple[str, float, float]] = []
        for dev, ts, v in rows:  # slot mapping pass, as in the real thing
            if dev not in self.lru:
                if len(self.lru) >= self.max_devices:
                    victim = next(iter(self.lru))
                    if victim in touched:
                        counts[Reason.DEVICE_LIMIT] = counts.get(Reason.DEVICE_LIMIT, 0) + 1
                        continue
                    del self.lru[victim]
                    self.hist.pop(victim)
                    self.last.pop(victim)
                    counts["evicted"] += 1
                self.lru[dev] = None
                self.hist[dev] = []
                self.last[dev] = -np.inf
            if dev not in touched:
                self.lru.move_to_end(dev)
                touched.add(dev)
            keep.append((dev, ts, v))
        for dev, ts, v in keep:
            if ts <= self.last[dev]:
                r = Reason.DUPLICATE if ts == self.last[dev] else Reason.OUT_OF_ORDER
                counts[r] = counts.get(r, 0) + 1
                continue
            if self.hist[dev] and ts - self.last[dev] > self.max_gap:
                self.hist[dev] = []
                counts["resets"] += 1
            self.last[dev] = ts
            self.hist[dev].append(v)
            counts["accepted"] += 1
            c = len(self.hist[dev])
            if c >= self.start and (c - self.start) % self.hop == 0:
                tail = self.hist[dev][-self.L :]
                windows.setdefault(dev, []).append(([tail[0]] * (self.L - len(tail)) + tail, c < self.L))
        return windows, counts


@given(
    L=st.integers(1, 5),
    hop=st.integers(1, 3),
    warmup=st.sampled_from(["wait", "pad"]),
    max_devices=st.integers(1, 4),
    batches=st.lists(
        st.lists(
            st.tuples(st.sampled_from("abcde"), st.sampled_from([-2.0, 0.0, 1.0, 1.0, 1.0, 2.0, 30.0])),
            max_size=12,
        ),
        min_size=1,
        max_size=6,
    ),
)
@settings(max_examples=300, deadline=None)
def test_windows_match_reference_model(
    L: int,  # noqa: N803
    hop: int,
    warmup: Literal["wait", "pad"],
    max_devices: int,
    batches: list[list[tuple[str, float]]],
) -> None:
    real = DeviceBuffers(max_devices, L, F, hop, warmup, 10.0)
    ref = Reference(L, hop, warmup, max_devices, 10.0)
    clock = dict.fromkeys("abcde", 1000.0)
    value = 0.0
    for steps in batches:
        rows = []
        for dev, dt in steps:
            clock[dev] += dt  # 0: duplicate, <0: out of order, 30: gap
            value += 1.0
            rows.append((dev, clock[dev], value))
        want, counts = ref.ingest(rows)
        got = real.ingest(batch(rows))
        per_device: dict[str, list[tuple[list[float], bool]]] = {}
        for dev, w, pad in zip(got.ready.devices, got.ready.windows, got.ready.padded, strict=True):
            per_device.setdefault(dev, []).append((w[:, 0].tolist(), bool(pad)))
            assert w[:, 1].tolist() == [-x for x in w[:, 0].tolist()]
        assert per_device == want
        assert got.accepted == counts["accepted"]
        assert got.resets == counts["resets"]
        assert len(got.evicted) == counts["evicted"]
        for reason in (Reason.DUPLICATE, Reason.OUT_OF_ORDER, Reason.DEVICE_LIMIT):
            assert sum(r.reason == reason for r in got.rejections) == counts.get(reason, 0)
        assert real.n_devices == len(ref.lru)
        assert got.ready.padded.dtype == np.bool_
        assert got.ready.end_ts.shape == got.ready.arrival_mono.shape == (len(got.ready),)
