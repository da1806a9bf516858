"""The report written next to an exported model: three PNG figures and ``report.md``.

- ``loss.png``: training and validation loss per epoch, the kept epoch marked;
- ``scores.png``: distribution of validation and calibration scores (log x) with the
  threshold;
- ``series.png``: a stretch of series scored by the *exported* ONNX model through ONNX
  Runtime (the daemon's loader), labelled anomalies shaded, score and threshold below;
  inputs outside ``model.score_features`` are marked "not scored".

The stretch: for synthetic training data, a fresh fleet from the same generator with
anomalies injected and a different seed (the model never saw it); for a CSV with a
label column, the file itself (training rows included, said in the report); otherwise
the held-out validation and calibration rows, unlabelled.

On that stretch the report measures, against the labels: event recall (share of
labelled anomaly runs with at least one window above the threshold among the windows
that contain part of the run), false alarms (runs of consecutive above-threshold
windows that contain no labelled sample) and the share of clean windows above the
threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from anomalyd_train.windows import make_windows

if TYPE_CHECKING:
    from anomalyd_train.data import Segment
    from anomalyd_train.pipeline import TrainResult

#: Seed offset of the evaluation fleet, so it never equals the training fleet's seed.
EVAL_SEED_OFFSET = 1_000_003
EVAL_ANOMALIES_PER_DEVICE_HOUR = 2.0
EVAL_DEVICES = 4
EVAL_MAX_HOURS = 3.0
#: At most this many samples in the plotted stretch, so a person can see single spikes.
PLOT_MAX_SAMPLES = 4_000

_TRAIN_COLOUR = "#1f77b4"
_VAL_COLOUR = "#ff7f0e"
_CAL_COLOUR = "#2ca02c"
_THRESHOLD_COLOUR = "#d62728"
_ANOMALY_SHADE = "#f4a6a6"


@dataclass
class ScoredStretch:
    """Series scored window by window, with labels where known."""

    description: str
    segments: list[Segment]
    # per segment: window end indices, scores, contributions, window-contains-label flags
    ends: list[npt.NDArray[np.int64]]
    scores: list[npt.NDArray[np.float32]]
    contains_label: list[npt.NDArray[np.bool_] | None]
    labelled: bool


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _stretch_segments(result: TrainResult) -> tuple[list[Segment], str, bool]:
    cfg = result.config
    if cfg.data.source == "synthetic":
        from anomalyd_train.data import synthetic_dataset

        syn = cfg.data.synthetic
        eval_cfg = syn.model_copy(
            update={
                "seed": syn.seed + EVAL_SEED_OFFSET,
                "n_devices": min(syn.n_devices, EVAL_DEVICES),
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


def score_stretch(result: TrainResult) -> ScoredStretch:
    """Score the report's stretch with the exported file through ``anomalyd.model``."""
    from anomalyd.model import SessionOptions, load_model

    segments, description, labelled = _stretch_segments(result)
    model = load_model(result.model_path, SessionOptions(providers="cpu"))
    length = model.window_length
    ends: list[npt.NDArray[np.int64]] = []
    scores: list[npt.NDArray[np.float32]] = []
    contains: list[npt.NDArray[np.bool_] | None] = []
    kept: list[Segment] = []
    for seg in segments:
        ws = make_windows([seg], length, hop=1, padding="none")
        if len(ws) == 0:
            continue
        parts = [model.run(ws.windows[i : i + 1024])[0] for i in range(0, len(ws), 1024)]
        kept.append(seg)
        scores.append(np.concatenate(parts))
        ends.append(np.arange(length - 1, len(seg.ts), dtype=np.int64))
        if labelled and seg.labels is not None:
            view = sliding_window_view(np.asarray(seg.labels, bool), length)
            contains.append(np.asarray(view.any(axis=1), dtype=bool))
        else:
            contains.append(None)
    return ScoredStretch(description, kept, ends, scores, contains, labelled and bool(kept))


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def detection_numbers(stretch: ScoredStretch, threshold: float) -> dict[str, Any]:
    """Event recall, false alarms and clean-window alarm rate on a labelled stretch."""
    events = detected = false_alarms = clean = clean_above = windows = 0
    hours = 0.0
    for seg, score, contains in zip(stretch.segments, stretch.scores, stretch.contains_label, strict=True):
        windows += len(score)
        hours += float(seg.ts[-1] - seg.ts[0]) / 3600 if len(seg.ts) > 1 else 0.0
        if contains is None or seg.labels is None:
            continue
        above = score > threshold
        length = len(seg.ts) - len(score) + 1
        for start, stop in _runs(np.asarray(seg.labels, bool)):
            events += 1
            # windows that contain a sample of [start, stop): their end is in [start, stop + L - 1)
            lo, hi = max(start - (length - 1), 0), min(stop, len(score))
            detected += bool(above[lo:hi].any())
        for a, b in _runs(above):
            false_alarms += not bool(contains[a:b].any())
        clean += int((~contains).sum())
        clean_above += int((above & ~contains).sum())
    numbers: dict[str, Any] = {"stretch": stretch.description, "windows scored": windows}
    if stretch.labelled:
        numbers["labelled anomaly events"] = events
        if events:
            numbers["event recall"] = f"{detected}/{events} ({detected / events:.0%})"
        numbers["false alarms (alarm runs without a labelled sample)"] = (
            f"{false_alarms} in {hours:.1f} h of series" if hours else str(false_alarms)
        )
        numbers["clean windows above threshold"] = (
            f"{clean_above}/{clean} ({clean_above / clean:.2e})" if clean else "0/0"
        )
    return numbers


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
    ax.set_title(
        f"Loss per epoch — {result.config.model.kind} model\n"
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
    ax.set_xlabel("score (log scale; ≈1 is a typical training window)")
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
    # Scores pile up around 1 and the threshold sits in the right tail: the upper left is free.
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pick_stretch(stretch: ScoredStretch) -> tuple[int, slice]:
    """The segment and sample range to plot: the one with the most labelled events,
    cut to ``PLOT_MAX_SAMPLES`` around its first events."""
    best, best_events = 0, -1
    for i, seg in enumerate(stretch.segments):
        n_events = len(_runs(np.asarray(seg.labels, bool))) if seg.labels is not None else 0
        if n_events > best_events:
            best, best_events = i, n_events
    seg = stretch.segments[best]
    n = len(seg.ts)
    start = 0
    if seg.labels is not None and np.asarray(seg.labels).any():
        first = int(np.flatnonzero(seg.labels)[0])
        start = max(0, min(first - PLOT_MAX_SAMPLES // 8, n - PLOT_MAX_SAMPLES))
    return best, slice(start, min(n, start + PLOT_MAX_SAMPLES))


def plot_series(result: TrainResult, stretch: ScoredStretch, path: Path) -> None:
    plt = _pyplot()
    i, window = _pick_stretch(stretch)
    seg = stretch.segments[i]
    features = result.dataset.features
    units = result.dataset.units
    n_f = len(features)
    t0 = float(seg.ts[window.start])
    minutes = (seg.ts[window] - t0) / 60.0
    fig, axes = plt.subplots(
        n_f + 1,
        1,
        sharex=True,
        figsize=(11, 1.5 * n_f + 2.8),
        dpi=110,
        gridspec_kw={"height_ratios": [1.0] * n_f + [1.6]},
    )
    label_runs = _runs(np.asarray(seg.labels, bool)[window]) if seg.labels is not None else []
    scored = result.export.contract.scored_feature_names
    for f, ax in enumerate(axes[:n_f]):
        ax.plot(minutes, seg.values[window, f], lw=0.7, color=_TRAIN_COLOUR)
        label = f"{features[f]}\n[{units[f]}]" if units[f] else features[f]
        # An input that is not scored cannot raise the score below; say so beside its trace.
        ax.set_ylabel(label if features[f] in scored else f"{label}\n(not scored)", fontsize=9)
        ax.grid(True, alpha=0.3)
    score_ax = axes[-1]
    ends = stretch.ends[i]
    score = stretch.scores[i]
    sel = (ends >= window.start) & (ends < window.stop)
    score_minutes = (seg.ts[ends[sel]] - t0) / 60.0
    threshold = result.threshold
    score_ax.plot(score_minutes, np.maximum(score[sel], 1e-3), lw=0.8, color="black", label="score")
    score_ax.axhline(threshold, color=_THRESHOLD_COLOUR, lw=1.5, ls="--", label=f"threshold {threshold:.3g}")
    above = sel & (score > threshold)
    if above.any():
        score_ax.plot(
            (seg.ts[ends[above]] - t0) / 60.0,
            score[above],
            "o",
            ms=2.5,
            color=_THRESHOLD_COLOUR,
            label="above threshold",
        )
    score_ax.set_yscale("log")
    score_ax.set_ylabel("score\n(log scale)", fontsize=9)
    score_ax.set_xlabel(f"minutes from {np.datetime64(int(t0), 's')} UTC")
    score_ax.grid(True, which="major", alpha=0.3)
    for ax in axes:
        for a, b in label_runs:
            lo = minutes[a]
            hi = minutes[min(b, len(minutes) - 1)]
            ax.axvspan(lo, hi, color=_ANOMALY_SHADE, alpha=0.6, lw=0)
    handles, labels = score_ax.get_legend_handles_labels()
    if label_runs:
        from matplotlib.patches import Patch

        handles.append(Patch(color=_ANOMALY_SHADE, alpha=0.6))
        labels.append("labelled anomaly")
    # Below the axes, where it can hide no data.
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"Scored by the exported ONNX model — {seg.origin}\n{stretch.description}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_report(result: TrainResult) -> list[Path]:
    """Write the figures and ``report.md`` into ``result.out_dir``; record them on ``result``."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "loss.png", out / "scores.png"]
    plot_loss(result, files[0])
    plot_scores(result, files[1])
    stretch = score_stretch(result)
    numbers: dict[str, Any] = {}
    if stretch.segments:
        files.append(out / "series.png")
        plot_series(result, stretch, files[2])
        numbers = detection_numbers(stretch, result.threshold)
    result.report_numbers = {k: v for k, v in numbers.items() if k != "stretch"}
    md = out / "report.md"
    md.write_text(_markdown(result, numbers, [f.name for f in files]), encoding="utf-8")
    result.report_files = [*files, md]
    return result.report_files


def _markdown(result: TrainResult, numbers: dict[str, Any], figures: list[str]) -> str:
    from anomalyd_train.pipeline import describe_score_features

    c = result.export.contract
    cal = result.calibration
    h = result.history
    val = result.validation_scores
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
        f"- training: {len(h.loss)} epochs, kept epoch {h.best_epoch}"
        + (f" (validation loss {h.val_loss[h.best_epoch - 1]:.5f})" if h.val_loss and h.best_epoch else ""),
        f"- threshold: {cal.threshold:.6g} by `{cal.method}` on {cal.n_scores} {result.calibration_source} "
        "windows"
        + (
            f", target false-alarm rate {cal.target_false_alarm_rate:g} per window"
            if cal.target_false_alarm_rate is not None
            else ""
        )
        + (f"; {cal.note}" if cal.note else ""),
    ]
    from anomalyd_train.pipeline import held_out_devices

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
    lines += ["- export checks: " + "; ".join(f"{x.name}: {x.detail}" for x in result.export.checks), ""]
    titles = {
        "loss.png": "Loss curves",
        "scores.png": "Score distribution on held-out normal windows",
        "series.png": "A scored stretch",
    }
    for name in figures:
        lines += [f"## {titles.get(name, name)}", "", f"![{titles.get(name, name)}]({name})", ""]
        if name == "series.png" and numbers:
            lines += [f"Measured on the {numbers['stretch']}:", ""]
            lines += [f"- {k}: {v}" for k, v in numbers.items() if k != "stretch"]
            lines += [
                "",
                "Event recall counts a labelled run as found when any window containing part of it "
                "scores above the threshold; a false alarm is a run of above-threshold windows that "
                "contains no labelled sample. No smoothing or hysteresis is applied here (the daemon's "
                "detector adds both).",
                "",
            ]
    return "\n".join(lines)
