"""The contract document: parsing, validation, and errors that name the field at fault."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from anomalyd.contract import SCHEMA_VERSION, Contract
from anomalyd.errors import ModelContractError
from anomalyd.model import read_contract


def valid_contract_dict() -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "forecast",
        "model_version": "test-000000000000",
        "features": [
            {"name": "temperature", "unit": "degC"},
            {"name": "pressure", "unit": "kPa"},
            {"name": "vibration", "unit": "g"},
        ],
        "window_length": 8,
        "threshold": {
            "value": 2.5,
            "method": "pot",
            "target_false_alarm_rate": 1e-3,
            "n_calibration_windows": 1000,
            "pot": {
                "initial_quantile": 0.98,
                "initial_threshold": 1.2,
                "shape": 0.05,
                "scale": 0.3,
                "n_peaks": 20,
            },
        },
        "normalisation": {"mean": [70.0, 100.0, 0.04], "std": [5.0, 2.0, 0.01]},
        "training_data": {
            "source": "unit test",
            "sha256": "0" * 64,
            "rows": 100,
            "segments": 1,
            "train_windows": 60,
            "validation_windows": 10,
        },
        "created": "2026-11-24T00:00:00Z",
    }


def test_valid_contract_round_trips() -> None:
    c = Contract.from_json(orjson.dumps(valid_contract_dict()))
    assert c.feature_names == ["temperature", "pressure", "vibration"]
    assert c.n_features == 3
    again = Contract.from_json(c.to_json())
    assert again == c
    text = c.describe()
    assert "temperature [degC]" in text
    assert "pot" in text


def _mutated(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(valid_contract_dict())
    node: Any = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("schema_version", 99, "schema_version"),
        ("kind", "transformer", "kind"),
        ("window_length", 1, "window_length"),
        ("window_length", _DELETE, "window_length"),
        ("features", [], "features"),
        ("features.0.name", "ts", "features.0.name"),
        ("features.1.name", "bad name!", "features.1.name"),
        ("threshold.value", "high", "threshold.value"),
        ("threshold.method", "guess", "threshold.method"),
        ("threshold.pot", None, "threshold"),
        ("training_data.sha256", "xyz", "training_data.sha256"),
        ("normalisation.std", [1.0], "normalisation"),
        ("normalisation.log_offset", [0.0, 0.05], "normalisation"),
        ("normalisation.log_offset", [0.0, 0.0, -0.05], "normalisation"),
        ("normalisation.input_clip", [0.0, 3.0], "normalisation"),
        ("normalisation.input_clip", [0.0, 0.0, -3.0], "normalisation"),
        # Every feature is scored (no score_features): clipping one would hide its departures.
        ("normalisation.input_clip", [3.0, 0.0, 0.0], "normalisation"),
        ("surprise", 1, "surprise"),
    ],
)
def test_bad_contract_names_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ModelContractError) as info:
        Contract.from_json(orjson.dumps(_mutated(path, value)))
    assert info.value.field == field
    assert field in str(info.value)


def test_non_json_and_non_object_are_rejected() -> None:
    with pytest.raises(ModelContractError, match="not valid JSON"):
        Contract.from_json(b"{not json")
    with pytest.raises(ModelContractError, match="JSON object"):
        Contract.from_json(b"[1, 2]")


def test_duplicate_feature_names_are_rejected() -> None:
    doc = valid_contract_dict()
    doc["features"][1]["name"] = "temperature"
    with pytest.raises(ModelContractError, match="duplicate"):
        Contract.from_json(orjson.dumps(doc))


def test_nan_threshold_is_rejected() -> None:
    text = orjson.dumps(valid_contract_dict()).replace(b'"value":2.5', b'"value":NaN')
    with pytest.raises(ModelContractError):
        Contract.from_json(text)


def test_sample_period_spread_is_optional_and_round_trips() -> None:
    doc = valid_contract_dict()
    c = Contract.from_json(orjson.dumps(doc))  # a model from before the spread was recorded
    assert c.training_data.sample_period_s is None
    assert c.training_data.sample_period_p05_s is None
    assert "sample period   not recorded" in c.describe()

    doc["training_data"].update(sample_period_s=1.0, sample_period_p05_s=0.9, sample_period_p95_s=1.2)
    c = Contract.from_json(orjson.dumps(doc))
    again = Contract.from_json(c.to_json())
    assert again == c
    assert (again.training_data.sample_period_p05_s, again.training_data.sample_period_p95_s) == (0.9, 1.2)
    assert "sample period   1 s (5-95 %: 0.9 to 1.2 s)" in c.describe()

    doc["training_data"].update(sample_period_p05_s=None, sample_period_p95_s=None)
    assert "sample period   1 s\n" in Contract.from_json(orjson.dumps(doc)).describe()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sample_period_s": 1.0, "sample_period_p05_s": 1.1}, "sample_period_p05_s <= sample_period_s"),
        ({"sample_period_s": 1.0, "sample_period_p95_s": 0.9}, "sample_period_p05_s <= sample_period_s"),
        ({"sample_period_p05_s": 0.9, "sample_period_p95_s": 1.1}, "need sample_period_s"),
        ({"sample_period_s": 1.0, "sample_period_p05_s": 0.0}, "greater than 0"),
    ],
)
def test_bad_sample_period_spread_is_refused(fields: dict[str, float], message: str) -> None:
    doc = valid_contract_dict()
    doc["training_data"].update(fields)
    with pytest.raises(ModelContractError, match=message) as info:
        Contract.from_json(orjson.dumps(doc))
    assert info.value.field.startswith("training_data")


def test_committed_default_model_records_its_sample_period_and_spread() -> None:
    # The cadence check reads these; the fleet samples at 1 Hz with a little jitter.
    root = Path(__file__).resolve().parents[2]
    d = read_contract(root / "exported_models" / "default" / "model.onnx").training_data
    # The median of a 1 Hz series with uniform jitter: within 1e-4 s of 1 s (0.999998 for
    # default-437dfa2f1e0f's 440,581 rows).
    assert d.sample_period_s == pytest.approx(1.0, abs=1e-4)
    assert d.sample_period_p05_s is not None
    assert d.sample_period_p95_s is not None
    assert 0.8 < d.sample_period_p05_s < d.sample_period_s < d.sample_period_p95_s < 1.2


def test_every_feature_is_scored_when_score_features_is_unset() -> None:
    c = Contract.from_json(orjson.dumps(valid_contract_dict()))
    assert c.score_features is None
    assert c.scored_feature_names == ["temperature", "pressure", "vibration"]
    assert "scored features all 3" in c.describe()
    # Unset is left out of the JSON, so such a contract reads as it did before the key existed.
    assert "score_features" not in orjson.loads(c.to_json())


def test_score_features_round_trip_and_are_described() -> None:
    doc = valid_contract_dict()
    doc["score_features"] = ["vibration", "pressure"]
    c = Contract.from_json(orjson.dumps(doc))
    assert Contract.from_json(c.to_json()) == c
    assert orjson.loads(c.to_json())["score_features"] == ["vibration", "pressure"]
    assert c.scored_feature_names == ["pressure", "vibration"]  # input order
    assert (
        "scored features 2 of 3: pressure, vibration (inputs only, contribution 0: temperature)"
        in c.describe()
    )


@pytest.mark.parametrize(
    ("score_features", "message"),
    [
        (["pressure", "humidity"], "['humidity'] are not features; the features are"),
        (["pressure", "pressure"], "repeated: ['pressure']"),
        ([], "at least 1 item"),
        ("pressure", "valid list"),
    ],
)
def test_bad_score_features_are_refused_naming_the_field(score_features: Any, message: str) -> None:
    doc = valid_contract_dict()
    doc["score_features"] = score_features
    with pytest.raises(ModelContractError, match=re.escape(message)) as info:
        Contract.from_json(orjson.dumps(doc))
    assert info.value.field == "score_features"


def test_input_clip_is_optional_and_only_for_inputs_only_features() -> None:
    doc = valid_contract_dict()
    assert Contract.from_json(orjson.dumps(doc)).normalisation.input_clip is None
    doc["score_features"] = ["pressure", "vibration"]
    doc["normalisation"]["input_clip"] = [3.0, 0.0, 0.0]
    assert Contract.from_json(orjson.dumps(doc)).normalisation.input_clip == [3.0, 0.0, 0.0]
    doc["normalisation"]["input_clip"] = [3.0, 3.0, 0.0]
    with pytest.raises(ModelContractError, match=r"clips the scored features \['pressure'\]"):
        Contract.from_json(orjson.dumps(doc))


def test_log_offsets_are_optional_and_per_feature() -> None:
    doc = valid_contract_dict()
    assert Contract.from_json(orjson.dumps(doc)).normalisation.log_offset is None
    doc["normalisation"]["log_offset"] = [0.0, 0.0, 0.05]
    assert Contract.from_json(orjson.dumps(doc)).normalisation.log_offset == [0.0, 0.0, 0.05]
