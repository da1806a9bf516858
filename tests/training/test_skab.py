"""The SKAB benchmark command on SKAB-shaped files generated here (never the GPL data)."""

from __future__ import annotations

import csv
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import Config
from anomalyd.errors import ConfigError, DataError
from anomalyd.model import SessionOptions, load_model
from anomalyd.replay import replay
from anomalyd_train.cli import main
from anomalyd_train.evaluation import Confusion, DelayResult, NabResult, confusion
from anomalyd_train.skab import (
    SKAB_COLUMNS,
    BenchmarkConfig,
    FileResult,
    SkabResult,
    discover,
    format_seeds_table,
    format_table,
    load_skab_config,
    read_experiment,
    run_skab,
    run_skab_seeds,
)

TRAIN_ROWS = 120
TEST_ROWS = 90
GAP_ROW = TRAIN_ROWS + 40  # a 100 s gap before this row: the daemon restarts the window
WINDOW = 8

TINY = f"""
[benchmark]
train_rows = {TRAIN_ROWS}

[train.window]
length = {WINDOW}

[train.split]
validation_fraction = 0.2
calibration_fraction = 0.2

[train.model]
kind = "autoencoder"
layers = 1
units = 8

[train.training]
epochs = 2
batch_size = 32
patience = 0

[train.calibration]
target_false_alarm_rate = 0.05
initial_quantile = 0.9
min_peaks = 5

[train.report]
enabled = false

[daemon.detector]
k_enter = 2
k_exit = 2
adaptive = true
adaptive_min_windows = 10
adaptive_floor = 0.0
"""


def write_experiment(path: Path, seed: int, anomaly: tuple[int, int] = (150, 190)) -> None:
    """A SKAB-shaped file: ';'-separated, 8 channels, labels, mixed CRLF/LF line endings."""
    rng = np.random.default_rng(seed)
    n = TRAIN_ROWS + TEST_ROWS
    t0 = datetime(2020, 3, 9, 10, 0, 0, tzinfo=UTC).timestamp()
    ts = t0 + np.arange(n, dtype=float)
    ts[GAP_ROW:] += 100.0
    values = rng.normal(size=(n, 8)) * 0.1 + np.arange(1, 9)
    a, b = anomaly
    values[a:b, 7] += 3.0  # a level shift of the flow channel, 30 noise stds
    labels = np.zeros(n)
    labels[a:b] = 1
    cps = np.zeros(n)
    cps[[a, b]] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        fh.write(";".join(["datetime", *SKAB_COLUMNS, "anomaly", "changepoint"]) + "\r\n")
        for i in range(n):
            stamp = datetime.fromtimestamp(ts[i], UTC).strftime("%Y-%m-%d %H:%M:%S")
            row = [stamp, *(f"{v:.5f}" for v in values[i]), f"{labels[i]:.1f}", f"{cps[i]:.1f}"]
            fh.write(";".join(row) + ("\r\n" if i % 2 else "\n"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("skab")
    write_experiment(root / "valve9" / "2.csv", seed=1)
    write_experiment(root / "valve9" / "10.csv", seed=2)
    write_experiment(root / "anomaly-free" / "anomaly-free.csv", seed=3)
    config = root / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path_factory.mktemp("out")
    assert main(["skab", str(root), "--out", str(out), "--config", str(config)]) == 0
    return root, out, config


def test_discover_skips_anomaly_free_and_sorts_naturally(tmp_path: Path) -> None:
    for rel in ("b/10.csv", "b/2.csv", "a/1.csv", "anomaly-free/x.csv", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path, ["anomaly-free"])]
    assert found == ["a/1.csv", "b/2.csv", "b/10.csv"]


def test_one_line_per_test_row_in_input_order(bench: tuple[Path, Path, Path]) -> None:
    root, out, _ = bench
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.csv")) == [
        "valve9/10.csv",
        "valve9/2.csv",
    ]
    for name in ("valve9/2.csv", "valve9/10.csv"):
        exp = read_experiment(root / name, BenchmarkConfig())
        with (out / name).open(newline="") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
        assert rows[0] == ["datetime", "score", "anomaly"]
        assert [r[0] for r in rows[1:]] == exp.stamps[TRAIN_ROWS:]
        assert {r[2] for r in rows[1:]} <= {"0", "1"}
        assert len(rows) - 1 == TEST_ROWS
        assert (out / "models" / name.removesuffix(".csv") / "model.onnx").is_file()


def test_rows_after_a_gap_keep_the_alert_state_until_the_window_refills(
    bench: tuple[Path, Path, Path],
) -> None:
    _, out, _ = bench
    with (out / "valve9" / "2.csv").open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))[1:]
    g = GAP_ROW - TRAIN_ROWS
    # The first test row already ends a full window (the training rows are its history).
    assert rows[0][1] != "nan"
    # After the gap the window restarts: its first WINDOW - 1 rows end no window ...
    assert [r[1] for r in rows[g : g + WINDOW - 1]] == ["nan"] * (WINDOW - 1)
    assert rows[g + WINDOW - 1][1] != "nan"
    # ... and carry the decision of the last row before the gap.
    assert {r[2] for r in rows[g : g + WINDOW - 1]} == {rows[g - 1][2]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"]["valve9/2.csv"]["rows_without_window"] == WINDOW - 1


def test_summary_pools_the_written_decisions(bench: tuple[Path, Path, Path]) -> None:
    root, out, _ = bench
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_files"] == 2
    pooled = None
    for name in ("valve9/2.csv", "valve9/10.csv"):
        exp = read_experiment(root / name, BenchmarkConfig())
        with (out / name).open(newline="") as fh:
            decisions = [int(r[2]) for r in list(csv.reader(fh, delimiter=";"))[1:]]
        c = confusion(exp.labels[TRAIN_ROWS:], decisions)
        f = summary["files"][name]
        assert (f["TP"], f["FP"], f["FN"], f["TN"]) == (c.tp, c.fp, c.fn, c.tn)
        assert f["nab"]["windows"] == 2
        assert f["delay"]["episodes"] == 1
        pooled = c if pooled is None else pooled + c
    assert pooled is not None
    p = summary["pooled"]
    assert (p["TP"], p["FP"], p["FN"], p["TN"]) == (pooled.tp, pooled.fp, pooled.fn, pooled.tn)
    assert p["F1"] == pytest.approx(pooled.f1)
    base = summary["all_anomaly_baseline"]
    assert base["TP"] + base["FP"] == 2 * TEST_ROWS
    assert base["FAR"] == 100.0
    assert [m["method"] for m in summary["leaderboard"]] == ["Conv-AE", "MSET", "LSTM-AE", "Vanilla LSTM"]
    assert summary["config"]["daemon"]["detector"]["adaptive"] is True
    # the reference ran on the same rows, and is pooled beside the model
    ref = [summary["files"][n]["reference"] for n in ("valve9/2.csv", "valve9/10.csv")]
    assert all(r["TP"] + r["FP"] + r["FN"] + r["TN"] == TEST_ROWS for r in ref)
    assert summary["reference"]["TP"] == sum(r["TP"] for r in ref)
    assert summary["groups"]["valve9"]["files"] == 2


def test_several_seeds_report_mean_and_range(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_experiment(root / "valve9" / "1.csv", seed=5)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    results = run_skab_seeds(root, out, load_skab_config(config), 2, echo=lambda _: None)
    assert len(results) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert [r["config"]["train"]["training"]["seed"] for r in summary["per_seed"]] == [0, 1]
    assert (out / "seed-1" / "valve9" / "1.csv").is_file()
    text = format_seeds_table(results)
    assert "over 2 training seeds: mean [min–max]" in text
    assert "| anomalyd, all (1 files) |" in text
    assert "| reference, all |" in text


def test_the_obvious_anomaly_is_found(bench: tuple[Path, Path, Path]) -> None:
    _, out, _ = bench
    summary = json.loads((out / "summary.json").read_text())
    # A 30-sigma shift of one channel: every file's episode is detected.
    assert summary["pooled"]["delay"]["missed"] == 0
    assert summary["pooled"]["TP"] > 0


def test_decisions_use_no_later_row(bench: tuple[Path, Path, Path]) -> None:
    """Changing rows after row k changes no decision up to row k (same exported model)."""
    root, out, config = bench
    cfg = load_skab_config(config)
    daemon = cfg.daemon_config()
    exp = read_experiment(root / "valve9" / "2.csv", cfg.benchmark)
    model = load_model(out / "models" / "valve9" / "2" / "model.onnx", SessionOptions(providers="cpu"))
    cols = [list(SKAB_COLUMNS).index(c) for c in cfg.benchmark.feature_columns]
    values = exp.values[:, cols]
    first = replay(model, daemon, "d", exp.ts, values, history=TRAIN_ROWS)
    k = 60
    changed = values.copy()
    changed[TRAIN_ROWS + k + 1 :] += 50.0
    second = replay(model, daemon, "d", exp.ts, changed, history=TRAIN_ROWS)
    assert np.array_equal(first.alert[: k + 1], second.alert[: k + 1])
    assert np.array_equal(first.score[: k + 1], second.score[: k + 1], equal_nan=True)
    assert not np.array_equal(first.score, second.score, equal_nan=True)


def test_table_sets_the_result_beside_the_leaderboard() -> None:
    f = FileResult(
        name="v/1.csv",
        test_rows=10,
        confusion=Confusion(tp=4, fp=1, fn=1, tn=4),
        nab=NabResult(raw=0.5, windows=1, detected=1),
        delays=DelayResult((3.0,)),
        threshold=1.0,
        seconds=2.0,
        rows_without_window=0,
        reference=Confusion(tp=5, fp=0, fn=0, tn=5),
    )
    g = FileResult(**{**f.__dict__, "name": "w/1.csv", "reference": Confusion(tp=1, fp=4, fn=4, tn=1)})
    text = format_table(SkabResult(files=[f, g], baseline=Confusion(tp=10, fp=10), seconds=2.0))
    assert "| **anomalyd (2 files)** | **0.80** | **20.00** | **20.00** |" in text
    assert "| reference, no network (2 files) | 0.60 | 40.00 | 40.00 |" in text
    assert "| anomalyd, v (1 files) | 0.80 | 20.00 | 20.00 |" in text
    assert "| reference, v | 1.00 | 0.00 | 0.00 |" in text
    assert "| reference, w | 0.20 | 80.00 | 80.00 |" in text
    assert "| every row anomalous | 0.67 | 100.00 | 0.00 |" in text
    for name in ("Conv-AE", "MSET", "LSTM-AE", "Vanilla LSTM"):
        assert f"| {name} (published, all 34) |" in text
    assert "NAB (standard, changepoint windows): 75.0" in text
    assert "mean detection delay: 3.0 s" in text
    assert math.isnan(SkabResult().nab.normalised)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon.detector]\nadaptive_k = -1.0\n")
    with pytest.raises(ConfigError) as err:
        load_skab_config(bad)
    assert err.value.key_path == "daemon.detector.adaptive_k"
    bad.write_text('[train.data]\nsource = "synthetic"\n')
    with pytest.raises(ConfigError) as err:
        load_skab_config(bad)
    assert err.value.key_path == "train.data"
    bad.write_text("[train.window]\nlength = 1\n")
    with pytest.raises(ConfigError) as err:
        load_skab_config(bad)
    assert err.value.key_path == "train.window.length"
    bad.write_text("[benchmark]\ntrain_rowz = 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_skab_config(bad)
    assert isinstance(load_skab_config(None).daemon_config(), Config)


def test_unknown_daemon_key_lists_the_daemon_keys(tmp_path: Path) -> None:
    # [daemon] is validated with the daemon's schema: its keys are the ones to suggest.
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon.model]\npth = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_skab_config(bad)
    assert err.value.key_path == "daemon.model.pth"
    text = str(err.value)
    assert text.startswith("daemon.model.pth: unknown key")
    for key in ("path", "providers", "intra_op_threads", "allow_spinning"):
        assert key in text
    assert "did you mean 'path'" in text
    for training_key in ("centering", "dropout", "units", "layers"):
        assert training_key not in text


def test_unknown_train_key_lists_the_training_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train.training]\nepochz = 3\n")
    with pytest.raises(ConfigError) as err:
        load_skab_config(bad)
    assert err.value.key_path == "train.training.epochz"
    assert str(err.value).startswith("train.training.epochz: unknown key")
    assert "did you mean 'epochs'" in str(err.value)


def test_no_experiment_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "anomaly-free").mkdir()
    (tmp_path / "anomaly-free" / "a.csv").write_text("x")
    with pytest.raises(DataError, match="no experiment"):
        run_skab(tmp_path, tmp_path / "out", load_skab_config(None), echo=lambda _: None)


def test_unparseable_row_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    write_experiment(f, seed=0)
    lines = f.read_text().splitlines()
    lines[5] = lines[5].replace(";", ";oops", 1)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 6"):
        read_experiment(f, BenchmarkConfig())


def test_without_config_the_command_uses_the_committed_benchmark_config() -> None:
    """`anomalyd-train skab DIR --out OUT` (the documented command) runs the configuration that
    docs/skab.md reports, not the generic training defaults."""
    from anomalyd_train.skab import default_config_path

    path = default_config_path()
    repo = Path(__file__).resolve().parents[2]
    assert path == repo / "training" / "configs" / "skab.toml"
    committed = load_skab_config(path)
    # What docs/skab.md reports: the bias-scored forecaster ensemble, thresholded on its
    # training data's scores.
    assert committed.train_config(repo / "x.csv", 60.0).model.score == "bias"
    assert committed.train_config(repo / "x.csv", 60.0).calibration.method == "training_quantile"
    # The thermal inputs, not scored, are clipped before the network.
    assert committed.train_config(repo / "x.csv", 60.0).model.input_only_clip == 3.0
    assert committed.daemon_config().detector.k_exit == 30
    assert committed != load_skab_config(None)


def test_the_reference_scores_the_channels_the_model_scores(tmp_path: Path) -> None:
    config = tmp_path / "eight.toml"
    config.write_text(
        '[benchmark]\nfeature_columns = ["Temperature", "Pressure", "Current"]\n'
        '[train.model]\nscore_features = ["pressure", "current"]\n'
    )
    assert load_skab_config(config).reference_columns() == [1, 2]
    assert load_skab_config(None).reference_columns() == list(range(len(SKAB_COLUMNS)))
