"""Windows, gaps, time splits, scaling, subsampling and the data hash."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from anomalyd.errors import DataError
from anomalyd_train.data import Segment
from anomalyd_train.windows import (
    Scaler,
    dataset_sha256,
    held_out_origins,
    level_noise_offset,
    log_scale,
    make_windows,
    split_by_origin,
    split_by_time,
    split_segments,
    subsample,
)


def seg(
    n: int, f: int = 2, t0: float = 0.0, *, origin: str = "dev", tag: float = 0.0, labels: bool = True
) -> Segment:
    """A segment whose values encode (tag, sample index) so windows can be traced back."""
    idx = np.arange(n, dtype=np.float32)
    values = np.stack([idx + tag + k * 1000 for k in range(f)], axis=1).astype(np.float32)
    return Segment(
        ts=t0 + np.arange(n, dtype=np.float64),
        values=values,
        labels=(np.arange(n) % 7 == 3) if labels else None,
        origin=origin,
    )


# ------------------------------------------------------------------------- split_segments


def test_split_segments_cuts_at_gaps_only() -> None:
    ts = np.array([0, 1, 2, 10, 11, 11.5, 20], dtype=np.float64)
    assert split_segments(ts, 3.0) == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_split_segments_step_equal_to_max_gap_is_contiguous() -> None:
    assert split_segments(np.array([0.0, 3.0, 6.0]), 3.0) == [slice(0, 3)]


def test_split_segments_cuts_at_non_forward_steps() -> None:
    ts = np.array([0.0, 1.0, 1.0, 2.0, 0.5])
    assert split_segments(ts, 5.0) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_split_segments_empty_and_bad_gap() -> None:
    assert split_segments(np.zeros(0), 1.0) == []
    with pytest.raises(ValueError, match="positive"):
        split_segments(np.arange(3.0), 0.0)


@given(
    steps=hnp.arrays(np.float64, st.integers(0, 60), elements=st.floats(-2, 10, allow_nan=False)),
    max_gap=st.floats(0.1, 8),
)
def test_split_segments_properties(steps: np.ndarray, max_gap: float) -> None:
    ts = np.concatenate([[100.0], 100.0 + np.cumsum(steps)])
    slices = split_segments(ts, max_gap)
    # The slices tile 0..n in order, none empty.
    assert slices[0].start == 0
    assert slices[-1].stop == len(ts)
    for a, b in itertools.pairwise(slices):
        assert a.stop == b.start
    for sl in slices:
        assert sl.stop > sl.start
        inner = np.diff(ts[sl])
        assert np.all((inner > 0) & (inner <= max_gap))  # contiguous inside
    for sl in slices[1:]:
        step = ts[sl.start] - ts[sl.start - 1]
        assert not (0 < step <= max_gap)  # every cut is at a gap or a non-forward step


# --------------------------------------------------------------------------- make_windows


def test_windows_shape_and_content() -> None:
    s = seg(10, f=3)
    ws = make_windows([s], length=4)
    assert ws.windows.shape == (7, 4, 3)
    assert ws.windows.dtype == np.float32
    np.testing.assert_array_equal(ws.windows[0], s.values[0:4])
    np.testing.assert_array_equal(ws.windows[-1], s.values[6:10])
    np.testing.assert_array_equal(ws.end_ts, s.ts[3:])
    assert ws.labels is not None
    assert s.labels is not None
    np.testing.assert_array_equal(ws.labels, s.labels[3:])
    assert not ws.padded.any()
    assert ws.dropped_segments == 0
    assert len(ws) == 7


def test_univariate_windows() -> None:
    s = seg(12, f=1)
    ws = make_windows([s], length=5, hop=2)
    assert ws.windows.shape == (4, 5, 1)
    np.testing.assert_array_equal(ws.windows[1, :, 0], s.values[2:7, 0])


def test_windows_never_span_segments() -> None:
    # Two segments of one device around a gap: each window holds one segment's values only.
    a = seg(8, tag=0.0)
    b = seg(9, t0=1000.0, tag=0.5)
    ws = make_windows([a, b], length=5)
    assert len(ws) == (8 - 5 + 1) + (9 - 5 + 1)
    frac = ws.windows[:, :, 0] % 1
    assert np.all((frac == 0).all(axis=1) | (frac == 0.5).all(axis=1))
    # Within a window the time steps are consecutive samples.
    assert np.all(np.diff(ws.windows[:, :, 0], axis=1) == 1)


def test_windows_hop() -> None:
    s = seg(20)
    ws = make_windows([s], length=5, hop=3)
    ends = np.arange(4, 20, 3)
    np.testing.assert_array_equal(ws.end_ts, s.ts[ends])
    assert len(ws) == (20 - 5) // 3 + 1


def test_short_segment_dropped_without_padding() -> None:
    ws = make_windows([seg(3), seg(10, t0=100)], length=5)
    assert ws.dropped_segments == 1
    assert len(ws) == 6
    np.testing.assert_array_equal(ws.end_ts, 100 + np.arange(4, 10))


def test_pre_padding_gives_every_sample_a_window() -> None:
    s = seg(6)
    ws = make_windows([s], length=4, padding="pre")
    assert len(ws) == 6
    np.testing.assert_array_equal(ws.end_ts, s.ts)
    # The first window is the first sample repeated (edge padding, not zeros).
    np.testing.assert_array_equal(ws.windows[0], np.repeat(s.values[:1], 4, axis=0))
    np.testing.assert_array_equal(ws.windows[2], np.concatenate([s.values[[0]], s.values[:3]]))
    np.testing.assert_array_equal(ws.windows[3], s.values[0:4])
    np.testing.assert_array_equal(ws.padded, [True, True, True, False, False, False])
    assert ws.dropped_segments == 0


def test_pre_padding_keeps_short_segments() -> None:
    ws = make_windows([seg(2), seg(1, t0=50)], length=5, padding="pre")
    assert len(ws) == 3
    assert ws.padded.all()
    assert ws.dropped_segments == 0
    np.testing.assert_array_equal(ws.windows[2], np.repeat(seg(1).values, 5, axis=0))


def test_no_windows_gives_empty_arrays_with_shape() -> None:
    ws = make_windows([seg(3, f=4)], length=5)
    assert ws.windows.shape == (0, 5, 4)
    assert ws.end_ts.shape == (0,)
    assert ws.labels is not None
    assert ws.labels.shape == (0,)
    assert ws.dropped_segments == 1


def test_labels_only_when_all_segments_have_them() -> None:
    ws = make_windows([seg(6), seg(6, t0=50, labels=False)], length=3)
    assert ws.labels is None


def test_bad_window_arguments() -> None:
    with pytest.raises(ValueError, match="length"):
        make_windows([seg(5)], length=1)
    with pytest.raises(ValueError, match="hop"):
        make_windows([seg(5)], length=2, hop=0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=5),
    length=st.integers(2, 12),
    hop=st.integers(1, 5),
    padding=st.sampled_from(["none", "pre"]),
)
def test_make_windows_matches_slices(lengths: list[int], length: int, hop: int, padding: str) -> None:
    segments = [seg(n, f=2, t0=1000.0 * i, tag=i / 10) for i, n in enumerate(lengths)]
    ws = make_windows(segments, length=length, hop=hop, padding=padding)  # type: ignore[arg-type]

    expected_windows = []
    expected_ts = []
    for s in segments:
        n = len(s.ts)
        if padding == "pre":
            if n == 0:
                continue
            ref = np.concatenate([np.repeat(s.values[:1], length - 1, axis=0), s.values])
            # Each window ends at sample e of the segment; in ref that is index e + L - 1.
            ends = list(range(0, n, hop))
            assert len(ends) == (n - 1) // hop + 1
            expected_windows += [ref[e : e + length] for e in ends]
        else:
            ends = list(range(length - 1, n, hop))
            assert len(ends) == ((n - length) // hop + 1 if n >= length else 0)
            expected_windows += [s.values[e - length + 1 : e + 1] for e in ends]
        expected_ts += [s.ts[e] for e in ends]

    assert len(ws) == len(expected_windows)
    assert ws.windows.shape == (len(expected_windows), length, 2)
    for got, want in zip(ws.windows, expected_windows, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ws.end_ts, np.asarray(expected_ts, dtype=np.float64))
    n_short = sum(1 for n in lengths if n < length)
    assert ws.dropped_segments == (n_short if padding == "none" else 0)


# -------------------------------------------------------------------------------- scaling


def test_scaler_standardises_training_rows() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 3)) * [1, 10, 0.01] + [5, -100, 0.04]).astype(np.float32)
    sc = Scaler.fit(x, ["a", "b", "c"])
    assert sc.mean.dtype == np.float32
    assert sc.std.dtype == np.float32
    z = sc.transform(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)
    # Works on windows (n, L, F) too: the last axis is the features.
    w = x[:40].reshape(4, 10, 3)
    np.testing.assert_allclose(sc.transform(w), z[:40].reshape(4, 10, 3), rtol=1e-6)


def test_scaler_clips_only_the_features_with_a_limit() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 2)).astype(np.float32)
    plain = Scaler.fit(x, ["a", "b"])
    assert plain.clipped == [False, False]
    clipped = dataclasses.replace(plain, clip=np.array([1.5, 0.0], np.float32))
    assert clipped.clipped == [True, False]
    far = np.array([[40.0, 40.0], [-40.0, -40.0], [0.1, 0.1]], np.float32)
    z, z_plain = clipped.transform(far), plain.transform(far)
    np.testing.assert_array_equal(z[:, 0], [1.5, -1.5, z_plain[2, 0]])
    np.testing.assert_array_equal(z[:, 1], z_plain[:, 1])
    for bad in ([1.0], [1.0, -1.0], [np.nan, 0.0]):
        with pytest.raises(ValueError, match="clip needs 2 limits"):
            dataclasses.replace(plain, clip=np.array(bad, np.float32))


def test_scaler_from_segments_equals_from_values() -> None:
    segments = [seg(10, t0=0), seg(7, t0=100, tag=0.3)]
    a = Scaler.fit(segments, ["x", "y"])
    b = Scaler.fit(np.concatenate([s.values for s in segments]), ["x", "y"])
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)


def test_scaler_constant_column_names_the_feature() -> None:
    x = np.ones((50, 2), dtype=np.float32)
    x[:, 0] = np.arange(50)
    x[:, 1] = 101.325
    with pytest.raises(DataError, match="'pressure' is constant"):
        Scaler.fit(x, ["temperature", "pressure"])


def test_scaler_keeps_small_but_real_variation() -> None:
    # A vibration channel in g: tiny values, but real variation relative to its level.
    x = np.random.default_rng(1).normal(0.04, 1e-4, size=(100, 1)).astype(np.float32)
    sc = Scaler.fit(x, ["vibration"])
    assert sc.std[0] > 0


def test_scaler_log_scale_for_a_noise_that_grows_with_the_level() -> None:
    # A vibration RMS: 2 mg of additive sensor noise plus 4 % of the level, on a quiet and on
    # a loud machine (each a slow ramp); a temperature beside it stays on its own scale.
    rng = np.random.default_rng(2)
    quiet, loud = np.linspace(0.008, 0.015, 3000), np.linspace(0.10, 0.14, 3000)
    level = np.concatenate([quiet, loud])
    vib = level * np.exp(rng.normal(0.0, 0.04, level.size)) + rng.normal(0.0, 0.002, level.size)
    temp = rng.normal(60.0, 2.0, level.size)
    x = np.stack([temp, vib], axis=1).astype(np.float32)
    sc = Scaler.fit(x, ["temperature", "vibration"], log_features=["vibration"])
    assert sc.logged == [False, True]
    offset = float(sc.log_offset[1])
    # The fitted noise a + b·x is 0.002 + 0.04·x: the offset a / b is 0.05.
    assert offset == pytest.approx(0.05, rel=0.3)
    assert offset == pytest.approx(level_noise_offset([x[:, 1]]), rel=1e-6)
    expected = np.log(np.maximum(x[:, 1].astype(np.float64), 0.0) + offset)
    assert sc.mean[1] == pytest.approx(expected.mean(), rel=1e-5)
    assert sc.std[1] == pytest.approx(expected.std(), rel=1e-4)
    z = sc.transform(x)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - sc.mean[0]) / sc.std[0], rtol=1e-5)
    # The point of it: the loud machine's sample-to-sample noise, 2.7x the quiet one's in g,
    # is about the quiet one's once logged.
    raw = np.diff(x[3000:, 1]).std() / np.diff(x[:3000, 1]).std()
    logged = np.diff(z[3000:, 1]).std() / np.diff(z[:3000, 1]).std()
    assert raw > 2.4
    assert 0.8 < logged < 1.25
    # Windows, and the documented formula (a value below 0 reads as 0).
    np.testing.assert_allclose(sc.transform(x[:40].reshape(4, 10, 2)), z[:40].reshape(4, 10, 2), rtol=1e-6)
    neg = np.array([[60.0, -0.5]], np.float32)
    assert sc.transform(neg)[0, 1] == pytest.approx((np.log(offset) - sc.mean[1]) / sc.std[1], rel=1e-5)
    np.testing.assert_array_equal(log_scale(x, sc.log_offset)[:, 0], x[:, 0])
    # From segments: each one's differences on its own, the same offset here.
    t = np.arange(3000.0)
    segments = [Segment(t, x[:3000], None, "quiet"), Segment(t, x[3000:], None, "loud")]
    by_segment = Scaler.fit(segments, ["temperature", "vibration"], log_features=["vibration"])
    assert by_segment.log_offset[1] == pytest.approx(offset, rel=0.05)


def test_scaler_log_scale_refuses_what_it_cannot_take() -> None:
    x = np.random.default_rng(3).normal(0.0, 1.0, size=(2000, 2)).astype(np.float32)
    with pytest.raises(DataError, match="'b' is below 0 in"):
        Scaler.fit(x, ["a", "b"], log_features=["b"])
    with pytest.raises(DataError, match=r"\['c'\] are not among"):
        Scaler.fit(x, ["a", "b"], log_features=["c"])
    # Noise that does not grow with the level: a log would only stretch the quiet end.
    flat = np.abs(x) + 1.0
    with pytest.raises(DataError, match="'b' cannot be log-scaled: its noise does not grow with its level"):
        Scaler.fit(flat, ["a", "b"], log_features=["b"])


def test_scaler_needs_rows() -> None:
    with pytest.raises(DataError, match="no training rows"):
        Scaler.fit([], ["a"])
    with pytest.raises(DataError, match="no training rows"):
        Scaler.fit(np.zeros((0, 1), dtype=np.float32), ["a"])


# ---------------------------------------------------------------------------- split by time


def test_split_by_time_is_ordered_disjoint_and_complete() -> None:
    # Two devices, each with a gap; device b's segments are given out of time order.
    segments = [
        seg(60, t0=0, origin="a"),
        seg(40, t0=500, origin="a"),
        seg(30, t0=900, origin="b"),
        seg(70, t0=100, origin="b"),
    ]
    train, val, cal = split_by_time(segments, 0.2, 0.1)
    for origin in ("a", "b"):
        parts = [[s for s in part if s.origin == origin] for part in (train, val, cal)]
        ts = [np.concatenate([s.ts for s in p]) for p in parts]
        # Earliest → latest, no overlap: train < validation < calibration in time.
        assert ts[0].max() < ts[1].min()
        assert ts[1].max() < ts[2].min()
        # Every row lands in exactly one part.
        all_ts = np.sort(np.concatenate([s.ts for s in segments if s.origin == origin]))
        np.testing.assert_array_equal(np.sort(np.concatenate(ts)), all_ts)
        assert [len(t) for t in ts] == [70, 20, 10]
    # Every part is still strictly increasing inside, and values follow their timestamps.
    for s in train + val + cal:
        assert np.all(np.diff(s.ts) > 0)
        np.testing.assert_array_equal(s.values[:, 0], s.ts - s.ts[0] + s.values[0, 0])


def test_split_by_time_cuts_a_straddling_segment_in_two() -> None:
    s = seg(100, origin="m")
    train, val, cal = split_by_time([s], 0.15, 0.15)
    assert [len(p) for p in (train, val, cal)] == [1, 1, 1]
    assert [len(p[0].ts) for p in (train, val, cal)] == [70, 15, 15]
    assert val[0].ts[0] == s.ts[70]
    assert cal[0].ts[0] == s.ts[85]
    assert train[0].labels is not None
    assert s.labels is not None
    np.testing.assert_array_equal(train[0].labels, s.labels[:70])
    # No window can join the parts: windows are cut per segment.
    ws = make_windows(val, length=5)
    assert ws.end_ts.min() >= s.ts[70 + 4]


def test_split_by_time_zero_fractions() -> None:
    train, val, cal = split_by_time([seg(10)], 0.0, 0.0)
    assert (len(train), len(val), len(cal)) == (1, 0, 0)
    assert train[0].ts.shape == (10,)


def test_split_by_time_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_by_time([seg(10)], 0.6, 0.5)


# ------------------------------------------------------------------------- subsample, hash


def test_subsample_keeps_order_spreads_evenly_and_is_seeded() -> None:
    ws = make_windows([seg(1000)], length=2)
    n = len(ws)
    a = subsample(ws, 100, seed=1)
    assert len(a) == 100
    idx = np.searchsorted(ws.end_ts, a.end_ts)
    assert np.all(np.diff(idx) > 0)  # in order, no repeats
    # One window from each tenth-of-a-percent run: every stretch of time is represented.
    bins = (np.arange(100) * n) // 100
    assert np.all(idx >= bins)
    assert np.all(idx < np.append(bins[1:], n))
    np.testing.assert_array_equal(ws.windows[idx], a.windows)
    np.testing.assert_array_equal(subsample(ws, 100, seed=1).end_ts, a.end_ts)
    assert not np.array_equal(subsample(ws, 100, seed=2).end_ts, a.end_ts)


def test_subsample_no_op_when_small_enough() -> None:
    ws = make_windows([seg(30)], length=5)
    assert subsample(ws, None, seed=0) is ws
    assert subsample(ws, len(ws), seed=0) is ws


def test_dataset_sha256_is_stable_and_sensitive() -> None:
    segments = [seg(20), seg(5, t0=100)]
    h = dataset_sha256(segments)
    assert len(h) == 64
    assert dataset_sha256([seg(20), seg(5, t0=100)]) == h
    # Layout and dtype of the arrays do not matter, only the numbers.
    strided = [
        Segment(ts=np.repeat(s.ts, 2)[::2], values=s.values.astype(np.float64), labels=None, origin="x")
        for s in segments
    ]
    assert dataset_sha256(strided) == h
    changed = [seg(20), seg(5, t0=100)]
    changed[1].values[2, 1] += 1
    assert dataset_sha256(changed) != h
    assert dataset_sha256(segments[::-1]) != h


# ------------------------------------------------------------------------- split_by_origin


def test_held_out_origins_are_spread_and_deterministic() -> None:
    names = [f"machine-{i:03d}" for i in range(20)]
    held = held_out_origins(list(reversed(names)), 0.15)
    assert held == held_out_origins(names, 0.15)  # order of appearance does not matter
    assert len(held) == 3
    # spread over the sorted names, one from each third, not the first three
    assert [names.index(h) // 7 for h in held] == [0, 1, 2]
    assert held_out_origins(["a", "b"], 0.01) == ["b"]  # at least one held out ...
    assert len(held_out_origins(["a", "b", "c"], 0.99)) == 2  # ... and at least one left


def test_held_out_origins_need_two_origins() -> None:
    with pytest.raises(DataError, match="at least 2 origins"):
        held_out_origins(["only.csv", "only.csv"], 0.2)


def test_split_by_origin_holds_out_whole_origins_and_splits_the_rest_by_time() -> None:
    segments = [
        seg(100, origin=f"dev{i}", t0=1000.0 * i + 200.0 * part, tag=i) for i in range(6) for part in range(2)
    ]
    train, val, cal = split_by_origin(segments, 0.2, 0.34)
    held = set(held_out_origins([s.origin for s in segments], 0.34))
    assert len(held) == 2
    assert {s.origin for s in cal} == held
    # every sample of a held-out origin calibrates, and no other sample does
    assert sum(len(s.ts) for s in cal) == 2 * 200
    assert not held & {s.origin for s in train + val}
    for origin in {s.origin for s in train}:
        t_end = max(s.ts[-1] for s in train if s.origin == origin)
        v = [s for s in val if s.origin == origin]
        assert sum(len(s.ts) for s in v) == 40  # 20 % of the origin's 200 rows, the latest
        assert min(s.ts[0] for s in v) > t_end
    total = sum(len(s.ts) for s in train + val + cal)
    assert total == sum(len(s.ts) for s in segments)
