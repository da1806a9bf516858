"""The training pipeline: held-out calibration, train-only scaling, any number of features."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from anomalyd.errors import ConfigError, DataError
from anomalyd.model import load_model, read_contract
from anomalyd_train.calibration import calibrate_threshold
from anomalyd_train.config import TrainConfig
from anomalyd_train.pipeline import TrainResult, prepare
from anomalyd_train.report import device_file_names
from anomalyd_train.windows import held_out_origins, make_windows, split_by_time

ROWS = 1500
START = 1_700_000_000.0


def write_csv(
    path: Path, n_features: int, *, labels: bool, held_out_factor: float = 1.0, seed: int = 0
) -> Path:
    """A 1 Hz multichannel series; the last 30 % of rows (validation + calibration at the
    default split) are multiplied by ``held_out_factor``. With ``labels``, three short
    offsets are injected into the last 30 % and labelled."""
    rng = np.random.default_rng(seed)
    t = np.arange(ROWS, dtype=np.float64)
    values = np.stack(
        [
            (k + 1) * np.sin(2 * np.pi * t / (40 + 7 * k)) + 0.1 * rng.normal(size=ROWS)
            for k in range(n_features)
        ],
        axis=1,
    )
    lab = np.zeros(ROWS, dtype=int)
    if labels:
        for start in (1120, 1250, 1400):
            values[start : start + 10] += 3.0
            lab[start : start + 10] = 1
    cut = int(ROWS * 0.7)
    values[cut:] *= held_out_factor
    header = ["time", *[f"ch{k}" for k in range(n_features)], *(["anomaly"] if labels else [])]
    with path.open("w", encoding="utf-8") as fh:
        fh.write(",".join(header) + "\n")
        for i in range(ROWS):
            row = [
                f"{START + t[i]:.1f}",
                *[f"{v:.6f}" for v in values[i]],
                *([str(lab[i])] if labels else []),
            ]
            fh.write(",".join(row) + "\n")
    return path


def csv_config(
    path: Path, n_features: int, *, labels: bool, report: bool = True, **extra: object
) -> TrainConfig:
    raw: dict[str, object] = {
        "name": f"csv-f{n_features}",
        "data": {
            "source": "csv",
            "csv": {
                "path": str(path),
                "timestamp_column": "time",
                "feature_columns": [f"ch{k}" for k in range(n_features)],
                **({"label_column": "anomaly"} if labels else {}),
            },
        },
        "window": {"length": 12},
        "model": {"layers": 1, "units": 8},
        "training": {"epochs": 2, "batch_size": 64},
        "calibration": {"min_peaks": 5, "initial_quantile": 0.9, "target_false_alarm_rate": 0.01},
        "report": {"enabled": report},
    }
    raw.update(extra)
    return TrainConfig.model_validate(raw)


# ----------------------------------------------------------------------- data side, no TF


def test_scaler_sees_training_rows_only(tmp_path: Path) -> None:
    plain = prepare(csv_config(write_csv(tmp_path / "a.csv", 2, labels=False), 2, labels=False))
    # Same training rows, held-out rows 10× larger: the scaler must not move.
    held_out = prepare(
        csv_config(write_csv(tmp_path / "b.csv", 2, labels=False, held_out_factor=10.0), 2, labels=False)
    )
    np.testing.assert_array_equal(plain.scaler.mean, held_out.scaler.mean)
    np.testing.assert_array_equal(plain.scaler.std, held_out.scaler.std)
    # ... while the held-out windows did change, so the comparison above means something.
    assert not np.array_equal(plain.calibration_windows.windows, held_out.calibration_windows.windows)
    # And the scaler is exactly the statistics of the training rows.
    train_rows = np.concatenate([s.values for s in plain.train_segments])
    np.testing.assert_allclose(plain.scaler.mean, train_rows.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.scaler.std, train_rows.std(axis=0), rtol=1e-5)
    # Changing a training row does move it.
    other = prepare(csv_config(write_csv(tmp_path / "c.csv", 2, labels=False, seed=1), 2, labels=False))
    assert not np.array_equal(plain.scaler.mean, other.scaler.mean)


def test_parts_follow_each_other_in_time(tmp_path: Path) -> None:
    p = prepare(csv_config(write_csv(tmp_path / "a.csv", 3, labels=False), 3, labels=False))
    train_end = p.train_windows.end_ts.max()
    val = p.validation_windows.end_ts
    cal = p.calibration_windows.end_ts
    assert len(val)
    assert len(cal)
    assert val.min() > train_end
    assert cal.min() > val.max()
    # No calibration window reaches back into the validation rows (1 Hz data: a window
    # starts L-1 seconds before it ends).
    first_cal_row = min(s.ts[0] for s in p.calibration_segments)
    assert (cal - (p.calibration_windows.windows.shape[1] - 1)).min() >= first_cal_row - 1e-6


def test_without_a_calibration_part_validation_calibrates(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", 1, labels=False)
    p = prepare(
        csv_config(path, 1, labels=False, split={"validation_fraction": 0.2, "calibration_fraction": 0.0})
    )
    assert p.calibration_source == "validation"
    assert len(p.calibration_windows) == 0


def test_device_calibration_holds_out_whole_devices() -> None:
    cfg = TrainConfig.model_validate(
        {
            "data": {"synthetic": {"n_devices": 8, "duration_s": 900.0, "seed": 5}},
            "window": {"length": 20},
            "split": {"validation_fraction": 0.2, "calibration_fraction": 0.25, "calibration": "devices"},
        }
    )
    p = prepare(cfg)
    held = held_out_origins([s.origin for s in p.dataset.segments], 0.25)
    assert len(held) == 2
    assert {s.origin for s in p.calibration_segments} == set(held)
    assert not set(held) & {s.origin for s in p.train_segments + p.validation_segments}
    # the calibration windows are exactly the held-out devices' windows, every one of them
    whole = [s for s in p.dataset.segments if s.origin in held]
    np.testing.assert_array_equal(p.calibration_windows.windows, make_windows(whole, 20).windows)
    assert p.calibration_source == "calibration"
    # the scaler never saw a held-out device
    rows = np.concatenate([s.values for s in p.train_segments])
    np.testing.assert_allclose(p.scaler.mean, rows.mean(axis=0), rtol=1e-5)
    # the time split of the same data calibrates on the last rows of every device instead
    by_time = prepare(cfg.model_copy(update={"split": cfg.split.model_copy(update={"calibration": "time"})}))
    assert {s.origin for s in by_time.calibration_segments} == {s.origin for s in p.dataset.segments}


def test_device_calibration_of_a_single_file_is_a_data_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", 1, labels=False)
    with pytest.raises(DataError, match="at least 2 origins"):
        prepare(csv_config(path, 1, labels=False, split={"calibration": "devices"}))


def test_too_long_a_window_is_a_data_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", 1, labels=False)
    with pytest.raises(DataError, match="window"):
        prepare(csv_config(path, 1, labels=False, window={"length": 400}))


def test_score_features_come_out_in_input_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", 3, labels=False)
    prep = prepare(csv_config(path, 3, labels=False, model={"score_features": ["ch2", "ch0"]}))
    assert prep.score_features == ["ch0", "ch2"]
    assert prep.scored == [True, False, True]
    # Naming every feature is the same as naming none: one form for "all scored".
    every = prepare(csv_config(path, 3, labels=False, model={"score_features": ["ch1", "ch2", "ch0"]}))
    assert every.score_features is None
    assert every.scored == [True, True, True]


def test_score_feature_missing_from_synthetic_data_is_a_config_error() -> None:
    # The synthetic fleet's feature names are known only once its data is generated.
    cfg = TrainConfig.model_validate(
        {
            "data": {"synthetic": {"n_devices": 1, "duration_s": 600.0}},
            "window": {"length": 12},
            "model": {"score_features": ["pressure", "humidity"]},
        }
    )
    with pytest.raises(ConfigError) as info:
        prepare(cfg)
    assert info.value.key_path == "model.score_features"
    assert "['humidity'] is not a feature name" in str(info.value)
    assert "['temperature', 'pressure', 'vibration']" in str(info.value)


def _first_line_with(lines: list[str], fragment: str) -> int:
    found = [i for i, line in enumerate(lines) if fragment in line]
    assert found, f"no line with {fragment!r} in:\n" + "\n".join(lines)
    return found[0]


#: What ``prepare`` says, step by step, in this order (loading is said before it starts).
DATA_STEPS = [
    "data: reading ",
    "data: csv: ",
    "split: by time within each of 1 origin(s)",
    "scaler: ",
    "windows: ",
]


def test_data_steps_are_said_in_order(tmp_path: Path) -> None:
    lines: list[str] = []
    path = write_csv(tmp_path / "a.csv", 2, labels=False)
    prepare(csv_config(path, 2, labels=False), lines.append)
    assert lines[0] == f"data: reading {path} ..."
    at = [_first_line_with(lines, step) for step in DATA_STEPS]
    assert at == sorted(at)
    split = lines[at[2]]
    # 1500 rows: 70 % train, 15 % validation, 15 % calibration
    assert split.endswith("rows: train 1050, validation 225, calibration 225")
    assert lines[at[3]] == "scaler: mean and std of 2 features from the 1050 training rows"


# --------------------------------------------------------------------- trained, F = 1 and 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, TrainResult], dict[int, str]]:
    """Both runs, and what each printed (progress on)."""
    from anomalyd_train.pipeline import train

    out: dict[int, TrainResult] = {}
    printed: dict[int, str] = {}
    for n_features, labels in ((1, False), (8, True)):
        d = tmp_path_factory.mktemp(f"f{n_features}")
        cfg = csv_config(write_csv(d / "data.csv", n_features, labels=labels), n_features, labels=labels)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            out[n_features] = train(cfg, d / "model", progress=True)
        printed[n_features] = buffer.getvalue()
    return out, printed


@pytest.fixture(scope="module")
def runs(trained: tuple[dict[int, TrainResult], dict[int, str]]) -> dict[int, TrainResult]:
    return trained[0]


#: Every step of a run, in order: the data steps, then the fit, then what follows it.
RUN_STEPS = [
    *DATA_STEPS,
    "training forecast model: ",
    "loading TensorFlow",
    "epoch   1/2",
    "epoch   2/2",
    "training: 2 of 2 epochs in 0:",
    "residual scales ",
    "calibration: scoring ",
    "threshold ",
    "export: converting to ONNX",
    "check onnx_checker",
    "check daemon_loader",
    "export: wrote ",
    "report: drawing figures",
    "report: scored 1 device(s)",
    "report: wrote 5 files",  # loss, scores, overview, the file's own, report.md
]


@pytest.mark.slow
def test_progress_says_every_step_in_order_with_elapsed_time(
    trained: tuple[dict[int, TrainResult], dict[int, str]],
) -> None:
    lines = trained[1][8].splitlines()
    assert lines
    for line in lines:
        assert re.match(r"\[\d+:\d\d:\d\d\] ", line), line
    # The first line comes before any data is read, and says what is being loaded.
    assert re.fullmatch(r"\[0:00:0\d\] data: reading .*data\.csv \.\.\.", lines[0])
    at = [_first_line_with(lines, step) for step in RUN_STEPS]
    assert at == sorted(at), [RUN_STEPS[i] for i in np.argsort(at)]
    assert len(set(at)) == len(at)
    assert (
        "early stopping not triggered (patience 3)"
        in lines[at[RUN_STEPS.index("training: 2 of 2 epochs in 0:")]]
    )


@pytest.mark.slow
@pytest.mark.parametrize("n_features", [1, 8])
def test_any_number_of_features_trains_and_exports(runs: dict[int, TrainResult], n_features: int) -> None:
    run = runs[n_features]
    contract = read_contract(run.model_path)
    assert contract.n_features == n_features
    assert contract.feature_names == [f"ch{k}" for k in range(n_features)]
    model = load_model(run.model_path)
    windows = np.repeat(np.asarray(contract.normalisation.mean, np.float32)[None, None, :], 12, axis=1)
    score, contrib = model.run(np.repeat(windows, 4, axis=0))
    assert score.shape == (4,)
    assert contrib.shape == (4, n_features)
    assert np.isfinite(score).all()


@pytest.mark.slow
@pytest.mark.parametrize("n_features", [1, 8])
def test_threshold_is_calibrated_on_the_held_out_calibration_windows(
    runs: dict[int, TrainResult], n_features: int
) -> None:
    run = runs[n_features]
    cfg = run.config
    # Rebuild the calibration windows independently of the pipeline ...
    from anomalyd_train.data import load_dataset

    _, _, cal = split_by_time(
        load_dataset(cfg).segments, cfg.split.validation_fraction, cfg.split.calibration_fraction
    )
    windows = make_windows(cal, cfg.window.length).windows
    assert run.calibration_source == "calibration"
    assert run.calibration.n_scores == len(windows) == run.windows["calibration"]
    # ... score them with the exported file and calibrate: the same threshold comes out.
    scores, _ = load_model(run.model_path).run(windows)
    expected = calibrate_threshold(
        scores.astype(np.float64),
        cfg.calibration.target_false_alarm_rate,
        initial_quantile=cfg.calibration.initial_quantile,
        min_peaks=cfg.calibration.min_peaks,
    )
    assert run.threshold == pytest.approx(expected.threshold, rel=1e-4)
    assert read_contract(run.model_path).threshold.method == expected.method


@pytest.mark.slow
def test_report_is_written_beside_the_model(runs: dict[int, TrainResult]) -> None:
    labelled = runs[8]
    names = sorted(p.name for p in labelled.report_files)
    # one figure for the file (its only device) beside the overview
    (device_png,) = device_file_names([labelled.dataset.segments[0].origin])
    assert names == sorted(["loss.png", "report.md", "scores.png", "series.png", device_png])
    for p in labelled.report_files:
        assert p.parent == labelled.model_path.parent
        assert p.stat().st_size > 0
    text = (labelled.out_dir / "report.md").read_text(encoding="utf-8")
    assert "![Loss curves](loss.png)" in text
    assert "event recall: " in text
    assert labelled.report_numbers["labelled anomaly events"] == 3
    # Unlabelled data: the stretch is the held-out part and no recall is claimed.
    unlabelled = runs[1]
    plain = (unlabelled.out_dir / "report.md").read_text(encoding="utf-8")
    assert "event recall" not in plain
    assert "| device | series | windows | alert runs |" in plain
