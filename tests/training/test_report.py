"""The training report: every shown device, labelled anomalies shaded, detections and false
alarms told apart (in the figures and in the counts), early stopping and h:mm durations.

The counting and drawing tests run on hand-made scored series (no TensorFlow); one tiny
synthetic model is trained for the module to check the files and texts a real run writes.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from numpy.lib.stride_tricks import sliding_window_view

from anomalyd.errors import ConfigError
from anomalyd_train.config import TrainConfig, load_train_config
from anomalyd_train.data import Segment
from anomalyd_train.pipeline import (
    History,
    TrainResult,
    describe_early_stopping,
    format_duration,
    format_summary,
    train,
)
from anomalyd_train.report import (
    ALERT_BAND,
    ALERT_STYLE,
    MIN_SPAN_FRACTION,
    ScoredDevice,
    ScoredSegment,
    alert_runs,
    choose_devices,
    device_figure,
    device_file_names,
    device_numbers,
    overview_figure,
    write_report,
)

# ------------------------------------------------------------------------- hand-made series

L = 4
THRESHOLD = 1.0


def scored_device(name: str, n: int, labels: list[int] | None, above: list[int]) -> ScoredDevice:
    """A 1 Hz device of ``n`` samples scored with windows of ``L``: labelled samples at
    ``labels`` (None: no labels), windows ``above`` scoring over ``THRESHOLD``."""
    ts = 1_700_000_000.0 + np.arange(n, dtype=np.float64)
    values = np.stack([np.sin(np.arange(n) / 3.0), np.cos(np.arange(n) / 5.0)], axis=1).astype(np.float32)
    lab = None
    contains = None
    if labels is not None:
        lab = np.zeros(n, dtype=bool)
        lab[labels] = True
        contains = np.asarray(sliding_window_view(lab, L).any(axis=1), dtype=bool)
    scores = np.full(n - L + 1, 0.5, dtype=np.float32)
    scores[above] = 3.0
    seg = Segment(ts=ts, values=values, labels=lab, origin=name)
    return ScoredDevice(name, [ScoredSegment(seg, np.arange(L - 1, n, dtype=np.int64), scores, contains)])


def labelled_device() -> ScoredDevice:
    # 40 samples, 37 windows; window i holds samples i .. i+3.
    # Labelled runs: samples 10-11 (held by windows 7-11) and sample 30 (windows 27-30).
    # Alerts: window 0 (no label: false alarm), windows 5-7 (window 7 holds sample 10:
    # a detection although it starts on clean windows), windows 20-21 (false alarm).
    # The run at sample 30 is missed.
    return scored_device("machine-001", 40, [10, 11, 30], [0, 5, 6, 7, 20, 21])


def test_alert_runs_are_detections_only_when_they_hold_a_labelled_sample() -> None:
    part = labelled_device().parts[0]
    runs = [(r.first, r.stop, r.kind) for r in alert_runs(part, THRESHOLD)]
    assert runs == [(0, 1, "false_alarm"), (5, 8, "detection"), (20, 22, "false_alarm")]
    unlabelled = scored_device("x", 40, None, [3, 4]).parts[0]
    assert [r.kind for r in alert_runs(unlabelled, THRESHOLD)] == ["unjudged"]


def test_device_numbers_count_events_detections_and_false_alarms() -> None:
    n = device_numbers(labelled_device(), THRESHOLD)
    assert (n.events, n.found) == (2, 1)
    assert (n.detections, n.false_alarms, n.unjudged) == (1, 2, 0)
    assert n.windows == 37
    # windows holding a label: 7-11 and 27-30 (9); clean ones above: 0, 5, 6, 20, 21 (the
    # detection's first two windows end before the label starts)
    assert (n.clean_windows, n.clean_above) == (28, 5)
    assert n.seconds == 39.0
    plain = device_numbers(scored_device("x", 40, None, [3, 4, 30]), THRESHOLD)
    assert not plain.labelled
    assert (plain.unjudged, plain.detections, plain.false_alarms, plain.events) == (2, 0, 0, 0)


def _gids(ax: Any) -> Counter[str]:
    return Counter(str(p.get_gid()) for p in ax.patches)


def test_device_figure_shades_labels_and_colours_alert_runs_by_kind() -> None:
    device = labelled_device()
    fig = device_figure(
        device,
        features=["a", "b"],
        units=["kPa", ""],
        scored=["a"],
        threshold=THRESHOLD,
        description="hand-made",
    )
    try:
        feature_axes, score_ax = fig.axes[:2], fig.axes[2]
        assert len(fig.axes) == 3
        # labelled runs shaded in every panel; alert runs only beside the score
        for ax in feature_axes:
            assert _gids(ax) == Counter({"label": 2})
        assert _gids(score_ax) == Counter({"label": 2, "detection": 1, "false_alarm": 2})
        for patch in score_ax.patches:
            colour = {"label": "#f6c85f", **{k: c for k, (c, _) in ALERT_STYLE.items()}}[patch.get_gid()]
            assert patch.get_facecolor()[:3] == pytest.approx(to_rgba(colour)[:3])
            # labels shaded full height; alert runs a band at the top, apart from them
            bottom = 0.0 if patch.get_gid() == "label" else 1 - ALERT_BAND
            assert patch.get_y() == pytest.approx(bottom)
        assert ALERT_STYLE["detection"][0] == "#2ca02c"  # green
        assert ALERT_STYLE["false_alarm"][0] == "#d62728"  # red
        # The one-sample labelled run and the one-window false alarm are still drawn wide
        # enough to see (39 s of series in minutes).
        min_width = 39 / 60 * MIN_SPAN_FRACTION
        assert min(p.get_width() for p in score_ax.patches) >= min_width * (1 - 1e-9)
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "labelled anomaly (2)" in legend
        assert any(t.startswith("detection") and t.endswith(": 1") for t in legend)
        assert any(t.startswith("false alarm") and t.endswith(": 2") for t in legend)
        assert "(not scored)" in feature_axes[1].get_ylabel()
        assert "(not scored)" not in feature_axes[0].get_ylabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_overview_shows_every_device_with_its_own_marks() -> None:
    import matplotlib.pyplot as plt

    devices = [
        labelled_device(),
        scored_device("machine-002", 30, [], [2, 3, 12]),
        scored_device("c", 20, None, [1]),
    ]
    fig = overview_figure(devices, threshold=THRESHOLD, description="hand-made")
    try:
        assert [ax.get_ylabel() for ax in fig.axes] == ["machine-001", "machine-002", "c"]
        assert _gids(fig.axes[0]) == Counter({"label": 2, "detection": 1, "false_alarm": 2})
        assert _gids(fig.axes[1]) == Counter({"false_alarm": 2})
        assert _gids(fig.axes[2]) == Counter({"unjudged": 1})
    finally:
        plt.close(fig)


def test_device_file_names_are_safe_and_distinct() -> None:
    assert device_file_names(["machine-000", "valve1/0.csv", "valve1:0.csv", "é"]) == [
        "series-machine-000.png",
        "series-valve1_0_csv.png",
        "series-valve1_0_csv-2.png",
        "series-device.png",
    ]


# ------------------------------------------------------------------------ config and choice


def test_choose_devices_by_name_or_by_count() -> None:
    origins = ["m-0", "m-1", "m-2", "m-3", "m-4"]
    by_count = TrainConfig.model_validate({"report": {"max_devices": 2}})
    assert choose_devices(by_count, origins) == (["m-0", "m-1"], ["m-2", "m-3", "m-4"])
    named = TrainConfig.model_validate({"report": {"devices": ["m-3", "m-1"], "max_devices": 1}})
    # data order, and every named one whatever max_devices says
    assert choose_devices(named, origins) == (["m-1", "m-3"], ["m-0", "m-2", "m-4"])


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[report]\ndevices = []", "at least 1"),
        ('[report]\ndevices = ["a", "a"]', "repeated: ['a']"),
        ('[report]\ndevices = [""]', "at least 1 character"),
        ("[report]\nmax_devices = 0", "greater than or equal to 1"),
    ],
)
def test_bad_report_keys_are_config_errors(tmp_path: Path, toml: str, fragment: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert info.value.key_path is not None
    assert info.value.key_path.startswith("report.")
    assert fragment in str(info.value)


def test_an_unknown_report_device_stops_the_run_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig.model_validate(
        {
            "data": {"synthetic": {"n_devices": 2, "duration_s": 600.0}},
            "window": {"length": 12},
            "report": {"devices": ["machine-001", "machine-7"]},
        }
    )
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "out", progress=False)
    assert info.value.key_path == "report.devices"
    assert "['machine-7'] not among the data's devices: machine-000, machine-001" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""  # progress off: nothing printed


# ------------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0:00:00"),
        (59.4, "0:00:59"),
        (192.0, "0:03:12"),
        (3599.4, "0:59:59"),
        (3599.6, "1:00 h"),
        (7500.0, "2:05 h"),
        (36_029.0, "10:00 h"),
        (-3.0, "0:00:00"),
        (float("nan"), "0:00:00"),
    ],
)
def test_durations_read_h_mm_ss_or_h_mm(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_early_stopping_is_described_as_it_happened() -> None:
    stopped = History(
        loss=[1.0, 0.5, 0.6, 0.7, 0.8], val_loss=[1.0, 0.4, 0.5, 0.6, 0.7], best_epoch=2, stopped_early=True
    )
    assert describe_early_stopping(stopped, 20, 3) == (
        "triggered after epoch 5 of 20: no better validation loss for 3 epochs (patience 3); "
        "weights of epoch 2 kept (lowest validation loss)"
    )
    full = History(loss=[1.0, 0.5], val_loss=[], best_epoch=2, stopped_early=False)
    assert describe_early_stopping(full, 2, 3) == (
        "not triggered (patience 3): ran all 2 epochs; weights of epoch 2 kept (lowest training loss)"
    )
    assert describe_early_stopping(full, 2, 0).startswith("off (training.patience = 0): ran all 2 epochs")


# --------------------------------------------------------------------- a real (tiny) report

DURATION = re.compile(r"\b\d+:\d\d:\d\d\b|\b\d+:\d\d h\b")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    cfg = TrainConfig.model_validate(
        {
            "name": "report-tiny",
            "data": {"synthetic": {"n_devices": 3, "duration_s": 1800.0, "seed": 3}},
            "window": {"length": 16},
            "model": {"layers": 1, "units": 8},
            "training": {"epochs": 2, "batch_size": 64, "max_train_windows": 1500},
            "calibration": {"min_peaks": 10},
            "report": {"max_devices": 2},
        }
    )
    return train(cfg, tmp_path_factory.mktemp("report"), progress=False)


def _count(n: str, noun: str) -> str:
    return f"{n} {noun}" if n == "1" else f"{n} {noun}s"


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| device"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_report_shows_every_device_with_its_counts(run: TrainResult) -> None:
    names = sorted(p.name for p in run.report_files)
    assert names == [
        "loss.png",
        "report.md",
        "scores.png",
        "series-machine-000.png",
        "series-machine-001.png",
        "series.png",
    ]
    text = (run.out_dir / "report.md").read_text(encoding="utf-8")
    for name in names:
        if name.endswith(".png"):
            assert f"]({name})" in text, name
            assert (run.out_dir / name).stat().st_size > 0
    # One table row per shown device and one for all of them; its counts are the summary's.
    rows = _table_rows(text)
    assert set(rows) == {"machine-000", "machine-001", "**all shown**"}
    total = {"detections": 0, "false_alarms": 0, "windows": 0}
    for device in ("machine-000", "machine-001"):
        series, windows, found, detections, false_alarms, _clean = rows[device]
        assert re.fullmatch(r"0:29:\d\d", series)  # half an hour of 1 Hz series
        summary_line = run.report_numbers[f"device {device}"]
        assert summary_line == (
            f"{found} labelled events found; {_count(detections, 'detection')}, "
            f"{_count(false_alarms, 'false alarm')} in {series} of series"
        )
        total["detections"] += int(detections)
        total["false_alarms"] += int(false_alarms)
        total["windows"] += int(windows)
    assert run.report_numbers["detections (alert runs with a labelled sample)"] == total["detections"]
    assert run.report_numbers["windows scored"] == total["windows"]
    assert run.report_numbers["false alarms (alert runs without a labelled sample)"].startswith(
        f"{total['false_alarms']} in "
    )
    assert rows["**all shown**"][3:5] == [str(total["detections"]), str(total["false_alarms"])]
    # The evaluation fleet had 2 injected anomalies per device-hour: events were there to find.
    assert run.report_numbers["labelled anomaly events"] >= 1
    # Early stopping and durations, in the report and in the summary.
    assert "- early stopping: not triggered (patience 3): ran all 2 epochs; weights of epoch" in text
    training_line = next(line for line in text.splitlines() if line.startswith("- training: "))
    assert re.search(r"2 of 2 epochs in 0:00:\d\d,", training_line)
    summary = format_summary(run)
    assert "early stopping not triggered (patience 3)" in summary
    assert re.search(r"^training   2 of 2 epochs in 0:\d\d:\d\d;", summary, re.M)
    assert re.search(r"^total      0:\d\d:\d\d$", summary, re.M)
    assert not re.search(r"epochs in \d+ s|^total +\d+ s", summary, re.M)  # no bare seconds left
    for key, value in run.report_numbers.items():
        if key.startswith("device "):
            assert DURATION.search(value), value


@pytest.mark.slow
def test_named_device_and_early_stop_in_a_rewritten_report(run: TrainResult, tmp_path: Path) -> None:
    # Same exported model, another choice of device and a fit that stopped early after an
    # hour: the report says both.
    cfg = run.config.model_copy(
        update={
            "report": run.config.report.model_copy(update={"devices": ["machine-002"]}),
            "training": run.config.training.model_copy(update={"epochs": 20}),
        }
    )
    history = History(
        loss=[0.9, 0.5, 0.6, 0.7, 0.8],
        val_loss=[0.8, 0.4, 0.5, 0.6, 0.7],
        best_epoch=2,
        stopped_early=True,
        seconds=4000.0,
    )
    rewritten = dataclasses.replace(run, config=cfg, out_dir=tmp_path, history=history, report_files=[])
    files = write_report(rewritten)
    assert sorted(p.name for p in files) == [
        "loss.png",
        "report.md",
        "scores.png",
        "series-machine-002.png",
        "series.png",
    ]
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert set(_table_rows(text)) == {"machine-002"}
    assert "not shown: machine-000, machine-001" in text
    assert "- training: 5 of 20 epochs in 1:07 h, kept epoch 2 (validation loss 0.40000)" in text
    assert (
        "- early stopping: triggered after epoch 5 of 20: no better validation loss for 3 epochs "
        "(patience 3); weights of epoch 2 kept (lowest validation loss)"
    ) in text
    summary = format_summary(rewritten)
    assert "training   5 of 20 epochs in 1:07 h; best epoch 2" in summary
    assert "early stopping triggered after epoch 5 of 20" in summary
    assert "device machine-002: " in summary
