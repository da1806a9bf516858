"""Training data sources, each turned into contiguous segments of (timestamps, values).

Two sources: the synthetic fleet of ``anomalyd.synthetic`` (the default) and a CSV file of
real history. Both end as a ``Dataset`` of ``Segment``s cut at gaps by the same function
(``windows.split_segments``), so a window can never span a gap whichever the source.

Bad rows are never dropped silently: each is counted under a reason in
``Dataset.skipped`` and summarised in ``Dataset.notes``, which the CLI prints. Problems that
make the data unusable (missing column, no rows, constant feature, not one window of real
history) raise ``anomalyd.errors.DataError`` naming the file, the column and the problem.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from anomalyd import synthetic
from anomalyd.errors import DataError
from anomalyd_train.config import CsvDataConfig, SyntheticDataConfig, TrainConfig
from anomalyd_train.windows import is_constant, split_segments

__all__ = ["Dataset", "Segment", "load_csv", "load_dataset", "synthetic_dataset"]

#: Without ``max_gap_s``, a step longer than this many median sample periods is a gap.
GAP_FACTOR = 3.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Segment:
    """A contiguous stretch of one series: no gap longer than the gap threshold inside."""

    ts: np.ndarray  # float64 (n,), epoch seconds, strictly increasing
    values: np.ndarray  # float32 (n, F), raw units
    labels: np.ndarray | None  # bool (n,), when the source has labels
    origin: str  # device or file this came from, e.g. "machine-003" or "valve1/0.csv"


@dataclass
class Dataset:
    """Everything a training run needs to know about its data, before windowing."""

    source: str  # for people and the contract, e.g. "csv: /data/valve1/0.csv"
    features: list[str]
    units: list[str]  # same order as features; "" when unknown
    segments: list[Segment]
    rows: int  # rows kept
    skipped: dict[str, int] = field(default_factory=dict)  # reason → rows skipped
    notes: list[str] = field(default_factory=list)  # person-readable lines
    sample_period_s: float | None = None  # median step inside segments
    sample_period_p05_s: float | None = None  # 5th percentile of the same steps
    sample_period_p95_s: float | None = None  # 95th percentile of the same steps


def load_dataset(cfg: TrainConfig) -> Dataset:
    """Load the configured source (``data.source``)."""
    if cfg.data.source == "csv":
        if cfg.data.csv is None:  # the config validator already refuses this
            raise DataError("data.source is 'csv' but there is no [data.csv] table")
        return load_csv(cfg.data.csv, window_length=cfg.window.length)
    ds = synthetic_dataset(cfg.data.synthetic)
    ds.notes += _check_window_length(ds.segments, cfg.window.length, "synthetic fleet")
    return ds


# ------------------------------------------------------------------------------ segmenting


def _median_step(ts: np.ndarray) -> float | None:
    steps = np.diff(ts)
    steps = steps[steps > 0]
    return float(np.median(steps)) if steps.size else None


def _segments(
    ts: np.ndarray, values: np.ndarray, labels: np.ndarray | None, origin: str, max_gap_s: float
) -> list[Segment]:
    return [
        Segment(
            ts=ts[sl],
            values=values[sl],
            labels=None if labels is None else labels[sl],
            origin=origin,
        )
        for sl in split_segments(ts, max_gap_s)
    ]


def _period_of(segments: list[Segment]) -> tuple[float | None, float | None, float | None]:
    """Median, 5th and 95th percentile of the steps inside segments (None: no step at all).

    Steps across gaps are left out: the contract records the cadence the model learned
    from, which a gap is not. The daemon widens its cadence band by this spread, so a
    model trained on jittery data accepts the jitter it has seen.
    """
    steps = [np.diff(s.ts) for s in segments if len(s.ts) > 1]
    if not steps:
        return None, None, None
    pooled = np.concatenate(steps)
    median = float(np.median(pooled))
    p05, p95 = (float(v) for v in np.percentile(pooled, [5.0, 95.0]))
    # Percentiles and the median round differently: keep p05 <= median <= p95 exact.
    return median, min(p05, median), max(p95, median)


def _describe_segments(segments: list[Segment], max_gap_s: float, how: str) -> str:
    lengths = [len(s.ts) for s in segments]
    return (
        f"{len(segments)} contiguous segment{'s' if len(segments) != 1 else ''} "
        f"(a step over {max_gap_s:g} s starts a new one; {how}); "
        f"rows per segment: min {min(lengths)}, max {max(lengths)}"
    )


def _check_window_length(segments: list[Segment], window_length: int, where: str) -> list[str]:
    """Refuse data without one window of real history; note segments shorter than L."""
    longest = max(len(s.ts) for s in segments)
    if longest < window_length:
        # Padding could produce windows, but every one would be partly invented: there is
        # nothing real to learn from, so this is an error whatever window.padding says.
        raise DataError(
            f"{where}: the longest contiguous segment has {longest} rows, fewer than one window "
            f"of {window_length}: use a shorter window.length or a larger max_gap_s"
        )
    short = [len(s.ts) for s in segments if len(s.ts) < window_length]
    if not short:
        return []
    return [
        f"{len(short)} segment(s) with {sum(short)} rows are shorter than the window length "
        f"{window_length}: padding = 'none' drops them, padding = 'pre' edge-pads them"
    ]


# ------------------------------------------------------------------------------------- CSV


def _find_column(header: list[str], name: str, role: str, file: Path) -> int:
    if name in header:
        return header.index(name)
    stripped = [h.strip() for h in header]
    if name.strip() in stripped:  # tolerate padding around names ("a; b" headers)
        return stripped.index(name.strip())
    raise DataError(f"{file}: {role} column {name!r} not found; the header has {header}")


def _timestamp_parser(cfg: CsvDataConfig, first: str, file: Path) -> tuple[Callable[[str], float], str]:
    """Pick the timestamp parser (format given, else from the first data row) and describe it."""

    def as_utc(d: datetime) -> float:
        # Naive times are read as UTC: a plant historian exporting local time without a zone
        # shifts by a constant, which leaves steps and gaps, all that training uses, intact.
        return (d if d.tzinfo is not None else d.replace(tzinfo=UTC)).timestamp()

    fmt = cfg.timestamp_format
    if fmt is not None:
        return (lambda s: as_utc(datetime.strptime(s.strip(), fmt))), f"format {fmt!r}"
    try:
        float(first)
    except ValueError:
        pass
    else:
        return float, "epoch seconds"
    try:
        datetime.fromisoformat(first.strip())
    except ValueError:
        raise DataError(
            f"{file}: timestamp column {cfg.timestamp_column!r}: first value {first!r} is neither "
            "epoch seconds nor ISO 8601; set data.csv.timestamp_format (strptime format)"
        ) from None
    return (lambda s: as_utc(datetime.fromisoformat(s.strip()))), "ISO 8601 (no zone: UTC)"


class _Skips:
    """Counts skipped rows by reason and remembers where each reason first happened."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def notes(self) -> list[str]:
        if not self.counts:
            return []
        total = sum(self.counts.values())
        parts = [f"{r} {n} (first: {self.first[r]})" for r, n in sorted(self.counts.items())]
        return [f"skipped {total} row(s): " + "; ".join(parts)]


def _parse_value(text: str) -> tuple[float, str | None]:
    """The value and ``None``, or NaN and the reason to skip the row."""
    s = text.strip()
    if not s:
        return math.nan, "nan"
    try:
        v = float(s)
    except ValueError:
        return math.nan, "non_numeric"
    if math.isnan(v):
        return math.nan, "nan"
    if math.isinf(v) or abs(v) > _FLOAT32_MAX:
        # Beyond float32's range the value would become inf in the values array.
        return math.nan, "non_finite"
    return v, None


def load_csv(cfg: CsvDataConfig, window_length: int | None = None) -> Dataset:
    """Read a CSV file into contiguous segments.

    Uses the ``csv`` module with ``newline=""``, so CRLF, LF and mixed line endings all
    read the same. A row is skipped, counted under a reason, when it is short (``short_row``),
    its timestamp does not parse (``bad_timestamp``), a feature is empty or NaN (``nan``),
    not a number (``non_numeric``) or infinite (``non_finite``), its label does not parse
    (``bad_label``), or its timestamp repeats (``duplicate_ts``) or goes back
    (``backwards_ts``) relative to the last kept row.

    With ``window_length``, data whose longest segment is shorter than one window is an
    error; shorter segments are only noted (``make_windows`` drops or pads them).
    """
    file = Path(cfg.path)
    origin = f"{file.parent.name}/{file.name}" if file.parent.name else file.name
    names = cfg.resolved_feature_names()
    skips = _Skips()
    ts_list: list[float] = []
    rows_list: list[list[float]] = []
    labels_list: list[bool] = []
    data_rows = 0
    truncated = False
    ts_how = ""
    try:
        with file.open(newline="", encoding=cfg.encoding) as fh:
            reader = csv.reader(fh, delimiter=cfg.separator)
            header = next(reader, None)
            if not header:
                raise DataError(f"{file}: empty file, no header row")
            header[0] = header[0].removeprefix("\ufeff")  # a BOM left by spreadsheet exports
            i_ts = _find_column(header, cfg.timestamp_column, "timestamp", file)
            i_feat = [_find_column(header, c, "feature", file) for c in cfg.feature_columns]
            i_lab = (
                None if cfg.label_column is None else _find_column(header, cfg.label_column, "label", file)
            )
            needed = max([i_ts, *i_feat, *([] if i_lab is None else [i_lab])]) + 1
            parse_ts: Callable[[str], float] | None = None
            last_ts = -math.inf
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line carries no data
                if cfg.first_rows is not None and data_rows >= cfg.first_rows:
                    truncated = True
                    break
                data_rows += 1
                line = f"line {reader.line_num}"
                if len(row) < needed:
                    skips.add("short_row", f"{line}: {len(row)} fields, need {needed}")
                    continue
                if parse_ts is None:
                    parse_ts, ts_how = _timestamp_parser(cfg, row[i_ts], file)
                try:
                    t = parse_ts(row[i_ts])
                except (ValueError, OverflowError, OSError):
                    skips.add("bad_timestamp", f"{line}: {row[i_ts]!r}")
                    continue
                if not math.isfinite(t):
                    skips.add("bad_timestamp", f"{line}: {row[i_ts]!r}")
                    continue
                vals: list[float] = []
                for col, i in zip(cfg.feature_columns, i_feat, strict=True):
                    v, reason = _parse_value(row[i])
                    if reason is not None:
                        skips.add(reason, f"{line}, column {col!r}: {row[i]!r}")
                        break
                    vals.append(v)
                else:
                    label = False
                    if i_lab is not None:
                        lv, reason = _parse_value(row[i_lab])
                        if reason is not None:
                            skips.add("bad_label", f"{line}, column {cfg.label_column!r}: {row[i_lab]!r}")
                            continue
                        label = lv != 0.0
                    if t == last_ts:
                        skips.add("duplicate_ts", f"{line}: {row[i_ts]!r}")
                        continue
                    if t < last_ts:
                        skips.add("backwards_ts", f"{line}: {row[i_ts]!r}")
                        continue
                    last_ts = t
                    ts_list.append(t)
                    rows_list.append(vals)
                    labels_list.append(label)
    except OSError as exc:
        raise DataError(f"cannot read CSV {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}: not valid {cfg.encoding} text ({exc.reason}); set data.csv.encoding"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{file}: malformed CSV ({exc})") from None

    if not ts_list:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(skips.counts.items())) or "none"
        raise DataError(f"{file}: no usable data rows ({data_rows} read; skipped: {skipped})")

    ts = np.asarray(ts_list, dtype=np.float64)
    values = np.asarray(rows_list, dtype=np.float32).reshape(len(ts_list), len(i_feat))
    labels = np.asarray(labels_list, dtype=bool) if i_lab is not None else None
    mean = values.mean(axis=0, dtype=np.float64)
    std = values.std(axis=0, dtype=np.float64)
    for col, m, s in zip(cfg.feature_columns, mean, std, strict=True):
        if is_constant(float(s), float(m)):
            raise DataError(
                f"{file}: feature column {col!r} is constant ({m:.6g}) over the {len(ts)} kept rows; "
                "a constant column carries no information and cannot be standardised: "
                "remove it from data.csv.feature_columns"
            )

    median = _median_step(ts)
    if cfg.max_gap_s is not None:
        max_gap, how = cfg.max_gap_s, "data.csv.max_gap_s"
    elif median is not None:
        max_gap, how = GAP_FACTOR * median, f"{GAP_FACTOR:g} × the median step {median:g} s"
    else:
        max_gap, how = 1.0, "a single row"
    segments = _segments(ts, values, labels, origin, max_gap)

    notes = [f"csv {file}: {data_rows} data rows read, {len(ts)} kept; timestamps as {ts_how}"]
    if truncated:
        notes.append(f"data.csv.first_rows = {cfg.first_rows}: the rows after those were not read")
    notes += skips.notes()
    notes.append(_describe_segments(segments, max_gap, how))
    if labels is not None:
        notes.append(
            f"labels from column {cfg.label_column!r}: {int(labels.sum())} of {len(labels)} rows "
            "anomalous (kept for reports and evaluation; training does not read them)"
        )
    if window_length is not None:
        notes += _check_window_length(segments, window_length, str(file))

    period, p05, p95 = _period_of(segments)
    return Dataset(
        source=f"csv: {file}" + (f" (first {cfg.first_rows} rows)" if cfg.first_rows else ""),
        features=names,
        units=[cfg.units.get(n, "") for n in names],
        segments=segments,
        rows=len(ts),
        skipped=dict(skips.counts),
        notes=notes,
        sample_period_s=period,
        sample_period_p05_s=p05,
        sample_period_p95_s=p95,
    )


# ------------------------------------------------------------------------------- synthetic


def synthetic_dataset(cfg: SyntheticDataConfig) -> Dataset:
    """The synthetic fleet of ``anomalyd.synthetic``, each device cut into segments at its gaps.

    The gap threshold is ``GAP_FACTOR`` × the fleet's median step, the same rule as for a
    CSV file without ``max_gap_s``.
    """
    spec = cfg.fleet_spec()
    fleet = synthetic.generate_fleet(spec)
    steps = [np.diff(np.asarray(d.ts, dtype=np.float64)) for d in fleet if len(d.ts) > 1]
    pooled = np.concatenate(steps) if steps else np.zeros(0)
    pooled = pooled[pooled > 0]
    median = float(np.median(pooled)) if pooled.size else cfg.period_s
    max_gap = GAP_FACTOR * median
    segments: list[Segment] = []
    skipped: dict[str, int] = {}
    for dev in fleet:
        ts = np.asarray(dev.ts, dtype=np.float64)
        values = np.asarray(dev.values, dtype=np.float32)
        labels = np.asarray(dev.labels, dtype=bool)
        # The generator is meant to emit finite values only; count rather than trust.
        ok = np.isfinite(values).all(axis=1)
        if not ok.all():
            skipped["nan"] = skipped.get("nan", 0) + int((~ok).sum())
            ts, values, labels = ts[ok], values[ok], labels[ok]
        segments += _segments(ts, values, labels, str(dev.device), max_gap)
    if not segments:
        raise DataError(f"the synthetic fleet is empty ({spec})")
    rows = sum(len(s.ts) for s in segments)
    hours = cfg.duration_s / 3600
    source = (
        f"synthetic fleet: {cfg.n_devices} devices × {hours:g} h, period {cfg.period_s:g} s, "
        f"seed {cfg.seed}, {cfg.anomalies_per_device_hour:g} anomalies per device-hour"
        + (f", starts staggered by {cfg.start_stagger_s:g} s" if cfg.start_stagger_s else "")
    )
    notes = [f"{source}: {rows} rows"]
    if skipped:
        notes.append(f"skipped {sum(skipped.values())} non-finite row(s) from the generator")
    notes.append(_describe_segments(segments, max_gap, f"{GAP_FACTOR:g} × the median step {median:g} s"))
    n_anom = sum(int(s.labels.sum()) for s in segments if s.labels is not None)
    if n_anom:
        notes.append(
            f"{n_anom} rows labelled anomalous (kept for reports and evaluation; training does not read them)"
        )
    features = list(synthetic.FEATURES)
    period, p05, p95 = _period_of(segments)
    return Dataset(
        source=source,
        features=features,
        units=[str(synthetic.UNITS.get(f, "")) for f in features],
        segments=segments,
        rows=rows,
        skipped=skipped,
        notes=notes,
        sample_period_s=period,
        sample_period_p05_s=p05,
        sample_period_p95_s=p95,
    )
