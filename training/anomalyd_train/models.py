"""Keras models: a stacked-LSTM forecaster and an LSTM encoder-decoder.

Both work in *normalised* units; normalisation and scoring are added around the
network at export (``anomalyd_train.export``). Every LSTM layer is built so that
tf2onnx turns it into one fused ONNX ``LSTM`` op (each rule below was checked against
tf2onnx's output on this TensorFlow version):

- ``use_cudnn=False``: the cuDNN-only path exports as ``CudnnRNNV3``, which has no
  fused ONNX equivalent;
- ``unroll=False``: an unrolled layer becomes L copies of the cell;
- no ``Masking``: a mask turns the recurrence into a ``Loop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from anomalyd_train.config import ModelConfig


def _lstm(units: int, *, return_sequences: bool, dropout: float, name: str) -> Any:
    import keras

    return keras.layers.LSTM(
        units,
        return_sequences=return_sequences,
        dropout=dropout,
        use_cudnn=False,
        unroll=False,
        name=name,
    )


def input_steps(kind: str, window_length: int) -> int:
    """How many time steps the network sees: the forecaster sees L-1 and predicts step L."""
    return window_length - 1 if kind == "forecast" else window_length


def build_model(cfg: ModelConfig, window_length: int, n_features: int) -> keras.Model:
    """Build (uncompiled) the network that ``cfg.kind`` names.

    ``forecast``: input ``(batch, L-1, F)`` → ``layers`` stacked LSTMs → Dense(F), the
    prediction of step L. ``autoencoder``: input ``(batch, L, F)`` → ``layers`` encoder
    LSTMs (the last one ``latent_units`` wide, default ``units``) → RepeatVector(L) →
    ``layers`` decoder LSTMs → TimeDistributed(Dense(F)), the reconstruction.
    With ``cfg.centering = "window_mean"`` the network works on the input minus its
    per-feature mean over the input steps, and that mean is added back to its output.
    Weight initialisation follows the global seed; set it with
    ``keras.utils.set_random_seed`` before calling (``pipeline.train`` does).
    """
    import keras

    if window_length < 2:
        raise ValueError(f"window_length must be at least 2, got {window_length}")
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    steps = input_steps(cfg.kind, window_length)
    inputs = keras.Input(shape=(steps, n_features), name="window_normalised")
    x = inputs
    level = None
    if cfg.centering == "window_mean":
        # Devices differ mostly by offsets: the network sees the window minus its own
        # per-feature mean and its output is shifted back by that mean, so a constant offset
        # added to a whole window moves the prediction with it and leaves the residual alone.
        # Plain element-wise ops around the LSTMs keep each LSTM one fused ONNX op.
        level = keras.ops.mean(inputs, axis=1, keepdims=True)
        x = inputs - level
    if cfg.kind == "forecast":
        for i in range(cfg.layers):
            last = i == cfg.layers - 1
            x = _lstm(cfg.units, return_sequences=not last, dropout=cfg.dropout, name=f"lstm_{i + 1}")(x)
        outputs = keras.layers.Dense(n_features, name="next_step")(x)
        if level is not None:
            outputs = outputs + keras.ops.squeeze(level, axis=1)
        return keras.Model(inputs, outputs, name="lstm_forecast")

    latent = cfg.latent_units or cfg.units
    for i in range(cfg.layers):
        last = i == cfg.layers - 1
        x = _lstm(
            latent if last else cfg.units,
            return_sequences=not last,
            dropout=cfg.dropout,
            name=f"encoder_lstm_{i + 1}",
        )(x)
    x = keras.layers.RepeatVector(window_length, name="repeat_latent")(x)
    for i in range(cfg.layers):
        x = _lstm(cfg.units, return_sequences=True, dropout=cfg.dropout, name=f"decoder_lstm_{i + 1}")(x)
    outputs = keras.layers.TimeDistributed(keras.layers.Dense(n_features), name="reconstruction")(x)
    if level is not None:
        outputs = outputs + level
    return keras.Model(inputs, outputs, name="lstm_autoencoder")


def lstm_layers(model: keras.Model) -> list[Any]:
    """Every Keras LSTM layer in ``model`` (recursively): the export expects one fused op each."""
    import keras

    found: list[Any] = []

    def walk(layer: Any) -> None:
        if isinstance(layer, keras.layers.LSTM):
            found.append(layer)
            return
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)
        inner = getattr(layer, "layer", None)  # wrappers: TimeDistributed, Bidirectional
        if inner is not None:
            walk(inner)

    for layer in model.layers:
        walk(layer)
    return found
