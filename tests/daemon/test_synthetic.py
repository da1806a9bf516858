"""The synthetic fleet: reproducible, well-formed, plausible physics, honest labels."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalyd.synthetic import (
    ANOMALY_KINDS,
    FEATURES,
    UNITS,
    DeviceSeries,
    FleetSpec,
    generate_device,
    generate_fleet,
    interleave,
)

T, P, V = (FEATURES.index(f) for f in ("temperature", "pressure", "vibration"))

# One long run shared by the tests that need every kind of event (cheap: ~0.2 s).
LONG = FleetSpec(n_devices=3, duration_s=8 * 3600.0, seed=7, anomalies_per_device_hour=3.0)


@pytest.fixture(scope="module")
def long_fleet() -> list[DeviceSeries]:
    return generate_fleet(LONG)


def check_invariants(d: DeviceSeries, spec: FleetSpec) -> None:
    """Everything a consumer may rely on, for any spec."""
    n = len(d.ts)
    assert d.ts.dtype == np.float64
    assert d.ts.shape == (n,)
    assert d.values.dtype == np.float32
    assert d.values.shape == (n, len(FEATURES))
    assert d.labels.dtype == np.bool_
    assert d.labels.shape == (n,)
    assert n >= 1
    assert np.all(np.diff(d.ts) > 0), "timestamps must strictly increase"
    assert np.all(np.isfinite(d.values))
    assert np.all(d.values[:, V] >= 0), "vibration RMS cannot be negative"
    assert d.ts[0] >= spec.start_ts - spec.jitter_fraction * spec.period_s
    assert d.ts[-1] <= spec.start_ts + spec.duration_s

    # Labels are exactly the union of the events.
    expected = np.zeros(n, dtype=bool)
    for ev in d.events:
        assert ev.kind in spec.anomaly_kinds
        assert 0 <= ev.start_index < ev.end_index <= n
        assert ev.start_ts == d.ts[ev.start_index]
        assert ev.end_ts == d.ts[ev.end_index - 1]
        assert ev.features
        assert set(ev.features) <= set(FEATURES)
        expected[ev.start_index : ev.end_index] = True
    np.testing.assert_array_equal(d.labels, expected)

    # Events are ordered, spaced and have history before them.
    for a, b in zip(d.events, d.events[1:], strict=False):
        assert b.start_ts - a.end_ts >= 300.0 - spec.period_s
    if d.events:
        assert d.events[0].start_ts - spec.start_ts >= 300.0 - spec.period_s

    # No gap inside or just before an event (a window model needs history after a gap).
    gap_after = np.flatnonzero(np.diff(d.ts) > spec.gap_s[0])  # gap between i and i+1
    for ev in d.events:
        for i in gap_after:
            # i = end_index - 1 is fine: a gap may follow an event directly.
            assert not (ev.start_index - 1 <= i < ev.end_index - 1), f"gap at {i} touches {ev}"
            if i < ev.start_index:
                assert d.ts[ev.start_index] - d.ts[i + 1] >= 300.0 - spec.period_s


def test_constants_agree() -> None:
    assert FEATURES == ("temperature", "pressure", "vibration")
    assert set(UNITS) == set(FEATURES)
    assert len(set(ANOMALY_KINDS)) == 6


def test_same_spec_gives_bit_identical_output() -> None:
    spec = FleetSpec(n_devices=2, duration_s=1800.0, seed=3)
    a, b = generate_fleet(spec), generate_fleet(spec)
    for x, y in zip(a, b, strict=True):
        assert x.device == y.device
        assert x.ts.tobytes() == y.ts.tobytes()
        assert x.values.tobytes() == y.values.tobytes()
        assert x.labels.tobytes() == y.labels.tobytes()
        assert x.events == y.events


def test_different_seeds_differ() -> None:
    a = generate_device(0, FleetSpec(duration_s=600.0, seed=1))
    b = generate_device(0, FleetSpec(duration_s=600.0, seed=2))
    assert not np.array_equal(a.values[: min(len(a.ts), len(b.ts))], b.values[: min(len(a.ts), len(b.ts))])


def test_device_does_not_depend_on_fleet_size() -> None:
    small = generate_fleet(FleetSpec(n_devices=2, duration_s=1800.0, seed=5))
    large = generate_fleet(FleetSpec(n_devices=5, duration_s=1800.0, seed=5))
    assert [d.device for d in large] == [f"machine-{i:03d}" for i in range(5)]
    for x, y in zip(small, large[:2], strict=True):
        assert x.values.tobytes() == y.values.tobytes()
        assert x.ts.tobytes() == y.ts.tobytes()
        assert x.events == y.events
    # ... while devices differ from each other.
    assert not np.array_equal(large[0].values[:100], large[1].values[:100])


def test_shapes_dtypes_labels_and_events(long_fleet: list[DeviceSeries]) -> None:
    for d in long_fleet:
        check_invariants(d, LONG)


def test_every_kind_appears_at_about_the_nominal_rate(long_fleet: list[DeviceSeries]) -> None:
    kinds = Counter(ev.kind for d in long_fleet for ev in d.events)
    assert set(kinds) == set(ANOMALY_KINDS), kinds
    hours = LONG.n_devices * LONG.duration_s / 3600.0
    # Renewal process with spacing and history: the realised rate sits a little below nominal.
    assert (
        0.5 * LONG.anomalies_per_device_hour
        <= sum(kinds.values()) / hours
        <= 1.2 * LONG.anomalies_per_device_hour
    )


def test_anomalies_change_only_labelled_samples(long_fleet: list[DeviceSeries]) -> None:
    clean = generate_fleet(dataclasses.replace(LONG, anomalies_per_device_hour=0.0))
    for d, c in zip(long_fleet, clean, strict=True):
        assert not c.labels.any()
        assert not c.events
        np.testing.assert_array_equal(d.ts, c.ts)  # gaps and timing don't depend on anomalies
        np.testing.assert_array_equal(d.values[~d.labels], c.values[~d.labels])
        for ev in d.events:
            rows = slice(ev.start_index, ev.end_index)
            cols = [FEATURES.index(f) for f in ev.features]
            changed = d.values[rows][:, cols] != c.values[rows][:, cols]
            # Every kind moves its channels on (nearly) every sample; stuck only where the
            # true signal moved away from the frozen value, which noise makes almost always.
            assert changed.mean() > 0.9, ev
            untouched = [j for j in range(len(FEATURES)) if j not in cols]
            np.testing.assert_array_equal(d.values[rows][:, untouched], c.values[rows][:, untouched])


def test_event_shapes_match_their_kind(long_fleet: list[DeviceSeries]) -> None:
    for d in long_fleet:
        for ev in d.events:
            seg = d.values[ev.start_index : ev.end_index]
            n = ev.end_index - ev.start_index
            if ev.kind == "stuck":
                (j,) = (FEATURES.index(f) for f in ev.features)
                assert np.all(seg[:, j] == d.values[ev.start_index - 1, j])
            elif ev.kind == "spike":
                assert 1 <= n <= 3
            elif ev.kind == "drift":
                assert n >= 600 / LONG.period_s - 1
            elif ev.kind == "noise_burst":
                assert "vibration" in ev.features
            elif ev.kind == "decorrelation":
                assert ev.features == ("pressure",)


def test_gaps_exist_and_are_outside_anomalies(long_fleet: list[DeviceSeries]) -> None:
    n_gaps = 0
    for d in long_fleet:
        dt = np.diff(d.ts)
        gaps = np.flatnonzero(dt > LONG.period_s * 2)
        n_gaps += gaps.size
        # Every missing stretch is at least gap_s[0] long and at most gap_s[1] (+1 period).
        assert np.all(dt[gaps] >= LONG.gap_s[0])
        assert np.all(dt[gaps] <= LONG.gap_s[1] + 3 * LONG.period_s)
        for i in gaps:
            assert not (d.labels[i] and d.labels[i + 1]), "a gap inside an anomaly"
            assert not any(ev.start_index <= i < ev.end_index - 1 for ev in d.events)
        # Jitter keeps ordinary steps near the period.
        normal = np.delete(dt, gaps)
        assert np.all(np.abs(normal - LONG.period_s) <= 2 * LONG.jitter_fraction * LONG.period_s + 1e-6)
    assert n_gaps >= 3  # 0.5 per device-hour over 24 device-hours


def test_no_gaps_when_rate_is_zero() -> None:
    d = generate_device(0, FleetSpec(duration_s=4 * 3600.0, gaps_per_device_hour=0.0))
    assert np.all(np.diff(d.ts) < 2.0)
    assert len(d.ts) == 4 * 3600


def test_plausible_ranges_and_pressure_follows_temperature() -> None:
    spec = FleetSpec(n_devices=3, duration_s=6 * 3600.0, seed=11, anomalies_per_device_hour=0.0)
    for d in generate_fleet(spec):
        v = d.values.astype(np.float64)
        assert v[:, T].min() > 10
        assert v[:, T].max() < 90
        assert v[:, P].min() > 150
        assert v[:, P].max() < 320
        assert v[:, V].min() >= 0
        assert v[:, V].max() < 1.0
        assert v[:, T].std() > 2.0, "load changes must move temperature"
        assert np.corrcoef(v[:, T], v[:, P])[0, 1] > 0.8
        # Vibration follows load (speed), as does temperature, after its lag.
        assert np.corrcoef(v[:, T], v[:, V])[0, 1] > 0.2


def _pooled_slope(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def test_decorrelation_breaks_the_pressure_temperature_relation() -> None:
    spec = FleetSpec(
        n_devices=4, duration_s=8 * 3600.0, seed=2, anomaly_kinds=("decorrelation",), gaps_per_device_hour=0
    )
    event_t: list[np.ndarray] = []
    event_p: list[np.ndarray] = []
    normal_slopes = []
    for d in generate_fleet(spec):
        v = d.values.astype(np.float64)
        normal = ~d.labels
        normal_slopes.append(_pooled_slope(v[normal, T], v[normal, P]))
        for ev in d.events:
            seg = v[ev.start_index : ev.end_index]
            # Per-event centring: only the within-event relation matters.
            event_t.append(seg[:, T] - seg[:, T].mean())
            event_p.append(seg[:, P] - seg[:, P].mean())
    assert len(event_t) >= 8
    normal_slope = float(np.median(normal_slopes))
    event_slope = _pooled_slope(np.concatenate(event_t), np.concatenate(event_p))
    assert normal_slope > 0.8  # kPa per degC
    assert event_slope < 0.5 * normal_slope, (event_slope, normal_slope)


def test_anomaly_magnitudes_scale_with_channel_noise() -> None:
    spec = FleetSpec(n_devices=4, duration_s=8 * 3600.0, seed=4, anomaly_kinds=("spike",))
    fleet = generate_fleet(spec)
    clean = generate_fleet(dataclasses.replace(spec, anomalies_per_device_hour=0.0))
    for d, c in zip(fleet, clean, strict=True):
        noise = np.median(np.abs(np.diff(c.values.astype(np.float64), axis=0)), axis=0)
        for ev in d.events:
            j = FEATURES.index(ev.features[0])
            jump = np.abs(d.values[ev.start_index, j] - c.values[ev.start_index, j])
            # 6–10 sigma; sigma ≈ 1.05 · median |diff| for Gaussian noise.
            assert 4 * noise[j] < jump < 15 * noise[j], (ev, jump, noise[j])


def test_zero_anomaly_rate_gives_no_labels() -> None:
    for d in generate_fleet(FleetSpec(n_devices=2, duration_s=7200.0, anomalies_per_device_hour=0.0)):
        assert not d.labels.any()
        assert d.events == []


def test_only_requested_kinds() -> None:
    spec = FleetSpec(n_devices=2, duration_s=6 * 3600.0, anomaly_kinds=("stuck", "spike"))
    kinds = {ev.kind for d in generate_fleet(spec) for ev in d.events}
    assert kinds == {"stuck", "spike"}


def test_interleave_is_time_ordered_and_complete() -> None:
    fleet = generate_fleet(FleetSpec(n_devices=3, duration_s=900.0, seed=1))
    dev, ts, values, labels = interleave(fleet)
    assert dev.dtype == np.int32
    assert ts.dtype == np.float64
    assert values.dtype == np.float32
    assert labels.dtype == np.bool_
    assert len(dev) == sum(len(d.ts) for d in fleet)
    assert np.all(np.diff(ts) >= 0)
    for i, d in enumerate(fleet):
        mine = dev == i
        np.testing.assert_array_equal(ts[mine], d.ts)
        np.testing.assert_array_equal(values[mine], d.values)
        np.testing.assert_array_equal(labels[mine], d.labels)


def test_interleave_breaks_ties_by_fleet_order() -> None:
    spec = FleetSpec(n_devices=1, duration_s=60.0, jitter_fraction=0.0, gaps_per_device_hour=0.0)
    d = generate_device(0, spec)
    dev, _ts, _, _ = interleave([d, d])
    np.testing.assert_array_equal(dev, np.tile([0, 1], len(d.ts)))
    assert interleave([])[2].shape == (0, 3)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_devices": 0}, "n_devices"),
        ({"n_devices": 1.5}, "n_devices"),
        ({"seed": -1}, "seed"),
        ({"period_s": 0.0}, "period_s"),
        ({"period_s": float("nan")}, "period_s"),
        ({"duration_s": 1.0, "period_s": 1.0}, "duration_s"),
        ({"duration_s": float("inf")}, "duration_s"),
        ({"duration_s": 1e9, "period_s": 1e-3}, "duration_s/period_s"),
        ({"anomalies_per_device_hour": -1.0}, "anomalies_per_device_hour"),
        ({"gaps_per_device_hour": -0.1}, "gaps_per_device_hour"),
        ({"jitter_fraction": 0.5}, "jitter_fraction"),
        ({"anomaly_kinds": ("spike", "meteor")}, "anomaly_kinds"),
        ({"anomaly_kinds": ("spike", "spike")}, "anomaly_kinds"),
        ({"anomaly_kinds": ()}, "anomaly_kinds"),
        ({"gap_s": (600.0, 120.0)}, "gap_s[1]"),
        ({"gap_s": (1.0, 10.0)}, "gap_s[0]"),
        ({"gap_s": (120.0,)}, "gap_s"),
        ({"start_ts": -5.0}, "start_ts"),
        ({"device_prefix": "a/b"}, "device_prefix"),
    ],
)
def test_invalid_spec_raises_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        FleetSpec(**changes)


def test_empty_kinds_are_fine_without_anomalies() -> None:
    spec = FleetSpec(anomaly_kinds=(), anomalies_per_device_hour=0.0, duration_s=60.0)
    assert not generate_device(0, spec).labels.any()


def test_negative_index_rejected() -> None:
    with pytest.raises(ValueError, match=r"^index:"):
        generate_device(-1, FleetSpec())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    index=st.integers(0, 50),
    duration_s=st.floats(2.0, 3 * 3600.0),
    period_s=st.sampled_from([0.5, 1.0, 2.5, 10.0]),
    rate=st.floats(0.0, 20.0),
    gaps=st.floats(0.0, 6.0),
    jitter=st.floats(0.0, 0.45),
    kinds=st.lists(st.sampled_from(ANOMALY_KINDS), min_size=1, max_size=6, unique=True),
)
def test_invariants_hold_for_arbitrary_small_specs(
    *,
    seed: int,
    index: int,
    duration_s: float,
    period_s: float,
    rate: float,
    gaps: float,
    jitter: float,
    kinds: list[str],
) -> None:
    spec = FleetSpec(
        n_devices=1,
        duration_s=max(duration_s, 2 * period_s),
        period_s=period_s,
        seed=seed,
        anomalies_per_device_hour=rate,
        anomaly_kinds=tuple(kinds),
        jitter_fraction=jitter,
        gaps_per_device_hour=gaps,
        gap_s=(max(30.0, 2 * period_s), 400.0),
    )
    check_invariants(generate_device(index, spec), spec)


def test_longer_duration_extends_the_same_device() -> None:
    """Prefix stability: the normal signal of a 1 h run is the first hour of a 3 h run."""
    short = generate_device(2, FleetSpec(duration_s=3600.0, seed=5, anomalies_per_device_hour=0.0))
    long = generate_device(2, FleetSpec(duration_s=3 * 3600.0, seed=5, anomalies_per_device_hour=0.0))
    n = np.searchsorted(long.ts, short.ts[-1]) + 1
    # Gaps are placed by a sequential draw that stops at the end, so they agree too.
    np.testing.assert_array_equal(long.ts[:n], short.ts)
    np.testing.assert_allclose(long.values[:n], short.values, rtol=0, atol=1e-5)


def test_start_stagger_moves_each_device_and_changes_only_time_of_day() -> None:
    base = FleetSpec(n_devices=3, duration_s=1800.0, seed=1, anomalies_per_device_hour=0.0)
    staggered = FleetSpec(
        n_devices=3, duration_s=1800.0, seed=1, anomalies_per_device_hour=0.0, start_stagger_s=6 * 3600.0
    )
    a, b = generate_fleet(base), generate_fleet(staggered)
    for k in range(3):
        np.testing.assert_allclose(b[k].ts - a[k].ts, k * 6 * 3600.0)
    # Device 0 starts at the same time in both; the others see another part of the day.
    np.testing.assert_array_equal(a[0].values, b[0].values)
    assert not np.allclose(a[2].values[:, 0], b[2].values[:, 0])
    with pytest.raises(ValueError, match="start_stagger_s"):
        FleetSpec(start_stagger_s=-1.0)


def test_spec_takes_numpy_numbers_but_not_floats_for_integers() -> None:
    spec = FleetSpec(n_devices=np.int64(2), seed=np.uint32(3), period_s=np.float32(0.5), duration_s=60)
    assert len(generate_fleet(spec)) == 2
    with pytest.raises(ValueError, match=r"^n_devices:"):
        FleetSpec(n_devices=np.float64(2.0))


def test_spec_module_imports_no_numpy() -> None:
    # Configs that declare a fleet (the training config) import FleetSpec without the generator.
    code = "import sys, anomalyd.synthetic_spec; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
