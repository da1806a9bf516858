"""``anomalyd score``: a CSV file through the daemon's pipeline (``anomalyd.replay``) with the
committed default model in ONNX Runtime; and the CSV reading behind it (``anomalyd.csvdata``)."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from anomalyd.cli import main
from anomalyd.config import Config, load_config
from anomalyd.csvdata import CsvOptions, read_csv, sanitise_feature_name
from anomalyd.errors import ConfigError, DataError
from anomalyd.model import DEFAULT_MODEL_PATH, LoadedModel, load_model
from anomalyd.replay import replay
from anomalyd.synthetic import FEATURES, DeviceSeries, generate_fleet
from anomalyd.synthetic_spec import FleetSpec

SKAB_HEADER = (
    "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;"
    "Voltage;Volume Flow RateRMS;anomaly;changepoint"
)
SKAB_OPTIONS = (
    "--separator", ";",
    "--timestamp-column", "datetime",
    "--timestamp-format", "%Y-%m-%d %H:%M:%S",
    "--feature-columns", "Temperature,Pressure,Accelerometer1RMS",
    "--feature-names", "temperature,pressure,vibration",
    "--label-column", "anomaly",
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="module")
def device() -> DeviceSeries:
    """15 minutes of one synthetic machine, its vibration stuck from row 343 to 643: the
    default model's flatline check raises an alert there (seed 1, checked below)."""
    spec = FleetSpec(
        n_devices=1,
        duration_s=900.0,
        seed=1,
        anomalies_per_device_hour=6.0,
        anomaly_kinds=("stuck",),
        gaps_per_device_hour=0.0,
    )
    return generate_fleet(spec)[0]


def write_device_csv(path: Path, dev: DeviceSeries) -> Path:
    """The device as ``ts,temperature,pressure,vibration,label``: every number written so
    that it reads back exactly (float64 timestamps, float32 values)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", *FEATURES, "label"])
        for t, row, label in zip(dev.ts.tolist(), dev.values, dev.labels.tolist(), strict=True):
            w.writerow([repr(t), *(str(v) for v in row), int(label)])
    return path


def read_output(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r[name] else np.nan for r in rows])


def test_score_writes_what_the_pipeline_decides_row_by_row(
    tmp_path: Path, model: LoadedModel, device: DeviceSeries, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_device_csv(tmp_path / "machine.csv", device)
    out, png = tmp_path / "scores.csv", tmp_path / "scores.png"
    code = main([
        "score", str(src), "--model", str(DEFAULT_MODEL_PATH), "--out", str(out), "--plot", str(png),
        "--label-column", "label",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    header, rows = read_output(out)
    assert header == [
        "ts", "device", "score", "smoothed", "threshold", "anomaly", "alert", "label",
        "contribution_temperature", "contribution_pressure", "contribution_vibration",
    ]  # fmt: skip
    assert len(rows) == len(device.ts)
    assert {r["device"] for r in rows} == {"machine"}  # the file's stem by default

    expected = replay(model, Config(), "machine", device.ts, device.values)
    np.testing.assert_array_equal(column(rows, "ts"), device.ts)
    np.testing.assert_array_equal(column(rows, "score"), expected.score)
    np.testing.assert_array_equal(column(rows, "smoothed"), expected.smoothed)
    np.testing.assert_array_equal(column(rows, "threshold"), expected.row_threshold)
    assert [r["anomaly"] == "1" for r in rows] == expected.anomaly.tolist()
    assert [r["alert"] == "1" for r in rows] == expected.alert.tolist()
    assert [r["label"] == "1" for r in rows] == device.labels.tolist()
    for j, name in enumerate(FEATURES):
        np.testing.assert_array_equal(
            column(rows, f"contribution_{name}").astype(np.float32), expected.contributions[:, j]
        )
    # Warm-up: the first window ends at row L (the model's window length); every later row ends one.
    scored = ~np.isnan(column(rows, "score"))
    assert scored.tolist() == [False] * (model.window_length - 1) + [True] * (
        len(rows) - model.window_length + 1
    )

    # The alert is on through most of the stuck stretch, and never before it.
    (event,) = device.events
    alert = np.array([r["alert"] == "1" for r in rows])
    assert not alert[: event.start_index].any()
    assert alert[event.start_index : event.end_index].mean() > 0.5

    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000
    said = capsys.readouterr().out
    assert f"kept {len(rows)}" in said
    assert "alert periods: 1" in said
    assert f"wrote {out} ({len(rows)} rows)" in said


def test_a_skab_file_reads_with_options_only(
    tmp_path: Path, model: LoadedModel, device: DeviceSeries
) -> None:
    """SKAB's own layout: ';', a datetime column, eight sensors under their own names, and
    anomaly/changepoint labels; only the model's three are read, under the model's names."""
    n = 120
    start = datetime(2020, 3, 9, 10, 34, 33, tzinfo=UTC).timestamp()
    lines = [SKAB_HEADER]
    for i in range(n):
        when = datetime.fromtimestamp(start + i, UTC).strftime("%Y-%m-%d %H:%M:%S")
        t, p, v = (str(x) for x in device.values[i])
        lines.append(f"{when};{v};0.0387;1.3;{p};{t};25.8;224.1;32.0;{int(i >= 100)}.0;0.0")
    src = tmp_path / "1.csv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "1.scores.csv"
    code = main(["score", str(src), "--out", str(out), "--no-plot", *SKAB_OPTIONS])
    assert code == 0
    header, rows = read_output(out)
    assert len(rows) == n
    assert header[-3:] == ["contribution_temperature", "contribution_pressure", "contribution_vibration"]
    assert float(rows[0]["ts"]) == start  # naive datetimes are UTC
    assert [r["label"] for r in rows] == ["0"] * 100 + ["1"] * 20
    assert sum(1 for r in rows if r["score"]) == n - model.window_length + 1  # one window per row from row L


def test_bad_rows_are_skipped_counted_and_reported(
    tmp_path: Path, device: DeviceSeries, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_device_csv(tmp_path / "d.csv", device)
    lines = src.read_text().splitlines()
    ts = device.ts.tolist()
    bad = {
        5: f"{ts[4]!r},abc,1.0,0.1,0",  # non_numeric
        9: f"{ts[8]!r},nan,1.0,0.1,0",  # nan
        12: f"{ts[11]!r},20.0,,0.1,0",  # nan (empty)
        20: f"{ts[19]!r},20.0,1e39,0.1,0",  # non_finite (beyond float32)
        30: f"{ts[29]!r},20.0",  # short_row
        40: "yesterday,20.0,1.0,0.1,0",  # bad_timestamp
        50: f"{ts[49]!r},20.0,1.0,0.1,maybe",  # bad_label
    }
    for line_index, text in bad.items():
        lines[line_index] = text
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.csv"
    code = main(["score", str(src), "--out", str(out), "--no-plot", "--label-column", "label"])
    assert code == 0
    _, rows = read_output(out)
    assert len(rows) == len(device.ts) - len(bad)
    said = capsys.readouterr().out
    assert "skipped 7 bad row(s): short_row 1 (first: line 31: 2 fields, need 5)" in said
    for reason, count in [
        ("bad_timestamp", 1),
        ("nan", 2),
        ("non_numeric", 1),
        ("non_finite", 1),
        ("bad_label", 1),
    ]:
        assert f"{reason} {count} (first: line " in said


def test_a_model_feature_no_column_maps_to_is_named_exit_78(
    tmp_path: Path, device: DeviceSeries, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "no_vibration.csv"
    src.write_text("ts,temperature,pressure\n" + "".join(f"{1.7e9 + i},20.0,100.0\n" for i in range(60)))
    out = tmp_path / "o.csv"
    assert main(["score", str(src), "--out", str(out)]) == ConfigError.exit_code == 78
    err = capsys.readouterr().err
    assert "--feature-columns: the model needs feature 'vibration'" in err
    assert not out.exists()

    # Mapped by options, one short: the error names the feature and the mapping given.
    mapped = ["--feature-columns", "temperature,pressure", "--feature-names", "temperature,pressure"]
    code = main(["score", str(src), "--out", str(out), *mapped])
    assert code == 78
    err = capsys.readouterr().err
    assert "--feature-names: the model needs feature(s) ['vibration']" in err
    assert "'pressure' -> pressure" in err


def test_unusable_files_exit_65_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "o.csv"), "--no-plot"]
    assert main(["score", str(tmp_path / "missing.csv"), *out]) == DataError.exit_code == 65
    assert "missing.csv: no such file" in capsys.readouterr().err

    header_only = tmp_path / "h.csv"
    header_only.write_text("ts,temperature,pressure,vibration\n")
    assert main(["score", str(header_only), *out]) == 65
    assert "no usable data rows (0 read" in capsys.readouterr().err

    wrong = tmp_path / "w.csv"
    wrong.write_text("ts,temperature,pressure,vibration\n1.7e9,1,2,3\n")
    assert main(["score", str(wrong), *out, "--feature-columns", "temperature,pressure,Vibration"]) == 65
    assert "feature column 'Vibration' not found" in capsys.readouterr().err

    skab_without_format = tmp_path / "s.csv"
    skab_without_format.write_text("when,temperature,pressure,vibration\n09/03/2020 10:34,1,2,3\n")
    assert main(["score", str(skab_without_format), *out, "--timestamp-column", "when"]) == 65
    assert "give --timestamp-format" in capsys.readouterr().err


def test_output_that_cannot_be_written_fails_before_scoring(tmp_path: Path, device: DeviceSeries) -> None:
    src = write_device_csv(tmp_path / "d.csv", device)
    assert main(["score", str(src), "--out", str(tmp_path / "nowhere" / "o.csv")]) == 78


def test_without_matplotlib_the_plot_is_left_out_or_refused(
    tmp_path: Path, device: DeviceSeries, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # matplotlib is installed here: None in sys.modules makes `import matplotlib` fail as it
    # would where it is not.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    src = write_device_csv(tmp_path / "d.csv", device)
    out = tmp_path / "o.csv"
    assert main(["score", str(src), "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 69
    err = capsys.readouterr().err
    assert "--plot needs matplotlib, which is not installed: pip install 'anomalyd[plot]'" in err
    assert not out.exists()  # refused before anything ran

    assert main(["score", str(src), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "no plot: matplotlib is not installed (pip install 'anomalyd[plot]'" in said
    assert out.exists()
    assert not out.with_suffix(".png").exists()


def test_configuration_reaches_the_detector(tmp_path: Path, device: DeviceSeries, model: LoadedModel) -> None:
    cfg = tmp_path / "anomalyd.toml"
    cfg.write_text("[detector]\nthreshold = 0.5\nk_enter = 1\n")
    src = write_device_csv(tmp_path / "d.csv", device)
    out = tmp_path / "o.csv"
    assert (
        main(["score", str(src), "--config", str(cfg), "--out", str(out), "--no-plot", "--device", "m-1"])
        == 0
    )
    _, rows = read_output(out)
    expected = replay(model, load_config(cfg), "m-1", device.ts, device.values)
    assert {r["threshold"] for r in rows if r["score"]} == {"0.5"}
    assert [r["alert"] == "1" for r in rows] == expected.alert.tolist()
    assert {r["device"] for r in rows} == {"m-1"}


def test_rows_out_of_order_are_kept_and_rejected_as_the_daemon_would(
    tmp_path: Path, device: DeviceSeries, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_device_csv(tmp_path / "d.csv", device)
    lines = src.read_text().splitlines()
    lines[101] = lines[100]  # data row 99 again (line 0 is the header): a duplicate timestamp
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.csv"
    assert main(["score", str(src), "--out", str(out), "--no-plot"]) == 0
    _, rows = read_output(out)
    assert len(rows) == len(device.ts)
    assert rows[99]["score"]
    assert not rows[100]["score"]
    assert rows[101]["score"]
    said = capsys.readouterr().out
    assert "1 row(s) stamped at or before the row before them (first: line 102" in said
    assert "rejected by the pipeline as the daemon would: duplicate 1" in said


# ------------------------------------------------------------------------------ csvdata


def test_reading_tolerates_bom_crlf_tabs_padding_and_iso_timestamps(tmp_path: Path) -> None:
    src = tmp_path / "t.tsv"
    src.write_bytes(
        "\ufeffwhen\t Flow RateRMS \tTemp\r\n"
        "2026-01-01T00:00:00\t1.5\t20\r\n"
        "\r\n"  # a blank line: no data row
        "2026-01-01T00:00:01+00:00\t2.5\t21\n".encode()
    )
    options = CsvOptions(separator="\t", timestamp_column="when", feature_columns=("Flow RateRMS", "Temp"))
    rec = read_csv(src, options)
    assert rec.names == ["flow_rate_rms", "temp"]
    assert rec.ts.tolist() == [1_767_225_600.0, 1_767_225_601.0]
    assert rec.values.tolist() == [[1.5, 20.0], [2.5, 21.0]]
    assert rec.data_rows == 2
    assert rec.timestamps_as == "ISO 8601 (no zone: UTC)"


def test_the_model_features_are_found_by_sanitised_column_name(tmp_path: Path) -> None:
    src = tmp_path / "s.csv"
    src.write_text("ts,Vibration,Temperature,Pressure,Extra\n1767225600,0.1,20,100,7\n")
    rec = read_csv(src, CsvOptions(), ["temperature", "pressure", "vibration"])
    assert rec.columns == ["Temperature", "Pressure", "Vibration"]
    assert rec.values.tolist() == [[20.0, 100.0, pytest.approx(0.1)]]


def test_options_that_cannot_work_name_the_option() -> None:
    with pytest.raises(ConfigError, match="--feature-names: needs one name per feature column"):
        CsvOptions(feature_columns=("a", "b"), feature_names=("x",))
    with pytest.raises(ConfigError, match="--feature-names: feature name 'ts' is not usable"):
        CsvOptions(feature_columns=("a",), feature_names=("ts",))
    with pytest.raises(ConfigError, match=r"--feature-columns \(sanitised\): each may appear once"):
        CsvOptions(feature_columns=("Flow Rate", "flow_rate"))
    with pytest.raises(ConfigError, match="--separator"):
        CsvOptions(separator=";;")


@pytest.mark.parametrize(
    "column",
    [
        "Volume Flow RateRMS",
        "Accelerometer1RMS",
        "datetime",
        "ts",
        " 1st sensor ",
        "PT-101.PV",
        "",
        "ÜberTemp",
    ],
)
def test_column_names_are_sanitised_as_training_sanitises_them(column: str) -> None:
    from anomalyd_train.config import sanitise_feature_name as training_rule

    assert sanitise_feature_name(column) == training_rule(column)
