"""Score "bias": a causal sequence forecaster, seed ensembles, the flatline check and the
training-quantile threshold, from the Keras model to the exported file.

One tiny model is trained once for the module (2 members of 1 LSTM layer of 8 units, L = 16,
2 epochs on a small synthetic fleet, temperature an input only, clipped to +-CLIP training
standard deviations before the network).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import onnx
import pytest

from anomalyd.model import load_model, read_contract
from anomalyd.synthetic import FEATURES
from anomalyd_train import export, scoring
from anomalyd_train.config import ModelConfig, TrainConfig
from anomalyd_train.models import build_model, build_networks, lstm_layers, member_mse
from anomalyd_train.pipeline import Prepared, TrainResult, _inputs_targets
from anomalyd_train.windows import clip_limits
from tests.training.trained_model import ort_scores, tiny_forecaster_config, trained_model_fixtures

pytestmark = pytest.mark.slow

L = 16
BURN_IN = 3
DECAY = 0.3
SCORED = ["pressure", "vibration"]  # temperature: an input only
CLIP = 2.0  # model.input_only_clip: temperature's normalised value is clipped to +-CLIP
QUANTILE = 0.95
FACTOR = 1.5


def _bias_model_config(**update: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {"kind": "forecast", "layers": 1, "units": 4, "score": "bias", "burn_in": BURN_IN, **update}
    )


def _call(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


# ------------------------------------------------------------------------- the Keras network


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("centering", ["none", "window_start"])
def test_bias_forecaster_forecasts_every_step_after_the_burn_in(layers: int, centering: str) -> None:
    model = build_model(_bias_model_config(layers=layers, centering=centering), L, 3)
    assert model.input_shape == (None, L - 1, 3)
    out = _call(model, np.zeros((5, L - 1, 3), np.float32))
    assert out.shape == (5, L - 1 - BURN_IN, 3)
    assert len(lstm_layers(model)) == layers


def test_burn_in_must_leave_a_forecast() -> None:
    with pytest.raises(ValueError, match="burn_in"):
        build_model(_bias_model_config(burn_in=L - 1), L, 3)


def test_bias_forecaster_is_causal() -> None:
    # Output j is the forecast of window step BURN_IN + 2 + j (1-based) made from input steps
    # 0 .. BURN_IN + j (0-based): changing input step k must leave outputs j < k - BURN_IN alone
    # and change output k - BURN_IN (the forecast made right after it).
    keras.utils.set_random_seed(0)
    model = build_model(_bias_model_config(layers=2, units=8, centering="window_start"), L, 3)
    x = np.random.default_rng(1).normal(size=(4, L - 1, 3)).astype(np.float32)
    base = _call(model, x)
    for k in range(BURN_IN, L - 1):
        bumped = x.copy()
        bumped[:, k, :] += 1.0
        out = _call(model, bumped)
        j = k - BURN_IN
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert np.all(np.abs(out[:, j] - base[:, j]).max(axis=-1) > 1e-4), k
    # A change inside the burn-in moves the level every forecast is made relative to.
    bumped = x.copy()
    bumped[:, 0, :] += 1.0
    assert np.all(np.abs(_call(model, bumped) - base).max(axis=-1) > 1e-4)


def test_window_mean_centering_would_break_causality() -> None:
    # Why the config refuses score "bias" with centering "window_mean" (model_construct skips
    # the check): the mean over every input step lets a later step move earlier forecasts.
    cfg = ModelConfig.model_construct(
        kind="forecast", layers=1, units=4, score="bias", burn_in=BURN_IN, centering="window_mean"
    )
    keras.utils.set_random_seed(0)
    model = build_model(cfg, L, 3)
    x = np.random.default_rng(1).normal(size=(4, L - 1, 3)).astype(np.float32)
    bumped = x.copy()
    bumped[:, -1, :] += 1.0
    assert not np.allclose(_call(model, bumped)[:, 0], _call(model, x)[:, 0], atol=1e-4)


def test_window_start_centering_makes_every_forecast_follow_an_offset() -> None:
    keras.utils.set_random_seed(3)
    model = build_model(_bias_model_config(units=8, centering="window_start"), L, 3)
    x = np.random.default_rng(0).normal(size=(4, L - 1, 3)).astype(np.float32)
    offset = np.array([2.0, -1.5, 0.7], np.float32)
    np.testing.assert_allclose(_call(model, x + offset), _call(model, x) + offset, atol=1e-5)


def test_targets_are_the_steps_the_forecasts_are_of() -> None:
    cfg = _bias_model_config()
    z = np.random.default_rng(2).normal(size=(6, L, 3)).astype(np.float32)
    x, y = _inputs_targets(cfg, z)
    np.testing.assert_array_equal(x, z[:, :-1])
    np.testing.assert_array_equal(y, z[:, BURN_IN + 1 :])
    keras.utils.set_random_seed(0)
    model = build_model(cfg, L, 3)
    assert _call(model, x).shape == y.shape
    residuals = scoring.forecast_residuals(model, z, BURN_IN, batch_size=4)  # two batches
    np.testing.assert_allclose(residuals, y - _call(model, x), atol=1e-6)
    # rtol 1e-6: the two run the network in batches of different sizes (float32 rounding).
    np.testing.assert_allclose(
        scoring.squared_residuals(model, "forecast", z, burn_in=BURN_IN),
        np.square(residuals).mean(axis=1),
        rtol=1e-6,
    )
    # score "error": step L alone.
    _, y_last = _inputs_targets(ModelConfig(kind="forecast"), z)
    np.testing.assert_array_equal(y_last, z[:, -1])


@pytest.mark.parametrize("layers", [1, 2])
def test_members_are_averaged_in_one_model_with_a_twin_per_member(layers: int) -> None:
    keras.utils.set_random_seed(0)
    model, twin = build_networks(_bias_model_config(layers=layers, members=3), L, 3)
    assert twin is not None
    assert len(lstm_layers(model)) == 3 * layers
    x = np.random.default_rng(4).normal(size=(2, L - 1, 3)).astype(np.float32)
    each = _call(twin, x)
    assert each.shape == (2, 3, L - 1 - BURN_IN, 3)
    np.testing.assert_allclose(_call(model, x), each.mean(axis=1), atol=1e-6)
    # Own initial weights: the members disagree ...
    assert not np.allclose(each[:, 0], each[:, 1], atol=1e-4)
    # ... and the twin trains the model's own weights.
    assert {id(w) for w in twin.weights} == {id(w) for w in model.weights}
    assert build_networks(_bias_model_config(layers=layers), L, 3)[1] is None


def test_member_mse_is_the_mean_of_the_members_losses() -> None:
    rng = np.random.default_rng(5)
    y_true = rng.normal(size=(4, 5, 2)).astype(np.float32)
    y_pred = rng.normal(size=(4, 3, 5, 2)).astype(np.float32)
    expected = np.mean([np.mean((y_pred[:, m] - y_true) ** 2) for m in range(3)])
    assert float(np.asarray(member_mse(y_true, y_pred))) == pytest.approx(expected, rel=1e-5)
    # Not the loss of the members' average (that would let them co-adapt).
    assert expected > np.mean((y_pred.mean(axis=1) - y_true) ** 2)


# ------------------------------------------------------------------------ helpers (numpy)


def test_bias_weights_are_an_ewma_summing_to_one() -> None:
    w = scoring.bias_weights(8, 0.2)
    assert w.dtype == np.float32
    assert w.shape == (8,)
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-6)
    assert np.all(np.diff(w) > 0)  # oldest first, newest heaviest
    np.testing.assert_allclose(w[:-1] / w[1:], 0.8, rtol=1e-5)
    np.testing.assert_allclose(scoring.bias_weights(4, 1.0), [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(scoring.bias_weights(1, 0.5), [1.0])


def test_window_spread_is_the_population_std_over_steps() -> None:
    rng = np.random.default_rng(6)
    z = rng.normal(size=(5, 9, 3)).astype(np.float32)
    z[2, :, 1] = 4.25
    spread = scoring.window_spread(z)
    assert spread.shape == (5, 3)
    np.testing.assert_allclose(spread, z.std(axis=1), rtol=1e-5)
    assert spread[2, 1] == 0.0
    np.testing.assert_allclose(
        scoring.window_spread(np.array([[[1.0], [2.0], [3.0], [4.0]]], np.float32)), [[1.25**0.5]]
    )


def test_flatline_floors() -> None:
    rng = np.random.default_rng(7)
    z = rng.normal(size=(20, 8, 4)).astype(np.float32)
    z[5, :, 2] = -0.3  # feature 2 was flat once in training: flat is normal for it
    floors = scoring.flatline_floors(z, [False, True, True, True], 0.1)
    assert floors.dtype == np.float32
    smallest = z.std(axis=1).min(axis=0)
    assert floors[0] == 0.0  # not scored
    np.testing.assert_allclose(floors[[1, 3]], 0.1 * smallest[[1, 3]], rtol=1e-5)
    assert floors[2] == 0.0
    assert np.all(floors[[1, 3]] > 0)
    np.testing.assert_array_equal(scoring.flatline_floors(z[:0], [True] * 4, 0.1), np.zeros(4))


# ------------------------------------------------------------------- trained end to end


def bias_config() -> TrainConfig:
    return tiny_forecaster_config(
        "tiny-bias",
        L,
        {
            "score": "bias",
            "burn_in": BURN_IN,
            "bias_decay": DECAY,
            "members": 2,
            "centering": "window_start",
            "flatline": True,
            "flatline_ratio": 0.1,
            "score_features": SCORED,
            "input_only_clip": CLIP,
        },
        # No calibration part: the validation windows are the only held-out ones.
        split={"validation_fraction": 0.2, "calibration_fraction": 0.0},
        training={"epochs": 2, "batch_size": 64, "max_train_windows": 1500},
        calibration={"method": "training_quantile", "quantile": QUANTILE, "factor": FACTOR},
    )


run, prep, session = trained_model_fixtures(bias_config, "bias")


def _some(prep: Prepared, n: int = 64) -> np.ndarray:
    return prep.validation_windows.windows[:n]


def test_ensemble_exports_one_fused_lstm_per_member_and_passes_every_check(run: TrainResult) -> None:
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]
    counts = export.op_counts(onnx.load(str(run.model_path)))
    assert counts["LSTM"] == run.scoring.n_lstm_layers == 2
    assert not counts.get("Loop")
    assert not counts.get("Scan")
    # Both members were trained from their own initial weights.
    first, second = (lstm_layers(run.scoring.model)[m].get_weights()[0] for m in (0, 1))
    assert not np.allclose(first, second)


def test_onnx_runtime_matches_tensorflow(run: TrainResult, prep: Prepared, session: Any) -> None:
    windows = _some(prep)
    stuck = windows.copy()
    stuck[:, :, 1] = stuck[:, -1:, 1]
    # A stuck feature's spread is 0 up to rounding, which the flatline term magnifies by
    # FLATLINE_SCORE / floor: a looser tolerance there (it is ~1000 either way).
    for some, rtol, atol in ((windows, 1e-4, 1e-5), (stuck, 1e-3, 1e-4)):
        got_score, got_contrib = ort_scores(session, some)
        ref_score, ref_contrib = run.scoring(some)
        np.testing.assert_allclose(got_score, ref_score, rtol=rtol, atol=atol)
        np.testing.assert_allclose(got_contrib, ref_contrib, rtol=rtol, atol=atol)
        loaded_score, _ = load_model(run.model_path).run(some)
        np.testing.assert_allclose(loaded_score, got_score, rtol=1e-6)


def _branches(s: scoring.ScoringFunction, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's weighted-mean and last-step residual in residual-scale units, outside the graph."""
    assert s.bias is not None
    assert s.input_clip is not None
    z = ((windows - s.mean) / s.std).astype(np.float32)
    z = np.clip(z, -clip_limits(s.input_clip), clip_limits(s.input_clip))
    r = (z[:, BURN_IN + 1 :] - _call(s.model, z[:, :-1])) / s.residual_scale
    return np.abs(np.einsum("nsf,s->nf", r, s.bias.weights)), np.abs(r[:, -1])


def test_score_follows_the_documented_definition(run: TrainResult, prep: Prepared, session: Any) -> None:
    s = run.scoring
    assert s.bias is not None
    windows = _some(prep)
    lasting, spike = _branches(s, windows)
    expected = np.maximum(lasting / s.bias.bias_scale, spike / s.bias.spike_scale)
    expected[:, 0] = 0.0  # temperature: not scored
    score, contrib = ort_scores(session, windows)
    np.testing.assert_allclose(contrib, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(score, contrib.max(axis=1))
    np.testing.assert_array_equal(contrib[:, 0], 0.0)
    assert np.all(contrib[:, 1:] > 0)
    # The largest, not the mean or the sum, of the scored features' terms.
    assert not np.allclose(score, contrib[:, 1:].mean(axis=1), rtol=1e-3)


def test_branch_scales_put_the_training_quantile_at_one(run: TrainResult, prep: Prepared) -> None:
    s = run.scoring
    assert s.bias is not None
    np.testing.assert_allclose(s.bias.weights, scoring.bias_weights(L - 1 - BURN_IN, DECAY))
    assert s.bias.burn_in == BURN_IN
    lasting, spike = _branches(s, prep.train_used.windows)
    for branch, scale in ((lasting, s.bias.bias_scale), (spike, s.bias.spike_scale)):
        worst = branch[:, 1:].max(axis=1) / scale  # over the scored features
        assert float(np.quantile(worst, scoring.BRANCH_QUANTILE)) == pytest.approx(1.0, rel=1e-3)
    # Residual scales: a training forecast's squared residual averages 1 per feature.
    z = prep.scaler.transform(prep.train_used.windows)
    sq = scoring.squared_residuals(s.model, "forecast", z.astype(np.float32), burn_in=BURN_IN)
    np.testing.assert_allclose((sq / s.residual_scale**2).mean(axis=0), 1.0, rtol=1e-3)


def test_threshold_is_factor_times_the_quantile_of_every_training_data_window(
    run: TrainResult, prep: Prepared
) -> None:
    assert len(prep.calibration_windows) == 0
    every = np.concatenate([prep.train_windows.windows, prep.validation_windows.windows])
    assert len(every) > len(prep.train_used)  # all training windows, not the subsample
    scores, _ = run.scoring(every)
    expected = FACTOR * float(np.quantile(scores.astype(np.float64), QUANTILE))
    threshold = read_contract(run.model_path).threshold
    assert threshold.method == "training_quantile"
    assert threshold.target_false_alarm_rate is None
    assert threshold.pot is None
    assert threshold.n_calibration_windows == len(every)  # each window counted once
    assert threshold.value == pytest.approx(expected, rel=1e-4)
    assert run.threshold == threshold.value
    assert run.calibration_source == "training-data"
    assert "training-data windows" in threshold.note


def test_contract_score_names_scored_features_members_and_flatline_check(run: TrainResult) -> None:
    contract = read_contract(run.model_path)
    assert contract.score_features == SCORED
    assert contract.feature_names == list(FEATURES)
    text = contract.score
    assert text.startswith("largest over the 2 scored features f (pressure, vibration)")
    assert "the mean of 2 networks' forecasts" in text
    assert f"for steps {BURN_IN + 2}..L" in text
    assert f"alpha {DECAY:g}" in text
    assert "0 for the inputs that are not scored: temperature" in text
    assert "flatline check on pressure, vibration:" in text
    assert f"the network sees temperature (inputs only) clipped to +-{CLIP:g}" in text
    assert contract.training_config["model"]["score"] == "bias"


# ------------------------------------------------------------------- inputs-only clipping


def test_contract_and_scaler_carry_the_input_only_clip(run: TrainResult, prep: Prepared) -> None:
    assert read_contract(run.model_path).normalisation.input_clip == [CLIP, 0.0, 0.0]
    assert prep.scaler.clipped == [True, False, False]
    # The network was fitted on clipped windows: no training input of temperature beyond CLIP.
    z = prep.scaler.transform(prep.train_used.windows)
    assert float(np.abs(z[:, :, 0]).max()) <= CLIP
    raw = (prep.train_used.windows - prep.scaler.mean) / prep.scaler.std
    assert float(np.abs(raw[:, :, 1:]).max()) == pytest.approx(float(np.abs(z[:, :, 1:]).max()), rel=1e-6)


def test_an_input_only_feature_beyond_the_clip_scores_as_at_the_clip(
    run: TrainResult, prep: Prepared, session: Any
) -> None:
    windows = _some(prep, 16).copy()
    mean, std = run.scoring.mean[0], run.scoring.std[0]

    def temperature_at(z: float) -> np.ndarray:
        # Temperature, the input only: at its training mean, then z training stds away for the
        # window's second half (a step: with window_start centering a constant level would
        # look the same to the network wherever it is).
        w = windows.copy()
        w[:, :, 0] = mean
        w[:, L // 2 :, 0] = mean + z * std
        return w

    at_clip, far = ort_scores(session, temperature_at(CLIP)), ort_scores(session, temperature_at(20 * CLIP))
    # The network sees CLIP either way: the same scores and contributions.
    np.testing.assert_allclose(far[0], at_clip[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(far[1], at_clip[1], rtol=1e-6, atol=1e-7)
    below, at_minus_clip = (
        ort_scores(session, temperature_at(-20 * CLIP)),
        ort_scores(session, temperature_at(-CLIP)),
    )
    np.testing.assert_allclose(below[0], at_minus_clip[0], rtol=1e-6, atol=1e-7)
    # Inside the clip temperature still reaches the network: its forecasts change.
    inside = ort_scores(session, temperature_at(0.0))
    assert not np.allclose(inside[0], at_clip[0], rtol=1e-4)
    # A scored feature is never clipped: pressure far out scores far higher.
    w = windows.copy()
    w[:, -5:, 1] += 20 * CLIP * run.scoring.std[1]
    assert np.all(ort_scores(session, w)[0] > 5 * ort_scores(session, windows)[0])


# -------------------------------------------------------------------------------- flatline


def test_trained_floors_are_a_fraction_of_the_smallest_training_spread(
    run: TrainResult, prep: Prepared
) -> None:
    floors = run.scoring.flat_floor
    assert floors is not None
    assert floors[0] == 0.0  # temperature: not scored, never checked
    z = prep.scaler.transform(prep.train_used.windows)
    expected = 0.1 * scoring.window_spread(z).min(axis=0)
    np.testing.assert_allclose(floors[1:], expected[1:], rtol=1e-5)
    assert np.all(floors[1:] > 0)


@pytest.mark.parametrize("feature", [1, 2])
def test_a_stuck_scored_feature_scores_the_flatline_score(
    run: TrainResult, prep: Prepared, session: Any, feature: int
) -> None:
    windows = _some(prep, 32)
    stuck = windows.copy()
    stuck[:, :, feature] = stuck[:, -1:, feature]  # frozen at its last reading
    for score, contrib in (ort_scores(session, stuck), run.scoring(stuck)):
        assert np.all(contrib[:, feature] >= scoring.FLATLINE_SCORE * 0.99)
        assert np.all(score > run.threshold)
        np.testing.assert_array_equal(contrib[:, 0], 0.0)
    # The same windows, moving: no flatline term anywhere.
    score, contrib = ort_scores(session, windows)
    assert np.all(score < scoring.FLATLINE_SCORE)
    assert np.all(contrib < 0.5 * scoring.FLATLINE_SCORE)


def test_a_feature_without_a_floor_gets_no_flatline_term(
    run: TrainResult, prep: Prepared, session: Any
) -> None:
    windows = _some(prep, 32)
    # Temperature (unscored, floor 0) stuck: it still contributes exactly 0.
    stuck = windows.copy()
    stuck[:, :, 0] = stuck[:, -1:, 0]
    score, contrib = ort_scores(session, stuck)
    np.testing.assert_array_equal(contrib[:, 0], 0.0)
    assert np.all(score < scoring.FLATLINE_SCORE)
    # A scored feature whose floor is 0 (its training held a flat window) scores as without the check.
    s = run.scoring
    assert s.flat_floor is not None

    def rebuilt(flat_floor: np.ndarray | None) -> scoring.ScoringFunction:
        return scoring.build_scoring_function(
            s.model,
            s.kind,
            window_length=s.window_length,
            mean=s.mean,
            std=s.std,
            residual_scale=s.residual_scale,
            n_lstm_layers=s.n_lstm_layers,
            scored=s.weights > 0,
            bias=s.bias,
            flat_floor=flat_floor,
            input_clip=s.input_clip,
        )

    floors = s.flat_floor.copy()
    floors[1] = 0.0  # pressure unchecked, vibration still checked
    stuck = windows.copy()
    stuck[:, :, 1:] = stuck[:, -1:, 1:]
    _, with_zero_floor = rebuilt(floors)(stuck)
    _, unchecked = rebuilt(None)(stuck)
    np.testing.assert_allclose(with_zero_floor[:, 1], unchecked[:, 1], rtol=1e-5, atol=1e-6)
    assert np.all(with_zero_floor[:, 1] < scoring.FLATLINE_SCORE)
    assert np.all(with_zero_floor[:, 2] >= scoring.FLATLINE_SCORE * 0.99)
    assert np.all(unchecked[:, 2] < scoring.FLATLINE_SCORE)
