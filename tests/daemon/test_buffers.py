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
    out: list[list[float]] = ready.windows[:, :, 0].tolist()
    return out


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


def test_a_newcomer_takes_the_slot_of_the_least_recent_device_on_probation() -> None:
    b = buffers(L=2, max_devices=2)
    b.ingest(batch([("a", 1, 1), ("b", 1, 1)]))
    b.ingest(batch([("a", 2, 2)]))  # a: a full window, established; b: on probation
    assert b.is_established("a")
    assert not b.is_established("b")
    r = b.ingest(batch([("c", 1, 1)]))
    assert r.evicted == ["b"]
    assert b.n_devices == 2
    assert b.readings("b") == 0
    # b comes back fresh. Before admission existed a, the least recently seen, went; now
    # a is established and only c, on probation, can give up its slot.
    r = b.ingest(batch([("b", 5, 5), ("b", 6, 6)]))
    assert r.evicted == ["c"]
    assert firsts(r.ready) == [[5, 6]]
    assert b.is_established("a")
    assert b.readings("a") == 2


def test_device_limit_only_when_every_device_on_probation_is_in_the_batch() -> None:
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
    """Plain-Python model of DeviceBuffers, reading by reading.

    Admission: a device is on probation until it has L readings since (re)start, then
    established (at most ``max_devices - probation`` at once); a newcomer takes a free
    slot, else the least recently seen device on probation not seen in this batch, else it
    is refused.
    """

    def __init__(  # noqa: PLR0917
        self,
        L: int,  # noqa: N803
        hop: int,
        warmup: str,
        max_devices: int,
        max_gap: float,
        probation: int | None = None,
    ) -> None:
        self.L, self.hop, self.max_devices, self.max_gap = L, hop, max_devices, max_gap
        self.start = L if warmup == "wait" else 1
        reserve = max_devices // 10 if probation is None else min(probation, max_devices)
        self.max_established = max_devices - reserve
        self.hist: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.probation: OrderedDict[str, None] = OrderedDict()
        self.established: set[str] = set()

    def forget(self, dev: str) -> None:
        del self.lru[dev]
        self.probation.pop(dev, None)
        self.established.discard(dev)
        self.hist.pop(dev)
        self.last.pop(dev)

    def admit(
        self, rows: list[tuple[str, float, float]], counts: dict[str, int]
    ) -> list[tuple[str, float, float]]:
        """The slot mapping pass, as in the real thing: the rows that got a slot."""
        touched: set[str] = set()
        keep: list[tuple[str, float, float]] = []
        for dev, ts, v in rows:
            if dev not in self.lru:
                if len(self.lru) >= self.max_devices:
                    victim = next(iter(self.probation), None)
                    if victim is None or victim in touched:
                        counts[Reason.DEVICE_LIMIT] = counts.get(Reason.DEVICE_LIMIT, 0) + 1
                        continue
                    self.forget(victim)
                    counts["evicted"] += 1
                self.lru[dev] = None
                self.probation[dev] = None
                self.hist[dev] = []
                self.last[dev] = -np.inf
            if dev not in touched:
                self.lru.move_to_end(dev)
                if dev in self.probation:
                    self.probation.move_to_end(dev)
                touched.add(dev)
            keep.append((dev, ts, v))
        return keep

    def promote(self, full: list[tuple[int, int, str]]) -> None:
        """Establish devices that held a full window, in the real order: by round (the
        device's k-th reading of the batch), then by position in the batch."""
        for _, _, dev in sorted(full):
            if dev in self.probation and len(self.established) < self.max_established:
                del self.probation[dev]
                self.established.add(dev)

    def ingest(
        self, rows: list[tuple[str, float, float]]
    ) -> tuple[dict[str, list[tuple[list[float], bool]]], dict[str, int]]:
        windows: dict[str, list[tuple[list[float], bool]]] = {}
        counts = {"accepted": 0, "resets": 0, "evicted": 0}
        occurrence: dict[str, int] = {}
        full: list[tuple[int, int, str]] = []
        for pos, (dev, ts, v) in enumerate(self.admit(rows, counts)):
            k = occurrence[dev] = occurrence.get(dev, -1) + 1
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
            if c >= self.L:
                full.append((k, pos, dev))
            if c >= self.start and (c - self.start) % self.hop == 0:
                tail = self.hist[dev][-self.L :]
                windows.setdefault(dev, []).append(([tail[0]] * (self.L - len(tail)) + tail, c < self.L))
        self.promote(full)
        return windows, counts


@given(
    L=st.integers(1, 5),
    hop=st.integers(1, 3),
    warmup=st.sampled_from(["wait", "pad"]),
    max_devices=st.integers(1, 4),
    probation=st.one_of(st.none(), st.integers(0, 5)),
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
def test_windows_match_reference_model(  # noqa: PLR0917
    L: int,  # noqa: N803
    hop: int,
    warmup: Literal["wait", "pad"],
    max_devices: int,
    probation: int | None,
    batches: list[list[tuple[str, float]]],
) -> None:
    real = DeviceBuffers(max_devices, L, F, hop, warmup, 10.0, probation_slots=probation)
    ref = Reference(L, hop, warmup, max_devices, 10.0, probation)
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
        assert sorted(d for d in real.devices() if real.is_established(d)) == sorted(ref.established)
        assert real.n_probation == len(ref.probation)
        assert got.ready.padded.dtype == np.bool_
        assert got.ready.end_ts.shape == got.ready.arrival_mono.shape == (len(got.ready),)


# --------------------------------------------------------------------------- cadence

P = 1.0  # the model's sample period in these tests
BAND = (0.75, 1.25)  # period_band(1.0, None, None, 0.25)


def cadence_buffers(
    L: int = 4,  # noqa: N803
    resample: bool = False,
    warmup: Literal["wait", "pad"] = "wait",
    max_devices: int = 16,
    max_gap_s: float = 60.0,
) -> DeviceBuffers:
    return DeviceBuffers(
        max_devices, L, F, 1, warmup, max_gap_s, period_band=BAND, sample_period_s=P, resample=resample
    )


def series(device: str, ts: list[float] | np.ndarray, value: float = 0.0) -> list[tuple[str, float, float]]:
    """Rows of one device; the value of a reading is its timestamp (plus ``value``)."""
    return [(device, float(t), float(t) + value) for t in ts]


def test_a_1hz_device_with_jitter_and_lost_readings_is_never_mismatched() -> None:
    rng = np.random.default_rng(7)
    ts = 1000.0 + np.arange(600) + rng.uniform(-0.2, 0.2, 600)  # every timestamp ±20 %
    ts = np.delete(ts, np.arange(5, 600, 17))  # and every 17th reading lost
    b = cadence_buffers()
    windows = 0
    for chunk in np.array_split(ts, 40):  # batches of about 14 readings: many rounds
        r = b.ingest(batch(series("a", chunk)))
        assert r.cadence_changes == []
        assert r.skipped_cadence == 0
        windows += len(r.ready)
    assert windows == len(ts) - 3  # every reading from the 4th on closes a window
    assert b.n_cadence_mismatched == 0
    assert not b.is_mismatched("a")
    step = b.median_step("a")
    assert step is not None
    assert 0.75 < step < 1.25


@pytest.mark.parametrize("period", [5.0, 0.5])
def test_a_device_at_another_cadence_is_mismatched_after_8_steps(period: float) -> None:
    b = cadence_buffers(L=4)
    ts = 1000.0 + period * np.arange(30)
    r = b.ingest(batch(series("a", ts) + series("ok", 1000.0 + np.arange(30))))
    assert r.accepted == 60
    # Reading 9 (8 steps) gives the verdict: windows of readings 4..8 went out before it.
    assert [c.device for c in r.cadence_changes] == ["a"]
    change = r.cadence_changes[0]
    assert change.mismatched
    assert change.period_s == pytest.approx(period)
    assert change.expected_s == P
    assert change.ts == ts[8]
    assert r.ready.devices.count("a") == 5
    assert r.ready.end_ts[np.array(r.ready.devices) == "a"].tolist() == ts[3:8].tolist()
    assert r.skipped_cadence == 30 - 8  # every later window is withheld, counted
    assert r.ready.devices.count("ok") == 27
    assert b.n_cadence_mismatched == 1
    assert b.n_resampled == 0
    assert b.is_mismatched("a")
    r = b.ingest(batch(series("a", ts[-1] + period * np.arange(1, 11))))
    assert len(r.ready) == 0
    assert r.skipped_cadence == 10
    assert r.cadence_changes == []  # reported once


def test_a_device_back_at_the_model_cadence_is_ok_again_from_a_fresh_window() -> None:
    b = cadence_buffers(L=4)
    slow = 1000.0 + 5.0 * np.arange(12)
    b.ingest(batch(series("a", slow)))
    assert b.is_mismatched("a")
    fast = slow[-1] + np.arange(1, 40)
    rows = series("a", fast)
    back: list[float] = []
    firsts_after: list[list[float]] = []
    for row in rows:  # one reading at a time, to see exactly where the verdict flips
        r = b.ingest(batch([row]))
        if r.cadence_changes:
            assert not r.cadence_changes[0].mismatched
            assert 0.75 <= r.cadence_changes[0].period_s <= 1.25
            back.append(row[1])
            assert b.readings("a") == 1  # the window restarted at this reading
        elif not back:
            assert len(r.ready) == 0  # still mismatched: nothing scored
        firsts_after += firsts(r.ready)
    assert len(back) == 1
    assert not b.is_mismatched("a")
    # Scored windows hold only readings from the flip on: the first one starts there.
    assert firsts_after[0] == [back[0], back[0] + 1, back[0] + 2, back[0] + 3]
    assert all(w[0] >= back[0] for w in firsts_after)


def test_a_gap_restarts_the_steps_and_keeps_the_verdict() -> None:
    b = cadence_buffers(L=4, max_gap_s=60.0)
    b.ingest(batch(series("a", 1000.0 + 5.0 * np.arange(12))))
    assert b.is_mismatched("a")
    r = b.ingest(batch(series("a", [2000.0, 2001.0, 2002.0])))
    assert r.resets == 1
    assert r.cadence_changes == []  # 2 steps since the gap: no new verdict yet
    assert b.is_mismatched("a")
    assert b.median_step("a") == 1.0  # the step across the gap is not a step
    assert r.skipped_cadence == 0  # not a full window since the gap
    r = b.ingest(batch(series("a", 2003.0 + np.arange(6))))  # the 8th step since the gap: ok
    assert [c.mismatched for c in r.cadence_changes] == [False]
    assert r.cadence_changes[0].ts == 2008.0


def test_eviction_clears_the_cadence_state() -> None:
    # L = 16: 12 readings give a verdict (8 steps) but no full window, so a is still on
    # probation and a newcomer may take its slot (an established device would keep it).
    b = cadence_buffers(L=16, max_devices=2)
    b.ingest(batch(series("a", 1000.0 + 5.0 * np.arange(12))))
    assert b.n_cadence_mismatched == 1
    assert not b.is_established("a")
    b.ingest(batch(series("b", [1.0]) + series("c", [1.0])))  # a is the least recent: evicted
    assert b.n_cadence_mismatched == 0
    r = b.ingest(batch(series("a", 5000.0 + np.arange(20))))  # back fresh at 1 Hz (b goes)
    assert r.evicted == ["b"]
    assert r.cadence_changes == []
    assert len(r.ready) == 5
    b.ingest(batch(series("a", 6000.0 + 5.0 * np.arange(12))))
    assert b.n_cadence_mismatched == 1
    assert sorted(b.evict_idle(now_mono=1e9, idle_s=1.0)) == ["a", "c"]  # established a too
    assert b.n_cadence_mismatched == 0


def test_without_a_band_nothing_is_checked() -> None:
    b = DeviceBuffers(4, 4, F, 1, "wait", 60.0, resample=True)
    r = b.ingest(batch(series("a", 1000.0 + 5.0 * np.arange(30))))
    assert len(r.ready) == 27
    assert r.cadence_changes == []
    assert b.n_cadence_mismatched == b.n_resampled == 0
    assert b.median_step("a") is None


def test_band_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="sample_period_s"):
        DeviceBuffers(4, 4, F, 1, "wait", 60.0, period_band=BAND)
    with pytest.raises(ValueError, match="period_band"):
        DeviceBuffers(4, 4, F, 1, "wait", 60.0, period_band=(1.2, 0.8), sample_period_s=1.0)


def wave(t: np.ndarray) -> np.ndarray:
    """A signal that is not linear, so interpolation is visible."""
    return np.asarray(10.0 * np.sin(t / 3.0), np.float64)


@pytest.mark.parametrize(("period", "grid_per_reading"), [(5.0, 5.0), (0.5, 0.5), (0.37, 0.37)])
def test_resampling_puts_readings_on_the_model_grid(period: float, grid_per_reading: float) -> None:
    L = 4  # noqa: N806
    b = cadence_buffers(L=L, resample=True)
    ts = 1000.0 + period * np.arange(80)
    rows = [("a", float(t), float(v)) for t, v in zip(ts, wave(ts), strict=True)]
    got_windows: list[np.ndarray] = []
    got_end: list[float] = []
    real_windows = 0
    anchor = None
    for i, row in enumerate(rows):
        r = b.ingest(batch([row]))
        assert r.skipped_cadence == 0
        if r.cadence_changes:
            assert i == 8
            anchor = row[1]
        if anchor is None:
            real_windows += len(r.ready)
            continue
        assert (r.ready.arrival_mono == row[1] + 0.5).all()  # arrival of the real reading
        got_windows += list(r.ready.windows)
        got_end += r.ready.end_ts.tolist()
    assert anchor is not None
    assert anchor == ts[8]
    assert real_windows == 5  # readings 4..8, before the verdict
    assert b.n_resampled == b.n_cadence_mismatched == 1
    end = np.array(got_end)
    # Every window ends on the grid anchor + k·P, one P after the previous one, with no hole.
    k = (end - anchor) / P
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    np.testing.assert_allclose(np.diff(end), P)
    assert end[0] == pytest.approx(anchor + (L - 1) * P)  # the window restarted at the anchor
    assert end[-1] <= ts[-1] < end[-1] + P
    grid_readings = int(np.floor((ts[-1] - anchor) / P + 1e-9)) + 1  # the anchor included
    assert len(end) == grid_readings - (L - 1)
    # Window values: the real signal interpolated linearly at the window's grid times.
    for w, e in zip(got_windows, end, strict=True):
        times = e - P * np.arange(L - 1, -1, -1)
        want = np.interp(times, ts, wave(ts))
        np.testing.assert_allclose(w[:, 0], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(w[:, 1], -w[:, 0], rtol=1e-6)
    windows_per_real = len(end) / (len(ts) - 9)
    assert windows_per_real == pytest.approx(grid_per_reading, rel=0.1)


def test_resampled_device_back_at_the_model_cadence_is_scored_on_its_own_readings() -> None:
    b = cadence_buffers(L=4, resample=True)
    slow = 1000.0 + 5.0 * np.arange(12)
    b.ingest(batch(series("a", slow)))
    assert b.n_resampled == 1
    fast = slow[-1] + 1.0 + np.arange(30)
    r = b.ingest(batch(series("a", fast)))
    [change] = r.cadence_changes
    assert not change.mismatched
    assert b.n_resampled == 0
    after = r.ready.end_ts >= change.ts
    # From the flip on, windows are real readings only: window ends are the readings' ts.
    ends = r.ready.end_ts[after].tolist()
    assert ends == [t for t in fast.tolist() if t >= change.ts + 3]
    assert firsts(r.ready)[int(np.argmax(after))][0] == change.ts


def test_resampling_after_a_gap_anchors_again() -> None:
    b = cadence_buffers(L=2, resample=True, max_gap_s=60.0)
    b.ingest(batch(series("a", 1000.0 + 5.0 * np.arange(12))))
    r = b.ingest(batch(series("a", [2000.3, 2005.3])))
    assert r.resets == 1
    assert r.ready.end_ts.tolist() == pytest.approx([2001.3, 2002.3, 2003.3, 2004.3, 2005.3])


# --------------------------------------------------------------------------- state export


def mixed_state() -> list[list[tuple[str, float, float]]]:
    """Batches that leave devices in every state: ok, warming up, mismatched, resampled, fresh."""
    return [
        series("ok", 1000.0 + np.arange(20)) + series("slow", 1000.0 + 5.0 * np.arange(14)),
        series("fast", 1000.0 + 0.5 * np.arange(11)) + series("young", [1003.0, 1004.0]),
        series("ok", [1020.0, 1021.5]) + series("slow", [1070.0]),
    ]


@pytest.mark.parametrize(("resample", "warmup"), [(False, "wait"), (True, "wait"), (True, "pad")])
def test_export_import_round_trip_continues_identically(
    resample: bool, warmup: Literal["wait", "pad"]
) -> None:
    a = cadence_buffers(L=5, resample=resample, warmup=warmup)
    for rows in mixed_state():
        a.ingest(batch(rows))
    state = a.export_state()
    assert state["devices"].tolist() == ["fast", "young", "ok", "slow"]  # least recently seen first
    assert state["windows"].shape == (4, 5, F)
    assert state["windows"][1, :3].tolist() == [[0, 0]] * 3  # young: 2 readings, front rows zero
    assert state["windows"][1, 3:, 0].tolist() == [1003.0, 1004.0]
    assert state["counts"].tolist()[1] == 2
    assert state["mismatched"].tolist() == [True, False, False, True]

    b = cadence_buffers(L=5, resample=resample, warmup=warmup)
    assert b.import_state(state, now_mono=50.0) == 4
    assert b.devices() == state["devices"].tolist()
    assert sorted(b.devices()) == sorted(a.devices())
    assert b.n_cadence_mismatched == a.n_cadence_mismatched == 2
    assert b.n_resampled == a.n_resampled
    for dev in a.devices():
        assert b.readings(dev) == a.readings(dev)
        assert b.median_step(dev) == a.median_step(dev)
    nxt = [
        series("ok", 1022.0 + np.arange(8)) + series("slow", 1075.0 + 5.0 * np.arange(6)),
        series("fast", 1005.5 + 0.5 * np.arange(12)) + series("young", 1005.0 + np.arange(7)),
        series("fast", 1012.0 + np.arange(10)) + series("slow", 1105.0 + np.arange(12)),
    ]
    for rows in nxt:
        ra, rb = a.ingest(batch(rows)), b.ingest(batch(rows))
        assert rb.ready.devices == ra.ready.devices
        np.testing.assert_array_equal(rb.ready.windows, ra.ready.windows)
        np.testing.assert_array_equal(rb.ready.end_ts, ra.ready.end_ts)
        np.testing.assert_array_equal(rb.ready.padded, ra.ready.padded)
        assert rb.cadence_changes == ra.cadence_changes
        assert rb.skipped_cadence == ra.skipped_cadence
        assert rb.resets == ra.resets
    assert len(a.export_state()["devices"]) == 4
    # Arrival times restart at now_mono: only the devices not heard since are idle.
    assert b.evict_idle(now_mono=55.0, idle_s=1.0) == []


def test_import_keeps_the_most_recent_devices_and_their_clock() -> None:
    a = cadence_buffers()
    for i, dev in enumerate("abcde"):
        a.ingest(batch(series(dev, 1000.0 + i + np.arange(5))))
    b = cadence_buffers(max_devices=3)
    assert b.import_state(a.export_state(), now_mono=100.0) == 3
    assert b.devices() == ["c", "d", "e"]
    assert b.n_established == 3  # full windows: established before, established again
    # Every slot holds an established device (no probation slots with 3): a newcomer is
    # refused until one idles out. (Before admission existed, c, the least recent, went.)
    r = b.ingest(batch(series("f", [100.0])))  # arrives at 100.5
    assert r.evicted == []
    assert [x.reason for x in r.rejections] == [Reason.DEVICE_LIMIT]
    assert b.evict_idle(now_mono=100.9, idle_s=1.0) == []
    assert sorted(b.evict_idle(now_mono=101.2, idle_s=1.0)) == ["c", "d", "e"]  # restored "at" 100
    assert b.ingest(batch(series("f", [101.0]))).accepted == 1


def test_empty_state_round_trip() -> None:
    state = cadence_buffers().export_state()
    assert state["devices"].shape == (0,)
    assert cadence_buffers().import_state(state, now_mono=0.0) == 0


def test_import_into_a_buffer_without_a_band_forgets_the_verdicts() -> None:
    a = cadence_buffers()
    a.ingest(batch(series("slow", 1000.0 + 5.0 * np.arange(12))))
    b = buffers()
    b.import_state(a.export_state(), now_mono=0.0)
    assert b.n_cadence_mismatched == 0
    assert len(b.ingest(batch(series("slow", [1060.0]))).ready) == 1


def _state() -> dict[str, np.ndarray]:
    a = cadence_buffers()
    a.ingest(batch(series("x", 1000.0 + np.arange(6)) + series("y", 1000.0 + np.arange(3))))
    return a.export_state()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("windows"), "'windows' is missing"),
        (lambda s: s.update(windows=s["windows"][:, :3]), r"'windows' has shape \(2, 3, 2\), this buffer"),
        (lambda s: s.update(last_values=np.zeros((2, 3), np.float32)), "'last_values' has shape"),
        (lambda s: s.update(steps=s["steps"][:, :8]), "cadence steps"),
        (lambda s: s.update(counts=s["counts"].astype(np.float64)), "'counts' has dtype float64"),
        (lambda s: s.update(counts=-s["counts"]), ">= 0"),
        (lambda s: s.update(devices=np.array(["x", "x"])), "unique"),
        (lambda s: s.update(devices=np.array([1, 2])), "unicode"),
        (lambda s: s["windows"].__setitem__((0, 0, 0), np.nan), "non-finite"),
        (lambda s: s["last_ts"].__setitem__(0, np.nan), "'last_ts'"),
        (lambda s: s.update(version=np.array(2)), "version 2"),
        (lambda s: s.update(established=np.array([1, 0])), "'established' must be a bool array"),
        (
            lambda s: s.update(established=np.array([True])),
            r"'established' must be a bool array of shape \(2,\)",
        ),
    ],
)
def test_malformed_state_is_refused_clearly(change: object, match: str) -> None:
    state = _state()
    change(state)  # type: ignore[operator]
    b = cadence_buffers()
    with pytest.raises(ValueError, match=match):
        b.import_state(state, now_mono=0.0)
    assert b.n_devices == 0


def test_import_needs_an_empty_buffer() -> None:
    b = cadence_buffers()
    b.ingest(batch(series("z", [1.0])))
    with pytest.raises(ValueError, match="empty"):
        b.import_state(_state(), now_mono=0.0)


def test_import_into_another_window_length_is_refused() -> None:
    with pytest.raises(ValueError, match="another model"):
        cadence_buffers(L=6).import_state(_state(), now_mono=0.0)


# --------------------------------------------------------------------------- cadence reference


class CadenceReference(Reference):
    """The reference model plus the cadence rule, in plain Python, reading by reading."""

    def __init__(self, L: int, hop: int, warmup: str, max_devices: int, max_gap: float) -> None:  # noqa: N803
        super().__init__(L, hop, warmup, max_devices, max_gap)
        self.steps: dict[str, list[float]] = {}
        self.mis: dict[str, bool] = {}

    def run(
        self, rows: list[tuple[str, float, float]]
    ) -> tuple[dict[str, list[list[float]]], int, list[tuple[str, bool, float, float]]]:
        windows: dict[str, list[list[float]]] = {}
        skipped = 0
        changes: list[tuple[str, bool, float, float]] = []
        occurrence: dict[str, int] = {}
        full: list[tuple[int, int, str]] = []
        for pos, (dev, ts, v) in enumerate(self.admit(rows, {"evicted": 0})):
            k = occurrence[dev] = occurrence.get(dev, -1) + 1
            if dev not in self.steps:  # a newcomer
                self.steps[dev], self.mis[dev] = [], False
            if ts <= self.last[dev]:
                continue
            if np.isfinite(self.last[dev]):
                step = ts - self.last[dev]
                if step > self.max_gap:
                    self.hist[dev] = []
                    self.steps[dev] = []
                else:
                    self.steps[dev].append(step)
                    recent = self.steps[dev][-16:]
                    if len(self.steps[dev]) >= 8:
                        median = float(np.median(recent))
                        mis = not BAND[0] <= median <= BAND[1]
                        if mis != self.mis[dev]:
                            self.mis[dev] = mis
                            changes.append((dev, mis, median, ts))
                            if not mis:
                                self.hist[dev] = []
            self.last[dev] = ts
            self.hist[dev].append(v)
            c = len(self.hist[dev])
            if c >= self.L:
                full.append((k, pos, dev))
            if c >= self.start and (c - self.start) % self.hop == 0:
                if self.mis[dev]:
                    skipped += 1
                else:
                    tail = self.hist[dev][-self.L :]
                    windows.setdefault(dev, []).append([tail[0]] * (self.L - len(tail)) + tail)
        self.promote(full)
        return windows, skipped, changes

    def forget(self, dev: str) -> None:
        super().forget(dev)
        self.steps.pop(dev)
        self.mis.pop(dev)


@given(
    L=st.integers(1, 4),
    max_devices=st.integers(1, 3),
    batches=st.lists(
        st.lists(
            st.tuples(st.sampled_from("abcd"), st.sampled_from([-1.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 30.0])),
            max_size=25,
        ),
        min_size=1,
        max_size=8,
    ),
)
@settings(max_examples=200, deadline=None)
def test_cadence_matches_reference_model(
    L: int,  # noqa: N803
    max_devices: int,
    batches: list[list[tuple[str, float]]],
) -> None:
    real = DeviceBuffers(max_devices, L, F, 1, "pad", 10.0, period_band=BAND, sample_period_s=P)
    ref = CadenceReference(L, 1, "pad", max_devices, 10.0)
    clock = dict.fromkeys("abcd", 1000.0)
    value = 0.0
    for steps in batches:
        rows = []
        for dev, dt in steps:
            clock[dev] += dt  # <0: out of order, 0.5 / 2: off cadence, 30: gap
            value += 1.0
            rows.append((dev, clock[dev], value))
        want, skipped, changes = ref.run(rows)
        got = real.ingest(batch(rows))
        per_device: dict[str, list[list[float]]] = {}
        for dev, w in zip(got.ready.devices, got.ready.windows, strict=True):
            per_device.setdefault(dev, []).append(w[:, 0].tolist())
        assert per_device == want
        assert got.skipped_cadence == skipped
        # Each device's changes in order; across devices within one batch no order is promised
        # (the buffers settle devices one after another, the reference row by row).
        got_changes = [(c.device, c.mismatched, c.period_s, c.ts) for c in got.cadence_changes]
        assert sorted(got_changes, key=lambda c: c[0]) == sorted(changes, key=lambda c: c[0])
        assert real.n_cadence_mismatched == sum(ref.mis.values())
