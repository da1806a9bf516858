"""Score "peak": the window's last few steps each forecast from the steps before them, the
largest squared residual over those steps and the scored features, a local noise correction,
and the "noise_scaled" training loss; from the Keras model to the exported file.

One tiny model is trained once for the module (1 LSTM layer of 8 units, L = 16 with the last
3 steps scored, 2 epochs on a small synthetic fleet, temperature an input only).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from anomalyd.errors import ConfigError
from anomalyd.model import load_model, read_contract
from anomalyd_train import export, scoring
from anomalyd_train.config import ModelConfig, TrainConfig, check_peak_weights, load_train_config
from anomalyd_train.models import member_mse, noise_scales, training_loss
from anomalyd_train.pipeline import Prepared, TrainResult
from anomalyd_train.windows import log_scale
from tests.training.trained_model import ort_scores, tiny_forecaster_config, trained_model_fixtures

pytestmark = pytest.mark.slow

L = 16
STEPS = 3
N_IN = L - STEPS  # steps each forecast sees
SCORED = ["pressure", "vibration"]  # temperature: an input only


# ---------------------------------------------------------------------------------- config


def test_peak_needs_a_forecaster_without_window_start_centering() -> None:
    with pytest.raises(ValueError, match="kind 'forecast'"):
        ModelConfig.model_validate({"kind": "autoencoder", "score": "peak"})
    with pytest.raises(ValueError, match="window_start"):
        ModelConfig.model_validate({"score": "peak", "centering": "window_start"})
    ModelConfig.model_validate({"score": "peak", "centering": "window_mean"})


def test_peak_steps_must_leave_the_network_two_steps(tmp_path: Any) -> None:
    path = tmp_path / "train.toml"
    path.write_text('[window]\nlength = 10\n[model]\nscore = "peak"\npeak_steps = 9\n')
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert err.value.key_path == "model.peak_steps"
    path.write_text('[window]\nlength = 10\n[model]\nscore = "peak"\npeak_steps = 8\n')
    assert load_train_config(path).model.peak_steps == 8


def test_peak_span_must_fit_the_scored_steps() -> None:
    with pytest.raises(ValueError, match="peak_span"):
        ModelConfig.model_validate(
            {"score": "peak", "centering": "window_mean", "peak_steps": 3, "peak_span": 4}
        )
    cfg = ModelConfig.model_validate(
        {"score": "peak", "centering": "window_mean", "peak_steps": 4, "peak_span": 2}
    )
    assert cfg.peak_span == 2
    with pytest.raises(ValueError, match=r"peak\.span"):
        scoring.build_scoring_function(
            None,
            "forecast",
            window_length=L,
            mean=np.zeros(3, np.float32),
            std=np.ones(3, np.float32),
            residual_scale=np.ones(3, np.float32),
            n_lstm_layers=1,
            peak=scoring.PeakScore(steps=STEPS, span=STEPS + 1),
        )


def test_peak_weights_need_peak_and_positive_finite_numbers() -> None:
    base = {"score": "peak", "centering": "window_mean"}
    with pytest.raises(ValueError, match="needs score 'peak'"):
        ModelConfig.model_validate({"peak_weights": {"pressure": 2.0}})
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite numbers above 0"):
            ModelConfig.model_validate(base | {"peak_weights": {"pressure": bad}})
    assert ModelConfig.model_validate(base | {"peak_weights": {"pressure": 1.4}}).peak_weights == {
        "pressure": 1.4
    }


def test_peak_weights_must_name_scored_features() -> None:
    names = ["temperature", "pressure", "vibration"]
    cfg = TrainConfig.model_validate({"model": {"score": "peak", "peak_weights": {"pressure": 1.4}}})
    assert check_peak_weights(cfg, names) == [1.0, 1.4, 1.0]
    assert check_peak_weights(TrainConfig.model_validate({"model": {"score": "peak"}}), names) is None
    unknown = TrainConfig.model_validate({"model": {"score": "peak", "peak_weights": {"presure": 2.0}}})
    with pytest.raises(ConfigError) as err:
        check_peak_weights(unknown, names)
    assert err.value.key_path == "model.peak_weights"
    assert "presure" in str(err.value)
    unscored = TrainConfig.model_validate(
        {"model": {"score": "peak", "score_features": SCORED, "peak_weights": {"temperature": 2.0}}}
    )
    with pytest.raises(ConfigError, match="input-only") as err:
        check_peak_weights(unscored, names)
    assert err.value.key_path == "model.peak_weights"


# ---------------------------------------------------------------------- loss (numpy, Keras)


def test_noise_scales_are_the_robust_std_of_white_noise() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, [0.01, 0.5, 2.0], size=(400, 30, 3)).astype(np.float32)
    z[:, :, 1] += np.linspace(0.0, 3.0, 30, dtype=np.float32)  # a steady ramp: differences shift
    z[::7, 5, 2] += 50.0  # rare outliers barely move a median
    np.testing.assert_allclose(noise_scales(z), [0.01, 0.5, 2.0], rtol=0.05)
    # A constant feature gets the floor, not a zero (the loss weight is 1 / scale²).
    flat = np.zeros((3, 5, 1), np.float32)
    assert noise_scales(flat)[0] > 0
    with pytest.raises(ValueError, match="windows"):
        noise_scales(np.zeros((3, 1, 2), np.float32))


def test_noise_scaled_loss_weighs_each_feature_by_its_noise() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, [0.1, 1.0], size=(200, 20, 2)).astype(np.float32)
    w = 1.0 / noise_scales(z) ** 2
    y_true = rng.normal(size=(8, 2)).astype(np.float32)
    y_pred = rng.normal(size=(8, 2)).astype(np.float32)
    loss = training_loss("noise_scaled", z, members=False)
    expected = np.mean((y_pred - y_true) ** 2 * w)
    assert float(np.asarray(loss(y_true, y_pred))) == pytest.approx(expected, rel=1e-5)
    # Several members: each member's output against the one target, as member_mse does.
    each = rng.normal(size=(8, 3, 2)).astype(np.float32)
    member_loss = training_loss("noise_scaled", z, members=True)
    expected = np.mean((each - y_true[:, None, :]) ** 2 * w)
    assert float(np.asarray(member_loss(y_true, each))) == pytest.approx(expected, rel=1e-5)
    # "mse" is exactly what it was before the key existed.
    assert training_loss("mse", z, members=False) == "mse"
    assert training_loss("mse", z, members=True) is member_mse


# ------------------------------------------------------------------- local noise (numpy)


def test_upper_median_and_local_noise() -> None:
    v = np.array([[3.0, 1.0, 2.0, 10.0], [4.0, 4.0, -1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(scoring.upper_median(v, axis=1), [3.0, 4.0])  # 2nd largest of 4
    np.testing.assert_array_equal(scoring.upper_median(v[:, :3], axis=1), [2.0, 4.0])  # median of 3
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, [0.2, 3.0], size=(300, 41, 2)).astype(np.float32)
    noise = scoring.local_noise(z, 40)  # the first 40 steps only
    assert noise.shape == (300, 2)
    np.testing.assert_allclose(np.median(noise, axis=0), [0.2, 3.0], rtol=0.05)
    # The step after the first 40 is not looked at; a spike among them barely moves it.
    changed = z.copy()
    changed[:, 40, :] += 100.0
    np.testing.assert_array_equal(scoring.local_noise(changed, 40), noise)
    changed[:, 20, :] += 1000.0
    # Two outlying differences among 39: a median moves by an order statistic or two, where a
    # standard deviation of the differences would grow many times over.
    moved = np.abs(scoring.local_noise(changed, 40) - noise) / noise
    assert moved.max() < 1.0
    assert float(np.mean(moved)) < 0.1
    plain = np.diff(changed[:, :40], axis=1).std(axis=1) / np.sqrt(2.0)
    assert np.all(plain > 5.0 * noise)


# ------------------------------------------------------------------- trained end to end


def peak_config() -> TrainConfig:
    return tiny_forecaster_config(
        "tiny-peak",
        L,
        {
            "centering": "window_mean",
            "score": "peak",
            "peak_steps": STEPS,
            "flatline": True,
            "score_features": SCORED,
            # Vibration on a log scale: the graph's log runs in every check below.
            "log_features": ["vibration"],
        },
    )


run, prep, session = trained_model_fixtures(peak_config, "peak")


def _some(prep: Prepared, n: int = 64) -> np.ndarray:
    return prep.validation_windows.windows[:n]


def _terms(s: scoring.ScoringFunction, windows: np.ndarray, *, local: bool = True) -> np.ndarray:
    """Each feature's term outside the graph, from the documented definition (no flatline)."""
    assert s.peak is not None
    assert s.log_offset is not None
    z = ((log_scale(windows, s.log_offset) - s.mean) / s.std).astype(np.float32)
    pred = np.stack([np.asarray(s.model(z[:, j : j + N_IN], training=False)) for j in range(STEPS)], axis=1)
    r = (z[:, N_IN:] - pred) / s.residual_scale
    if local and s.peak.noise_reference is not None:
        ratio = np.maximum(scoring.local_noise(z, N_IN) / s.peak.noise_reference, 1.0)
        r = r / ratio[:, None, :]
    squared = np.square(r)
    runs = STEPS - s.peak.span + 1
    terms = sum(squared[:, j : j + runs] for j in range(s.peak.span)).max(axis=1)
    terms[:, 0] = 0.0  # temperature: not scored
    return terms


def _with_peak(s: scoring.ScoringFunction, peak: scoring.PeakScore) -> scoring.ScoringFunction:
    """The same network and constants scored with another ``peak``."""
    assert s.log_offset is not None
    return scoring.build_scoring_function(
        s.model,
        s.kind,
        window_length=L,
        mean=s.mean,
        std=s.std,
        residual_scale=s.residual_scale,
        n_lstm_layers=s.n_lstm_layers,
        log_offset=s.log_offset,
        scored=[False, True, True],
        peak=peak,
    )


def test_network_sees_the_window_less_the_scored_steps(run: TrainResult) -> None:
    assert run.scoring.model.input_shape == (None, N_IN, 3)
    assert run.scoring.window_length == L
    assert read_contract(run.model_path).window_length == L


def test_exports_one_fused_lstm_and_passes_every_check(run: TrainResult) -> None:
    assert [c.name for c in run.export.checks] == ["onnx_checker", "fused_lstm", "parity", "daemon_loader"]
    counts = export.op_counts(onnx.load(str(run.model_path)))
    # The scored steps' forecasts are one batch through the network: still one op per layer.
    assert counts["LSTM"] == run.scoring.n_lstm_layers == 1
    assert not counts.get("Loop")
    assert not counts.get("Scan")
    assert counts.get("TopK") == 2  # the two medians of the local noise


def test_onnx_runtime_matches_tensorflow(run: TrainResult, prep: Prepared, session: Any) -> None:
    windows = _some(prep)
    stuck = windows.copy()
    stuck[:, :, 1] = stuck[:, -1:, 1]
    for some, rtol, atol in ((windows, 1e-4, 1e-5), (stuck, 1e-3, 1e-4)):
        got_score, got_contrib = ort_scores(session, some)
        ref_score, ref_contrib = run.scoring(some)
        np.testing.assert_allclose(got_score, ref_score, rtol=rtol, atol=atol)
        np.testing.assert_allclose(got_contrib, ref_contrib, rtol=rtol, atol=atol)
        loaded_score, _ = load_model(run.model_path).run(some)
        np.testing.assert_allclose(loaded_score, got_score, rtol=1e-6)


def test_score_follows_the_documented_definition(run: TrainResult, prep: Prepared, session: Any) -> None:
    windows = _some(prep)
    terms = _terms(run.scoring, windows)
    score, contrib = ort_scores(session, windows)
    np.testing.assert_allclose(score, terms.max(axis=1), rtol=1e-3, atol=1e-5)
    # The largest term, not the mean of them ...
    assert not np.allclose(score, terms[:, 1:].mean(axis=1), rtol=1e-3)
    # ... and the contributions sum to it, each feature in proportion to its term.
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
    share = terms / terms.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(contrib / score[:, None], share, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(contrib[:, 0], 0.0)


def test_a_one_step_surprise_scores_in_peak_steps_consecutive_windows(
    run: TrainResult, prep: Prepared
) -> None:
    # A stream of clean rows with a jump at row p: the windows ending at p .. p+STEPS-1 each
    # hold step p among their scored steps, and each forecasts it from the same N_IN steps
    # before it, so (without the local correction, which looks at different older steps in
    # each) step p's residual, and with it the score, is the same in all of them although
    # their later steps differ: no forecast sees the step it forecasts or any after it.
    s = run.scoring
    no_local = scoring.build_scoring_function(
        s.model,
        s.kind,
        window_length=L,
        mean=s.mean,
        std=s.std,
        residual_scale=s.residual_scale,
        n_lstm_layers=s.n_lstm_layers,
        scored=[False, True, True],
        peak=scoring.PeakScore(steps=STEPS),
    )
    rows = prep.validation_segments[0].values[: L + 2 * STEPS].astype(np.float32).copy()
    p = L + STEPS - 2
    rows[p, 1] += 40.0 * s.std[1] * s.residual_scale[1]  # 40 residual scales of pressure
    ends = np.arange(L - 1, len(rows))
    windows = np.stack([rows[e - L + 1 : e + 1] for e in ends])
    score, contrib = no_local(windows)
    holding = (ends >= p) & (ends < p + STEPS)
    assert holding.sum() == STEPS
    assert np.all(score[holding] > 400.0), score
    np.testing.assert_allclose(score[holding], score[holding][0], rtol=1e-4)
    assert np.all(contrib[holding, 1] > 0.9 * score[holding])  # pressure's doing
    assert np.all(score[ends < p] < 0.1 * score[holding].min())


def test_peak_span_sums_consecutive_steps_in_the_graph_and_in_onnx(run: TrainResult, prep: Prepared) -> None:
    # span 2: each feature's term is the larger of (step 1 + step 2) and (step 2 + step 3)
    # of its squared residuals, so a surprise that lasts two steps (a level shift the network
    # follows after one step) adds up, where span 1 takes only the larger of the two.
    s = run.scoring
    assert s.peak is not None
    paired = _with_peak(s, scoring.PeakScore(steps=STEPS, noise_reference=s.peak.noise_reference, span=2))
    windows = _some(prep).copy()
    windows[::2, -2:, 1] += 30.0 * s.residual_scale[1] * s.std[1]  # pressure up for the last 2 steps
    terms = _terms(paired, windows)
    score, contrib = paired(windows)
    np.testing.assert_allclose(score, terms.max(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
    single = _terms(s, windows)
    assert np.all(terms >= single * (1 - 1e-5))  # a sum of squares is never below its largest part
    assert np.all(terms[::2, 1] > 1.2 * single[::2, 1])  # the two-step surprise added up
    proto = export.convert(paired, opset=17)
    assert export.op_counts(proto)["LSTM"] == 1
    got_score, got_contrib = ort_scores(export._ort_session(proto.SerializeToString()), windows)
    np.testing.assert_allclose(got_score, score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_contrib, contrib, rtol=1e-4, atol=1e-5)
    text = scoring.peak_score_definition(
        ["temperature", "pressure", "vibration"], SCORED, steps=STEPS, window_length=L, local=True, span=2
    )
    assert text.startswith(
        "largest over the 2 scored features f (pressure, vibration) and the 2 runs of 2 consecutive "
        f"steps among the window's last {STEPS} of the sum over the run's steps t of (r_t,f / (s_f))^2"
    )


def test_peak_weights_multiply_each_term_in_the_graph_and_in_onnx(run: TrainResult, prep: Prepared) -> None:
    # Pressure's term counts 3 times: the score is the larger of 3 x pressure's and
    # vibration's term; the flatline part is added after the weight, so it is not weighted.
    s = run.scoring
    assert s.peak is not None
    weights = np.array([1.0, 3.0, 1.0], np.float32)
    weighted = _with_peak(
        s, scoring.PeakScore(steps=STEPS, noise_reference=s.peak.noise_reference, weights=weights)
    )
    windows = _some(prep)
    terms = _terms(s, windows) * weights
    score, contrib = weighted(windows)
    np.testing.assert_allclose(score, terms.max(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
    share = contrib[:, 1] / np.maximum(contrib[:, 1] + contrib[:, 2], 1e-30)
    np.testing.assert_allclose(share, terms[:, 1] / (terms[:, 1] + terms[:, 2]), rtol=1e-3, atol=1e-6)
    assert np.all(score >= _terms(s, windows).max(axis=1) * (1 - 1e-5))
    proto = export.convert(weighted, opset=17)
    got_score, got_contrib = ort_scores(export._ort_session(proto.SerializeToString()), windows)
    np.testing.assert_allclose(got_score, score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_contrib, contrib, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"peak\.weights"):
        _with_peak(s, scoring.PeakScore(steps=STEPS, weights=np.array([1.0, 0.0, 1.0], np.float32)))
    text = scoring.peak_score_definition(
        ["temperature", "pressure", "vibration"],
        SCORED,
        steps=STEPS,
        window_length=L,
        local=True,
        weights=[1.0, 3.0, 1.0],
    )
    assert "multiplied by its weight (pressure 3, vibration 1) before the largest is taken" in text


def test_local_noise_only_ever_lowers_the_terms(run: TrainResult, prep: Prepared) -> None:
    s = run.scoring
    assert s.peak is not None
    assert s.peak.noise_reference is not None
    z = prep.scaler.transform(prep.train_used.windows)
    np.testing.assert_allclose(
        s.peak.noise_reference, np.median(scoring.local_noise(z, N_IN), axis=0), rtol=1e-6
    )
    windows = _some(prep, 32)
    # Noise six times the reference in pressure's older steps: its terms are divided by the
    # ratio squared, and the graph scores that.
    rng = np.random.default_rng(4)
    noisy = windows.copy()
    extra = 6.0 * s.peak.noise_reference[1] * s.std[1]
    noisy[:, :N_IN, 1] += rng.normal(0.0, extra, size=(len(noisy), N_IN)).astype(np.float32)
    zn = ((noisy - s.mean) / s.std).astype(np.float32)
    ratio = np.maximum(scoring.local_noise(zn, N_IN) / s.peak.noise_reference, 1.0)
    assert np.all(ratio[:, 1] > 1.5)
    local = _terms(s, noisy)
    np.testing.assert_allclose(local[:, 1], _terms(s, noisy, local=False)[:, 1] / ratio[:, 1] ** 2, rtol=1e-4)
    score, _ = s(noisy)
    np.testing.assert_allclose(score, local.max(axis=1), rtol=1e-3, atol=1e-5)
    # A quiet stretch (ratio below 1) is scored as without the correction: it never raises a term.
    for some in (windows, noisy):
        assert np.all(_terms(s, some) <= _terms(s, some, local=False) * (1 + 1e-5))


@pytest.mark.parametrize("feature", [1, 2])
def test_a_stuck_scored_feature_scores_the_flatline_score(
    run: TrainResult, prep: Prepared, session: Any, feature: int
) -> None:
    stuck = _some(prep, 32).copy()
    stuck[:, :, feature] = stuck[:, -1:, feature]
    score, contrib = ort_scores(session, stuck)
    assert np.all(score >= scoring.FLATLINE_SCORE * 0.99)
    assert np.all(score > run.threshold)
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
    np.testing.assert_array_equal(contrib[:, 0], 0.0)


def test_contract_score_text(run: TrainResult) -> None:
    contract = read_contract(run.model_path)
    text = contract.score
    assert text.startswith(f"largest over the last {STEPS} steps t of the window and the 2 scored features f")
    assert f"forecast from the {N_IN} steps before it" in text
    assert "max(1, n_f / N_f)" in text
    assert "0 for the inputs that are not scored: temperature" in text
    assert "flatline check on pressure, vibration:" in text
    assert contract.training_config["model"]["score"] == "peak"
    assert contract.training_config["training"]["loss"] == "noise_scaled"
    # The log scale is in the contract (the offset the graph uses) and in the text.
    offsets = contract.normalisation.log_offset
    assert offsets is not None
    assert offsets[:2] == [0.0, 0.0]
    assert offsets[2] == pytest.approx(float(run.scaler.log_offset[2]), rel=1e-6)
    assert offsets[2] > 0
    assert "x is log(max(x, 0) + log_offset) for vibration" in text
