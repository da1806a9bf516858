"""Export to one self-describing ONNX file: contract, fused LSTMs, parity, and checks
that fail for models that break them.

One tiny model per kind is trained once for the module (1 LSTM layer of 8 units,
L = 16, 2 epochs on a small synthetic fleet).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from anomalyd.contract import CONTRIBUTIONS_OUTPUT, INPUT_NAME, METADATA_KEY, SCORE_OUTPUT, Contract
from anomalyd.model import load_model, read_contract
from anomalyd.synthetic import FEATURES, UNITS
from anomalyd_train import export, scoring
from anomalyd_train.config import TrainConfig, config_to_dict
from anomalyd_train.export import ExportCheckError
from anomalyd_train.pipeline import TrainResult, train
from anomalyd_train.windows import dataset_sha256

pytestmark = pytest.mark.slow

L = 16


def tiny_config(kind: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": f"tiny-{kind}",
            "data": {"synthetic": {"n_devices": 2, "duration_s": 1800.0, "seed": 3}},
            "window": {"length": L},
            "model": {"kind": kind, "layers": 1, "units": 8},
            "training": {"epochs": 2, "batch_size": 64, "max_train_windows": 1500},
            "calibration": {"min_peaks": 10},
            "report": {"enabled": False},
        }
    )


@pytest.fixture(scope="module", params=["forecast", "autoencoder"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    kind = request.param
    return train(tiny_config(kind), tmp_path_factory.mktemp(kind), progress=False)


def _session(model_bytes: bytes) -> Any:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def _ort(path_or_bytes: Path | bytes, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    score, contrib = _session(data).run([SCORE_OUTPUT, CONTRIBUTIONS_OUTPUT], {INPUT_NAME: windows})
    return score, contrib


def _validation_windows(run: TrainResult, n: int = 200) -> np.ndarray:
    from anomalyd_train.pipeline import prepare

    return prepare(run.config).validation_windows.windows[:n]


# --------------------------------------------------------------------------- the exported file


def test_contract_says_what_training_did(run: TrainResult) -> None:
    contract = read_contract(run.model_path)
    cfg = run.config
    assert contract.kind == cfg.model.kind
    assert [(f.name, f.unit) for f in contract.features] == [(f, UNITS[f]) for f in FEATURES]
    assert contract.window_length == L
    assert contract.threshold.value == pytest.approx(run.calibration.threshold)
    assert contract.threshold.method == run.calibration.method
    assert contract.threshold.target_false_alarm_rate == cfg.calibration.target_false_alarm_rate
    assert contract.threshold.n_calibration_windows == run.windows["calibration"]
    assert contract.normalisation.mean == pytest.approx(run.scaler.mean.tolist())
    assert contract.normalisation.std == pytest.approx(run.scaler.std.tolist())
    data = contract.training_data
    assert data.sha256 == dataset_sha256(run.dataset.segments)
    assert data.rows == run.dataset.rows
    assert data.segments == len(run.dataset.segments)
    assert (data.train_windows, data.validation_windows, data.calibration_windows) == (
        run.windows["train_used"],
        run.windows["validation"],
        run.windows["calibration"],
    )
    assert data.sample_period_s == pytest.approx(1.0, rel=0.05)
    assert contract.training_config == config_to_dict(cfg)
    assert {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "anomalyd"} <= set(
        contract.versions
    )
    created = datetime.fromisoformat(contract.created)
    assert created.utcoffset() is not None
    assert created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_model_version_names_the_graph(run: TrainResult) -> None:
    proto = onnx.load(str(run.model_path))
    contract = Contract.from_json({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert contract.model_version == f"{run.config.name}-{export.graph_digest(proto)[:12]}"
    assert proto.producer_name == "anomalyd-train"
    assert contract.model_version in proto.doc_string


def test_model_version_is_stable_for_the_same_weights_and_changes_with_them(run: TrainResult) -> None:
    exported = onnx.load(str(run.model_path))
    again = export.convert(run.scoring, 17)  # tf2onnx may name the constants differently
    assert export.graph_digest(again) == export.graph_digest(exported)
    weight = _lstm_weight(again)
    w = onnx.numpy_helper.to_array(weight).copy()
    w.flat[0] += 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(w, weight.name))
    assert export.graph_digest(again) != export.graph_digest(exported)


def test_graph_io_is_the_contract_and_constants_are_initializers(run: TrainResult) -> None:
    proto = onnx.load(str(run.model_path))
    # A captured tf.constant would show up as a second input; only "window" may be there.
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [L, 3]
    assert sorted(o.name for o in proto.graph.output) == sorted([SCORE_OUTPUT, CONTRIBUTIONS_OUTPUT])


def test_one_fused_lstm_per_layer_and_no_loops(run: TrainResult) -> None:
    counts = export.op_counts(onnx.load(str(run.model_path)))
    expected = 1 if run.config.model.kind == "forecast" else 2  # autoencoder: encoder + decoder
    assert counts.get("LSTM") == expected
    assert "Loop" not in counts
    assert "Scan" not in counts
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]


def test_onnx_runtime_matches_tensorflow(run: TrainResult) -> None:
    windows = _validation_windows(run)
    got_score, got_contrib = _ort(run.model_path, windows)
    ref_score, ref_contrib = run.scoring(windows)
    np.testing.assert_allclose(got_score, ref_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_contrib, ref_contrib, rtol=1e-4, atol=1e-5)


def test_score_follows_the_documented_definition(run: TrainResult) -> None:
    windows = _validation_windows(run, 64)
    s = run.scoring
    z = (windows - s.mean) / s.std
    if s.kind == "forecast":
        r = (z[:, -1, :] - np.asarray(s.model(z[:, :-1, :]))) / s.residual_scale
        per_feature = r**2
    else:
        per_feature = (((z - np.asarray(s.model(z))) / s.residual_scale) ** 2).mean(axis=1)
    score, contrib = _ort(run.model_path, windows)
    np.testing.assert_allclose(score, per_feature.mean(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib, per_feature / 3, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5, atol=1e-6)


def test_residual_scale_makes_training_windows_score_one_per_feature(run: TrainResult) -> None:
    from anomalyd_train.pipeline import prepare

    train_windows = prepare(run.config).train_used.windows
    _, contrib = run.scoring(train_windows)
    per_feature = contrib.mean(axis=0) * 3
    floored = run.residual_scale <= scoring.MIN_RESIDUAL_SCALE
    np.testing.assert_allclose(per_feature[~floored], 1.0, rtol=1e-3)


# ------------------------------------------------------ scoring some of the features


SCORED = ["pressure", "vibration"]  # temperature: an input only


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """An autoencoder with 3 inputs whose score is made of 2 of them."""
    base = tiny_config("autoencoder")
    cfg = base.model_copy(
        update={"name": "tiny-partial", "model": base.model.model_copy(update={"score_features": SCORED})}
    )
    return train(cfg, tmp_path_factory.mktemp("partial"), progress=False)


def _terms(s: scoring.ScoringFunction, windows: np.ndarray) -> np.ndarray:
    """Each feature's scaled squared residual, computed outside the graph, ``(n, F)``."""
    z = (windows - s.mean) / s.std
    if s.kind == "forecast":
        return ((z[:, -1, :] - np.asarray(s.model(z[:, :-1, :]))) / s.residual_scale) ** 2
    return (((z - np.asarray(s.model(z))) / s.residual_scale) ** 2).mean(axis=1)


def test_an_unscored_feature_contributes_exactly_zero(partial: TrainResult) -> None:
    assert list(FEATURES) == ["temperature", *SCORED]
    windows = _validation_windows(partial, 64)
    score, contrib = _ort(partial.model_path, windows)
    assert np.all(contrib[:, 0] == 0.0)
    assert np.all(contrib[:, 1:] > 0.0)
    # The daemon's loader and the TensorFlow twin agree with the file.
    loaded_score, loaded_contrib = load_model(partial.model_path).run(windows)
    np.testing.assert_array_equal(loaded_contrib[:, 0], 0.0)
    np.testing.assert_allclose(loaded_score, score, rtol=1e-6)
    ref_score, ref_contrib = partial.scoring(windows)
    np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ref_contrib[:, 0], 0.0)


def test_partial_score_is_the_mean_of_the_scored_features_terms(partial: TrainResult) -> None:
    windows = _validation_windows(partial, 64)
    terms = _terms(partial.scoring, windows)
    score, contrib = _ort(partial.model_path, windows)
    np.testing.assert_allclose(score, terms[:, 1:].mean(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib[:, 1:], terms[:, 1:] / 2, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5, atol=1e-6)
    # The unscored feature's residual is real and left out: counting it would change the score.
    assert not np.allclose(score, terms.mean(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(partial.scoring.weights, [0.0, 0.5, 0.5])


def test_partial_contract_names_the_score_features(partial: TrainResult) -> None:
    contract = read_contract(partial.model_path)
    assert contract.score_features == SCORED
    assert contract.feature_names == list(FEATURES)  # every feature is still an input
    assert "mean over the 2 scored features f (pressure, vibration)" in contract.score
    assert "not scored (temperature)" in contract.score
    assert "scored features 2 of 3: pressure, vibration" in contract.describe()
    assert contract.training_config["model"]["score_features"] == SCORED


def test_partial_threshold_is_calibrated_on_the_graphs_scores(partial: TrainResult) -> None:
    from anomalyd_train.pipeline import prepare

    prep = prepare(partial.config)
    score, _ = _ort(partial.model_path, prep.calibration_windows.windows)
    np.testing.assert_allclose(partial.calibration_scores, score, rtol=1e-4, atol=1e-5)
    # Residual scales still make a typical training window score about 1.
    _, contrib = partial.scoring(prep.train_used.windows)
    np.testing.assert_allclose(contrib.sum(axis=1).mean(), 1.0, rtol=1e-3)


def test_scoring_every_feature_builds_the_graph_of_before(run: TrainResult) -> None:
    s = run.scoring
    flagged = scoring.build_scoring_function(
        s.model,
        s.kind,
        window_length=s.window_length,
        mean=s.mean,
        std=s.std,
        residual_scale=s.residual_scale,
        n_lstm_layers=s.n_lstm_layers,
        scored=[True, True, True],
    )
    exported = onnx.load(str(run.model_path))
    assert export.graph_digest(export.convert(flagged, 17)) == export.graph_digest(exported)
    # "Before" is what every "error"-score graph built before score_features existed held (the
    # default model default-952c396eb564 among them): the scalar 1/F weight, no per-feature
    # weight vector, so such a model's graph and model_version do not change. (The committed
    # default model now uses the "peak" score, a maximum over features with no 1/F weight.)
    consts = [onnx.numpy_helper.to_array(i) for i in exported.graph.initializer]
    assert any(c.shape == () and c == np.float32(1 / 3) for c in consts)
    assert not any(c.shape == (3,) and np.allclose(c, 1 / 3) for c in consts)
    metadata = {p.key: p.value for p in exported.metadata_props}[METADATA_KEY]
    assert "score_features" not in json.loads(metadata)
    assert read_contract(run.model_path).score == scoring.SCORE_DEFINITION


def test_score_weights() -> None:
    np.testing.assert_array_equal(scoring.score_weights(3), np.full(3, np.float32(1 / 3)))
    np.testing.assert_array_equal(scoring.score_weights(3, [True, False, True]), [0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="one flag per feature"):
        scoring.score_weights(3, [True, False])
    with pytest.raises(ValueError, match="at least one feature"):
        scoring.score_weights(2, [False, False])


# ------------------------------------------------------------------ checks that must fail


def _tiny_keras(variant: str) -> Any:
    layers: list[Any] = [keras.Input((7, 2))]
    if variant == "masking":
        layers.append(keras.layers.Masking(0.0))
    layers += [
        keras.layers.LSTM(4, unroll=variant == "unroll", use_cudnn=False),
        keras.layers.Dense(2),
    ]
    return keras.Sequential(layers)


def _scoring(model: Any) -> scoring.ScoringFunction:
    one = np.ones(2, np.float32)
    return scoring.build_scoring_function(
        model,
        "forecast",
        window_length=8,
        mean=0 * one,
        std=one,
        residual_scale=one,
        n_lstm_layers=1,
    )


@pytest.mark.parametrize(("variant", "found"), [("unroll", "0 fused LSTM ops"), ("masking", "Loop")])
def test_fused_lstm_check_fails_for_unfused_layers(variant: str, found: str) -> None:
    proto = export.convert(_scoring(_tiny_keras(variant)), 17)
    with pytest.raises(ExportCheckError, match=found) as info:
        export.check_fused_lstm(proto, 1)
    assert info.value.check == "fused_lstm"
    assert info.value.exit_code != 0


def test_fused_lstm_check_fails_on_a_layer_count_mismatch(run: TrainResult) -> None:
    proto = onnx.load(str(run.model_path))
    n = export.op_counts(proto)["LSTM"]
    assert export.check_fused_lstm(proto, n).name == "fused_lstm"
    with pytest.raises(ExportCheckError, match=f"{n} fused LSTM ops, the Keras model has {n + 1}"):
        export.check_fused_lstm(proto, n + 1)


def _lstm_weight(proto: Any) -> Any:
    lstm = next(node for node in proto.graph.node if node.op_type == "LSTM")
    return next(init for init in proto.graph.initializer if init.name == lstm.input[1])


def test_parity_check_fails_for_a_tampered_weight(run: TrainResult) -> None:
    windows = _validation_windows(run, 64)
    proto = onnx.load(str(run.model_path))
    assert export.check_parity(proto.SerializeToString(), run.scoring, windows, 1e-4, 1e-5).name == "parity"
    weight = _lstm_weight(proto)
    w = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array((w * 1.05).astype(w.dtype), weight.name))
    with pytest.raises(ExportCheckError, match="differs from TensorFlow") as info:
        export.check_parity(proto.SerializeToString(), run.scoring, windows, 1e-4, 1e-5)
    assert info.value.check == "parity"


def test_parity_check_fails_for_a_tampered_normalisation(run: TrainResult) -> None:
    windows = _validation_windows(run, 64)
    proto = onnx.load(str(run.model_path))
    # The first Sub subtracts the baked-in mean; nudge it by 1 % of a std.
    sub = next(node for node in proto.graph.node if node.op_type == "Sub" and INPUT_NAME in node.input)
    init = next(i for i in proto.graph.initializer if i.name in sub.input)
    mean = onnx.numpy_helper.to_array(init)
    shifted = (mean + 0.01 * run.scaler.std).astype(mean.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(shifted, init.name))
    with pytest.raises(ExportCheckError, match="parity"):
        export.check_parity(proto.SerializeToString(), run.scoring, windows, 1e-4, 1e-5)


def test_checker_fails_for_a_broken_graph(run: TrainResult) -> None:
    proto = onnx.load(str(run.model_path))
    assert export.check_onnx_checker(proto).name == "onnx_checker"
    lstm = next(node for node in proto.graph.node if node.op_type == "LSTM")
    lstm.input[1] = "no_such_tensor"
    with pytest.raises(ExportCheckError) as info:
        export.check_onnx_checker(proto)
    assert info.value.check == "onnx_checker"


def test_loader_check_fails_when_the_contract_disagrees_with_the_graph(
    run: TrainResult, tmp_path: Path
) -> None:
    proto = onnx.load(str(run.model_path))
    contract = read_contract(run.model_path)
    bad = contract.model_copy(update={"window_length": L + 1})
    onnx.helper.set_model_props(proto, {METADATA_KEY: bad.to_json()})
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ExportCheckError, match="window_length") as info:
        export.check_loads(path)
    assert info.value.check == "daemon_loader"


class _OffByOne(scoring.ScoringFunction):
    """A reference that disagrees with the graph it was built from."""

    def __call__(self, windows: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        score, contrib = super().__call__(windows, batch_size)
        return score + 1.0, contrib


def test_a_failed_check_fails_the_export_and_writes_nothing(run: TrainResult, tmp_path: Path) -> None:
    off_by_one = _OffByOne(**{f.name: getattr(run.scoring, f.name) for f in dataclasses.fields(run.scoring)})
    out = tmp_path / "model.onnx"
    contract = read_contract(run.model_path)
    fields = contract.model_dump(
        mode="json", exclude={"schema_version", "model_version", "versions", "created"}
    )
    with pytest.raises(ExportCheckError, match="'parity' failed"):
        export.export_model(
            off_by_one,
            name="off",
            contract_fields=fields,
            out_path=out,
            opset=17,
            parity_windows=_validation_windows(run, 32),
            rtol=1e-4,
            atol=1e-5,
        )
    assert list(tmp_path.iterdir()) == []


def test_an_unfused_model_fails_the_export(tmp_path: Path, run: TrainResult) -> None:
    contract = read_contract(run.model_path)
    fields = contract.model_dump(
        mode="json", exclude={"schema_version", "model_version", "versions", "created"}
    )
    fields.update(
        window_length=8,
        features=[{"name": "a"}, {"name": "b"}],
        normalisation={"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    )
    with pytest.raises(ExportCheckError, match="'fused_lstm' failed"):
        export.export_model(
            _scoring(_tiny_keras("unroll")),
            name="unrolled",
            contract_fields=fields,
            out_path=tmp_path / "model.onnx",
            opset=17,
            parity_windows=np.zeros((4, 8, 2), np.float32),
            rtol=1e-4,
            atol=1e-5,
        )
    assert not (tmp_path / "model.onnx").exists()


def test_window_mean_centering_keeps_fused_lstms_parity_and_offset_invariance(tmp_path: Path) -> None:
    base = tiny_config("forecast")
    cfg = base.model_copy(
        update={
            "model": base.model.model_copy(update={"layers": 2, "centering": "window_mean"}),
            "training": base.training.model_copy(update={"epochs": 1, "max_train_windows": 800}),
        }
    )
    run = train(cfg, tmp_path, progress=False)
    proto = onnx.load(str(run.model_path))
    counts = export.op_counts(proto)
    assert counts.get("LSTM") == 2
    assert "Loop" not in counts
    assert "Scan" not in counts
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]
    assert read_contract(run.model_path).training_config["model"]["centering"] == "window_mean"
    windows = _validation_windows(run, 64)
    got_score, got_contrib = _ort(run.model_path, windows)
    ref_score, ref_contrib = run.scoring(windows)
    np.testing.assert_allclose(got_score, ref_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_contrib, ref_contrib, rtol=1e-4, atol=1e-5)
    # A device that reads 2 standard deviations high on every channel scores the same.
    offset = (2.0 * run.scaler.std).astype(np.float32)
    shifted, _ = _ort(run.model_path, windows + offset)
    np.testing.assert_allclose(shifted, got_score, rtol=2e-3, atol=1e-3)
    # Without centering the same offset changes the scores (the control).
    plain, _ = _ort(_plain_run_model(tmp_path / "plain", cfg), windows + offset)
    assert not np.allclose(plain, _ort(tmp_path / "plain" / "model.onnx", windows)[0], rtol=2e-3, atol=1e-3)


def _plain_run_model(out: Path, cfg: TrainConfig) -> Path:
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"centering": "none"})})
    return train(plain, out, progress=False).model_path
