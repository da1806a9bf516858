"""The score inside the exported graph: its constants, how they are measured, and the
TensorFlow function raw window → (score, contributions) that ``anomalyd_train.export``
converts to ONNX.

The graph takes raw windows ``window (batch, L, F)``, normalises them (``Scaler``: mean, std,
an optional log scale, an optional clip of the inputs that are not scored), runs the network
and computes the score in one of three forms (``build_scoring_function``):

- ``error``: the mean over the scored features of each one's squared residual in units of
  its training residual scale (``score_definition``);
- ``bias``: a sequence forecaster's signed residuals averaged over the window (a lasting
  bias) or its last residual (a spike), the largest over the scored features
  (``BiasScore``, ``bias_score_definition``);
- ``peak``: the largest squared residual over the window's last steps, optionally divided
  by the window's local noise or the network's predicted noise (``PeakScore``,
  ``peak_score_definition``).

The score may stand for a subset of the inputs (``model.score_features``): per-feature
weights ``w_f`` are ``1 / n_scored`` for scored features and 0 for the others, and
``contributions = term * w``, so an unscored feature still feeds the network but adds
exactly 0. Training, calibration and the report all score through ``ScoringFunction`` or
the exported file, so they see the same weighted score the daemon does. With every feature
scored the graph is the one built before weights existed (one scalar ``1 / F``), so its
``graph_digest`` and numbers are unchanged. A flatline (stuck-sensor) term can be added to
any form (``flatline_floors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.contract import CONTRIBUTIONS_OUTPUT, INPUT_NAME, SCORE_OUTPUT
from anomalyd_train import models
from anomalyd_train.windows import clip_limits

FloatArray = npt.NDArray[np.float32]

#: Residual scales below this (normalised units) are raised to it, so that a feature
#: the network predicts almost perfectly cannot turn rounding noise into huge scores.
MIN_RESIDUAL_SCALE = 1e-3

SCORE_DEFINITION = (
    "mean over features f of (r_f / s_f)^2, where r_f is the residual in normalised units "
    "((x - mean) / std) and s_f the feature's residual scale on training windows; "
    "forecast: r is step L minus its prediction from steps 1..L-1; "
    "autoencoder: squared terms averaged over the L reconstructed steps; "
    "contributions_f = (r_f / s_f)^2 / F, so they sum to the score"
)


def score_definition(features: list[str], scored: list[str] | None = None) -> str:
    """The contract's ``score`` text for a model with inputs ``features``: ``SCORE_DEFINITION``
    when every feature is scored (``scored`` None or all of them), else the same definition
    over the ``scored`` features, naming the inputs that are not scored."""
    if scored is None or set(scored) >= set(features):
        return SCORE_DEFINITION
    n = len(scored)
    inputs_only = [f for f in features if f not in scored]
    return (
        f"mean over the {n} scored features f ({', '.join(scored)}) of (r_f / s_f)^2, where r_f is "
        "the residual in normalised units ((x - mean) / std) and s_f the feature's residual scale on "
        "training windows; forecast: r is step L minus its prediction from steps 1..L-1; "
        "autoencoder: squared terms averaged over the L reconstructed steps; "
        f"contributions_f = (r_f / s_f)^2 / {n} for scored features and 0 for the inputs that are "
        f"not scored ({', '.join(inputs_only)}), so they sum to the score"
    )


def bias_score_definition(
    features: list[str], scored: list[str] | None, *, decay: float, burn_in: int, members: int
) -> str:
    """The contract's ``score`` text for a ``score = "bias"`` model."""
    names = scored if scored is not None else features
    inputs_only = [f for f in features if f not in names]
    text = (
        f"largest over the {len(names)} scored features f ({', '.join(names)}) of "
        f"max(|sum_t w_t r_t,f / s_f| / B, |r_L,f / s_f| / P): r_t,f is step t's residual in "
        f"normalised units ((x - mean) / std) against its forecast from the steps before it"
        + (f" (the mean of {members} networks' forecasts)" if members > 1 else "")
        + f", for steps {burn_in + 2}..L; w_t are exponential weights (alpha {decay:g}) summing to 1, "
        "newest heaviest; s_f is the feature's residual scale, B and P the 99th percentiles of "
        "the two branches on training windows; contributions_f is that term per feature"
    )
    if inputs_only:
        text += f" (0 for the inputs that are not scored: {', '.join(inputs_only)})"
    return text


def flatline_definition(floors: FloatArray, features: list[str]) -> str:
    """What the flatline check adds, for the contract's ``score`` text."""
    checked = [f for f, v in zip(features, floors, strict=True) if v > 0]
    if not checked:
        return ""
    return (
        f"; plus a flatline check on {', '.join(checked)}: "
        f"{FLATLINE_SCORE:g} x max(0, 1 - spread / floor) added to the feature's contribution, "
        "where spread is its standard deviation over the window (normalised units) and floor a "
        "fraction of the smallest spread of any training window"
    )


def score_weights(n_features: int, scored: npt.ArrayLike | None = None) -> FloatArray:
    """Per-feature weights ``w_f`` of the score: ``1 / n_scored`` where ``scored`` (a boolean
    mask over the features; None: all) is true, 0 elsewhere.

    Raises ``ValueError`` for a mask of the wrong length or one that scores nothing.
    """
    mask = np.ones(n_features, bool) if scored is None else np.asarray(scored, dtype=bool)
    if mask.shape != (n_features,):
        raise ValueError(f"scored: need one flag per feature ({n_features}), got shape {mask.shape}")
    n_scored = int(mask.sum())
    if n_scored == 0:
        raise ValueError("scored: at least one feature must be scored")
    return np.where(mask, np.float32(1.0 / n_scored), np.float32(0.0)).astype(np.float32)


#: Score ``bias``: each branch is scaled so that this quantile of the training windows reads 1.
BRANCH_QUANTILE = 0.99

#: What a perfectly flat (stuck) scored feature adds to its contribution: far above any
#: threshold a calibration gives, so the check decides alone. A spread between 0 and the
#: floor adds proportionally less (``FLATLINE_SCORE · (1 - spread / floor)``).
FLATLINE_SCORE = 1000.0

#: Training spreads (normalised units) at or below this count as flat already: no check.
MIN_FLAT_SPREAD = 1e-6


@dataclass(frozen=True)
class ScoringFunction:
    """The ``tf.function`` raw window → (score, contributions), with what it was built from."""

    fn: Any  # tf.types.experimental.PolymorphicFunction
    model: Any  # the keras.Model inside it (normalised units in and out)
    kind: str
    window_length: int
    n_features: int
    n_lstm_layers: int
    mean: FloatArray
    std: FloatArray
    residual_scale: FloatArray
    weights: FloatArray  # w_f: 1 / n_scored for scored features, 0 for inputs only
    bias: BiasScore | None = None  # score "bias": its constants; None: score "error"
    flat_floor: FloatArray | None = None  # flatline check floors per feature (0: off); None: no check
    peak: PeakScore | None = None  # score "peak": its constants
    log_offset: FloatArray | None = None  # per feature, 0: own scale; None: no feature logged
    input_clip: FloatArray | None = None  # per feature, 0: not clipped; None: none clipped

    def __call__(self, windows: FloatArray, batch_size: int = 1024) -> tuple[FloatArray, FloatArray]:
        """Score raw windows ``(n, L, F)`` in TensorFlow; returns ``score (n,)``, ``contributions (n, F)``."""
        scores: list[FloatArray] = []
        contribs: list[FloatArray] = []
        for start in range(0, len(windows), batch_size):
            out = self.fn(np.ascontiguousarray(windows[start : start + batch_size], dtype=np.float32))
            scores.append(np.asarray(out[SCORE_OUTPUT], dtype=np.float32))
            contribs.append(np.asarray(out[CONTRIBUTIONS_OUTPUT], dtype=np.float32))
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, self.n_features), np.float32)
        return np.concatenate(scores), np.concatenate(contribs)


def forecast_residuals(
    model: Any, windows_normalised: FloatArray, burn_in: int, batch_size: int = 1024
) -> FloatArray:
    """A sequence forecaster's (``score = "bias"``) residuals ``z - forecast`` of steps
    ``burn_in+2 .. L``, in normalised units: ``(n, L-1-burn_in, F)``."""
    out: list[FloatArray] = []
    for start in range(0, len(windows_normalised), batch_size):
        z = windows_normalised[start : start + batch_size]
        pred = np.asarray(model(z[:, :-1, :], training=False))
        out.append((z[:, burn_in + 1 :, :] - pred).astype(np.float32))
    _, length, f = windows_normalised.shape
    return np.concatenate(out) if out else np.zeros((0, length - 1 - burn_in, f), np.float32)


def squared_residuals(
    model: Any,
    kind: str,
    windows_normalised: FloatArray,
    batch_size: int = 1024,
    burn_in: int | None = None,
    *,
    noise: tuple[FloatArray, float] | None = None,
) -> FloatArray:
    """Per-window, per-feature mean squared residual in normalised units, ``(n, F)``.

    Forecast: ``(z_L - prediction)^2``, or with ``burn_in`` (a sequence forecaster, score
    ``bias``) the mean over the forecast steps; autoencoder: ``(z - reconstruction)^2``
    averaged over the L steps. Used to estimate the residual scales. With ``noise`` (a
    heteroscedastic forecaster: its ``noise_scales`` and ``noise_floor``) each residual is
    divided by its predicted noise first (``models.predicted_noise``).
    """
    if burn_in is not None:
        residuals = forecast_residuals(model, windows_normalised, burn_in, batch_size)
        return np.asarray(np.square(residuals).mean(axis=1), dtype=np.float32)
    out: list[FloatArray] = []
    for start in range(0, len(windows_normalised), batch_size):
        z = windows_normalised[start : start + batch_size]
        if kind == "forecast":
            pred = np.asarray(model(z[:, :-1, :], training=False))
            if noise is not None:
                pred, sigma = models.predicted_noise(pred, *noise)
                out.append(np.square((z[:, -1, :] - pred) / sigma).astype(np.float32))
            else:
                out.append(np.square(z[:, -1, :] - pred).astype(np.float32))
        else:
            rec = np.asarray(model(z, training=False))
            out.append(np.square(z - rec).mean(axis=1).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, windows_normalised.shape[2]), np.float32)


def bias_weights(n_steps: int, decay: float) -> FloatArray:
    """Exponential weights over ``n_steps`` residuals, oldest first, summing to 1: step ``k``
    from the end weighs ``(1 - decay)^k`` (an EWMA with alpha ``decay``, truncated to the window)."""
    w = (1.0 - decay) ** np.arange(n_steps - 1, -1, -1, dtype=np.float64)
    return np.asarray(w / w.sum(), dtype=np.float32)


def window_spread(windows_normalised: FloatArray) -> FloatArray:
    """Each feature's standard deviation over each window's steps, ``(n, F)``: the flatline
    check's measure (a stuck sensor's spread is 0)."""
    z = windows_normalised.astype(np.float32)
    return np.asarray(np.sqrt(np.mean(np.square(z - z.mean(axis=1, keepdims=True)), axis=1)), np.float32)


@dataclass(frozen=True)
class BiasScore:
    """The constants of a ``score = "bias"`` graph, all measured on training windows.

    ``weights``: ``bias_weights`` over the L-1-burn_in scored forecast steps. ``bias_scale`` and
    ``spike_scale``: the ``BRANCH_QUANTILE`` of the largest scored feature's |weighted mean
    residual| and |last residual| (in residual-scale units), so each branch reads 1 at that
    quantile of the training windows.
    """

    burn_in: int
    weights: FloatArray
    bias_scale: float
    spike_scale: float

    @classmethod
    def measure(
        cls,
        residuals: FloatArray,
        residual_scale: FloatArray,
        scored: npt.ArrayLike,
        burn_in: int,
        decay: float,
    ) -> BiasScore:
        """From training residuals ``(n, steps, F)`` (``forecast_residuals``)."""
        mask = np.asarray(scored, dtype=bool)
        r = residuals[:, :, mask] / residual_scale[mask]
        weights = bias_weights(r.shape[1], decay)
        bias = np.abs(np.einsum("nsf,s->nf", r, weights)).max(axis=1)
        spike = np.abs(r[:, -1, :]).max(axis=1)
        floor = MIN_RESIDUAL_SCALE
        return cls(
            burn_in=burn_in,
            weights=weights,
            bias_scale=max(float(np.quantile(bias, BRANCH_QUANTILE)), floor),
            spike_scale=max(float(np.quantile(spike, BRANCH_QUANTILE)), floor),
        )


def upper_median(values: FloatArray, axis: int) -> FloatArray:
    """The ``(n+1)//2``-th largest of ``n`` values along ``axis``: the median for odd ``n``,
    the upper of the two middle values for even ``n``. The graph takes it with ``TopK`` (ONNX
    has no median op); this is its numpy twin, used for the constants measured in training."""
    v = np.moveaxis(np.asarray(values, np.float32), axis, -1)
    k = (v.shape[-1] + 1) // 2
    return np.asarray(-np.sort(-v, axis=-1)[..., k - 1], np.float32)


def local_noise(windows_normalised: FloatArray, n_steps: int) -> FloatArray:
    """Each feature's sample-to-sample noise over a window's first ``n_steps`` steps, ``(n, F)``:
    the median absolute deviation of its first differences, × 1.4826 / sqrt 2 (white noise of
    std s gives s). Robust, so a spike or a load ramp among those steps barely moves it."""
    z = np.asarray(windows_normalised, np.float32)[:, :n_steps, :]
    d = z[:, 1:, :] - z[:, :-1, :]
    med = upper_median(d, axis=1)
    mad = upper_median(np.abs(d - med[:, None, :]), axis=1)
    return np.asarray(mad * np.float32(NOISE_MAD_FACTOR), np.float32)


#: MAD of first differences → noise std: 1.4826 (MAD → std of a normal) / sqrt 2 (differences).
NOISE_MAD_FACTOR = 1.4826 / float(np.sqrt(2.0))


@dataclass(frozen=True)
class PeakScore:
    """The constants of a ``score = "peak"`` graph.

    ``steps``: how many of the window's newest steps are forecast (each from the
    ``window_length - steps`` steps before it) and scored. ``noise_reference``: per feature,
    the median of ``local_noise`` over the training windows (the scored residuals are divided
    by ``max(1, local / reference)``); None: no local noise correction. ``predicted_noise``:
    for a heteroscedastic forecaster, what turns its raw noise output into a noise level
    (``models.predicted_noise``); each residual is divided by it. ``span``: a feature's term is
    the largest sum of ``span`` consecutive scored steps' squared residuals (1: the largest one).
    ``weights``: per feature, what its term is multiplied by before the largest is taken (its
    threshold is then the model's / weight); None: 1 for every feature.
    """

    steps: int
    noise_reference: FloatArray | None = None
    # A heteroscedastic forecaster: each feature's sample-to-sample noise (``noise_scales``,
    # the units of its predicted noise) and the floor of that prediction. None: not one.
    predicted_noise: tuple[FloatArray, float] | None = None
    span: int = 1
    weights: FloatArray | None = None

    @classmethod
    def measure(
        cls,
        windows_normalised: FloatArray,
        steps: int,
        local: bool,
        predicted_noise: tuple[FloatArray, float] | None = None,
        span: int = 1,
        *,
        weights: npt.ArrayLike | None = None,
    ) -> PeakScore:
        """From full-length training windows ``(n, L, F)``."""
        w = None if weights is None else np.asarray(weights, np.float32)
        if not local:
            return cls(steps=steps, predicted_noise=predicted_noise, span=span, weights=w)
        n_in = windows_normalised.shape[1] - steps
        ref = np.median(local_noise(windows_normalised, n_in), axis=0)
        return cls(
            steps=steps,
            noise_reference=np.maximum(ref, MIN_RESIDUAL_SCALE).astype(np.float32),
            predicted_noise=predicted_noise,
            span=span,
            weights=w,
        )


def peak_score_definition(
    features: list[str],
    scored: list[str] | None,
    *,
    steps: int,
    window_length: int,
    local: bool,
    noise_floor: float | None = None,
    members: int = 1,
    span: int = 1,
    weights: list[float] | None = None,
) -> str:
    """The contract's ``score`` text for a ``score = "peak"`` model (``weights``: per feature
    in ``features`` order, None for none)."""
    names = scored if scored is not None else features
    inputs_only = [f for f in features if f not in names]
    n_in = window_length - steps
    term = "(r_t,f / (s_f" + (" · sigma_t,f" if noise_floor is not None else "") + "))^2"
    text = (
        (
            f"largest over the last {steps} steps t of the window and the {len(names)} scored features f "
            f"({', '.join(names)}) of {term}"
            if span == 1
            else f"largest over the {len(names)} scored features f ({', '.join(names)}) and the "
            f"{steps - span + 1} runs of {span} consecutive steps among the window's last {steps} "
            f"of the sum over the run's steps t of {term}"
        )
        + (" / max(1, n_f / N_f)^2" if local else "")
        + f": r_t,f is step t's residual in normalised units ((x - mean) / std) against its forecast "
        f"from the {n_in} steps before it, s_f the feature's residual scale on training windows"
        + (
            f"; n_f the feature's sample-to-sample noise over the window's first {n_in} steps "
            "(1.4826 x the median absolute deviation of its first differences / sqrt 2) and N_f "
            "its median over training windows"
            if local
            else ""
        )
        + (
            "; sigma_t,f is the noise the network predicts for that forecast: u_f · exp(v / 2), "
            f"v = 2 ln {noise_floor:g} + softplus(raw − 2 ln {noise_floor:g}) from its second F "
            "outputs, u_f the feature's sample-to-sample noise on training windows"
            if noise_floor is not None
            else ""
        )
        + (
            (
                f"; with {members} networks, the forecast is the mean of theirs and sigma_t,f^2 the "
                "mean of their predicted sigma^2 plus the variance of their forecasts (in units of "
                "u_f^2), carried by the raw output that gives it"
                if noise_floor is not None
                else f"; the forecast is the mean of {members} networks' forecasts"
            )
            if members > 1
            else ""
        )
        + (
            "; each feature's term is multiplied by its weight ("
            + ", ".join(f"{f} {w:g}" for f, w in zip(features, weights, strict=True) if f in names)
            + ") before the largest is taken"
            if weights is not None
            else ""
        )
        + "; contributions_f is feature f's largest term times score / (sum of the terms), so "
        "they sum to the score and are in proportion to each feature's term"
    )
    if inputs_only:
        text += f" (0 for the inputs that are not scored: {', '.join(inputs_only)})"
    return text


def flatline_floors(windows_normalised: FloatArray, scored: npt.ArrayLike, ratio: float) -> FloatArray:
    """Per feature, ``ratio`` × the smallest spread of any training window (``window_spread``);
    0 (no check) for features not scored and for features whose training already holds a
    perfectly flat window (a quantised, steady signal: flat is normal there)."""
    mask = np.asarray(scored, dtype=bool)
    smallest = (
        window_spread(windows_normalised).min(axis=0) if len(windows_normalised) else np.zeros(mask.size)
    )
    floors = np.where(mask & (smallest > MIN_FLAT_SPREAD), ratio * smallest, 0.0)
    return floors.astype(np.float32)


def residual_scales(sq_residuals: FloatArray) -> FloatArray:
    """``s_f`` = root mean squared residual per feature (floored at ``MIN_RESIDUAL_SCALE``).

    With this scale a typical training window scores about 1 (the mean of
    ``(r_f/s_f)^2`` over training windows is 1 per feature), whatever the units.
    """
    if len(sq_residuals) == 0:
        raise ValueError("no training windows to estimate residual scales from")
    s = np.sqrt(sq_residuals.astype(np.float64).mean(axis=0))
    return np.asarray(np.maximum(s, MIN_RESIDUAL_SCALE), dtype=np.float32)


def build_scoring_function(
    model: Any,
    kind: str,
    *,
    window_length: int,
    mean: FloatArray,
    std: FloatArray,
    residual_scale: FloatArray,
    n_lstm_layers: int,
    log_offset: FloatArray | None = None,
    scored: npt.ArrayLike | None = None,
    bias: BiasScore | None = None,
    flat_floor: FloatArray | None = None,
    peak: PeakScore | None = None,
    input_clip: FloatArray | None = None,
) -> ScoringFunction:
    """Wrap ``model`` in a ``tf.function``: raw window → normalise → network → score.

    ``scored`` is a boolean mask over the features (None: all); the score is the mean of the
    scored features' terms and the others' contributions are exactly 0 (``score_weights``).
    Raises ``ValueError`` for a mask that does not fit or scores nothing.

    ``bias`` (a sequence forecaster, score ``bias``): each scored feature's term is the larger
    of its weighted mean residual ``|sum_t w_t r_t / s_f| / bias_scale`` and its last residual
    ``|r_L / s_f| / spike_scale``, and the score is the largest term (not the mean: a bias in
    one channel must not be diluted by the others' noise).

    ``peak`` (a forecaster over ``window_length - peak.steps`` steps, score ``peak``): each of the
    window's last ``peak.steps`` steps is forecast from the steps before it (the network runs
    once on the stacked sub-windows, so each LSTM stays one fused op); a scored feature's term is
    its largest squared standardised residual over those steps (divided by the local noise
    factor when ``peak.noise_reference`` is set; by the forecast's predicted noise when
    ``peak.predicted_noise`` is set), or with ``peak.span`` > 1 its largest sum over ``span``
    consecutive steps, times its weight when ``peak.weights`` is set; the score the largest
    term, and the contributions the terms rescaled to sum to the score.

    ``log_offset`` (per feature, 0 = own scale): a feature with an offset above 0 enters as
    ``log(max(x, 0) + offset)`` before ``mean``/``std`` (``anomalyd_train.windows.log_scale``).

    ``input_clip`` (per feature, 0 = none): a feature with a limit above 0 is clipped to
    ``[-limit, limit]`` right after normalisation (``Scaler.clip``, ``model.input_only_clip``),
    so the network and everything after it see the clipped value.

    ``flat_floor`` (per feature, 0 = off): the flatline check adds
    ``FLATLINE_SCORE * max(0, 1 - spread / floor)`` to a feature's contribution, ``spread``
    being its standard deviation over the window's steps.

    The constants are captured as numpy arrays: tf2onnx turns those into
    initializers, while a captured ``tf.constant`` would become an extra graph input
    (seen with tf2onnx on this TensorFlow version).
    """
    import tensorflow as tf

    n_features = len(mean)
    weights = score_weights(n_features, scored)
    every_feature = bool(np.all(weights > 0))
    mean_c = np.asarray(mean, np.float32).reshape(1, 1, n_features)
    inv_std_c = (1.0 / np.asarray(std, np.float64)).astype(np.float32).reshape(1, 1, n_features)
    inv_scale_c = (1.0 / np.asarray(residual_scale, np.float64)).astype(np.float32)
    # Every feature scored: the scalar 1/F, so the graph (and model_version) stays what it
    # was before weights existed. Otherwise a (F,) weight vector; the unscored features'
    # inverse scales are zeroed too, so their terms are 0 before the weight: squared, a huge
    # residual would overflow to inf, and inf * 0 is NaN, which would poison the score.
    weight_c: Any = np.float32(1.0 / n_features) if every_feature else weights
    if not every_feature:
        inv_scale_c = np.where(weights > 0, inv_scale_c, np.float32(0.0)).astype(np.float32)

    if bias is not None or peak is not None:
        # Unscored features: inverse scale 0, so their residual terms are exactly 0.
        inv_scale_c = np.where(weights > 0, inv_scale_c, np.float32(0.0)).astype(np.float32)
    if bias is not None:
        steps_weight_c = bias.weights.reshape(1, -1, 1).astype(np.float32)
        inv_bias_c = np.float32(1.0 / bias.bias_scale)
        inv_spike_c = np.float32(1.0 / bias.spike_scale)
        first_scored = bias.burn_in + 1
    if peak is not None:
        if bias is not None:
            raise ValueError("a scoring function has one score: bias or peak, not both")
        if not 1 <= peak.steps <= window_length - 2:
            raise ValueError(f"peak.steps must be between 1 and {window_length - 2}, got {peak.steps}")
        if not 1 <= peak.span <= peak.steps:
            raise ValueError(f"peak.span must be between 1 and peak.steps ({peak.steps}), got {peak.span}")
        peak_runs = peak.steps - peak.span + 1  # runs of span consecutive scored steps
        peak_in = window_length - peak.steps  # steps each forecast sees
        peak_k = peak.steps
        if peak.weights is not None:
            peak_weights_c = np.asarray(peak.weights, np.float32).reshape(n_features)
            if not np.all(np.isfinite(peak_weights_c) & (peak_weights_c > 0)):
                raise ValueError(f"peak.weights must be finite and above 0, got {peak.weights}")
        # Median of the peak_in - 1 first differences: the ((n+1)//2)-th largest (upper_median).
        noise_k = peak_in // 2
        if peak.noise_reference is not None:
            inv_ref_c = (1.0 / np.asarray(peak.noise_reference, np.float64)).astype(np.float32)
        if peak.predicted_noise is not None:
            noise_c = np.asarray(peak.predicted_noise[0], np.float32)
            noise_floor = float(peak.predicted_noise[1])
    log_any = log_offset is not None and bool(np.any(np.asarray(log_offset) > 0))
    if log_any:
        assert log_offset is not None
        logged_c = (np.asarray(log_offset) > 0).reshape(1, 1, n_features)
        # 1 where a feature keeps its scale: its log is computed and thrown away by the select.
        log_offset_c = np.where(logged_c, np.asarray(log_offset, np.float32).reshape(1, 1, -1), 1.0).astype(
            np.float32
        )
    clip_any = input_clip is not None and bool(np.any(np.asarray(input_clip) > 0))
    if clip_any:
        assert input_clip is not None
        clip_limit_c = clip_limits(np.asarray(input_clip, np.float32)).reshape(1, 1, n_features)
    check_flat = flat_floor is not None and bool(np.any(flat_floor > 0))
    if check_flat:
        assert flat_floor is not None
        inv_floor_c = np.where(flat_floor > 0, 1.0 / np.maximum(flat_floor, 1e-30), 0.0).astype(np.float32)
        flat_gain_c = np.where(flat_floor > 0, FLATLINE_SCORE, 0.0).astype(np.float32)

    # autograph=False: the branches below are Python decisions on constants, made once at
    # tracing; AutoGraph would try (and fail, noisily) to convert them into graph control flow.
    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[tf.TensorSpec((None, window_length, n_features), tf.float32, name=INPUT_NAME)],
        autograph=False,
    )
    def score_window(window: Any) -> dict[str, Any]:
        if log_any:
            window = tf.where(logged_c, tf.math.log(tf.maximum(window, 0.0) + log_offset_c), window)
        z = (window - mean_c) * inv_std_c
        if clip_any:
            z = tf.minimum(tf.maximum(z, -clip_limit_c), clip_limit_c)
        if peak is not None:
            # Sub-window j holds steps j+1..j+peak_in and forecasts step j+peak_in+1; all of them
            # go through the network as one batch.
            subs = tf.stack([z[:, j : j + peak_in, :] for j in range(peak_k)], axis=1)
            pred = model(tf.reshape(subs, [-1, peak_in, n_features]), training=False)
            if peak.predicted_noise is not None:
                # Forecast and raw noise level side by side; the residual is measured in the
                # noise the network predicted for that forecast (models.predicted_noise).
                out = tf.reshape(pred, [-1, peak_k, 2 * n_features])
                lv = models.noise_log_variance(out[:, :, n_features:], noise_floor, tf.math)
                sigma = tf.exp(0.5 * lv) * noise_c
                r = (z[:, peak_in:, :] - out[:, :, :n_features]) * inv_scale_c / sigma
            else:
                r = (z[:, peak_in:, :] - tf.reshape(pred, [-1, peak_k, n_features])) * inv_scale_c
            if peak.noise_reference is not None:
                # Noise from the oldest peak_in steps only: an event in the scored steps must
                # not raise the yardstick it is measured with.
                d = tf.transpose(z[:, 1:peak_in, :] - z[:, : peak_in - 1, :], [0, 2, 1])
                med = tf.math.top_k(d, k=noise_k).values[:, :, -1:]
                mad = tf.math.top_k(tf.abs(d - med), k=noise_k).values[:, :, -1]
                ratio = tf.maximum(mad * np.float32(NOISE_MAD_FACTOR) * inv_ref_c, 1.0)
                r = r / tf.expand_dims(ratio, 1)
            squared = tf.square(r)
            if peak.span > 1:
                # Each run of span consecutive steps: the sum of their squared residuals.
                squared = tf.add_n([squared[:, j : j + peak_runs, :] for j in range(peak.span)])
            contributions = tf.reduce_max(squared, axis=1)
            if peak.weights is not None:
                # Before the flatline part, which stays FLATLINE_SCORE whatever the weight.
                contributions = contributions * peak_weights_c
        elif bias is not None:
            pred = model(z[:, :-1, :], training=False)
            r = (z[:, first_scored:, :] - pred) * inv_scale_c
            lasting = tf.abs(tf.reduce_sum(r * steps_weight_c, axis=1)) * inv_bias_c
            spike = tf.abs(r[:, -1, :]) * inv_spike_c
            contributions = tf.maximum(lasting, spike)
        elif kind == "forecast":
            pred = model(z[:, :-1, :], training=False)
            contributions = tf.square((z[:, -1, :] - pred) * inv_scale_c) * weight_c
        else:
            rec = model(z, training=False)
            contributions = tf.reduce_mean(tf.square((z - rec) * inv_scale_c), axis=1) * weight_c
        if check_flat:
            centred = z - tf.reduce_mean(z, axis=1, keepdims=True)
            spread = tf.sqrt(tf.reduce_mean(tf.square(centred), axis=1))
            contributions = contributions + tf.nn.relu(1.0 - spread * inv_floor_c) * flat_gain_c
        # score "error": the sum of the contributions, so the two agree exactly in the graph;
        # score "bias": the largest one; score "peak": the largest one, with the contributions
        # rescaled to sum to it (each feature keeps its share).
        if bias is not None:
            score = tf.reduce_max(contributions, axis=1)
        elif peak is not None:
            score = tf.reduce_max(contributions, axis=1)
            total = tf.reduce_sum(contributions, axis=1)
            contributions = contributions * tf.expand_dims(score / tf.maximum(total, 1e-30), 1)
        else:
            score = tf.reduce_sum(contributions, axis=1)
        return {SCORE_OUTPUT: score, CONTRIBUTIONS_OUTPUT: contributions}

    return ScoringFunction(
        fn=score_window,
        model=model,
        kind=kind,
        window_length=window_length,
        n_features=n_features,
        n_lstm_layers=n_lstm_layers,
        mean=np.asarray(mean, np.float32),
        std=np.asarray(std, np.float32),
        residual_scale=np.asarray(residual_scale, np.float32),
        weights=weights,
        bias=bias,
        flat_floor=None if flat_floor is None else np.asarray(flat_floor, np.float32),
        peak=peak,
        log_offset=np.asarray(log_offset, np.float32) if log_any else None,
        input_clip=np.asarray(input_clip, np.float32) if clip_any else None,
    )
