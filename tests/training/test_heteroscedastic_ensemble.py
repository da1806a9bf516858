"""A seed ensemble of heteroscedastic forecasters (``model.members`` > 1 with
``model.heteroscedastic``): each member is trained on its own Gaussian likelihood, and the
one exported graph scores their combination, a Gaussian with the members' mean forecast and
their mean predicted variance plus the spread of their forecasts.

One tiny model is trained once for the module (2 members of 1 LSTM layer of 8 units, L = 16
with the last 3 steps scored, 2 epochs on a small synthetic fleet).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from anomalyd.model import load_model, read_contract
from anomalyd_train import export
from anomalyd_train.config import ModelConfig, TrainConfig
from anomalyd_train.models import (
    build_networks,
    ensemble_noise_output,
    noise_log_variance,
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
NOISE = np.array([0.1, 0.3, 0.05])


def _mixture(stacked: np.ndarray, noise: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The combination written out: mean forecast and the standard deviation (normalised
    units) of the members' equal-weight Gaussian mixture."""
    forecasts, sigmas = zip(*(predicted_noise(m, noise, floor) for m in stacked), strict=True)
    f = np.asarray(forecasts, np.float64)
    s = np.asarray(sigmas, np.float64)
    mean = f.mean(axis=0)
    variance = np.mean(s**2, axis=0) + np.mean((f - mean) ** 2, axis=0)
    return mean, np.sqrt(variance)


# ------------------------------------------------------------------------------ the combination


def test_several_heteroscedastic_members_are_a_valid_config() -> None:
    cfg = ModelConfig.model_validate({"heteroscedastic": True, "score": "peak", "members": 3})
    assert cfg.members == 3


def test_the_combination_is_the_members_gaussian_mixture_moments() -> None:
    rng = np.random.default_rng(1)
    stacked = np.concatenate(
        [rng.normal(0.0, 0.2, size=(3, 50, 3)), rng.normal(0.5, 2.0, size=(3, 50, 3))], axis=-1
    )
    out = ensemble_noise_output(stacked, NOISE, FLOOR, np_ops)
    assert out.shape == (50, 6)
    forecast, sigma = predicted_noise(out, NOISE, FLOOR)
    mean, mixture_sigma = _mixture(stacked, NOISE, FLOOR)
    np.testing.assert_allclose(forecast, mean, rtol=1e-12)
    np.testing.assert_allclose(sigma, mixture_sigma, rtol=1e-5)


def test_members_that_agree_give_their_own_output_and_disagreement_widens_the_noise() -> None:
    rng = np.random.default_rng(2)
    one = np.concatenate([rng.normal(size=(20, 3)), rng.uniform(-1.0, 3.0, size=(20, 3))], axis=-1)
    twins = ensemble_noise_output(np.stack([one, one]), NOISE, FLOOR, np_ops)
    np.testing.assert_allclose(twins, one, rtol=1e-5, atol=1e-5)
    apart = np.stack([one, one.copy()])
    apart[1, :, 0] += 4.0 * NOISE[0]  # member 2's temperature forecast 4 noise units higher
    _, sigma_agree = predicted_noise(one, NOISE, FLOOR)
    forecast, sigma_apart = predicted_noise(ensemble_noise_output(apart, NOISE, FLOOR, np_ops), NOISE, FLOOR)
    np.testing.assert_allclose(forecast[:, 0], one[:, 0] + 2.0 * NOISE[0])
    # Variance + (2 noise units)^2, in the feature's noise units.
    np.testing.assert_allclose(
        (sigma_apart[:, 0] / NOISE[0]) ** 2, (sigma_agree[:, 0] / NOISE[0]) ** 2 + 4.0, rtol=1e-4
    )
    np.testing.assert_allclose(sigma_apart[:, 1:], sigma_agree[:, 1:], rtol=1e-5)


def test_members_at_the_noise_floor_stay_finite_and_at_the_floor() -> None:
    stacked = np.zeros((2, 4, 6))
    stacked[..., 3:] = -80.0  # far below the floor: every member predicts the floor
    out = ensemble_noise_output(stacked.astype(np.float32), NOISE, FLOOR, np_ops)
    assert np.all(np.isfinite(out))
    lv = noise_log_variance(out[:, 3:].astype(np.float64), FLOOR, np_ops)
    np.testing.assert_allclose(lv, 2 * np.log(FLOOR), atol=1e-4)


def test_the_keras_ensemble_combines_its_members_as_documented() -> None:
    cfg = ModelConfig.model_validate(
        {"kind": "forecast", "layers": 1, "units": 4, "score": "peak", "heteroscedastic": True, "members": 2}
    )
    with pytest.raises(ValueError, match="noise scales"):
        build_networks(cfg, 12, 3)
    model, twin = build_networks(cfg, 12, 3, noise=NOISE)
    assert twin is not None
    x = np.random.default_rng(3).normal(size=(7, 11, 3)).astype(np.float32)
    members = np.moveaxis(np.asarray(twin(x)), 1, 0).astype(np.float64)
    forecast, sigma = predicted_noise(np.asarray(model(x)), NOISE, FLOOR)
    mean, mixture_sigma = _mixture(members, NOISE, FLOOR)
    np.testing.assert_allclose(forecast, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, mixture_sigma, rtol=1e-4)


def test_each_member_is_trained_on_its_own_likelihood() -> None:
    import keras

    rng = np.random.default_rng(4)
    windows = rng.normal(size=(300, 8, 3)).astype(np.float32)
    loss_one = training_loss("noise_scaled", windows, members=False, predicted_noise=(NOISE, FLOOR))
    loss_members = training_loss("noise_scaled", windows, members=True, predicted_noise=(NOISE, FLOOR))
    y = rng.normal(size=(64, 3)).astype(np.float32)
    outs = rng.normal(size=(64, 2, 6)).astype(np.float32)

    def value(loss: Any, y_true: Any, y_pred: Any) -> float:
        return float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))

    each = [value(loss_one, y, outs[:, m]) for m in range(2)]
    assert value(loss_members, y, outs) == pytest.approx(np.mean(each), rel=1e-5)


# -------------------------------------------------------------------------- a trained model


def ensemble_config() -> TrainConfig:
    return tiny_forecaster_config(
        "tiny-het-ensemble",
        L,
        {
            "centering": "window_mean",
            "score": "peak",
            "peak_steps": STEPS,
            "peak_local_noise": False,
            "heteroscedastic": True,
            "noise_floor": FLOOR,
            "members": 2,
        },
    )


run, prep, session = trained_model_fixtures(ensemble_config, "het-ensemble")


def test_exports_one_fused_lstm_per_member_and_passes_every_check(run: TrainResult) -> None:
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]
    counts = export.op_counts(onnx.load(str(run.model_path)))
    assert counts["LSTM"] == 2
    assert not counts.get("Loop")
    assert not counts.get("Scan")
    contract = read_contract(run.model_path)
    assert contract.training_config["model"]["members"] == 2
    assert "with 2 networks, the forecast is the mean of theirs and sigma_t,f^2 the mean" in contract.score


def test_onnx_runtime_scores_the_members_combination(run: TrainResult, prep: Prepared, session: Any) -> None:
    s = run.scoring
    assert s.peak is not None
    assert s.peak.predicted_noise is not None
    windows = prep.validation_windows.windows[:64]
    score, contrib = ort_scores(session, windows)
    np.testing.assert_allclose(score, run.scoring(windows)[0], rtol=1e-4, atol=1e-5)
    loaded, _ = load_model(run.model_path).run(windows)
    np.testing.assert_allclose(loaded, score, rtol=1e-6)
    # The documented score from the members' own outputs, combined outside the graph.
    _, twin = build_networks(run.config.model, L - STEPS + 1, 3, noise=s.peak.predicted_noise[0])
    assert twin is not None
    twin.set_weights(s.model.get_weights())
    z = ((windows - s.mean) / s.std).astype(np.float32)
    terms = []
    for j in range(STEPS):
        members = np.moveaxis(np.asarray(twin(z[:, j : j + N_IN], training=False)), 1, 0).astype(np.float64)
        forecast, sigma = _mixture(members, *s.peak.predicted_noise)
        terms.append(np.square((z[:, N_IN + j] - forecast) / (s.residual_scale * sigma)))
    np.testing.assert_allclose(score, np.max(terms, axis=0).max(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
