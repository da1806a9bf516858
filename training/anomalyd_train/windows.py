"""From contiguous segments to training tensors: gaps, time splits, windows, scaling.

Invariants this module keeps (and its tests check):

- A window never spans a gap: windows are cut from one segment at a time.
- Splits are by time and never shuffled: each origin's series is cut into
  train | validation | calibration, earliest to latest, with no shared samples.
- Scaling statistics come from training rows only.

No TensorFlow here: the arrays are numpy, ready for ``keras.Model.fit``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anomalyd.errors import DataError

if TYPE_CHECKING:
    # data.py imports split_segments from here; the runtime never needs the class itself.
    from anomalyd_train.data import Segment

__all__ = [
    "Scaler",
    "WindowSet",
    "dataset_sha256",
    "held_out_origins",
    "is_constant",
    "make_windows",
    "split_by_origin",
    "split_by_time",
    "split_segments",
    "subsample",
]


def split_segments(ts: np.ndarray, max_gap_s: float) -> list[slice]:
    """Slices of ``ts`` that are contiguous: every step inside is in ``(0, max_gap_s]``.

    A step longer than ``max_gap_s`` is a gap and starts a new segment. A step that is not
    forward (equal or backwards time) also starts one, so that every segment is strictly
    increasing even if a caller did not clean its timestamps. Empty input gives ``[]``.
    """
    if not max_gap_s > 0:
        raise ValueError(f"max_gap_s must be positive, got {max_gap_s}")
    n = len(ts)
    if n == 0:
        return []
    steps = np.diff(np.asarray(ts, dtype=np.float64))
    breaks = np.flatnonzero(~((steps > 0) & (steps <= max_gap_s))) + 1
    bounds = [0, *breaks.tolist(), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


# Relative spread below which a float32 column carries no information: float32 resolves
# about 1.2e-7 of a value, so a std of 1e-6 × |mean| is a handful of rounding steps, and
# dividing by it would turn rounding noise into huge normalised values.
_CONSTANT_RTOL = 1e-6


def is_constant(std: float, mean: float) -> bool:
    """True when a column's spread is zero or lost in float32 rounding of its mean."""
    return not std > _CONSTANT_RTOL * abs(mean)


#: A log-scaled feature's noise is measured in this many bins of its level (see ``Scaler``).
LOG_NOISE_BINS = 20
#: ... and must grow by at least this factor from the level's 10th to its 90th percentile.
LOG_MIN_NOISE_GROWTH = 1.2
#: Its offset is never below this fraction of its 99th percentile.
LOG_OFFSET_FLOOR = 1e-3


def level_noise_offset(columns: Sequence[np.ndarray]) -> float:
    """The offset ``c`` for which ``log(x + c)`` has the same noise at every level, from
    time-ordered columns of one feature (one per segment).

    A sensor's sample-to-sample noise is measured in ``LOG_NOISE_BINS`` bins of its level
    (1.4826 x the median absolute deviation of first differences over sqrt 2, robust to load
    changes) and fitted as ``a + b·x``: an additive part ``a`` and a part ``b`` proportional
    to the level. ``log(x + a/b)`` turns that noise into the constant ``b``. Raises
    ``ValueError`` when the fitted noise grows by less than ``LOG_MIN_NOISE_GROWTH`` from the
    level's 10th to its 90th percentile, where a log scale would only stretch the quiet end.
    """
    level = np.concatenate([np.asarray(c, np.float64)[1:] for c in columns if len(c) > 1])
    diffs = np.concatenate([np.diff(np.asarray(c, np.float64)) for c in columns if len(c) > 1])
    if level.size < 10 * LOG_NOISE_BINS:
        raise ValueError(f"{level.size} consecutive pairs are too few to measure the noise by level")
    edges = np.quantile(level, np.linspace(0.0, 1.0, LOG_NOISE_BINS + 1))
    which = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, LOG_NOISE_BINS - 1)
    xs: list[float] = []
    sigmas: list[float] = []
    for k in range(LOG_NOISE_BINS):
        d = diffs[which == k]
        if d.size < 10:
            continue
        xs.append(float(np.median(level[which == k])))
        sigmas.append(1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0))
    if len(xs) < 3:
        raise ValueError("the level takes too few distinct values to measure the noise by level")
    b, a = np.polyfit(np.asarray(xs), np.asarray(sigmas), 1)
    x10, x90 = np.quantile(level, [0.1, 0.9])
    growth = (a + b * x90) / (a + b * x10) if a + b * x10 > 0 else math.inf
    if not (b > 0 and growth >= LOG_MIN_NOISE_GROWTH):
        raise ValueError(
            f"its noise does not grow with its level (fitted noise {a:.3g} + {b:.3g}·x: "
            f"x {growth:.2f} from its 10th to its 90th percentile, under {LOG_MIN_NOISE_GROWTH})"
        )
    floor = LOG_OFFSET_FLOOR * float(np.quantile(np.maximum(level, 0.0), 0.99))
    return max(float(a) / float(b), floor, 1e-12)


def log_scale(x: np.ndarray, log_offset: np.ndarray) -> np.ndarray:
    """``log(max(x, 0) + offset)`` on the features whose ``log_offset`` is above 0; the others
    unchanged. The same formula the exported graph applies before its normalisation."""
    x = np.asarray(x, dtype=np.float32)
    logged = log_offset > 0
    if not logged.any():
        return x
    safe = np.where(logged, log_offset, np.float32(1.0)).astype(np.float32)
    out: np.ndarray = np.where(logged, np.log(np.maximum(x, np.float32(0.0)) + safe), x)
    return out.astype(np.float32, copy=False)


def clip_limits(clip: np.ndarray) -> np.ndarray:
    """Per-feature clipping limits in standardised units: ``clip`` where above 0, else the
    largest float32 (no finite value is clipped). The exported graph uses the same array."""
    out: np.ndarray = np.where(clip > 0, clip, np.finfo(np.float32).max).astype(np.float32)
    return out


@dataclass
class Scaler:
    """Per-feature standardisation ``(x - mean) / std``, fitted on training rows only.

    A feature named in ``log_features`` is standardised on a log scale: ``x`` becomes
    ``log(max(x, 0) + offset)`` first (``log_offset``; 0 for a feature on its own scale), and
    ``mean``/``std`` are those of the logged values. For a signal whose noise grows with its
    level (a vibration RMS: an additive sensor noise plus a few percent of whatever it reads),
    the offset is fitted so that the logged noise is the same at every level
    (``level_noise_offset``): a loud machine's noise is then no larger than a quiet one's.

    ``clip`` (per feature, 0 = none): a feature with a limit above 0 is clipped to
    ``[-clip, clip]`` after standardising (``model.input_only_clip``; the exported graph does
    the same), so the network never sees it further out than that.
    """

    mean: np.ndarray  # float32 (F,)
    std: np.ndarray  # float32 (F,)
    log_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (F,) or empty
    clip: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (F,) or empty

    def __post_init__(self) -> None:
        if self.log_offset.size == 0:
            self.log_offset = np.zeros_like(self.mean, dtype=np.float32)
        if self.clip.size == 0:
            self.clip = np.zeros_like(self.mean, dtype=np.float32)
        if self.clip.shape != self.mean.shape or np.any(~(self.clip >= 0)):
            raise ValueError(f"clip needs {self.mean.size} limits at or above 0, got {self.clip}")

    @property
    def clipped(self) -> list[bool]:
        """One flag per feature: is it clipped after standardising?"""
        return [bool(c > 0) for c in self.clip]

    @property
    def logged(self) -> list[bool]:
        """One flag per feature: is it standardised on a log scale?"""
        return [bool(o > 0) for o in self.log_offset]

    @classmethod
    def fit(
        cls,
        segments_or_values: Sequence[Segment] | np.ndarray,
        features: list[str],
        log_features: Sequence[str] = (),
    ) -> Scaler:
        """Fit on training segments (or a values array ``(n, F)``).

        Raises ``DataError`` naming the feature when a column is constant: its std would be
        zero and every normalised value infinite or meaningless; and when a feature in
        ``log_features`` is below 0 in more than 1 % of the rows (a log scale needs values
        that are mostly at or above 0, such as an RMS), or is not one of ``features``.
        """
        if isinstance(segments_or_values, np.ndarray):
            values = segments_or_values.reshape(-1, segments_or_values.shape[-1])
        elif len(segments_or_values) == 0:
            raise DataError("cannot fit the scaler: there are no training rows")
        else:
            values = np.concatenate([s.values for s in segments_or_values], axis=0)
        if values.shape[0] == 0:
            raise DataError("cannot fit the scaler: there are no training rows")
        if values.shape[1] != len(features):
            raise ValueError(f"values have {values.shape[1]} columns, features name {len(features)}")
        unknown = [n for n in log_features if n not in features]
        if unknown:
            raise DataError(f"log-scaled features {unknown} are not among the features {features}")
        log_offset = np.zeros(len(features), np.float32)
        for j, name in enumerate(features):
            if name not in log_features:
                continue
            below = float(np.mean(values[:, j] < 0))
            if below > 0.01:
                raise DataError(
                    f"feature {name!r} is below 0 in {below:.1%} of the training rows: a log "
                    "scale needs values at or above 0 (such as an RMS); leave it on its own scale"
                )
            # Differences within a segment only; a values array is one stretch.
            columns = (
                [values[:, j]]
                if isinstance(segments_or_values, np.ndarray)
                else [s.values[:, j] for s in segments_or_values]
            )
            try:
                log_offset[j] = level_noise_offset(columns)
            except ValueError as exc:
                raise DataError(f"feature {name!r} cannot be log-scaled: {exc}") from None
        scaled = log_scale(values, log_offset)
        # float64 accumulation: a float32 sum over 10^5+ rows loses digits of the mean.
        mean = scaled.mean(axis=0, dtype=np.float64)
        std = scaled.std(axis=0, dtype=np.float64)
        for name, m, s in zip(features, mean, std, strict=True):
            if is_constant(float(s), float(m)):
                raise DataError(
                    f"feature {name!r} is constant over the {values.shape[0]} training rows "
                    f"(value {m:.6g}): it cannot be standardised; remove it from the features"
                )
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32), log_offset=log_offset)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise an array whose last axis is the features (``(n, F)`` or ``(n, L, F)``)."""
        out: np.ndarray = (log_scale(x, self.log_offset) - self.mean) / self.std
        if any(self.clipped):
            limit = clip_limits(self.clip)
            out = np.minimum(np.maximum(out, -limit), limit)
        return out.astype(np.float32, copy=False)


def split_by_time(
    segments: list[Segment], validation_fraction: float, calibration_fraction: float
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """Cut each origin's series into train | validation | calibration, by time.

    For each origin (device or file), its segments are taken in time order and its rows are
    cut at two time points so that the parts hold about ``1 - v - c``, ``v`` and ``c`` of the
    origin's rows (by row count, so gaps do not distort the shares). A segment that
    straddles a cut is split there into two segments; no sample is shared, and no window
    can later join the two sides, so nothing of the training part leaks into a validation
    or calibration window. The cost: each cut loses a window's worth of history (the first
    L-1 samples after the cut get no window unless padding is "pre"). Nothing is shuffled.
    """
    if min(validation_fraction, calibration_fraction) < 0 or validation_fraction + calibration_fraction >= 1:
        raise ValueError("fractions must be non-negative and sum below 1")
    by_origin: dict[str, list[Segment]] = {}
    for seg in segments:
        by_origin.setdefault(seg.origin, []).append(seg)
    train: list[Segment] = []
    val: list[Segment] = []
    cal: list[Segment] = []
    for unordered in by_origin.values():
        segs = sorted(unordered, key=lambda s: float(s.ts[0]) if len(s.ts) else math.inf)
        total = sum(len(s.ts) for s in segs)
        n_cal = round(calibration_fraction * total)
        n_val = round(validation_fraction * total)
        cut_val = total - n_val - n_cal  # first row of validation, in the origin's row order
        cut_cal = total - n_cal  # first row of calibration
        offset = 0
        for seg in segs:
            n = len(seg.ts)
            for out, lo, hi in ((train, 0, cut_val), (val, cut_val, cut_cal), (cal, cut_cal, total)):
                a, b = max(lo - offset, 0), min(hi - offset, n)
                if b > a:
                    out.append(_slice_segment(seg, slice(a, b)))
            offset += n
    return train, val, cal


def held_out_origins(origins: Sequence[str], fraction: float) -> list[str]:
    """The origins that ``split_by_origin`` holds out: ``max(1, round(fraction · n))`` of the
    ``n`` distinct names, spread evenly over their sorted order (the middle of each of that
    many equal runs), so a fleet whose devices were started one after another gives
    calibration devices from every part of its time span. Deterministic; no seed needed.
    """
    names = sorted(set(origins))
    n = len(names)
    if n < 2:
        raise DataError(
            f"split.calibration = 'devices' needs at least 2 origins (devices or files), got {n}; "
            "use split.calibration = 'time'"
        )
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    k = min(max(1, round(fraction * n)), n - 1)  # at least one origin is left to train on
    picks = sorted({int((i + 0.5) * n / k) for i in range(k)})
    return [names[i] for i in picks]


def split_by_origin(
    segments: list[Segment], validation_fraction: float, calibration_fraction: float
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """Hold out whole origins for calibration; cut the rest by time into train | validation.

    The calibration part is every segment of the origins ``held_out_origins`` picks (about
    ``calibration_fraction`` of the origins), so a threshold calibrated on it has seen
    devices the network never trained on, as a deployed fleet model will. The other origins
    are each cut by time as in ``split_by_time``: the earliest ``1 - validation_fraction`` of
    their rows train, the rest validate. The three parts share no origin between calibration
    and the others, and no sample at all.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError("validation_fraction must be in [0, 1)")
    held = set(held_out_origins([s.origin for s in segments], calibration_fraction))
    rest = [s for s in segments if s.origin not in held]
    cal = [s for s in segments if s.origin in held]
    train, val, _ = split_by_time(rest, validation_fraction, 0.0)
    return train, val, cal


def _slice_segment(seg: Segment, sl: slice) -> Segment:
    if sl.start == 0 and sl.stop == len(seg.ts):
        return seg
    return dataclasses.replace(
        seg,
        ts=seg.ts[sl],
        values=seg.values[sl],
        labels=None if seg.labels is None else seg.labels[sl],
    )


@dataclass
class WindowSet:
    """Windows cut from segments, in segment order then time order."""

    windows: np.ndarray  # float32 (n, L, F), raw units, oldest sample first
    end_ts: np.ndarray  # float64 (n,), timestamp of each window's last sample
    labels: np.ndarray | None  # bool (n,), label of each window's last sample, if known
    padded: np.ndarray  # bool (n,), True when the window starts with edge padding
    dropped_segments: int  # segments shorter than L that gave no window (padding "none")

    def __len__(self) -> int:
        return int(self.windows.shape[0])


def make_windows(
    segments: list[Segment], length: int, hop: int = 1, padding: Literal["none", "pre"] = "none"
) -> WindowSet:
    """Cut every segment into windows of ``length`` samples, ``hop`` samples apart.

    ``padding="none"``: the first window of a segment ends at its sample ``L-1``; a segment
    shorter than L gives none and is counted in ``dropped_segments``. Windows per segment:
    ``(n - L) // hop + 1`` when ``n >= L``.

    ``padding="pre"``: every sample from the segment's first gets a window, as the daemon's
    ``warmup = "pad"`` scores early samples: the missing history is filled by repeating the
    segment's first sample (edge padding; zeros in raw units would be huge outliers after
    standardisation). Windows per segment: ``(n - 1) // hop + 1`` when ``n >= 1``.

    Labels are only carried when every segment has them.
    """
    if length < 2:
        raise ValueError(f"window length must be at least 2, got {length}")
    if hop < 1:
        raise ValueError(f"hop must be at least 1, got {hop}")
    if padding not in ("none", "pre"):
        raise ValueError(f"padding must be 'none' or 'pre', got {padding!r}")
    n_features = segments[0].values.shape[1] if segments else 0
    with_labels = bool(segments) and all(s.labels is not None for s in segments)
    parts_w: list[np.ndarray] = []
    parts_ts: list[np.ndarray] = []
    parts_lab: list[np.ndarray] = []
    parts_pad: list[np.ndarray] = []
    dropped = 0
    for seg in segments:
        n = len(seg.ts)
        values = np.asarray(seg.values, dtype=np.float32)
        if padding == "pre":
            if n == 0:
                continue
            values = np.concatenate([np.repeat(values[:1], length - 1, axis=0), values], axis=0)
            first_end = 0
        elif n < length:
            dropped += 1
            continue
        else:
            first_end = length - 1
        # (n', F, L) view → (n', L, F); [::hop] before the copy keeps memory to what is kept.
        view = sliding_window_view(values, length, axis=0)[::hop]
        parts_w.append(np.ascontiguousarray(view.transpose(0, 2, 1)))
        ends = np.arange(first_end, n, hop)
        parts_ts.append(seg.ts[ends])
        parts_pad.append(ends < length - 1)
        if with_labels and seg.labels is not None:
            parts_lab.append(np.asarray(seg.labels[ends], dtype=bool))
    if not parts_w:
        return WindowSet(
            windows=np.zeros((0, length, n_features), dtype=np.float32),
            end_ts=np.zeros(0, dtype=np.float64),
            labels=np.zeros(0, dtype=bool) if with_labels else None,
            padded=np.zeros(0, dtype=bool),
            dropped_segments=dropped,
        )
    return WindowSet(
        windows=np.concatenate(parts_w, axis=0),
        end_ts=np.concatenate(parts_ts).astype(np.float64, copy=False),
        labels=np.concatenate(parts_lab) if with_labels else None,
        padded=np.concatenate(parts_pad),
        dropped_segments=dropped,
    )


def subsample(ws: WindowSet, max_windows: int | None, seed: int) -> WindowSet:
    """Keep at most ``max_windows`` windows, spread evenly over the set, seeded.

    The set is cut into ``max_windows`` equal runs and one window is drawn at random from
    each, so every stretch of time stays represented (a plain random draw can leave holes)
    and the kept windows stay in order. Same seed, same windows.
    """
    n = len(ws)
    if max_windows is None or n <= max_windows:
        return ws
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    rng = np.random.default_rng(seed)
    edges = (np.arange(max_windows + 1, dtype=np.int64) * n) // max_windows
    idx = edges[:-1] + np.floor(rng.random(max_windows) * np.diff(edges)).astype(np.int64)
    return WindowSet(
        windows=ws.windows[idx],
        end_ts=ws.end_ts[idx],
        labels=None if ws.labels is None else ws.labels[idx],
        padded=ws.padded[idx],
        dropped_segments=ws.dropped_segments,
    )


def dataset_sha256(segments: list[Segment]) -> str:
    """sha256 over each segment's timestamps (float64 LE) and values (float32 LE), in order.

    Fixed byte order and dtype, so the same data hashes the same on any machine.
    """
    h = hashlib.sha256()
    for seg in segments:
        h.update(np.ascontiguousarray(seg.ts, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(seg.values, dtype="<f4").tobytes())
    return h.hexdigest()
