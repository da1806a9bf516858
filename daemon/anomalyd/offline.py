"""``anomalyd score``: a CSV file of one device's recorded readings through the daemon's
pipeline, offline, into a CSV of per-row scores and alerts (and a plot).

The rows are read by ``anomalyd.csvdata`` (bad rows counted, not fatal) and scored by
``anomalyd.replay``: the daemon's buffers, batcher, ONNX Runtime and detector, configured
as the daemon would be from the same configuration. So the output says what a running
daemon would have decided, window by window, had the device sent these readings.

The output CSV has one line per kept row, in file order::

    ts,device,score,smoothed,threshold,anomaly,alert[,label],contribution_<feature>...

``ts`` is epoch seconds; ``score``, ``smoothed``, ``threshold`` and the contributions are
empty on rows that ended no window (warm-up, a restart after a gap, a row the pipeline
rejected); ``anomaly`` is the window's verdict (``smoothed > threshold``) and ``alert`` the
device's alert state after the row (after hysteresis, so it carries over rows without a
window); ``label`` is the file's label column, when one is given.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anomalyd.config import Config
from anomalyd.csvdata import CsvOptions, CsvRecording, read_csv
from anomalyd.errors import ConfigError, MissingExtraError
from anomalyd.model import LoadedModel, SessionOptions, load_model
from anomalyd.replay import ReplayResult, replay

__all__ = ["OfflineScores", "runs", "score_file", "score_recording", "summary", "write_scores"]

log = logging.getLogger(__name__)

#: What to install for the plot (matplotlib is not a dependency of the daemon).
PLOT_EXTRA = "pip install 'anomalyd[plot]'"


@dataclass
class OfflineScores:
    """A recording and what the pipeline made of it: ``result`` has one entry per row."""

    recording: CsvRecording
    device: str
    result: ReplayResult
    model_version: str
    window_length: int

    @property
    def features(self) -> list[str]:
        return self.recording.names


def score_recording(
    recording: CsvRecording, model: LoadedModel, config: Config, device: str
) -> OfflineScores:
    """Score every row of ``recording`` (its features in the model's order) as ``device``."""
    if recording.names != model.contract.feature_names:
        raise ValueError(
            f"recording features {recording.names} are not the model's {model.contract.feature_names}"
        )
    result = replay(model, config, device, recording.ts, recording.values)
    return OfflineScores(recording, device, result, model.contract.model_version, model.window_length)


def runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) index ranges where ``mask`` is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def summary(scores: OfflineScores) -> list[str]:
    """What the run found, for people: windows, rejections, anomalies, alert periods, labels."""
    r = scores.result
    n = len(r)
    scored = int(np.count_nonzero(~np.isnan(r.score)))
    lines = [
        f"features: {scores.recording.mapping()}",
        f"model {scores.model_version}: window {scores.window_length} rows; threshold {r.threshold:.6g}",
        f"windows scored: {scored} of {n} rows (a row ends a window once the device has "
        f"{scores.window_length} readings without a gap)",
    ]
    if r.rejections:
        by_reason = Counter(str(x.reason) for x in r.rejections)
        parts = ", ".join(f"{reason} {count}" for reason, count in sorted(by_reason.items()))
        lines.append(
            f"rejected by the pipeline as the daemon would: {parts} (first: {r.rejections[0].detail})"
        )
    if scored == 0:
        lines.append(
            "no window was scored: fewer rows than one window, gaps longer than stream.max_gap_s, or a "
            "sample period the model was not trained for (stream.cadence_check; see the warnings above)"
        )
    alerts = runs(r.alert)
    lines.append(
        f"anomalous windows: {int(r.anomaly.sum())}; alert periods: {len(alerts)}, "
        f"{int(r.alert.sum())} rows in alert"
    )
    labels = scores.recording.labels
    if labels is not None:
        lines.append(
            f"labelled anomalous: {int(labels.sum())} rows in {len(runs(labels))} period(s); in alert: "
            f"{int((labels & r.alert).sum())} of them, and {int((~labels & r.alert).sum())} unlabelled rows"
        )
    return lines


def _number(x: float, fmt: str = "r") -> str:
    if math.isnan(x):
        return ""
    return repr(x) if fmt == "r" else format(x, fmt)


def write_scores(path: Path, scores: OfflineScores) -> int:
    """Write the scores CSV (see the module docstring) to ``path``; return its data rows.

    Written to a temporary file beside ``path`` and renamed over it: a failed run never
    leaves half a file where a complete one is expected.
    """
    r = scores.result
    labels = scores.recording.labels
    header = ["ts", "device", "score", "smoothed", "threshold", "anomaly", "alert"]
    header += ["label"] if labels is not None else []
    header += [f"contribution_{name}" for name in scores.features]
    device = scores.device
    label_list = labels.tolist() if labels is not None else None
    # Beside the target (same file system, so the rename is atomic); opened as any new file
    # is, so that it gets the permissions the umask gives.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            columns = zip(
                r.ts.tolist(),
                r.score.tolist(),
                r.smoothed.tolist(),
                r.row_threshold.tolist(),
                r.anomaly.tolist(),
                r.alert.tolist(),
                r.contributions.tolist(),
                strict=True,
            )
            for i, (ts, score, smoothed, threshold, anomaly, alert, contributions) in enumerate(columns):
                row = [repr(ts), device, _number(score), _number(smoothed), _number(threshold)]
                row += [str(int(anomaly)), str(int(alert))]
                if label_list is not None:
                    row.append(str(int(label_list[i])))
                # Contributions are float32: 9 significant digits write each one exactly.
                row += [_number(c, ".9g") for c in contributions]
                writer.writerow(row)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(r)


def _check_writable(path: Path, option: str) -> None:
    """Fail before the scoring, not after it, when ``path`` cannot be written."""
    directory = path.parent if str(path.parent) else Path()
    if not directory.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: no directory {str(directory)!r}", option)
    if path.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: it is a directory", option)
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"cannot write {str(path)!r}: directory {str(directory)!r} is not writable", option)


def score_file(
    path: Path,
    options: CsvOptions,
    config: Config,
    *,
    device: str | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    plot_required: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """The ``anomalyd score`` command: read, score, write the CSV (and the plot); exit code.

    ``out`` defaults to ``<file stem>.scores.csv`` in the working directory. ``plot``: the
    PNG to write, None for none; when matplotlib is not installed, a ``plot_required`` one
    (``--plot``) is an error (exit 69) before anything runs, else it is left out with a note.
    """
    from anomalyd.offline_plot import matplotlib_available, plot_scores

    out = out if out is not None else Path(f"{path.stem}.scores.csv")
    _check_writable(out, "--out")
    if plot is not None:
        if not matplotlib_available():
            if plot_required:
                raise MissingExtraError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}")
            echo(f"no plot: matplotlib is not installed ({PLOT_EXTRA}, then --plot PATH or run again)")
            plot = None
        else:
            _check_writable(plot, "--plot")
    model_options = SessionOptions(
        providers=config.model.providers,
        intra_op_threads=config.model.intra_op_threads,
        allow_spinning=config.model.allow_spinning,
    )
    model = load_model(config.model.path, model_options)  # ModelContractError: 65
    recording = read_csv(path, options, model.contract.feature_names)
    device = device if device is not None else path.stem
    scores = score_recording(recording, model, config, device)
    for line in recording.notes() + summary(scores):
        echo(line)
    rows = write_scores(out, scores)
    echo(f"wrote {out} ({rows} rows)")
    if plot is not None:
        plot_scores(plot, scores)
        echo(f"wrote {plot}")
    return 0
