"""The report written next to an exported model: PNG figures and ``report.md``.

- ``loss.png``: training and validation loss per epoch, the kept epoch marked;
- ``scores.png``: distribution of validation and calibration scores (log x) with the
  threshold;
- ``series.png``: every shown device of the evaluation series, one row each: its score
  from the *exported* ONNX model through ONNX Runtime (the daemon's loader) against the
  threshold;
- ``series-<device>.png``: one per shown device, its inputs above its score; inputs
  outside ``model.score_features`` are marked "not scored".

In the series figures labelled anomalies are shaded (amber) and every alert run (a run
of consecutive above-threshold windows) is marked by a band across the top of the score
panel and dots on its windows: green when one of its windows contains a labelled sample (a
detection), red when none does (a false alarm), orange when the series has no labels to
judge it by.

The evaluation series: for synthetic training data, a fresh fleet from the same generator
with anomalies injected and a different seed (the model never saw it); for a CSV with a
label column, the file itself (training rows included, said in the report); otherwise
the held-out validation and calibration rows, unlabelled.

The shown devices: those ``report.devices`` names, else the first ``report.max_devices``
in data order (the synthetic evaluation fleet has that many devices).

Per device and over all shown devices the report counts, against the labels: labelled
anomaly events and how many were found (a window containing part of the run scores above
the threshold), alert runs split into detections and false alarms, and the share of clean
windows (no labelled sample) above the threshold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from anomalyd.errors import ConfigError
from anomalyd_train.windows import make_windows

if TYPE_CHECKING:
    from anomalyd_train.config import TrainConfig
    from anomalyd_train.data import Segment
    from anomalyd_train.pipeline import TrainResult

#: Seed offset of the evaluation fleet, so it never equals the training fleet's seed.
EVAL_SEED_OFFSET = 1_000_003
EVAL_ANOMALIES_PER_DEVICE_HOUR = 2.0
EVAL_MAX_HOURS = 3.0
#: A labelled run or alert run is drawn at least this share of the time axis wide, so a
#: single window in three hours of series is still visible.
MIN_SPAN_FRACTION = 0.005

_TRAIN_COLOUR = "#1f77b4"
_VAL_COLOUR = "#ff7f0e"
_CAL_COLOUR = "#2ca02c"
_THRESHOLD_COLOUR = "#d62728"
_SERIES_THRESHOLD_COLOUR = "#555555"  # not red: red marks false alarms in the series figures
_LABEL_SHADE = "#f6c85f"

AlertKind = Literal["detection", "false_alarm", "unjudged"]
#: Colour and legend name of each kind of alert run.
ALERT_STYLE: dict[str, tuple[str, str]] = {
    "detection": ("#2ca02c", "detection (alert run containing a labelled sample)"),
    "false_alarm": ("#d62728", "false alarm (alert run without a labelled sample)"),
    "unjudged": ("#ff7f0e", "alert run (no labels to judge it)"),
}


@dataclass
class ScoredSegment:
    """One segment scored window by window (hop 1, no padding)."""

    segment: Segment
    ends: npt.NDArray[np.int64]  # sample index of each window's last sample
    scores: npt.NDArray[np.float32]
    contains_label: npt.NDArray[np.bool_] | None  # per window: holds a labelled sample

    @property
    def window_length(self) -> int:
        return len(self.segment.ts) - len(self.scores) + 1


@dataclass
class ScoredDevice:
    """Every scored segment of one device (or file), in time order."""

    name: str
    parts: list[ScoredSegment]

    @property
    def seconds(self) -> float:
        return sum(float(p.segment.ts[-1] - p.segment.ts[0]) for p in self.parts if len(p.segment.ts) > 1)


@dataclass
class ScoredStretch:
    """The shown devices of the evaluation series, scored, with labels where known."""

    description: str
    devices: list[ScoredDevice]
    labelled: bool
    not_shown: list[str] = field(default_factory=list)  # devices of the series left out
    without_windows: list[str] = field(default_factory=list)  # shown, but too short for one window


@dataclass(frozen=True)
class AlertRun:
    """A run of consecutive above-threshold windows ``[first, stop)`` of one segment."""

    first: int
    stop: int
    kind: AlertKind


@dataclass
class DeviceNumbers:
    """What the report counts on one device (or, summed, on all of them)."""

    device: str
    seconds: float
    windows: int
    labelled: bool
    events: int = 0  # labelled anomaly runs
    found: int = 0  # ... with a window containing part of the run above the threshold
    detections: int = 0
    false_alarms: int = 0
    unjudged: int = 0
    clean_windows: int = 0
    clean_above: int = 0

    def add(self, other: DeviceNumbers) -> None:
        self.seconds += other.seconds
        self.windows += other.windows
        self.labelled = self.labelled or other.labelled
        self.events += other.events
        self.found += other.found
        self.detections += other.detections
        self.false_alarms += other.false_alarms
        self.unjudged += other.unjudged
        self.clean_windows += other.clean_windows
        self.clean_above += other.clean_above


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------ which series, which devices


def _eval_fleet_size(cfg: TrainConfig) -> int:
    syn = cfg.data.synthetic
    # Named devices keep the training fleet's ids, so the fleet must reach the named ones.
    return syn.n_devices if cfg.report.devices is not None else min(syn.n_devices, cfg.report.max_devices)


def _series_segments(result: TrainResult) -> tuple[list[Segment], str, bool]:
    """The evaluation series: its segments, a description, and whether it is labelled."""
    cfg = result.config
    if cfg.data.source == "synthetic":
        from anomalyd_train.data import synthetic_dataset

        syn = cfg.data.synthetic
        eval_cfg = syn.model_copy(
            update={
                "seed": syn.seed + EVAL_SEED_OFFSET,
                "n_devices": _eval_fleet_size(cfg),
                "duration_s": min(syn.duration_s, EVAL_MAX_HOURS * 3600),
                "anomalies_per_device_hour": EVAL_ANOMALIES_PER_DEVICE_HOUR,
            }
        )
        ds = synthetic_dataset(eval_cfg)
        return ds.segments, f"unseen evaluation fleet — {ds.source}", True
    segments = result.dataset.segments
    csv = cfg.data.csv
    if csv is not None and csv.label_column is not None and csv.first_rows is not None:
        # Trained on the first rows only (SKAB's protocol): score the whole file, whose
        # later rows the model never saw.
        from anomalyd.errors import DataError
        from anomalyd_train.data import load_csv

        try:
            whole = load_csv(csv.model_copy(update={"first_rows": None}))
        except DataError:
            whole = None
        if whole is not None:
            return (
                whole.segments,
                f"{whole.source}: the whole file with its labels (the first {csv.first_rows} rows trained)",
                True,
            )
    if segments and all(s.labels is not None for s in segments):
        return segments, f"{result.dataset.source}, all rows (training rows included), with its labels", True
    from anomalyd_train.windows import split_by_time

    _, val, cal = split_by_time(segments, cfg.split.validation_fraction, cfg.split.calibration_fraction)
    return val + cal, f"{result.dataset.source}, held-out rows (no labels)", False


def _origins_in_order(segments: Sequence[Segment]) -> list[str]:
    return list(dict.fromkeys(s.origin for s in segments))


def choose_devices(cfg: TrainConfig, origins: Sequence[str]) -> tuple[list[str], list[str]]:
    """The devices to show (``report.devices``, else the first ``report.max_devices``) and
    the rest of ``origins``, both in data order."""
    if cfg.report.devices is not None:
        named = set(cfg.report.devices)
        shown = [o for o in origins if o in named]
    else:
        shown = list(origins[: cfg.report.max_devices])
    return shown, [o for o in origins if o not in shown]


def check_report_devices(cfg: TrainConfig, origins: Sequence[str]) -> None:
    """``ConfigError`` at ``report.devices`` when it names a device the data does not have.

    Called with the training data's origins before training, so a misspelt name costs
    seconds, not a run: the synthetic evaluation fleet keeps the training fleet's device
    ids, and a CSV's evaluation series is its own file.
    """
    if cfg.report.devices is None:
        return
    known = list(dict.fromkeys(origins))
    unknown = [d for d in cfg.report.devices if d not in known]
    if unknown:
        listed = ", ".join(known[:8]) + (f" ... ({len(known)} in all)" if len(known) > 8 else "")
        raise ConfigError(f"{unknown} not among the data's devices: {listed}", "report.devices")


def score_stretch(result: TrainResult) -> ScoredStretch:
    """Score the shown devices of the evaluation series with the exported file through
    ``anomalyd.model`` (the daemon's loader and ONNX Runtime)."""
    from anomalyd.model import SessionOptions, load_model

    segments, description, labelled = _series_segments(result)
    origins = _origins_in_order(segments)
    shown, not_shown = choose_devices(result.config, origins)
    model = load_model(result.model_path, SessionOptions(providers="cpu"))
    length = model.window_length
    devices: list[ScoredDevice] = []
    # A named device can still lack a window here (all its segments shorter than L):
    # the report names it rather than drop it.
    without_windows = [d for d in result.config.report.devices or [] if d not in origins]
    for name in shown:
        parts: list[ScoredSegment] = []
        for seg in (s for s in segments if s.origin == name):
            ws = make_windows([seg], length, hop=1, padding="none")
            if len(ws) == 0:
                continue
            scores = np.concatenate([model.run(ws.windows[i : i + 1024])[0] for i in range(0, len(ws), 1024)])
            contains = None
            if labelled and seg.labels is not None:
                view = sliding_window_view(np.asarray(seg.labels, bool), length)
                contains = np.asarray(view.any(axis=1), dtype=bool)
            ends = np.arange(length - 1, len(seg.ts), dtype=np.int64)
            parts.append(ScoredSegment(seg, ends, scores, contains))
        if parts:
            devices.append(ScoredDevice(name, parts))
        else:
            without_windows.append(name)
    return ScoredStretch(description, devices, labelled and bool(devices), not_shown, without_windows)


# ------------------------------------------------------------------------------- counting


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def alert_runs(part: ScoredSegment, threshold: float) -> list[AlertRun]:
    """The segment's runs of above-threshold windows, each a detection (one of its windows
    contains a labelled sample), a false alarm (none does) or unjudged (no labels)."""
    runs = []
    for a, b in _runs(part.scores > threshold):
        kind: AlertKind
        if part.contains_label is None:
            kind = "unjudged"
        else:
            kind = "detection" if bool(part.contains_label[a:b].any()) else "false_alarm"
        runs.append(AlertRun(a, b, kind))
    return runs


def device_numbers(device: ScoredDevice, threshold: float) -> DeviceNumbers:
    """Events found, detections, false alarms and clean windows above threshold on one device."""
    n = DeviceNumbers(
        device.name,
        device.seconds,
        sum(len(p.scores) for p in device.parts),
        labelled=any(p.contains_label is not None for p in device.parts),
    )
    for part in device.parts:
        runs = alert_runs(part, threshold)
        n.detections += sum(r.kind == "detection" for r in runs)
        n.false_alarms += sum(r.kind == "false_alarm" for r in runs)
        n.unjudged += sum(r.kind == "unjudged" for r in runs)
        contains, labels = part.contains_label, part.segment.labels
        if contains is None or labels is None:
            continue
        above = part.scores > threshold
        length = part.window_length
        for start, stop in _runs(np.asarray(labels, bool)):
            n.events += 1
            # windows that contain a sample of [start, stop): window i covers [i, i + L - 1]
            lo, hi = max(start - (length - 1), 0), min(stop, len(above))
            n.found += bool(above[lo:hi].any())
        n.clean_windows += int((~contains).sum())
        n.clean_above += int((above & ~contains).sum())
    return n


def _counts_text(n: DeviceNumbers) -> str:
    """One line of counts, for the summary."""
    from anomalyd_train.pipeline import format_duration

    if not n.labelled:
        return f"{_count(n.unjudged, 'alert run')} in {format_duration(n.seconds)} of series (no labels)"
    return (
        f"{n.found}/{n.events} labelled events found; {_count(n.detections, 'detection')}, "
        f"{_count(n.false_alarms, 'false alarm')} in {format_duration(n.seconds)} of series"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _total(per_device: Sequence[DeviceNumbers], name: str) -> DeviceNumbers:
    total = DeviceNumbers(name, 0.0, 0, labelled=False)
    for n in per_device:
        total.add(n)
    return total


def detection_numbers(stretch: ScoredStretch, per_device: Sequence[DeviceNumbers]) -> dict[str, Any]:
    """The totals over the shown devices (event recall, detections, false alarms, clean
    windows above the threshold), then one line of counts per device (``device <name>``)."""
    from anomalyd_train.pipeline import format_duration

    total = _total(per_device, "all")
    numbers: dict[str, Any] = {
        "stretch": stretch.description,
        "devices shown": len(per_device),
        "windows scored": total.windows,
    }
    if stretch.labelled:
        numbers["labelled anomaly events"] = total.events
        if total.events:
            numbers["event recall"] = f"{total.found}/{total.events} ({total.found / total.events:.0%})"
        numbers["detections (alert runs with a labelled sample)"] = total.detections
        numbers["false alarms (alert runs without a labelled sample)"] = (
            f"{total.false_alarms} in {format_duration(total.seconds)} of series"
        )
        numbers["clean windows above threshold"] = (
            f"{total.clean_above}/{total.clean_windows} ({total.clean_above / total.clean_windows:.2e})"
            if total.clean_windows
            else "0/0"
        )
    else:
        numbers["alert runs (no labels to judge them)"] = (
            f"{total.unjudged} in {format_duration(total.seconds)} of series"
        )
    for n in per_device:
        numbers[f"device {n.device}"] = _counts_text(n)
    return numbers


# -------------------------------------------------------------------------------- figures


def _label_log_minor_ticks(ax: Any) -> None:
    """Label 2..9 × 10^k too when the axis spans under two decades (else it shows one label)."""
    from matplotlib.ticker import LogFormatterSciNotation

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 100:
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_loss(result: TrainResult, path: Path) -> None:
    plt = _pyplot()
    h = result.history
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    epochs = np.arange(1, len(h.loss) + 1)
    rest = [v for v in (h.loss[1:] + h.val_loss) if v > 0]
    # The first epoch's average loss (from random weights) can squash every later epoch
    # into a flat line at the bottom: cut it off the axis and give its value in the legend.
    clip_first = len(h.loss) >= 4 and bool(rest) and h.loss[0] > 3 * max(rest)
    train_label = f"training (epoch 1: {h.loss[0]:.3g}, off scale)" if clip_first else "training"
    ax.plot(epochs, h.loss, "o-", color=_TRAIN_COLOUR, label=train_label)
    if h.val_loss:
        ax.plot(epochs, h.val_loss, "s-", color=_VAL_COLOUR, label="validation")
    if h.best_epoch:
        ax.axvline(h.best_epoch, color="grey", ls="--", lw=1, label=f"kept: epoch {h.best_epoch}")
    ax.set_yscale("log")
    if clip_first:
        ax.set_ylim(min(rest) / 1.15, max(rest) * 1.3)
    _label_log_minor_ticks(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalised units, log scale)")
    stop = f"stopped early after epoch {len(h.loss)}" if h.stopped_early else "ran every epoch"
    ax.set_title(
        f"Loss per epoch — {result.config.model.kind} model, {stop}\n"
        "(training loss is averaged over each epoch, validation loss taken at its end)",
        fontsize=10,
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scores(result: TrainResult, path: Path) -> None:
    plt = _pyplot()
    threshold = result.threshold
    series = [("validation", result.validation_scores, _VAL_COLOUR)]
    if result.calibration_source == "calibration":
        series.append(("calibration", result.calibration_scores, _CAL_COLOUR))
    positive = np.concatenate([s[s > 0] for _, s, _ in series if s.size] or [np.ones(1, np.float32)])
    lo = max(float(positive.min()), 1e-6)
    hi = max(float(positive.max()), threshold) * 1.5
    bins = np.logspace(np.log10(lo), np.log10(hi), 80)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, scores, colour in series:
        if scores.size:
            above = float(np.mean(scores > threshold))
            ax.hist(
                np.clip(scores, lo, None),
                bins=bins,
                histtype="step",
                lw=1.6,
                color=colour,
                label=f"{name}: {scores.size} windows, {above:.2%} above",
            )
    c = result.calibration
    ax.axvline(threshold, color=_THRESHOLD_COLOUR, lw=2, label=f"threshold {threshold:.3g} ({c.method})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Where typical windows sit depends on the score (about 1 for the mean score, higher for
    # "peak", which takes a maximum): say it from the data rather than from a rule.
    typical = float(np.median(positive))
    ax.set_xlabel(f"score (log scale; the median held-out window scores {typical:.2g})")
    ax.set_ylabel("windows (log scale)")
    ax.set_title(
        "Held-out scores on normal data"
        + (
            f" — target false-alarm rate {c.target_false_alarm_rate:g} per window"
            if c.target_false_alarm_rate is not None
            else f" — threshold {c.method}"
        )
    )
    ax.grid(True, which="major", alpha=0.3)
    # Scores pile up around the median and the threshold sits in the right tail: the upper left is free.
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class _TimeAxis:
    """Seconds since a device's first sample, shown in minutes (or hours past three)."""

    t0: float
    per_unit: float
    unit: str
    min_width: float  # narrowest span drawn, in axis units

    @classmethod
    def of(cls, device: ScoredDevice) -> _TimeAxis:
        t0 = float(device.parts[0].segment.ts[0])
        span_s = float(device.parts[-1].segment.ts[-1]) - t0
        per_unit, unit = (3600.0, "hours") if span_s > 3 * 3600 else (60.0, "minutes")
        return cls(t0, per_unit, unit, max(span_s / per_unit, 1e-9) * MIN_SPAN_FRACTION)

    def __call__(self, ts: Any) -> Any:
        return (np.asarray(ts, dtype=np.float64) - self.t0) / self.per_unit

    def label(self) -> str:
        return f"{self.unit} from {np.datetime64(int(self.t0), 's')} UTC"


#: Alert runs are a band across the top of the score panel (this share of its height), so
#: they stay distinct from the labelled shading under them.
ALERT_BAND = 0.14


def _span(
    ax: Any, x0: float, x1: float, *, min_width: float, colour: str, alpha: float, gid: str, ymin: float = 0.0
) -> None:
    """Shade ``[x0, x1]`` from ``ymin`` (axes fraction) up, widened about its middle to
    ``min_width`` so it stays visible; ``gid`` says what it marks."""
    if x1 - x0 < min_width:
        mid = (x0 + x1) / 2
        x0, x1 = mid - min_width / 2, mid + min_width / 2
    ax.axvspan(x0, x1, ymin=ymin, color=colour, alpha=alpha, lw=0).set_gid(gid)


def _shade_labels(ax: Any, device: ScoredDevice, x: _TimeAxis) -> int:
    """Shade the device's labelled runs on ``ax``; returns how many."""
    n = 0
    for part in device.parts:
        seg = part.segment
        if part.contains_label is None or seg.labels is None:
            continue
        for a, b in _runs(np.asarray(seg.labels, bool)):
            lo, hi = float(x(seg.ts[a])), float(x(seg.ts[b - 1]))
            _span(ax, lo, hi, min_width=x.min_width, colour=_LABEL_SHADE, alpha=0.55, gid="label")
            n += 1
    return n


def _plot_score(ax: Any, device: ScoredDevice, x: _TimeAxis, threshold: float) -> dict[str, int]:
    """The device's score (log) and threshold, each alert run marked by a band at the top
    and its windows' dots, in its kind's colour; returns the runs per kind."""
    counts = dict.fromkeys(ALERT_STYLE, 0)
    for part in device.parts:
        ts = part.segment.ts
        ax.plot(x(ts[part.ends]), np.maximum(part.scores, 1e-3), lw=0.8, color="black")
        for run in alert_runs(part, threshold):
            colour = ALERT_STYLE[run.kind][0]
            ends = part.ends[run.first : run.stop]
            _span(
                ax,
                float(x(ts[ends[0]])),
                float(x(ts[ends[-1]])),
                min_width=x.min_width,
                colour=colour,
                alpha=0.9,
                gid=run.kind,
                ymin=1 - ALERT_BAND,
            )
            ax.plot(x(ts[ends]), part.scores[run.first : run.stop], "o", ms=2.5, color=colour)
            counts[run.kind] += 1
    ax.axhline(threshold, color=_SERIES_THRESHOLD_COLOUR, lw=1.3, ls="--")
    ax.set_yscale("log")
    # Room above the highest score for the band, so the band never hides a score.
    lo, hi = (np.log10(v) for v in ax.get_ylim())
    ax.set_ylim(10**lo, 10 ** (lo + (hi - lo) / (1 - ALERT_BAND)))
    ax.grid(True, which="major", alpha=0.3)
    return counts


def _legend_entries(
    threshold: float, *, labelled: bool, counts: dict[str, int], labels: int
) -> tuple[list[Any], list[str]]:
    """Legend handles and texts: score, threshold, and each mark with how many it has."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], color="black", lw=0.8),
        Line2D([], [], color=_SERIES_THRESHOLD_COLOUR, lw=1.3, ls="--"),
    ]
    names = ["score", f"threshold {threshold:.3g}"]
    kinds = ["detection", "false_alarm"] if labelled else ["unjudged"]
    if labelled:
        handles.append(Patch(color=_LABEL_SHADE, alpha=0.55))
        names.append(f"labelled anomaly ({labels})")
    for kind in kinds:
        colour, name = ALERT_STYLE[kind]
        handles.append(Patch(color=colour, alpha=0.9))
        names.append(f"{name}: {counts[kind]}")
    return handles, names


def device_figure(
    device: ScoredDevice,
    *,
    features: Sequence[str],
    units: Sequence[str],
    scored: Sequence[str],
    threshold: float,
    description: str,
) -> Any:
    """One device: each input above its score, labelled runs shaded in every panel and
    alert runs marked by kind in the score panel (the last axes). Returns the figure."""
    plt = _pyplot()
    n_f = len(features)
    fig, axes = plt.subplots(
        n_f + 1,
        1,
        sharex=True,
        figsize=(11, 1.5 * n_f + 3.0),
        dpi=110,
        gridspec_kw={"height_ratios": [1.0] * n_f + [1.6]},
        squeeze=False,
    )
    axes = axes[:, 0]
    x = _TimeAxis.of(device)
    for f, ax in enumerate(axes[:n_f]):
        for part in device.parts:
            ax.plot(x(part.segment.ts), part.segment.values[:, f], lw=0.7, color=_TRAIN_COLOUR)
        label = f"{features[f]}\n[{units[f]}]" if units[f] else features[f]
        # An input that is not scored cannot raise the score below; say so beside its trace.
        ax.set_ylabel(label if features[f] in scored else f"{label}\n(not scored)", fontsize=9)
        ax.grid(True, alpha=0.3)
    score_ax = axes[-1]
    counts = _plot_score(score_ax, device, x, threshold)
    score_ax.set_ylabel("score\n(log scale)", fontsize=9)
    score_ax.set_xlabel(x.label())
    # The same runs in every panel: the count for the legend is any one panel's.
    labels = [_shade_labels(ax, device, x) for ax in axes][-1]
    labelled = any(p.contains_label is not None for p in device.parts)
    handles, names = _legend_entries(threshold, labelled=labelled, counts=counts, labels=labels)
    # Below the axes, where it can hide no data.
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle(f"Scored by the exported ONNX model — {device.name}\n{description}", fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    return fig


def overview_figure(devices: Sequence[ScoredDevice], *, threshold: float, description: str) -> Any:
    """Every shown device's score, one row each, with the same marks as ``device_figure``."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(devices), 1, figsize=(11, 1.45 * len(devices) + 1.9), dpi=110, squeeze=False)
    axes = axes[:, 0]
    totals = dict.fromkeys(ALERT_STYLE, 0)
    labels = 0
    for device, ax in zip(devices, axes, strict=True):
        x = _TimeAxis.of(device)
        counts = _plot_score(ax, device, x, threshold)
        labels += _shade_labels(ax, device, x)
        for kind, n in counts.items():
            totals[kind] += n
        ax.set_ylabel(device.name, fontsize=8.5)
        ax.set_xlabel(x.label(), fontsize=8)
        ax.tick_params(labelsize=8)
    labelled = any(p.contains_label is not None for d in devices for p in d.parts)
    handles, names = _legend_entries(threshold, labelled=labelled, counts=totals, labels=labels)
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle(f"Score of every shown device (log scale)\n{description}", fontsize=10)
    # Keep the bottom 0.6 inch for the legend.
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    return fig


def device_file_names(names: Sequence[str]) -> list[str]:
    """``series-<device>.png`` per device: characters outside ``[A-Za-z0-9_-]`` become ``_``
    and a repeated result gets ``-2``, ``-3``, ... so every device keeps its own file."""
    out: list[str] = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "device"
        candidate, k = f"series-{stem}.png", 2
        while candidate in out:
            candidate, k = f"series-{stem}-{k}.png", k + 1
        out.append(candidate)
    return out


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path)
    _pyplot().close(fig)


# ------------------------------------------------------------------------------ the report


def write_report(result: TrainResult, echo: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write the figures and ``report.md`` into ``result.out_dir``; record them on ``result``."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "loss.png", out / "scores.png"]
    plot_loss(result, files[0])
    plot_scores(result, files[1])
    stretch = score_stretch(result)
    echo(
        f"report: scored {len(stretch.devices)} device(s) with the exported model: "
        + (", ".join(d.name for d in stretch.devices) or "none gives a window")
        + (
            f"; no window, not scored: {', '.join(stretch.without_windows)}"
            if stretch.without_windows
            else ""
        )
    )
    per_device = [device_numbers(d, result.threshold) for d in stretch.devices]
    numbers = detection_numbers(stretch, per_device) if stretch.devices else {}
    device_files: list[str] = []
    if stretch.devices:
        files.append(out / "series.png")
        _save(
            overview_figure(stretch.devices, threshold=result.threshold, description=stretch.description),
            files[-1],
        )
        device_files = device_file_names([d.name for d in stretch.devices])
        for device, name in zip(stretch.devices, device_files, strict=True):
            files.append(out / name)
            fig = device_figure(
                device,
                features=result.dataset.features,
                units=result.dataset.units,
                scored=result.export.contract.scored_feature_names,
                threshold=result.threshold,
                description=stretch.description,
            )
            _save(fig, files[-1])
    result.report_numbers = {k: v for k, v in numbers.items() if k != "stretch"}
    md = out / "report.md"
    md.write_text(_markdown(result, stretch, per_device, numbers, device_files), encoding="utf-8")
    result.report_files = [*files, md]
    return result.report_files


def _device_table(stretch: ScoredStretch, per_device: Sequence[DeviceNumbers]) -> list[str]:
    from anomalyd_train.pipeline import format_duration

    rows = [*per_device, _total(per_device, "**all shown**")] if len(per_device) > 1 else list(per_device)
    if stretch.labelled:
        lines = [
            "| device | series | windows | labelled events found | detections | false alarms "
            "| clean windows above threshold |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n in rows:
            clean = f"{n.clean_above}/{n.clean_windows}" if n.labelled else "no labels"
            found = f"{n.found}/{n.events}" if n.labelled else "no labels"
            lines.append(
                f"| {n.device} | {format_duration(n.seconds)} | {n.windows} | {found} | {n.detections} "
                f"| {n.false_alarms} | {clean} |"
            )
    else:
        lines = ["| device | series | windows | alert runs |", "|---|---:|---:|---:|"]
        for n in rows:
            lines.append(f"| {n.device} | {format_duration(n.seconds)} | {n.windows} | {n.unjudged} |")
    return lines


def _markdown(
    result: TrainResult,
    stretch: ScoredStretch,
    per_device: Sequence[DeviceNumbers],
    numbers: dict[str, Any],
    device_files: Sequence[str],
) -> str:
    from anomalyd_train.pipeline import (
        describe_early_stopping,
        describe_score_features,
        format_duration,
        held_out_devices,
    )

    c = result.export.contract
    cal = result.calibration
    h = result.history
    val = result.validation_scores
    cfg = result.config
    lines = [
        f"# Training report — {c.model_version}",
        "",
        f"- kind: {c.kind}; window length {c.window_length}; features: "
        + ", ".join(f"{f.name} [{f.unit}]" if f.unit else f.name for f in c.features),
        *(
            [f"- score: {describe_score_features(c.scored_feature_names, c.feature_names)}"]
            if c.score_features is not None
            else []
        ),
        f"- data: {result.dataset.source}",
        f"- windows: train {result.windows['train']} (used {result.windows['train_used']}), "
        f"validation {result.windows['validation']}, calibration {result.windows['calibration']}",
        f"- training: {len(h.loss)} of {cfg.training.epochs} epochs in {format_duration(h.seconds)}, "
        f"kept epoch {h.best_epoch}"
        + (f" (validation loss {h.val_loss[h.best_epoch - 1]:.5f})" if h.val_loss and h.best_epoch else ""),
        f"- early stopping: {describe_early_stopping(h, cfg.training.epochs, cfg.training.patience)}",
        f"- threshold: {cal.threshold:.6g} by `{cal.method}` on {cal.n_scores} {result.calibration_source} "
        "windows"
        + (
            f", target false-alarm rate {cal.target_false_alarm_rate:g} per window"
            if cal.target_false_alarm_rate is not None
            else ""
        )
        + (f"; {cal.note}" if cal.note else ""),
    ]
    held = held_out_devices(result)
    if held:
        lines.append(
            f"- calibration windows from {len(held)} held-out devices the network never trained on: "
            + ", ".join(held)
        )
    if val.size:
        lines.append(
            f"- validation windows above the threshold: {int((val > cal.threshold).sum())} of {val.size}"
        )
    lines += [
        "- export checks: " + "; ".join(f"{x.name}: {x.detail}" for x in result.export.checks),
        "",
        "## Loss curves",
        "",
        "![Loss curves](loss.png)",
        "",
        "## Score distribution on held-out normal windows",
        "",
        "![Score distribution on held-out normal windows](scores.png)",
        "",
        "## Devices scored by the exported model",
        "",
        f"The {stretch.description}, scored window by window (hop 1) by `model.onnx` through the "
        "daemon's loader and ONNX Runtime.",
        "",
    ]
    if stretch.not_shown:
        lines += [
            f"Shown: {len(stretch.devices)} of {len(stretch.devices) + len(stretch.not_shown)} devices; "
            f"not shown: {', '.join(stretch.not_shown)} (set `report.devices` or `report.max_devices`).",
            "",
        ]
    if stretch.without_windows:
        lines += [
            f"No window of {c.window_length} samples in the evaluation series, so not scored: "
            + ", ".join(stretch.without_windows)
            + ".",
            "",
        ]
    if not stretch.devices:
        lines += ["No device of the evaluation series gives a window: nothing was scored.", ""]
        return "\n".join(lines)
    lines += _device_table(stretch, per_device)
    lines += [""]
    lines += [f"- {k}: {v}" for k, v in numbers.items() if k != "stretch" and not k.startswith("device ")]
    lines += [
        "",
        "An alert run is a run of consecutive windows scoring above the threshold, marked in the "
        "figures by a band across the top of the score panel. It is a detection (green) when one "
        "of its windows contains a labelled sample, a false alarm (red) when none does; without "
        "labels it is only an alert run (orange). A "
        "labelled run (shaded amber) counts as found when any window containing part of it "
        "scores above the threshold. Runs and labels narrower than "
        f"{MIN_SPAN_FRACTION:.1%} of the time axis are drawn that wide so they stay visible. No "
        "smoothing or hysteresis is applied here (the daemon's detector adds both).",
        "",
        "![Score of every shown device](series.png)",
        "",
    ]
    for device, name in zip(stretch.devices, device_files, strict=True):
        lines += [f"### {device.name}", "", f"![{device.name}]({name})", ""]
    return "\n".join(lines)
