"""The Keras models: shapes, and the layer settings that keep ONNX LSTMs fused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from anomalyd_train.config import ModelConfig
from anomalyd_train.models import build_model, input_steps, lstm_layers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("n_features", [1, 3, 8])
@pytest.mark.parametrize("layers", [1, 2])
def test_forecast_maps_l_minus_1_steps_to_the_next_step(n_features: int, layers: int) -> None:
    model = build_model(ModelConfig(kind="forecast", layers=layers, units=8), 12, n_features)
    assert model.input_shape == (None, 11, n_features)
    out = model(np.zeros((5, 11, n_features), np.float32))
    assert tuple(out.shape) == (5, n_features)
    assert len(lstm_layers(model)) == layers


@pytest.mark.parametrize("n_features", [1, 8])
def test_autoencoder_reconstructs_the_whole_window(n_features: int) -> None:
    cfg = ModelConfig(kind="autoencoder", layers=2, units=8, latent_units=4)
    model = build_model(cfg, 12, n_features)
    assert model.input_shape == (None, 12, n_features)
    out = model(np.zeros((3, 12, n_features), np.float32))
    assert tuple(out.shape) == (3, 12, n_features)
    lstms = lstm_layers(model)
    assert len(lstms) == 4  # encoder and decoder, two each
    # the bottleneck is the last encoder layer
    assert [layer.units for layer in lstms] == [8, 4, 8, 8]


@pytest.mark.parametrize("kind", ["forecast", "autoencoder"])
def test_lstm_layers_are_built_the_fusable_way(kind: str) -> None:
    model = build_model(ModelConfig(kind=kind, layers=2, units=8, dropout=0.1), 10, 3)
    for layer in lstm_layers(model):
        assert layer.use_cudnn is False
        assert layer.unroll is False
        assert layer.dropout == pytest.approx(0.1)
    assert not any(isinstance(layer, keras.layers.Masking) for layer in model.layers)


def test_input_steps() -> None:
    assert input_steps("forecast", 50) == 49
    assert input_steps("autoencoder", 50) == 50


def test_same_seed_gives_same_weights_and_another_seed_does_not() -> None:
    cfg = ModelConfig(kind="forecast", layers=1, units=4)
    keras.utils.set_random_seed(7)
    a = build_model(cfg, 6, 2).get_weights()
    keras.utils.set_random_seed(7)
    b = build_model(cfg, 6, 2).get_weights()
    keras.utils.set_random_seed(8)
    c = build_model(cfg, 6, 2).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="window_length"):
        build_model(ModelConfig(), 1, 3)
    with pytest.raises(ValueError, match="n_features"):
        build_model(ModelConfig(), 10, 0)


@pytest.mark.parametrize("kind", ["forecast", "autoencoder"])
def test_window_mean_centering_makes_the_output_follow_an_offset(kind: str) -> None:
    # An offset added to a whole window (a device reading 2 kPa high) must move the
    # prediction by the same offset, so the residual, and the score, do not change.
    keras.utils.set_random_seed(3)
    centred = build_model(ModelConfig(kind=kind, layers=2, units=8, centering="window_mean"), 12, 3)
    steps = input_steps(kind, 12)
    x = np.random.default_rng(0).normal(size=(4, steps, 3)).astype(np.float32)
    offset = np.array([2.0, -1.5, 0.7], np.float32)
    base = np.asarray(centred(x))
    shifted = np.asarray(centred(x + offset))
    np.testing.assert_allclose(shifted, base + offset, atol=1e-5)
    # Without centering the network's output does not follow the offset (the control).
    keras.utils.set_random_seed(3)
    plain = build_model(ModelConfig(kind=kind, layers=2, units=8), 12, 3)
    assert not np.allclose(np.asarray(plain(x + offset)), np.asarray(plain(x)) + offset, atol=1e-3)
    assert len(lstm_layers(centred)) == len(lstm_layers(plain))
