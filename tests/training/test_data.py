"""Data sources: the CSV loader's options, skips and errors, and the synthetic fleet."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from anomalyd.contract import Contract
from anomalyd.errors import DataError
from anomalyd.model import read_contract
from anomalyd_train.config import CsvDataConfig, SyntheticDataConfig, TrainConfig, load_train_config
from anomalyd_train.data import load_csv, load_dataset, synthetic_dataset
from anomalyd_train.windows import dataset_sha256
from tests.daemon.test_contract import valid_contract_dict

T0 = datetime(2020, 3, 9, 10, 14, 33, tzinfo=UTC).timestamp()

SKAB_HEADER = "datetime;Accelerometer1RMS;Current;Volume Flow RateRMS;anomaly"


def skab_like(rows: int = 30, gap_after: int | None = None, gap_s: int = 120) -> list[str]:
    """Rows in SKAB's format: ';', 'YYYY-MM-DD hh:mm:ss', labels as 0.0/1.0."""
    lines = [SKAB_HEADER]
    t = T0
    for i in range(rows):
        if gap_after is not None and i == gap_after:
            t += gap_s
        stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{stamp};{0.02 + 0.001 * (i % 5):.4f};{1.3 + 0.01 * i:.3f};{32 + i % 3}.0;{float(i >= 25)}"
        )
        t += 1
    return lines


def write_csv(tmp_path: Path, lines: list[str], ending: str | list[str] = "\n", name: str = "h.csv") -> Path:
    endings = [ending] * len(lines) if isinstance(ending, str) else ending
    p = tmp_path / name
    p.write_bytes("".join(line + e for line, e in zip(lines, endings, strict=False)).encode())
    return p


def csv_cfg(path: Path, **kw: Any) -> CsvDataConfig:
    base: dict[str, Any] = {
        "path": path,
        "separator": ";",
        "timestamp_column": "datetime",
        "feature_columns": ["Accelerometer1RMS", "Current", "Volume Flow RateRMS"],
    }
    base.update(kw)
    return CsvDataConfig.model_validate(base)


def simple_csv(tmp_path: Path, body: list[str], header: str = "ts,a,b") -> Path:
    return write_csv(tmp_path, [header, *body])


def simple_cfg(path: Path, **kw: Any) -> CsvDataConfig:
    return CsvDataConfig.model_validate(
        {"path": path, "timestamp_column": "ts", "feature_columns": ["a", "b"], **kw}
    )


def epoch_rows(n: int, start: float = 1000.0) -> list[str]:
    return [f"{start + i},{i % 4},{(i * 7) % 5}" for i in range(n)]


# -------------------------------------------------------------------------- SKAB-like files


def test_skab_like_file_loads_with_options_only(tmp_path: Path) -> None:
    lines = skab_like(30)
    # Mixed line endings in one file: CRLF for most rows, LF for some, as in SKAB.
    endings = ["\r\n" if i % 3 else "\n" for i in range(len(lines))]
    path = write_csv(tmp_path, lines, endings)
    ds = load_csv(csv_cfg(path, label_column="anomaly", units={"current": "A"}))

    assert ds.features == ["accelerometer1_rms", "current", "volume_flow_rate_rms"]
    assert ds.units == ["", "A", ""]
    assert ds.rows == 30
    assert ds.skipped == {}
    assert len(ds.segments) == 1
    s = ds.segments[0]
    assert s.ts.dtype == np.float64
    assert s.values.dtype == np.float32
    assert s.values.shape == (30, 3)
    np.testing.assert_array_equal(s.ts, T0 + np.arange(30))  # naive times read as UTC
    assert s.values[3, 1] == pytest.approx(1.33)
    assert s.values[2, 2] == 34.0
    assert s.labels is not None
    assert s.labels.sum() == 5
    assert s.labels[25]
    assert s.origin == f"{tmp_path.name}/h.csv"
    assert ds.sample_period_s == 1.0
    assert ds.source == f"csv: {path}"
    assert any("labels from column 'anomaly'" in n for n in ds.notes)


def test_gap_splits_segments(tmp_path: Path) -> None:
    path = write_csv(tmp_path, skab_like(40, gap_after=15, gap_s=300), "\r\n")
    ds = load_csv(csv_cfg(path))
    assert [len(s.ts) for s in ds.segments] == [15, 25]
    assert ds.segments[1].ts[0] - ds.segments[0].ts[-1] > 300
    assert ds.rows == 40
    assert any("2 contiguous segments" in n for n in ds.notes)


def test_max_gap_option_overrides_the_median_rule(tmp_path: Path) -> None:
    path = write_csv(tmp_path, skab_like(40, gap_after=15, gap_s=300))
    assert len(load_csv(csv_cfg(path, max_gap_s=1000.0)).segments) == 1
    # Below the regular 1 s step every row is its own segment.
    assert len(load_csv(csv_cfg(path, max_gap_s=0.5)).segments) == 40


def test_first_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path, skab_like(30))
    ds = load_csv(csv_cfg(path, first_rows=12))
    assert ds.rows == 12
    np.testing.assert_array_equal(ds.segments[0].ts, T0 + np.arange(12))
    assert any("first_rows = 12" in n for n in ds.notes)
    assert "first 12 rows" in ds.source


def test_bom_and_padded_header_names(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffts, a ,b\n".encode() + "\n".join(epoch_rows(10)).encode() + b"\n")
    ds = load_csv(simple_cfg(p))
    assert ds.rows == 10


# --------------------------------------------------------------------------- timestamps


def test_epoch_timestamps(tmp_path: Path) -> None:
    ds = load_csv(simple_cfg(simple_csv(tmp_path, epoch_rows(10, start=1.7e9 + 0.5))))
    np.testing.assert_array_equal(ds.segments[0].ts, 1.7e9 + 0.5 + np.arange(10))
    assert any("epoch seconds" in n for n in ds.notes)


def test_iso_timestamps_with_zones(tmp_path: Path) -> None:
    rows = [
        "2024-01-01T00:00:00Z,1,2",
        "2024-01-01T01:00:01+01:00,2,3",  # = 00:00:01Z
        "2024-01-01T00:00:02.5,3,1",  # naive → UTC
    ]
    ds = load_csv(simple_cfg(simple_csv(tmp_path, rows), max_gap_s=10.0))
    base = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    np.testing.assert_allclose(ds.segments[0].ts, base + np.array([0.0, 1.0, 2.5]))


def test_strptime_format(tmp_path: Path) -> None:
    rows = ["09.03.2020 10:14:33,1,2", "09.03.2020 10:14:34,2,1", "09.03.2020 10:14:35,3,5"]
    ds = load_csv(simple_cfg(simple_csv(tmp_path, rows), timestamp_format="%d.%m.%Y %H:%M:%S"))
    np.testing.assert_array_equal(ds.segments[0].ts, T0 + np.arange(3))


def test_unrecognised_first_timestamp_is_an_error(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, ["yesterday,1,2", "today,2,3"])
    with pytest.raises(DataError, match="timestamp_format") as info:
        load_csv(simple_cfg(path))
    assert str(path) in str(info.value)
    assert "'ts'" in str(info.value)


# ---------------------------------------------------------------------------- counted skips


def test_bad_rows_are_counted_never_silent(tmp_path: Path) -> None:
    rows = [
        *epoch_rows(6),
        "1006,NaN,1",  # nan
        "1007,,1",  # empty → nan
        "1008,abc,1",  # non_numeric
        "1009,inf,1",  # non_finite
        "1010,1e40,1",  # beyond float32 → non_finite
        "1005,1,2",  # duplicate_ts (last kept is 1005)
        "1003,1,2",  # backwards_ts
        "1011",  # short_row
        "not-a-time,1,2",  # bad_timestamp
        *epoch_rows(6, start=1012),
    ]
    ds = load_csv(simple_cfg(simple_csv(tmp_path, rows), max_gap_s=10.0))
    assert ds.skipped == {
        "nan": 2,
        "non_numeric": 1,
        "non_finite": 2,
        "duplicate_ts": 1,
        "backwards_ts": 1,
        "short_row": 1,
        "bad_timestamp": 1,
    }
    assert ds.rows == 12
    assert sum(ds.skipped.values()) + ds.rows == len(rows)
    skip_note = next(n for n in ds.notes if n.startswith("skipped 9 row(s)"))
    assert "non_numeric 1 (first: line 10, column 'a': 'abc')" in skip_note
    assert all(np.all(np.diff(s.ts) > 0) for s in ds.segments)
    assert all(np.isfinite(s.values).all() for s in ds.segments)


def test_bad_label_is_counted(tmp_path: Path) -> None:
    rows = [f"{1000 + i},{i % 3},{i % 4},{i % 2}" for i in range(8)] + ["1008,1,2,maybe"]
    path = simple_csv(tmp_path, rows, header="ts,a,b,label")
    ds = load_csv(simple_cfg(path, label_column="label"))
    assert ds.skipped == {"bad_label": 1}
    assert ds.segments[0].labels is not None
    np.testing.assert_array_equal(ds.segments[0].labels, np.arange(8) % 2 == 1)


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    p = tmp_path / "blank.csv"
    p.write_text("ts,a,b\n" + "\n".join(epoch_rows(5)) + "\n\n\n")
    ds = load_csv(simple_cfg(p))
    assert ds.rows == 5
    assert ds.skipped == {}


# ------------------------------------------------------------------------------- errors


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, epoch_rows(5))
    cfg = CsvDataConfig.model_validate(
        {"path": path, "timestamp_column": "ts", "feature_columns": ["a", "flow"]}
    )
    with pytest.raises(DataError) as info:
        load_csv(cfg)
    msg = str(info.value)
    assert str(path) in msg
    assert "'flow' not found" in msg
    assert "['ts', 'a', 'b']" in msg  # says what is there


def test_missing_timestamp_column(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, epoch_rows(5))
    with pytest.raises(DataError, match="timestamp column 'time' not found"):
        load_csv(simple_cfg(path, timestamp_column="time"))


def test_constant_column_is_an_error(tmp_path: Path) -> None:
    rows = [f"{1000 + i},{i},5.0" for i in range(10)]
    path = simple_csv(tmp_path, rows)
    with pytest.raises(DataError, match="'b' is constant") as info:
        load_csv(simple_cfg(path))
    assert str(path) in str(info.value)


def test_constant_after_skips_is_judged_on_kept_rows(tmp_path: Path) -> None:
    # Only the skipped row differs: over the kept rows the column is constant.
    rows = [f"{1000 + i},{i},5.0" for i in range(10)] + ["1010,x,6.0"]
    with pytest.raises(DataError, match="'b' is constant"):
        load_csv(simple_cfg(simple_csv(tmp_path, rows)))


def test_header_only_file_has_no_rows(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, [])
    with pytest.raises(DataError, match="no usable data rows") as info:
        load_csv(simple_cfg(path))
    assert str(path) in str(info.value)


def test_all_rows_bad_says_why(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, ["1000,x,1", "1001,y,2"])
    with pytest.raises(DataError, match="non_numeric 2"):
        load_csv(simple_cfg(path))


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_csv(simple_cfg(p))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read CSV"):
        load_csv(simple_cfg(tmp_path / "missing.csv"))


def test_wrong_encoding(tmp_path: Path) -> None:
    p = tmp_path / "latin.csv"
    p.write_bytes(b"ts,a,b\n" + "1000,1,2\n1001,2,3 \xb0C\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"data\.csv\.encoding"):
        load_csv(simple_cfg(p))


def test_too_few_rows_for_one_window(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, epoch_rows(8))
    assert load_csv(simple_cfg(path), window_length=8).rows == 8
    with pytest.raises(DataError, match="fewer than one window of 9") as info:
        load_csv(simple_cfg(path), window_length=9)
    assert str(path) in str(info.value)


def test_short_segments_are_noted(tmp_path: Path) -> None:
    rows = epoch_rows(20) + epoch_rows(4, start=5000)
    ds = load_csv(simple_cfg(simple_csv(tmp_path, rows)), window_length=10)
    assert [len(s.ts) for s in ds.segments] == [20, 4]
    assert any("1 segment(s) with 4 rows are shorter than the window length 10" in n for n in ds.notes)


# ------------------------------------------------------------------------------ synthetic


def small_fleet(**kw: Any) -> SyntheticDataConfig:
    return SyntheticDataConfig.model_validate({"n_devices": 3, "duration_s": 3 * 3600, **kw})


def test_synthetic_dataset_segments_and_metadata() -> None:
    cfg = small_fleet()
    ds = synthetic_dataset(cfg)
    assert ds.features == ["temperature", "pressure", "vibration"]
    assert ds.units == ["degC", "kPa", "g"]
    assert {s.origin for s in ds.segments} == {"machine-000", "machine-001", "machine-002"}
    assert ds.rows == sum(len(s.ts) for s in ds.segments)
    assert ds.sample_period_s is not None
    assert ds.sample_period_s == pytest.approx(1.0, rel=0.05)
    assert "3 devices" in ds.source
    assert "seed 0" in ds.source
    max_gap = 3 * ds.sample_period_s * 1.01
    for s in ds.segments:
        assert s.values.dtype == np.float32
        assert s.values.shape == (len(s.ts), 3)
        steps = np.diff(s.ts)
        assert np.all((steps > 0) & (steps < max_gap))  # no gap inside a segment
        assert s.labels is not None
        assert not s.labels.any()  # training data is normal by default
    # Segments of one device follow each other across real gaps.
    by_dev = [s for s in ds.segments if s.origin == "machine-000"]
    for a, b in itertools.pairwise(by_dev):
        assert b.ts[0] - a.ts[-1] > 3 * ds.sample_period_s


def test_synthetic_dataset_is_seeded() -> None:
    a = synthetic_dataset(small_fleet(seed=4))
    b = synthetic_dataset(small_fleet(seed=4))
    c = synthetic_dataset(small_fleet(seed=5))
    assert len(a.segments) == len(b.segments)
    for x, y in zip(a.segments, b.segments, strict=True):
        np.testing.assert_array_equal(x.ts, y.ts)
        np.testing.assert_array_equal(x.values, y.values)
    assert not np.array_equal(a.segments[0].values, c.segments[0].values)


def test_synthetic_dataset_with_anomalies_keeps_labels() -> None:
    ds = synthetic_dataset(small_fleet(anomalies_per_device_hour=2.0))
    assert sum(int(s.labels.sum()) for s in ds.segments if s.labels is not None) > 0
    assert any("labelled anomalous" in n for n in ds.notes)


def test_load_dataset_dispatches_on_source(tmp_path: Path) -> None:
    path = simple_csv(tmp_path, epoch_rows(30))
    cfg = TrainConfig.model_validate(
        {
            "data": {
                "source": "csv",
                "csv": {"path": str(path), "timestamp_column": "ts", "feature_columns": ["a", "b"]},
            },
            "window": {"length": 10},
        }
    )
    assert load_dataset(cfg).source == f"csv: {path}"
    with pytest.raises(DataError, match="fewer than one window of 40"):
        load_dataset(cfg.model_copy(update={"window": cfg.window.model_copy(update={"length": 40})}))
    syn = TrainConfig.model_validate({"data": {"synthetic": {"n_devices": 2, "duration_s": 1800.0}}})
    assert load_dataset(syn).features == ["temperature", "pressure", "vibration"]


def test_committed_default_config_still_generates_the_default_models_training_data() -> None:
    # The generator's defaults (FleetSpec) fill whatever [data.synthetic] leaves out, so a
    # change to them would silently change what the committed config trains on.
    root = Path(__file__).resolve().parents[2]
    cfg = load_train_config(root / "training" / "configs" / "default.toml")
    contract = read_contract(root / "exported_models" / "default" / "model.onnx")
    ds = synthetic_dataset(cfg.data.synthetic)
    assert ds.source == contract.training_data.source
    assert dataset_sha256(ds.segments) == contract.training_data.sha256


# ------------------------------------------------------------------------ sample period


def test_sample_period_spread_from_steps_inside_segments(tmp_path: Path) -> None:
    # 10 segments of 11 rows, steps cycling through 0.8, 0.9, 1.0, 1.1, 1.2 s, 300 s apart.
    # The 9 gaps are 8 % of all steps: counted as steps, they would be the 95th percentile.
    steps = np.tile([0.8, 0.9, 1.0, 1.1, 1.2], 2)
    segment = np.concatenate([[0.0], np.cumsum(steps)])
    ts = np.concatenate([1000.0 + 400.0 * k + segment for k in range(10)])
    rows = [f"{float(t)!r},{i % 4},{(i * 7) % 5}" for i, t in enumerate(ts)]
    ds = load_csv(simple_cfg(simple_csv(tmp_path, rows), max_gap_s=10.0))
    assert len(ds.segments) == 10
    assert ds.sample_period_s == pytest.approx(1.0)
    assert ds.sample_period_p05_s == pytest.approx(0.8)
    assert ds.sample_period_p95_s == pytest.approx(1.2)


def test_regular_steps_have_no_spread(tmp_path: Path) -> None:
    ds = load_csv(simple_cfg(simple_csv(tmp_path, epoch_rows(30))))
    assert ds.sample_period_s == ds.sample_period_p05_s == ds.sample_period_p95_s == 1.0


def test_single_row_has_no_period(tmp_path: Path) -> None:
    ds = load_csv(simple_cfg(simple_csv(tmp_path, ["1000,1,2", "1001,2,3"]), max_gap_s=0.5))
    assert [len(s.ts) for s in ds.segments] == [1, 1]
    assert ds.sample_period_s is ds.sample_period_p05_s is ds.sample_period_p95_s is None


def test_synthetic_sample_period_spread_goes_into_the_contract() -> None:
    ds = synthetic_dataset(small_fleet())  # timestamps jittered by ±5 % of the 1 s period
    assert ds.sample_period_s is not None
    assert ds.sample_period_p05_s is not None
    assert ds.sample_period_p95_s is not None
    assert 0.9 < ds.sample_period_p05_s < ds.sample_period_s < ds.sample_period_p95_s < 1.1
    doc = valid_contract_dict()
    doc["training_data"].update(
        sample_period_s=ds.sample_period_s,
        sample_period_p05_s=ds.sample_period_p05_s,
        sample_period_p95_s=ds.sample_period_p95_s,
    )
    contract = Contract.from_json(Contract.from_json(orjson.dumps(doc)).to_json())
    d = contract.training_data
    assert (d.sample_period_s, d.sample_period_p05_s, d.sample_period_p95_s) == (
        ds.sample_period_s,
        ds.sample_period_p05_s,
        ds.sample_period_p95_s,
    )
