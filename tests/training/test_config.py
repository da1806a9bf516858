"""The training config: defaults, TOML loading, and errors that name the key at fault."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from anomalyd.contract import Feature
from anomalyd.errors import ConfigError
from anomalyd.synthetic_spec import FleetSpec
from anomalyd_train.config import (
    TRAINING_FLEET,
    SyntheticDataConfig,
    TrainConfig,
    config_to_dict,
    input_only_clip,
    load_train_config,
    sanitise_feature_name,
)

CSV_TABLE = """
[data]
source = "csv"
[data.csv]
path = "data/history.csv"
separator = ";"
timestamp_column = "datetime"
feature_columns = ["Temperature", "Volume Flow RateRMS"]
"""


def write(tmp_path: Path, text: str, name: str = "train.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_train_config(write(tmp_path, text))
    return info.value


def test_none_gives_defaults() -> None:
    cfg = load_train_config(None)
    assert cfg == TrainConfig()
    assert cfg.data.source == "synthetic"
    assert cfg.data.synthetic.anomalies_per_device_hour == 0.0
    assert (cfg.window.length, cfg.window.hop, cfg.window.padding) == (50, 1, "none")
    assert cfg.model.kind == "forecast"
    assert cfg.training.max_train_windows == 20_000


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_train_config(write(tmp_path, "")) == TrainConfig()


def test_values_from_file(tmp_path: Path) -> None:
    cfg = load_train_config(
        write(
            tmp_path,
            """
            name = "pump-7"
            [window]
            length = 20
            padding = "pre"
            [model]
            kind = "autoencoder"
            latent_units = 8
            [training]
            epochs = 3
            max_train_windows = 100
            learning_rate = 0.01
            """,
        )
    )
    assert cfg.name == "pump-7"
    assert (cfg.window.length, cfg.window.padding) == (20, "pre")
    assert (cfg.model.kind, cfg.model.latent_units) == ("autoencoder", 8)
    assert (cfg.training.epochs, cfg.training.max_train_windows) == (3, 100)
    assert cfg.training.learning_rate == pytest.approx(0.01)
    # Untouched tables keep their defaults.
    assert cfg.split == TrainConfig().split


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("epochz = 3", "epochz"),
        ("[training]\nepochz = 3", "training.epochz"),
        ("[data.synthetic]\ndevices = 3", "data.synthetic.devices"),
        ("[telemetry]\nx = 1", "telemetry"),
    ],
)
def test_unknown_key_names_its_path(tmp_path: Path, text: str, key_path: str) -> None:
    err = load_error(tmp_path, text)
    assert err.key_path == key_path
    assert "unknown key" in str(err)


def test_synthetic_keys_are_the_generators_settings_with_training_defaults() -> None:
    syn = SyntheticDataConfig()
    assert set(SyntheticDataConfig.model_fields) <= {f.name for f in dataclasses.fields(FleetSpec)}
    for name in SyntheticDataConfig.model_fields:
        assert getattr(syn, name) == getattr(TRAINING_FLEET, name), name
    assert syn.fleet_spec() == TRAINING_FLEET
    # Training departs from the generator's defaults in these settings only.
    differs = {
        f.name
        for f in dataclasses.fields(FleetSpec)
        if getattr(TRAINING_FLEET, f.name) != getattr(FleetSpec(), f.name)
    }
    assert differs == {"n_devices", "duration_s", "anomalies_per_device_hour"}


def test_fleet_the_generator_refuses_is_an_error_at_load(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[data.synthetic]\nduration_s = 1.0")
    assert err.key_path == "data.synthetic"
    assert "duration_s: need a finite number >= 2" in str(err)


def test_unknown_key_in_csv_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE + 'seperator = ","\n')
    assert err.key_path == "data.csv.seperator"
    assert "separator" in str(err)  # the allowed keys point at the typo


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[training]\nepochz = 3")
    assert "epochs" in str(err)
    assert "batch_size" in str(err)


@pytest.mark.parametrize(
    ("text", "key_path", "expected"),
    [
        ('[training]\nepochs = "20"', "training.epochs", "integer"),
        ("[training]\nepochs = 2.5", "training.epochs", "integer"),
        ("[training]\nepochs = true", "training.epochs", "integer"),
        ("[training]\nepochs = 0", "training.epochs", "greater than or equal to 1"),
        ("[window]\nlength = 1", "window.length", "greater than or equal to 2"),
        ('[window]\npadding = "post"', "window.padding", "'none' or 'pre'"),
        ('[model]\nkind = "transformer"', "model.kind", "'forecast' or 'autoencoder'"),
        ("[model]\nlayers = 9", "model.layers", "less than or equal to 4"),
        (
            "[calibration]\ntarget_false_alarm_rate = 1.0",
            "calibration.target_false_alarm_rate",
            "less than 1",
        ),
        ('[report]\nenabled = "yes"', "report.enabled", "boolean"),
        ("window = 5", "window", "dictionary"),
    ],
)
def test_wrong_values_name_key_and_expectation(
    tmp_path: Path, text: str, key_path: str, expected: str
) -> None:
    err = load_error(tmp_path, text)
    assert err.key_path == key_path
    assert expected in str(err)
    assert "train.toml" in str(err)  # the file is named too


def test_split_fractions_must_leave_training_data(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[split]\nvalidation_fraction = 0.5\ncalibration_fraction = 0.45")
    assert err.key_path == "split"
    assert "below 0.9" in str(err)


def test_new_options_default_to_the_old_behaviour() -> None:
    # Configs written before these options existed must train exactly as they did.
    cfg = load_train_config(None)
    assert cfg.split.calibration == "time"
    assert cfg.model.centering == "none"


def test_device_calibration_and_centering_are_read(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        '[split]\ncalibration = "devices"\n[model]\ncentering = "window_mean"\n', encoding="utf-8"
    )
    cfg = load_train_config(path)
    assert cfg.split.calibration == "devices"
    assert cfg.model.centering == "window_mean"


def test_device_calibration_needs_a_calibration_fraction(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[split]\ncalibration = "devices"\ncalibration_fraction = 0.0')
    assert err.key_path == "split"
    assert "calibration_fraction > 0" in str(err)


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ('[split]\ncalibration = "files"', "split.calibration"),
        ('[model]\ncentering = "yes"', "model.centering"),
    ],
)
def test_unknown_split_or_centering_choice_names_its_key(tmp_path: Path, text: str, key_path: str) -> None:
    err = load_error(tmp_path, text)
    assert err.key_path == key_path


def test_csv_source_needs_csv_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[data]\nsource = "csv"')
    assert err.key_path == "data.csv"
    assert "[data.csv]" in str(err)


def test_csv_table_needs_feature_columns(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[data]\nsource = "csv"\n[data.csv]\npath = "x.csv"\ntimestamp_column = "t"')
    assert err.key_path == "data.csv.feature_columns"
    assert "missing" in str(err)


def test_relative_csv_path_resolves_against_config_dir(tmp_path: Path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = load_train_config(write(sub, CSV_TABLE))
    assert cfg.data.csv is not None
    assert cfg.data.csv.path == (sub / "data" / "history.csv").resolve()


def test_absolute_csv_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "h.csv"
    cfg = load_train_config(write(tmp_path, CSV_TABLE.replace("data/history.csv", target.as_posix())))
    assert cfg.data.csv is not None
    assert cfg.data.csv.path == target


def test_csv_feature_names_default_to_sanitised_columns(tmp_path: Path) -> None:
    cfg = load_train_config(write(tmp_path, CSV_TABLE))
    assert cfg.data.csv is not None
    assert cfg.data.csv.resolved_feature_names() == ["temperature", "volume_flow_rate_rms"]


def test_csv_feature_names_count_must_match(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE + 'feature_names = ["t"]\n')
    assert err.key_path == "data.csv.feature_names"
    assert "one name per feature column (2)" in str(err)


def test_csv_feature_names_must_suit_telemetry(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE + 'feature_names = ["temp", "flow rate"]\n')
    assert err.key_path == "data.csv"
    assert "'flow rate'" in str(err)


def test_csv_units_keys_must_be_feature_names(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE + '[data.csv.units]\nTemperature = "degC"\n')
    assert err.key_path == "data.csv.units"
    assert "'Temperature'" in str(err)
    ok = load_train_config(write(tmp_path, CSV_TABLE + '[data.csv.units]\ntemperature = "degC"\n'))
    assert ok.data.csv is not None
    assert ok.data.csv.units == {"temperature": "degC"}


def test_score_features_default_to_every_feature(tmp_path: Path) -> None:
    assert TrainConfig().model.score_features is None
    assert load_train_config(write(tmp_path, CSV_TABLE)).model.score_features is None


def test_csv_score_features_are_feature_names(tmp_path: Path) -> None:
    scored = CSV_TABLE + '[model]\nscore_features = ["volume_flow_rate_rms"]\n'
    assert load_train_config(write(tmp_path, scored)).model.score_features == ["volume_flow_rate_rms"]
    # The column name is not the feature name: refused at load, listing the names to use.
    err = load_error(tmp_path, CSV_TABLE + '[model]\nscore_features = ["Volume Flow RateRMS"]\n')
    assert err.key_path == "model.score_features"
    assert "['Volume Flow RateRMS'] is not a feature name" in str(err)
    assert "['temperature', 'volume_flow_rate_rms']" in str(err)


@pytest.mark.parametrize(
    ("value", "message"),
    [("[]", "at least 1 item"), ('["temperature", "temperature"]', "repeated: ['temperature']")],
)
def test_score_features_must_be_a_non_empty_list_without_repeats(
    tmp_path: Path, value: str, message: str
) -> None:
    err = load_error(tmp_path, CSV_TABLE + f"[model]\nscore_features = {value}\n")
    assert err.key_path == "model.score_features"
    assert message in str(err)


def test_input_only_clip_is_one_limit_per_feature_for_the_inputs_only(tmp_path: Path) -> None:
    features = ["temperature", "volume_flow_rate_rms"]
    assert input_only_clip(load_train_config(write(tmp_path, CSV_TABLE)), features) is None
    text = CSV_TABLE + '[model]\nscore_features = ["volume_flow_rate_rms"]\ninput_only_clip = 3.0\n'
    assert input_only_clip(load_train_config(write(tmp_path, text)), features) == [3.0, 0.0]


@pytest.mark.parametrize("scored", ["", 'score_features = ["temperature", "volume_flow_rate_rms"]\n'])
def test_input_only_clip_needs_an_input_only_feature(tmp_path: Path, scored: str) -> None:
    cfg = load_train_config(write(tmp_path, CSV_TABLE + f"[model]\n{scored}input_only_clip = 3.0\n"))
    with pytest.raises(ConfigError) as info:
        input_only_clip(cfg, ["temperature", "volume_flow_rate_rms"])
    assert info.value.key_path == "model.input_only_clip"
    assert "every feature is scored" in str(info.value)


@pytest.mark.parametrize("value", ["0.0", "-1.0", '"3"'])
def test_input_only_clip_is_a_positive_float(tmp_path: Path, value: str) -> None:
    err = load_error(tmp_path, CSV_TABLE + f"[model]\ninput_only_clip = {value}\n")
    assert err.key_path == "model.input_only_clip"


def test_bias_score_and_training_quantile_options_default_to_the_old_behaviour() -> None:
    cfg = TrainConfig()
    assert cfg.model.score == "error"
    assert cfg.model.members == 1
    assert cfg.model.flatline is False
    assert cfg.calibration.method == "pot"


def test_bias_score_options_are_read(tmp_path: Path) -> None:
    text = (
        "[window]\nlength = 12\n"
        '[model]\nscore = "bias"\ncentering = "window_start"\nburn_in = 10\nbias_decay = 0.5\n'
        "members = 3\nflatline = true\nflatline_ratio = 0.2\n"
        '[calibration]\nmethod = "training_quantile"\nquantile = 0.9\nfactor = 3.0\n'
    )
    cfg = load_train_config(write(tmp_path, text))
    assert (cfg.model.score, cfg.model.centering, cfg.model.burn_in) == ("bias", "window_start", 10)
    assert (cfg.model.bias_decay, cfg.model.members, cfg.model.flatline) == (0.5, 3, True)
    assert cfg.model.flatline_ratio == 0.2
    assert (cfg.calibration.method, cfg.calibration.quantile, cfg.calibration.factor) == (
        "training_quantile",
        0.9,
        3.0,
    )
    # burn_in only matters to score "bias": the same burn_in with score "error" is fine.
    assert (
        load_train_config(write(tmp_path, "[window]\nlength = 12\n[model]\nburn_in = 11\n")).model.burn_in
        == 11
    )


@pytest.mark.parametrize(
    ("text", "key_path", "expected"),
    [
        ('[model]\nscore = "bias"\nkind = "autoencoder"', "model", "needs kind 'forecast'"),
        ('[model]\nscore = "bias"\ncentering = "window_mean"', "model", "use 'window_start'"),
        (
            '[window]\nlength = 12\n[model]\nscore = "bias"\nburn_in = 11',
            "model.burn_in",
            "must be below window.length - 1 (11), got 11",
        ),
        ('[model]\nscore = "surprise"', "model.score", "'error', 'bias' or 'peak'"),
        ("[model]\nmembers = 9", "model.members", "less than or equal to 8"),
        ("[model]\nbias_decay = 0.0", "model.bias_decay", "greater than 0"),
        ("[model]\nburn_in = 0", "model.burn_in", "greater than or equal to 1"),
        ("[model]\nflatline_ratio = 1.0", "model.flatline_ratio", "less than 1"),
        ('[model]\nflatline = "yes"', "model.flatline", "boolean"),
        ('[calibration]\nmethod = "gev"', "calibration.method", "'pot' or 'training_quantile'"),
        ("[calibration]\nquantile = 1.0", "calibration.quantile", "less than 1"),
        ("[calibration]\nfactor = 0.0", "calibration.factor", "greater than 0"),
    ],
)
def test_bad_bias_score_or_calibration_options_name_their_key(
    tmp_path: Path, text: str, key_path: str, expected: str
) -> None:
    err = load_error(tmp_path, text)
    assert err.key_path == key_path
    assert expected in str(err)


def test_burn_in_is_checked_against_the_window_through_model_validate() -> None:
    ok = {"window": {"length": 12}, "model": {"score": "bias", "burn_in": 10}}
    assert TrainConfig.model_validate(ok).model.burn_in == 10
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({**ok, "model": {"score": "bias", "burn_in": 11}})
    assert [e["loc"] for e in info.value.errors()] == [("model", "burn_in")]


def test_benchmark_config_with_slow_channels_as_inputs_only(tmp_path: Path) -> None:
    # The SKAB command sanitises column names into feature names; score_features names those.
    from anomalyd_train.skab import SKAB_COLUMNS, load_skab_config

    fast = [c for c in SKAB_COLUMNS if c not in ("Temperature", "Thermocouple")]
    columns = ", ".join(f'"{c}"' for c in SKAB_COLUMNS)

    def benchmark(names: list[str]) -> Path:
        listed = ", ".join(f'"{n}"' for n in names)
        text = f"[benchmark]\nfeature_columns = [{columns}]\n[train.model]\nscore_features = [{listed}]\n"
        return write(tmp_path, text, "skab.toml")

    cfg = load_skab_config(benchmark([sanitise_feature_name(c) for c in fast]))
    train = cfg.train_config(tmp_path / "1.csv", 60.0)
    assert train.model.score_features == [sanitise_feature_name(c) for c in fast]
    assert len(train.model.score_features) == 6
    with pytest.raises(ConfigError) as info:
        load_skab_config(benchmark(fast))
    assert info.value.key_path == "train.model.score_features"
    assert "'accelerometer1_rms'" in str(info.value)


def test_csv_timestamp_column_cannot_be_a_feature(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE.replace('"Temperature"', '"datetime"'))
    assert err.key_path == "data.csv"
    assert "timestamp column 'datetime'" in str(err)


def test_csv_separator_is_one_character(tmp_path: Path) -> None:
    err = load_error(tmp_path, CSV_TABLE.replace('separator = ";"', 'separator = ";;"'))
    assert err.key_path == "data.csv.separator"


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[training]\nepochs = = 3\n")
    assert "train.toml" in str(err)
    assert "line 2" in str(err)
    assert err.key_path is None


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_train_config(tmp_path / "nope.toml")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "latin.toml"
    p.write_bytes('name = "m\xe9ter"'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_train_config(p)


def test_config_to_dict_is_json_safe_and_round_trips(tmp_path: Path) -> None:
    cfg = load_train_config(write(tmp_path, CSV_TABLE))
    d = config_to_dict(cfg)
    text = json.dumps(d)  # raises if anything is not JSON-serialisable (Path, etc.)
    assert isinstance(d["data"]["csv"]["path"], str)
    assert TrainConfig.model_validate(json.loads(text)) == cfg


@pytest.mark.parametrize(
    ("column", "name"),
    [
        ("Volume Flow RateRMS", "volume_flow_rate_rms"),
        ("Accelerometer1RMS", "accelerometer1_rms"),
        ("Temperature", "temperature"),
        ("temperature", "temperature"),
        ("RMSValue", "rms_value"),
        ("  spaced  out  ", "spaced_out"),
        ("Druck [bar]", "druck_bar"),
        ("1st sensor", "_1st_sensor"),
        ("ts", "ts_"),
        ("°C", "c"),
        ("!!!", "feature"),
        ("x" * 100, "x" * 64),
    ],
)
def test_sanitise_feature_name(column: str, name: str) -> None:
    assert sanitise_feature_name(column) == name
    Feature(name=sanitise_feature_name(column))  # valid as a contract feature name


def test_data_side_imports_no_tensorflow() -> None:
    # config/data/windows must stay light: validating a config or loading data should not
    # pay TensorFlow's start-up. A fresh interpreter, because this test process may have
    # imported TensorFlow for other tests.
    code = (
        "import sys, anomalyd_train.config, anomalyd_train.data, anomalyd_train.windows\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnx', 'scipy', 'matplotlib')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
