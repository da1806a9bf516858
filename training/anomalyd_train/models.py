"""Keras models: a stacked-LSTM forecaster and an LSTM encoder-decoder.

Both work in *normalised* units; normalisation and scoring are added around the
network at export (``anomalyd_train.scoring``, converted by ``anomalyd_train.export``).
Every LSTM layer is built so that tf2onnx turns it into one fused ONNX ``LSTM`` op (each
rule below was checked against tf2onnx's output on this TensorFlow version):

- ``use_cudnn=False``: the cuDNN-only path exports as ``CudnnRNNV3``, which has no
  fused ONNX equivalent;
- ``unroll=False``: an unrolled layer becomes L copies of the cell;
- no ``Masking``: a mask turns the recurrence into a ``Loop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

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
    """The network alone: ``build_networks(...)[0]``."""
    return build_networks(cfg, window_length, n_features)[0]


def build_networks(
    cfg: ModelConfig, window_length: int, n_features: int, noise: Any = None
) -> tuple[keras.Model, keras.Model | None]:
    """Build (uncompiled) the network that ``cfg`` names; ``cfg.members`` copies of it, with
    their own initial weights, averaged (a seed ensemble in one model, one fused LSTM op per
    layer per member).

    ``forecast``: input ``(batch, L-1, F)`` → ``layers`` stacked LSTMs → Dense(F), the
    prediction of step L; with ``cfg.heteroscedastic`` a second Dense(F) beside it gives each
    forecast's raw noise level, and the output is ``(batch, 2F)``: forecast, then noise
    (``predicted_noise`` reads it). With ``score = "bias"`` every step is forecast instead: the last
    LSTM returns its sequence and the output ``(batch, L-1-burn_in, F)`` holds the forecasts
    of steps ``burn_in+2 .. L`` (each made from the steps before it only; the LSTM is causal).
    ``autoencoder``: input ``(batch, L, F)`` → ``layers`` encoder LSTMs (the last one
    ``latent_units`` wide, default ``units``) → RepeatVector(L) → ``layers`` decoder LSTMs →
    TimeDistributed(Dense(F)), the reconstruction.
    With ``cfg.centering = "window_mean"`` the network works on the input minus its
    per-feature mean over the input steps, and that mean is added back to its output;
    ``"window_start"`` uses the mean of the first ``burn_in`` steps instead (causal).
    Weight initialisation follows the global seed; set it with
    ``keras.utils.set_random_seed`` before calling (``pipeline.train`` does).

    Several heteroscedastic members (``noise``: each feature's sample-to-sample noise,
    ``noise_scales``, the units of the predicted noise) are combined as one Gaussian with the
    members' mean and variance (moment matching): the forecast is the mean of their
    forecasts, the variance the mean of their predicted variances plus the spread of their
    forecasts. Where the members disagree (a state none was trained on) the forecast is
    uncertain and a miss there counts for less; the combined variance goes back out as the
    raw noise output that gives it (``ensemble_noise_output``), so the scorer reads one
    network's output either way.

    Returns the model and, for several members, a twin sharing its layers that returns every
    member's output ``(batch, members, ...)``, to be trained with ``member_mse``: members
    trained on their average would co-adapt into one wider network and their errors would
    not average out. One member: ``(model, None)``.
    """
    import keras

    if window_length < 2:
        raise ValueError(f"window_length must be at least 2, got {window_length}")
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    steps = input_steps(cfg.kind, window_length)
    sequence = cfg.kind == "forecast" and cfg.score == "bias"
    if sequence and cfg.burn_in >= steps:
        raise ValueError(f"burn_in ({cfg.burn_in}) must be below the {steps} input steps")
    inputs = keras.Input(shape=(steps, n_features), name="window_normalised")
    x = inputs
    level = None
    if cfg.centering == "window_mean":
        # Devices differ mostly by offsets: the network sees the window minus its own
        # per-feature mean and its output is shifted back by that mean, so a constant offset
        # added to a whole window moves the prediction with it and leaves the residual alone.
        # Plain element-wise ops around the LSTMs keep each LSTM one fused ONNX op.
        level = keras.ops.mean(inputs, axis=1, keepdims=True)
    elif cfg.centering == "window_start":
        # The same, from the first burn_in steps only: every scored forecast comes after them.
        level = keras.ops.mean(inputs[:, : cfg.burn_in, :], axis=1, keepdims=True)
    if level is not None:
        x = inputs - level
    outputs = []
    for m in range(cfg.members):
        out = _member(cfg, x, window_length, n_features, sequence=sequence, m=m)
        if sequence:
            out = out[:, cfg.burn_in :, :]
        if cfg.heteroscedastic:
            # The first F outputs are the forecast, the last F each forecast's raw noise level
            # (``predicted_noise``): only the forecast moves with the window's level.
            mean, raw = out[..., :n_features], out[..., n_features:]
            if level is not None:
                mean = mean + keras.ops.squeeze(level, axis=1)
            out = keras.ops.concatenate([mean, raw], axis=-1)
        elif level is not None:
            out = out + (
                keras.ops.squeeze(level, axis=1) if cfg.kind == "forecast" and not sequence else level
            )
        outputs.append(out)
    name = "lstm_autoencoder" if cfg.kind == "autoencoder" else "lstm_forecast"
    if len(outputs) == 1:
        return keras.Model(inputs, outputs[0], name=name), None
    if cfg.heteroscedastic:
        if noise is None:
            raise ValueError("several heteroscedastic members need the features' noise scales (noise)")
        combined = ensemble_noise_output(keras.ops.stack(outputs, axis=0), noise, cfg.noise_floor, keras.ops)
    else:
        combined = keras.ops.mean(keras.ops.stack(outputs, axis=0), axis=0)
    model = keras.Model(inputs, combined, name=name)
    return model, keras.Model(inputs, keras.ops.stack(outputs, axis=1), name=f"{name}_members")


def member_mse(y_true: Any, y_pred: Any) -> Any:
    """Mean squared error of every member's output ``(batch, members, ...)`` against one target
    ``(batch, ...)``: the mean of the members' own losses."""
    import keras

    return keras.ops.mean(keras.ops.square(y_pred - keras.ops.expand_dims(y_true, 1)))


def noise_scales(windows_normalised: Any) -> Any:
    """Each feature's sample-to-sample noise level in normalised units, ``(F,)``: the robust
    standard deviation of its first differences along the windows' steps, over sqrt 2 (for
    white noise of std s the differences have std s·sqrt 2). Robust (median absolute
    deviation) so that load changes and ramps, which move many differences a little, do not
    inflate it. Floored so that a constant feature cannot give an infinite loss weight."""
    import numpy as np

    z = np.asarray(windows_normalised, dtype=np.float64)
    if z.ndim != 3 or z.shape[1] < 2:
        raise ValueError(f"need windows (n, L >= 2, F), got shape {z.shape}")
    d = np.diff(z, axis=1).reshape(-1, z.shape[2])
    mad = np.median(np.abs(d - np.median(d, axis=0)), axis=0)
    return np.maximum(1.4826 * mad / np.sqrt(2.0), NOISE_FLOOR).astype(np.float32)


#: ``noise_scales`` never goes below this (normalised units).
NOISE_FLOOR = 1e-4


def noise_log_variance(raw: Any, floor: float, ops: Any) -> Any:
    """A heteroscedastic forecaster's log-variance (in units of the feature's sample-to-sample
    noise squared) from its raw noise output: ``2·log(floor) + softplus(raw − 2·log(floor))``,
    which is ``raw`` well above the floor and never below it. ``ops`` is whatever provides
    ``softplus``: ``keras.ops`` (the loss), ``tf.math`` (the exported graph) or ``np_ops``."""
    floor_lv = float(2.0 * np.log(floor))
    return floor_lv + ops.softplus(raw - floor_lv)


class np_ops:  # noqa: N801 - used like a module
    """``noise_log_variance``'s and ``ensemble_noise_output``'s maths in numpy."""

    @staticmethod
    def softplus(x: Any) -> Any:
        return np.logaddexp(0.0, x)

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    mean = staticmethod(np.mean)
    square = staticmethod(np.square)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def concatenate(xs: Any, axis: int) -> Any:
        return np.concatenate(xs, axis=axis)


#: ``ensemble_noise_output`` keeps the combined log-variance at least this far above the
#: floor, so that the inverse of the floor's softplus stays finite.
ENSEMBLE_FLOOR_MARGIN = 1e-6


def ensemble_noise_output(stacked: Any, noise: Any, floor: float, ops: Any) -> Any:
    """Several heteroscedastic members' outputs ``(members, ..., 2F)`` → one output ``(..., 2F)``
    of the same form: the mean forecast, then the raw noise level whose ``noise_log_variance``
    is the log of the members' mean predicted variance plus the variance of their forecasts
    (both in units of ``noise``, each feature's sample-to-sample noise squared).

    The raw level inverts the floor's softplus: ``raw = fl + log(exp(lv - fl) - 1)`` with
    ``fl = 2·log(floor)``; ``lv`` is never below ``fl`` (every member's variance is at least
    the floor's) and is kept ``ENSEMBLE_FLOOR_MARGIN`` above it."""
    f = stacked.shape[-1] // 2
    means, raws = stacked[..., :f], stacked[..., f:]
    forecast = ops.mean(means, axis=0)
    within = ops.mean(ops.exp(noise_log_variance(raws, floor, ops)), axis=0)
    inv_noise_sq = (1.0 / np.square(np.asarray(noise, np.float64))).astype(np.float32)
    between = ops.mean(ops.square(means - forecast), axis=0) * inv_noise_sq
    floor_lv = float(2.0 * np.log(floor))
    excess = ops.maximum(ops.log(within + between) - floor_lv, ENSEMBLE_FLOOR_MARGIN)
    raw = floor_lv + ops.log(ops.exp(excess) - 1.0)
    return ops.concatenate([forecast, raw], axis=-1)


def predicted_noise(out: Any, noise: Any, floor: float) -> tuple[Any, Any]:
    """A heteroscedastic forecaster's output ``(..., 2F)`` (numpy) → its forecast ``(..., F)``
    and each forecast's predicted noise in normalised units ``(..., F)``:
    ``noise_f · exp(log_variance / 2)``, ``noise`` being ``noise_scales``."""
    out = np.asarray(out)
    f = out.shape[-1] // 2
    lv = noise_log_variance(out[..., f:].astype(np.float64), floor, np_ops)
    return out[..., :f], (np.asarray(noise, np.float64) * np.exp(0.5 * lv)).astype(np.float32)


def training_loss(
    kind: str, windows_normalised: Any, *, members: bool, predicted_noise: tuple[Any, float] | None = None
) -> Any:
    """The Keras loss for ``training.loss = kind`` (``"mse"`` or ``"noise_scaled"``), for a
    single network or (``members``) a seed ensemble's twin (``member_mse``).

    ``noise_scaled``: the squared error of feature f is divided by ``noise_scales(...)[f]**2``,
    so the loss is the mean squared residual in units of each feature's own noise: the same
    units the score uses (its residual scales), instead of the global spread's. With
    ``predicted_noise`` (a heteroscedastic forecaster, output ``(batch, 2F)``: the
    ``noise_scales`` of ``windows_normalised`` and the noise floor, as the score gets them):
    the Gaussian negative log-likelihood in those units, ``lv + err / exp(lv)`` with ``lv``
    the predicted log-variance (``noise_log_variance``).
    """
    import keras

    if kind == "mse":
        return member_mse if members else "mse"
    if kind != "noise_scaled":
        raise ValueError(f"unknown loss {kind!r}")
    noise = noise_scales(windows_normalised) if predicted_noise is None else predicted_noise[0]
    weights = (1.0 / np.asarray(noise) ** 2).astype("float32")
    if predicted_noise is not None:
        floor = predicted_noise[1]

        def gaussian_nll(y_true: Any, y_pred: Any) -> Any:
            # -log N(y; forecast, (noise_f·sigma)^2) up to constants, sigma^2 = exp(lv): the
            # squared error in noise units over the predicted variance, plus its log. Members:
            # each member's own likelihood (the mean of them), not the combination's.
            f = y_true.shape[-1]
            if members:
                y_true = keras.ops.expand_dims(y_true, 1)
            lv = noise_log_variance(y_pred[..., f:], floor, keras.ops)
            err = keras.ops.square(y_true - y_pred[..., :f]) * weights
            return keras.ops.mean(lv + err * keras.ops.exp(-lv))

        return gaussian_nll

    def noise_scaled_mse(y_true: Any, y_pred: Any) -> Any:
        # The features are the last axis of every target and output shape the models have.
        if members:
            y_true = keras.ops.expand_dims(y_true, 1)
        return keras.ops.mean(keras.ops.square(y_pred - y_true) * weights)

    return noise_scaled_mse


def _member(cfg: ModelConfig, x: Any, window_length: int, n_features: int, *, sequence: bool, m: int) -> Any:
    """One member network on the (centred) input ``x``; layer names carry the member index
    when there are several."""
    import keras

    tag = f"m{m + 1}_" if cfg.members > 1 else ""
    if cfg.kind == "forecast":
        for i in range(cfg.layers):
            last = i == cfg.layers - 1
            x = _lstm(
                cfg.units,
                return_sequences=sequence or not last,
                dropout=cfg.dropout,
                name=f"{tag}lstm_{i + 1}",
            )(x)
        if cfg.heteroscedastic:
            forecast = keras.layers.Dense(n_features, name=f"{tag}next_step")(x)
            noise = keras.layers.Dense(n_features, name=f"{tag}noise_level")(x)
            return keras.layers.Concatenate(name=f"{tag}next_step_and_noise")([forecast, noise])
        return keras.layers.Dense(n_features, name=f"{tag}next_step")(x)

    latent = cfg.latent_units or cfg.units
    for i in range(cfg.layers):
        last = i == cfg.layers - 1
        x = _lstm(
            latent if last else cfg.units,
            return_sequences=not last,
            dropout=cfg.dropout,
            name=f"{tag}encoder_lstm_{i + 1}",
        )(x)
    x = keras.layers.RepeatVector(window_length, name=f"{tag}repeat_latent")(x)
    for i in range(cfg.layers):
        x = _lstm(cfg.units, return_sequences=True, dropout=cfg.dropout, name=f"{tag}decoder_lstm_{i + 1}")(x)
    return keras.layers.TimeDistributed(keras.layers.Dense(n_features), name=f"{tag}reconstruction")(x)


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
