"""Synthetic fleet: machines with temperature, pressure and vibration, plus labelled anomalies.

numpy only, seeded and bit-reproducible. The training package trains the default model on it
and the daemon's MQTT simulator publishes it, so both see the same machines. What to generate
is a ``FleetSpec`` (declared, with its defaults and checks, in ``anomalyd.synthetic_spec``).

The physics of one device (all parameters drawn per device):

- **Load** ``L(t)`` in [0, 1]: piecewise levels (idle / part / full load, segments of ~15 min
  on average, at least 3 min) joined by raised-cosine ramps of 30–180 s, plus a small daily
  cycle following the wall clock.
- **Temperature** follows ambient (a daily cycle peaking at 15:00 UTC) plus a load-driven
  rise through a first-order lag (time constant 5–15 min), plus a slow process disturbance.
- **Pressure** follows temperature (about 1–1.6 kPa/degC) plus its own fast load term
  (first-order lag of 20 s) and a process disturbance.
- **Vibration** is an RMS value in g: the 1x, 2x and 3x harmonics of the shaft speed (which
  follows load), each passed through a structural resonance, over a broadband floor, with
  multiplicative noise.
- **Sensors** add white noise, a gain (±3 %) and an offset per device.
- **Timing**: samples every ``period_s`` with uniform jitter of ±``jitter_fraction``·period;
  gaps (stretches of missing samples, ``gap_s`` long) arrive as a Poisson process at
  ``gaps_per_device_hour``. The machine keeps running during a gap; only the data is missing.

Anomalies are injected on top of the normal signal. Their size is scaled to each channel's
short-term variability ``sigma_f`` (robust std of first differences over sqrt 2, i.e. the
sample-to-sample noise level a forecasting window model has to live with), by these factors:

=============  ==================================================================  ==========
kind           what happens                                                        duration
=============  ==================================================================  ==========
spike          one channel jumps by 6–10 sigma_f                                   1–3 samples
level_shift    one channel offset by 4–8 sigma_f                                   2–10 min
drift          one channel ramps linearly to 10–20 sigma_f (sensor drift)          10–30 min
stuck          one channel repeats its last value                                  3–15 min
noise_burst    vibration gains |N(0,1)|·4–8 sigma_v; half the time pressure gets   20 s–3 min
               N(0,1)·4–8 sigma_p pulsation as well
decorrelation  pressure's coupling to temperature falls from 1 to c in [-1, 0],     ramp + 1–2 tau
               plus a smooth independent bump of 2–4 sigma_p                        (10–20 min
                                                                                    fallback)
=============  ==================================================================  ==========

Vibration faults only go up (a loose or damaged machine vibrates more); the others pick a
sign at random. A decorrelation is only visible while temperature moves, so it is placed
across a load change when one follows within 30 min of the drawn start.

Events start as a renewal process: an exponential wait, then the event, then at least 5 min
of normal data. The mean wait is ``1/rate`` minus the spacing and the kinds' typical duration
(at least 1 min), so without gaps the rate approaches ``anomalies_per_device_hour``; gaps,
the end of the series and decorrelations waiting for a load change make the realised rate
lower (about 70–85 % of nominal at the defaults), and a rate too high to fit is capped.
No event starts within the first 5 min of the series or of a segment after a gap (a window
model needs history), and no event spans a gap. Kinds are drawn as successive random
permutations of ``anomaly_kinds`` so that every kind appears once per round.

Each device draws from its own streams, derived from ``(seed, index)`` by
``numpy.random.SeedSequence``: device k is the same whatever ``n_devices`` is, and the
timing, physics, gap and anomaly streams are separate, so changing the anomaly rate does
not change the normal signal or the gaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from anomalyd.synthetic_spec import ANOMALY_KINDS, FleetSpec, check_int

__all__ = [
    "ANOMALY_KINDS",
    "FEATURES",
    "UNITS",
    "AnomalyEvent",
    "DeviceSeries",
    "FleetSpec",
    "generate_device",
    "generate_fleet",
    "interleave",
]

FEATURES: tuple[str, ...] = ("temperature", "pressure", "vibration")
UNITS: dict[str, str] = {"temperature": "degC", "pressure": "kPa", "vibration": "g"}

_T, _P, _V = 0, 1, 2
_DAY_S = 86_400.0
_HOUR_S = 3_600.0
#: No event within this long of the start of a contiguous stretch: a window model needs history.
_HISTORY_S = 300.0
#: At least this much normal data between two events.
_SPACING_S = 300.0

# Anomaly magnitudes in units of the channel's short-term variability sigma_f (see module doc).
_SPIKE_SIGMAS = (6.0, 10.0)
_SHIFT_SIGMAS = (4.0, 8.0)
_DRIFT_SIGMAS = (10.0, 20.0)
_BURST_SIGMAS = (4.0, 8.0)
_DECOR_COUPLING = (-1.0, 0.0)
_DECOR_BUMP_SIGMAS = (2.0, 4.0)
# Durations in seconds (spikes are counted in samples instead).
_SPIKE_SAMPLES = (1, 3)
_DURATION_S: dict[str, tuple[float, float]] = {
    "level_shift": (120.0, 600.0),
    "drift": (600.0, 1800.0),
    "stuck": (180.0, 900.0),
    "noise_burst": (20.0, 180.0),
    "decorrelation": (600.0, 1200.0),  # fallback when no load change follows
}
#: Typical durations, used to set the mean wait so the realised rate is near the nominal one.
_TYPICAL_S: dict[str, float] = {
    "spike": 2.0,
    "level_shift": 360.0,
    "drift": 1200.0,
    "stuck": 540.0,
    "noise_burst": 100.0,
    "decorrelation": 900.0,  # lead + ramp + 1–2 tau, or the fallback
}
_MIN_MEAN_WAIT_S = 60.0

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class AnomalyEvent:
    """One injected anomaly. ``start_ts``/``end_ts`` are the timestamps of its first and last
    sample (both inclusive), so ``start_ts <= ts <= end_ts`` selects exactly its samples."""

    kind: str
    start_index: int  # first anomalous sample (index into DeviceSeries arrays)
    end_index: int  # exclusive
    start_ts: float
    end_ts: float
    features: tuple[str, ...]  # channels affected


@dataclass
class DeviceSeries:
    """One device's readings: ``values[:, j]`` is ``FEATURES[j]`` in ``UNITS``."""

    device: str
    ts: npt.NDArray[np.float64]  # (n,), strictly increasing
    values: npt.NDArray[np.float32]  # (n, 3), columns in FEATURES order
    labels: npt.NDArray[np.bool_]  # (n,), True inside an anomaly
    events: list[AnomalyEvent] = field(default_factory=list)


@dataclass(frozen=True)
class _LoadChange:
    t: float  # ramp start, seconds since series start
    ramp_s: float
    delta: float


@dataclass(frozen=True)
class _Event:
    """An event on the full (gap-free) grid, before gap samples are removed."""

    kind: str
    start: int
    end: int
    channels: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Physics


def _recursive(u: FloatArray, a: float, y0: float) -> FloatArray:
    """y[i] = a·y[i-1] + u[i] with y[-1] = y0. A plain loop over a list: no scipy in the
    runtime, and per-element numpy scalar access would be ~5x slower."""
    out = [0.0] * len(u)
    y = float(y0)
    for i, ui in enumerate(u.tolist()):
        y = a * y + ui
        out[i] = y
    return np.asarray(out, dtype=np.float64)


def _lag(x: FloatArray, tau_s: float, period_s: float) -> FloatArray:
    """First-order lag with time constant tau, started in equilibrium with x[0]."""
    alpha = 1.0 - math.exp(-period_s / tau_s)
    return _recursive(alpha * x, 1.0 - alpha, float(x[0]))


def _ar1(rng: np.random.Generator, n: int, tau_s: float, std: float, period_s: float) -> FloatArray:
    """Stationary AR(1) disturbance with correlation time tau and marginal std."""
    phi = math.exp(-period_s / tau_s)
    y0 = float(rng.normal(0.0, std))  # drawn first: the prefix must not depend on n
    u = rng.normal(0.0, std * math.sqrt(1.0 - phi * phi), n)
    return _recursive(u, phi, y0)


def _load_profile(
    rng: np.random.Generator, t: FloatArray, tod_s: FloatArray
) -> tuple[FloatArray, list[_LoadChange]]:
    """Piecewise load levels with raised-cosine ramps, plus a small daily cycle."""
    regimes = ((0.10, 0.20), (0.35, 0.70), (0.80, 1.00))  # idle, part load, full load
    weights = (0.2, 0.4, 0.4)

    def level() -> float:
        lo, hi = regimes[int(rng.choice(3, p=weights))]
        return float(rng.uniform(lo, hi))

    n = len(t)
    t_end = float(t[-1])
    daily_phase = float(rng.uniform(0, 2 * np.pi))
    current = level()
    base = current
    steps = np.zeros(n + 1)
    ramps = np.zeros(n)
    changes: list[_LoadChange] = []
    c = -float(rng.uniform(0.0, 900.0))  # the series starts in the middle of a segment
    while True:
        # Segments last >= 180 s, the longest ramp, so ramps never overlap.
        c += max(180.0, float(rng.exponential(900.0)))
        if c >= t_end:
            break
        new = level()
        ramp = float(rng.uniform(30.0, 180.0))
        i0, i1 = np.searchsorted(t, [c, c + ramp])
        u = (t[i0:i1] - c) / ramp
        ramps[i0:i1] += (new - current) * (0.5 - 0.5 * np.cos(np.pi * u))
        steps[i1] += new - current
        changes.append(_LoadChange(c, ramp, new - current))
        current = new
    daily = 0.05 * np.sin(2 * np.pi * tod_s / _DAY_S + daily_phase)
    load = np.clip(base + np.cumsum(steps)[:n] + ramps + daily, 0.0, 1.05)
    return load, changes


def _physics(
    seed: np.random.SeedSequence, t: FloatArray, tod_s: FloatArray, period_s: float
) -> tuple[FloatArray, FloatArray, list[_LoadChange], dict[str, float]]:
    """Clean measured channels (n, 3) in raw units, true temperature, load changes, params.

    Prefix-stable: the device's constants come from one stream drawn in a fixed order, the
    load schedule from another, and every length-n noise array from a stream of its own, so
    a longer ``duration_s`` extends the same device instead of making a different one.
    """
    n = len(t)
    s_par, s_load, *s_noise = seed.spawn(8)
    par = np.random.default_rng(s_par)
    noise = [np.random.default_rng(x) for x in s_noise]
    u = par.uniform

    amp_ambient, tau_t, rise = u(2.0, 5.0), u(300.0, 900.0), u(30.0, 50.0)
    k_t, p_base, p_load = u(1.0, 1.6), u(180.0, 220.0), u(8.0, 15.0)  # k_t: kPa per degC
    speed0, speed_load = u(8.0, 12.0), u(35.0, 45.0)  # Hz
    f_res, zeta = u(60.0, 110.0), u(0.05, 0.15)
    h1, h2, h3, floor = u(0.03, 0.06), u(0.01, 0.03), u(0.003, 0.01), u(0.005, 0.01)
    t_gain, t_off = u(0.97, 1.03), u(-1.5, 1.5)
    p_gain, p_off = u(0.97, 1.03), u(-5.0, 5.0)
    v_gain, v_off = u(0.97, 1.03), u(0.0, 0.002)

    load, changes = _load_profile(np.random.default_rng(s_load), t, tod_s)
    load_fast = _lag(load, 20.0, period_s)

    # Temperature: ambient daily cycle (peak 15:00) + load-driven rise through a lag.
    ambient = 20.0 + amp_ambient * np.cos(2 * np.pi * (tod_s - 15 * 3600.0) / _DAY_S)
    temp_true = _lag(ambient + rise * load, tau_t, period_s) + _ar1(noise[0], n, 120.0, 0.2, period_s)

    # Pressure: follows temperature, plus a fast load term.
    pres_noise = _ar1(noise[1], n, 30.0, 0.25, period_s)
    pres_true = p_base + k_t * (temp_true - 20.0) + p_load * load_fast + pres_noise

    # Vibration RMS: shaft harmonics through a resonance (magnitude of a 1-DOF oscillator).
    speed = speed0 + speed_load * load_fast

    def gain(f: FloatArray) -> FloatArray:
        r = f / f_res
        return np.asarray(1.0 / np.sqrt((1.0 - r * r) ** 2 + (2.0 * zeta * r) ** 2))

    rel = (speed / 50.0) ** 2  # forces from imbalance grow with the square of speed
    a1 = h1 * rel * gain(speed)
    a2 = h2 * rel * gain(2 * speed)
    a3 = h3 * gain(3 * speed)
    vib_true = np.sqrt(floor**2 + (a1**2 + a2**2 + a3**2) / 2.0) * np.exp(noise[2].normal(0.0, 0.04, n))

    # Sensors: gain, offset, white noise.
    clean = np.empty((n, 3))
    clean[:, _T] = t_gain * temp_true + t_off + noise[3].normal(0.0, 0.08, n)
    clean[:, _P] = p_gain * pres_true + p_off + noise[4].normal(0.0, 0.2, n)
    clean[:, _V] = v_gain * vib_true + v_off + noise[5].normal(0.0, 0.002, n)
    np.maximum(clean[:, _V], 0.0, out=clean[:, _V])
    params = {"tau_t": tau_t, "k_t_measured": p_gain * k_t}
    return clean, temp_true, changes, params


def _short_term_sigma(clean: FloatArray) -> FloatArray:
    """Robust std of first differences / sqrt 2: the sample-to-sample noise of each channel."""
    if len(clean) < 3:
        return np.ones(clean.shape[1])
    d = np.diff(clean, axis=0)
    mad = np.median(np.abs(d - np.median(d, axis=0)), axis=0)
    sigma = 1.4826 * mad / math.sqrt(2.0)
    return np.asarray(np.where(sigma > 0, sigma, 1e-6))


# ---------------------------------------------------------------------------------------------
# Gaps and events (indices on the full grid)


def _place_gaps(rng: np.random.Generator, n: int, spec: FleetSpec) -> list[tuple[int, int]]:
    """Gaps as [start, end) index ranges to remove; at least one sample on each side."""
    if spec.gaps_per_device_hour <= 0:
        return []
    p = spec.period_s
    gaps: list[tuple[int, int]] = []
    cursor = 1
    while True:
        # min(): a vanishingly small rate gives an infinite wait, which int() cannot take.
        g0 = cursor + int(min(rng.exponential(_HOUR_S / spec.gaps_per_device_hour) / p, n))
        # ceil: the missing stretch is at least the drawn length, so never shorter than gap_s[0].
        g1 = g0 + math.ceil(float(rng.uniform(*spec.gap_s)) / p)
        if g1 >= n:
            return gaps
        gaps.append((g0, g1))
        cursor = g1 + 1


def _segments(n: int, gaps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    segs: list[tuple[int, int]] = []
    s = 0
    for g0, g1 in gaps:
        segs.append((s, g0))
        s = g1
    segs.append((s, n))
    return segs


def _kind_stream(rng: np.random.Generator, kinds: tuple[str, ...]) -> list[str]:
    """Successive random permutations, so every kind appears once per round."""
    return [kinds[i] for i in rng.permutation(len(kinds))]


def _draw_extent(
    rng: np.random.Generator,
    kind: str,
    *,
    start: int,
    period_s: float,
    changes: list[_LoadChange],
    tau_t: float,
) -> tuple[int, int]:
    """(start, end) on the full grid for an event of ``kind`` drawn to start at ``start``."""
    if kind == "spike":
        return start, start + int(rng.integers(_SPIKE_SAMPLES[0], _SPIKE_SAMPLES[1] + 1))
    if kind == "decorrelation":
        # Visible only while temperature moves: cover the next big load change if one is near.
        lead = float(rng.uniform(60.0, 180.0))
        t0 = start * period_s
        for ch in changes:
            if abs(ch.delta) >= 0.25 and t0 <= ch.t - lead <= t0 + 1800.0:
                a = round((ch.t - lead) / period_s)
                length = lead + ch.ramp_s + float(rng.uniform(1.0, 2.0)) * tau_t
                return a, a + max(1, round(length / period_s))
    lo, hi = _DURATION_S[kind]
    return start, start + max(1, round(float(rng.uniform(lo, hi)) / period_s))


def _place_events(
    rng: np.random.Generator,
    n: int,
    spec: FleetSpec,
    *,
    gaps: list[tuple[int, int]],
    changes: list[_LoadChange],
    tau_t: float,
) -> list[_Event]:
    rate = spec.anomalies_per_device_hour
    if rate <= 0 or not spec.anomaly_kinds:
        return []
    p = spec.period_s
    kinds = spec.anomaly_kinds
    typical = sum(_TYPICAL_S[k] for k in kinds) / len(kinds)
    mean_wait = max(_HOUR_S / rate - _SPACING_S - typical, _MIN_MEAN_WAIT_S) / p  # in samples
    hist = math.ceil(_HISTORY_S / p)
    spacing = math.ceil(_SPACING_S / p)
    segs = _segments(n, gaps)
    seg_starts = np.array([s for s, _ in segs])
    queue: list[str] = []
    events: list[_Event] = []
    cursor = hist
    while cursor < n:
        if not queue:
            queue = _kind_stream(rng, kinds)
        kind = queue[0]
        a, b = _draw_extent(
            rng,
            kind,
            start=cursor + int(min(rng.exponential(mean_wait), n)),
            period_s=p,
            changes=changes,
            tau_t=tau_t,
        )
        if a >= n:
            break
        k = int(np.searchsorted(seg_starts, a, side="right")) - 1
        s, e = segs[k]
        if a < s + hist:
            cursor = s + hist  # too close to the segment start (or inside the gap before it)
            continue
        if b > e:
            if k + 1 >= len(segs):
                break
            cursor = segs[k + 1][0] + hist  # would run into a gap or past the end
            continue
        queue.pop(0)
        events.append(_Event(kind, a, b, _draw_channels(rng, kind)))
        cursor = b + spacing
    return events


def _draw_channels(rng: np.random.Generator, kind: str) -> tuple[int, ...]:
    if kind == "decorrelation":
        return (_P,)
    if kind == "noise_burst":
        return (_P, _V) if rng.random() < 0.5 else (_V,)
    return (int(rng.integers(3)),)


def _apply(
    rng: np.random.Generator,
    values: FloatArray,
    ev: _Event,
    *,
    sigma: FloatArray,
    temp_true: FloatArray,
    k_t_measured: float,
) -> None:
    """Inject ``ev`` into ``values`` in place (rows ev.start:ev.end only)."""
    a, b, m = ev.start, ev.end, ev.end - ev.start
    for ch in ev.channels:
        # Vibration faults only increase the vibration.
        sign = 1.0 if ch == _V else float(rng.choice((-1.0, 1.0)))
        x = values[a:b, ch]
        if ev.kind == "spike":
            x += sign * rng.uniform(*_SPIKE_SIGMAS) * sigma[ch]
        elif ev.kind == "level_shift":
            x += sign * rng.uniform(*_SHIFT_SIGMAS) * sigma[ch]
        elif ev.kind == "drift":
            x += sign * rng.uniform(*_DRIFT_SIGMAS) * sigma[ch] * (np.arange(1, m + 1) / m)
        elif ev.kind == "stuck":
            x[:] = values[a - 1, ch]
        elif ev.kind == "noise_burst":
            z = rng.normal(0.0, 1.0, m)
            x += rng.uniform(*_BURST_SIGMAS) * sigma[ch] * (np.abs(z) if ch == _V else z)
        elif ev.kind == "decorrelation":
            coupling = float(rng.uniform(*_DECOR_COUPLING))
            x += (coupling - 1.0) * k_t_measured * (temp_true[a:b] - temp_true[a])
            x += sign * rng.uniform(*_DECOR_BUMP_SIGMAS) * sigma[ch] * np.sin(np.pi * np.arange(m) / m)
        else:  # pragma: no cover - FleetSpec rejects unknown kinds
            raise AssertionError(ev.kind)
    np.maximum(values[a:b, _V], 0.0, out=values[a:b, _V])


# ---------------------------------------------------------------------------------------------
# Public API


def generate_device(index: int, spec: FleetSpec) -> DeviceSeries:
    """Generate device ``index`` (id ``f"{spec.device_prefix}{index:03d}"``) of the fleet."""
    check_int(index, "index", 0)
    seq = np.random.SeedSequence(spec.seed, spawn_key=(int(index),))
    s_time, s_phys, s_gaps, s_anom = seq.spawn(4)
    rng_time, rng_gaps, rng_anom = (np.random.default_rng(s) for s in (s_time, s_gaps, s_anom))
    p = spec.period_s
    n = math.floor(spec.duration_s / p + 1e-9)
    start_ts = spec.start_ts + index * spec.start_stagger_s

    t = np.arange(n) * p + rng_time.uniform(-spec.jitter_fraction, spec.jitter_fraction, n) * p
    tod = np.mod(start_ts + t, _DAY_S)
    clean, temp_true, changes, params = _physics(s_phys, t, tod, p)
    sigma = _short_term_sigma(clean)

    gaps = _place_gaps(rng_gaps, n, spec)
    events = _place_events(rng_anom, n, spec, gaps=gaps, changes=changes, tau_t=params["tau_t"])
    values = clean.copy()
    labels = np.zeros(n, dtype=bool)
    for ev in events:
        _apply(rng_anom, values, ev, sigma=sigma, temp_true=temp_true, k_t_measured=params["k_t_measured"])
        labels[ev.start : ev.end] = True

    keep = np.ones(n, dtype=bool)
    for g0, g1 in gaps:
        keep[g0:g1] = False
    new_index = np.cumsum(keep) - 1  # position of each kept sample after removal
    ts = start_ts + t[keep]
    out_events = []
    for ev in events:
        s, e = int(new_index[ev.start]), int(new_index[ev.end - 1]) + 1
        out_events.append(
            AnomalyEvent(
                kind=ev.kind,
                start_index=s,
                end_index=e,
                start_ts=float(ts[s]),
                end_ts=float(ts[e - 1]),
                features=tuple(FEATURES[c] for c in ev.channels),
            )
        )
    return DeviceSeries(
        device=f"{spec.device_prefix}{index:03d}",
        ts=ts,
        values=values[keep].astype(np.float32),
        labels=labels[keep],
        events=out_events,
    )


def generate_fleet(spec: FleetSpec) -> list[DeviceSeries]:
    """All ``spec.n_devices`` devices, in index order."""
    return [generate_device(i, spec) for i in range(spec.n_devices)]


def interleave(
    fleet: Sequence[DeviceSeries],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Merge a fleet into one time-ordered stream: (device_index, ts, values, labels).

    ``device_index[i]`` indexes ``fleet``. Stable by ts: equal timestamps keep fleet order.
    """
    if not fleet:
        return (
            np.empty(0, np.int32),
            np.empty(0, np.float64),
            np.empty((0, len(FEATURES)), np.float32),
            np.empty(0, bool),
        )
    dev = np.concatenate([np.full(len(d.ts), i, dtype=np.int32) for i, d in enumerate(fleet)])
    ts = np.concatenate([d.ts for d in fleet])
    order = np.argsort(ts, kind="stable")
    values = np.concatenate([d.values for d in fleet])
    labels = np.concatenate([d.labels for d in fleet])
    return dev[order], ts[order], values[order], labels[order]
