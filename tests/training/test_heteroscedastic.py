"""A heteroscedastic forecaster (``model.heteroscedastic``): the network predicts each
forecast's noise level beside the forecast, is trained by the Gaussian negative
log-likelihood, and the "peak" score measures each residual in that predicted noise; from the
config to the exported file.

One tiny model is trained once for the module (1 LSTM layer of 8 units, L = 16 with the last
3 steps scored, 2 epochs on a small synthetic fleet).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from anomalyd.errors import ConfigError
from anomalyd.model import load_model, read_contract
from anomalyd_train import export, scoring
from anomalyd_train.config import ModelConfig, TrainConfig, load_train_config
from anomalyd_train.models import (
    build_networks,
    noise_log_variance,
    noise_scales,
    np_ops,
    predicted_noise,
    training_loss,
)
from anomalyd_train.pipeline import Prepared, TrainResult
from tests.training.trained_model import ort_scores, tiny_forecaster_config, trained_model_fixtures

pytestmark = pytest.mark.slow

L = 16
STEPS = 3
N_IN = L - STEPS
FLOOR = 0.5


# ---------------------------------------------------------------------------------- config


def test_heteroscedastic_needs_the_peak_score() -> None:
    with pytest.raises(ValueError, match="needs score 'peak'"):
        ModelConfig.model_validate({"heteroscedastic": True, "score": "error"})
    with pytest.raises(ValueError, match="greater than 0"):
        ModelConfig.model_validate({"heteroscedastic": True, "score": "peak", "noise_floor": 0})
    ModelConfig.model_validate({"heteroscedastic": True, "score": "peak"})


def test_heteroscedastic_needs_the_noise_scaled_loss(tmp_path: Any) -> None:
    path = tmp_path / "train.toml"
    model = '[model]\nscore = "peak"\nheteroscedastic = true\n'
    path.write_text(model + '[training]\nloss = "mse"\n')
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert err.value.key_path == "training.loss"
    path.write_text(model + '[training]\nloss = "noise_scaled"\n')
    assert load_train_config(path).model.heteroscedastic


# --------------------------------------------------------------------- the noise and the loss


def test_predicted_noise_never_goes_below_its_floor() -> None:
    raw = np.array([-50.0, -5.0, 0.0, 2.0, 8.0])
    lv = noise_log_variance(raw, FLOOR, np_ops)
    assert np.all(lv >= 2 * np.log(FLOOR))
    assert lv[0] == pytest.approx(2 * np.log(FLOOR), abs=1e-12)
    # Well above the floor the raw output is the log-variance itself.
    assert lv[-1] == pytest.approx(8.0, abs=1e-3)
    out = np.concatenate([np.array([[1.0, 2.0]]), raw[None, :2]], axis=1)
    forecast, sigma = predicted_noise(out, np.array([0.1, 0.3]), FLOOR)
    np.testing.assert_array_equal(forecast, [[1.0, 2.0]])
    np.testing.assert_allclose(sigma, [[0.1 * FLOOR, 0.3 * np.exp(0.5 * lv[1])]], rtol=1e-6)


def test_gaussian_nll_is_lowest_where_the_predicted_noise_matches_the_errors() -> None:
    import keras

    rng = np.random.default_rng(5)
    windows = rng.normal(0.0, 1.0, size=(400, 8, 2)).astype(np.float32)
    u = noise_scales(windows)
    loss = training_loss("noise_scaled", windows, members=False, predicted_noise=(u, 0.1))
    y = np.zeros((1000, 2), np.float32)
    # Errors of 3 noise units in feature 0 and 1 in feature 1.
    pred_mean = (rng.normal(0.0, 1.0, size=(1000, 2)) * np.array([3.0, 1.0]) * u).astype(np.float32)

    def nll(log_var: list[float]) -> float:
        raw = np.broadcast_to(np.asarray(log_var, np.float32), (1000, 2))
        return float(keras.ops.convert_to_numpy(loss(y, np.concatenate([pred_mean, raw], axis=1))))

    best = nll([2 * np.log(3.0), 0.0])
    for other in ([0.0, 0.0], [2 * np.log(3.0), 1.0], [4.0, -1.0]):
        assert nll(other) > best


# -------------------------------------------------------------------------- a trained model


def het_config() -> TrainConfig:
    return tiny_forecaster_config(
        "tiny-het",
        L,
        {
            "centering": "window_mean",
            "score": "peak",
            "peak_steps": STEPS,
            "peak_local_noise": False,
            "heteroscedastic": True,
            "noise_floor": FLOOR,
            "flatline": True,
        },
    )


run, prep, session = trained_model_fixtures(het_config, "het")


def _terms(s: scoring.ScoringFunction, windows: np.ndarray) -> np.ndarray:
    """Each feature's term outside the graph, from the documented definition (no flatline)."""
    assert s.peak is not None
    assert s.peak.predicted_noise is not None
    z = ((windows - s.mean) / s.std).astype(np.float32)
    out = np.stack([np.asarray(s.model(z[:, j : j + N_IN], training=False)) for j in range(STEPS)], axis=1)
    forecast, sigma = predicted_noise(out, *s.peak.predicted_noise)
    r = (z[:, N_IN:] - forecast) / (s.residual_scale * sigma)
    return np.square(r).max(axis=1)


def test_the_network_forecasts_and_predicts_its_noise(run: TrainResult, prep: Prepared) -> None:
    s = run.scoring
    assert s.model.input_shape == (None, N_IN, 3)
    assert s.model.output_shape == (None, 6)  # 3 forecasts, 3 noise levels
    assert s.peak is not None
    assert s.peak.predicted_noise is not None
    noise, floor = s.peak.predicted_noise
    assert floor == FLOOR
    # The units of the noise output: the sample-to-sample noise of the windows fitted on.
    z = prep.scaler.transform(prep.train_used.windows)[:, STEPS - 1 :, :]
    np.testing.assert_allclose(noise, noise_scales(z), rtol=1e-6)
    # Residual scales: the root mean square of the residuals in predicted noise (about 1
    # for a network whose noise is right; a 2-epoch one is rough).
    assert np.all((s.residual_scale > 0.2) & (s.residual_scale < 5.0))


def test_exports_one_fused_lstm_and_passes_every_check(run: TrainResult) -> None:
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]
    counts = export.op_counts(onnx.load(str(run.model_path)))
    assert counts["LSTM"] == 1
    assert counts.get("Softplus") == 1  # the noise floor
    assert not counts.get("Loop")
    assert not counts.get("Scan")


def test_onnx_runtime_matches_tensorflow_and_the_definition(
    run: TrainResult, prep: Prepared, session: Any
) -> None:
    windows = prep.validation_windows.windows[:64]
    score, contrib = ort_scores(session, windows)
    ref_score, ref_contrib = run.scoring(windows)
    np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(contrib, ref_contrib, rtol=1e-4, atol=1e-5)
    loaded, _ = load_model(run.model_path).run(windows)
    np.testing.assert_allclose(loaded, score, rtol=1e-6)
    terms = _terms(run.scoring, windows)
    np.testing.assert_allclose(score, terms.max(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)


def test_the_same_miss_scores_lower_where_the_network_expects_larger_ones(
    run: TrainResult, prep: Prepared
) -> None:
    # The score of a residual is divided by the noise predicted for it: windows with the
    # same pressure miss on the last step score (40 / sigma)^2 for it, so those with the
    # larger predicted noise score lower. Two epochs barely teach the network to tell windows
    # apart, so a copy of it has its noise output made 30x as sensitive to its input (and
    # raised above the floor).
    s = run.scoring
    assert s.peak is not None
    assert s.peak.predicted_noise is not None
    model = build_networks(run.config.model, N_IN + 1, 3)[0]
    model.set_weights(s.model.get_weights())
    kernel, bias = model.get_layer("noise_level").get_weights()
    model.get_layer("noise_level").set_weights([30.0 * kernel, bias + 2.0])  # above the floor
    s = scoring.build_scoring_function(
        model,
        s.kind,
        window_length=L,
        mean=s.mean,
        std=s.std,
        residual_scale=s.residual_scale,
        n_lstm_layers=s.n_lstm_layers,
        peak=s.peak,
    )
    windows = prep.validation_windows.windows[:256].copy()
    z = ((windows - s.mean) / s.std).astype(np.float32)
    out = np.asarray(model(z[:, -N_IN - 1 : -1], training=False))
    forecast, sigma = predicted_noise(out, *s.peak.predicted_noise)
    assert sigma[:, 1].max() > 1.1 * sigma[:, 1].min()
    # The last step's pressure exactly 40 residual scales (x its predicted noise is what
    # the score divides by) above its forecast.
    windows[:, -1, 1] = (forecast[:, 1] + 40.0 * s.residual_scale[1]) * s.std[1] + s.mean[1]
    terms = _terms(s, windows)
    np.testing.assert_allclose(terms[:, 1], (40.0 / sigma[:, 1]) ** 2, rtol=2e-3)
    score, _ = s(windows)
    np.testing.assert_allclose(score, terms.max(axis=1), rtol=1e-3)
    assert score[np.argmax(sigma[:, 1])] < score[np.argmin(sigma[:, 1])]


def test_contract_score_text(run: TrainResult) -> None:
    contract = read_contract(run.model_path)
    text = contract.score
    assert "of (r_t,f / (s_f · sigma_t,f))^2" in text
    assert f"v = 2 ln {FLOOR:g} + softplus(raw − 2 ln {FLOOR:g})" in text
    assert "max(1, n_f / N_f)" not in text  # no local noise correction here
    assert contract.training_config["model"]["heteroscedastic"] is True
