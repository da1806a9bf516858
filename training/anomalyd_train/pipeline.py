"""The training pipeline: config in, checked ONNX model (and report) out.

``train`` is a straight line of pure steps over one ``TrainConfig``:

load dataset → split each series by time (train | validation | calibration; or hold out
whole devices for calibration and split the rest by time) → fit the
scaler on training rows only → cut windows → subsample the training windows → fit
(Adam, MSE on normalised targets or, with ``training.loss = "noise_scaled"``, in units of
each feature's noise; early stopping on validation loss, best weights restored) →
residual scales from training windows → scores on the held-out calibration windows →
threshold (``anomalyd_train.calibration``) → export with checks → report.

Every score here comes from the TensorFlow scoring function (``anomalyd_train.scoring``) or
the exported file, never from a second formula, so ``model.score_features`` (a score over
some of the inputs) reaches the threshold, the summary and the report exactly as the daemon
will compute it.

Nothing here reads global state; the config says everything, and the seed in it
makes a run repeatable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.errors import DataError
from anomalyd_train.calibration import (
    Calibration,
    calibrate_threshold,
    to_contract_threshold,
    training_quantile_threshold,
)
from anomalyd_train.config import (
    ModelConfig,
    TrainConfig,
    check_log_features,
    check_peak_weights,
    check_score_features,
    config_to_dict,
    input_only_clip,
)
from anomalyd_train.data import Dataset, Segment, load_dataset
from anomalyd_train.windows import (
    Scaler,
    WindowSet,
    dataset_sha256,
    held_out_origins,
    make_windows,
    split_by_origin,
    split_by_time,
    subsample,
)

FloatArray = npt.NDArray[np.float32]

MODEL_FILE = "model.onnx"


@dataclass
class History:
    """Per-epoch losses (``training.loss`` on normalised targets) and where training stopped."""

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; the weights of this epoch were kept
    stopped_early: bool = False
    seconds: float = 0.0


@dataclass
class TrainResult:
    """Everything a run produced, for the summary, the report and tests."""

    config: TrainConfig
    out_dir: Path
    model_path: Path
    dataset: Dataset
    scaler: Scaler
    windows: dict[str, int]  # train (before subsampling), train_used, validation, calibration
    dropped_segments: int
    history: History
    residual_scale: FloatArray
    calibration: Calibration
    calibration_source: str  # which held-out windows calibrated the threshold
    validation_scores: FloatArray
    calibration_scores: FloatArray
    export: Any  # anomalyd_train.export.ExportResult
    scoring: Any  # anomalyd_train.scoring.ScoringFunction: the TensorFlow twin of the ONNX graph
    report_files: list[Path] = field(default_factory=list)
    report_numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def threshold(self) -> float:
        return float(self.export.contract.threshold.value)


def format_duration(seconds: float) -> str:
    """A duration for people: ``h:mm:ss`` under an hour (``0:03:12``), ``h:mm h`` from an
    hour on (``2:05 h``, to the nearest minute)."""
    whole = round(max(seconds, 0.0)) if np.isfinite(seconds) else 0
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"0:{minutes:02d}:{secs:02d}"
    hours, minutes = divmod(round(whole / 60), 60)
    return f"{hours}:{minutes:02d} h"


def _elapsed(seconds: float) -> str:
    """Elapsed run time for progress lines: always ``h:mm:ss``, so the lines align."""
    hours, rest = divmod(round(max(seconds, 0.0)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _echo(progress: bool, started: float | None = None) -> Callable[[str], None]:
    """Print each line after the time since ``started`` (``perf_counter``; default: now), as
    ``[0:01:23] line``, so a log says how long every step took."""
    start = time.perf_counter() if started is None else started

    def echo(line: str) -> None:
        if progress:
            print(f"[{_elapsed(time.perf_counter() - start)}] {line}", flush=True)

    return echo


def _epoch_logger(echo: Callable[[str], None], epochs: int) -> Any:
    """A Keras callback printing one line per epoch (Keras' own bar is unreadable in logs)."""
    import keras

    class EpochLine(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            val = f"  val_loss {logs['val_loss']:.5f}" if "val_loss" in logs else ""
            echo(
                f"  epoch {epoch + 1:>3}/{epochs}  loss {logs.get('loss', float('nan')):.5f}{val}"
                f"  ({time.perf_counter() - self.start:.1f} s)"
            )

    return EpochLine()


def _inputs_targets(model_cfg: ModelConfig, z: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Network input and target from normalised windows ``(n, L, F)``: the forecaster's
    target is step L, or with ``score = "bias"`` every step after the burn-in."""
    if model_cfg.kind == "forecast":
        if model_cfg.score == "bias":
            return z[:, :-1, :], z[:, model_cfg.burn_in + 1 :, :]
        return z[:, :-1, :], z[:, -1, :]
    return z, z


def fit_model(
    cfg: TrainConfig,
    train_z: FloatArray,
    val_z: FloatArray | None,
    echo: Callable[[str], None],
    predicted_noise: tuple[FloatArray, float] | None = None,
) -> tuple[Any, History]:
    """Build and fit the network on normalised windows; returns it with its history.
    ``predicted_noise``: a heteroscedastic forecaster's noise units and floor (``train``
    measures them once, for the loss and the score alike).

    Early stopping watches the validation loss (the training loss when there is no
    validation part) and the best epoch's weights are restored at the end.
    """
    # Importing TensorFlow takes seconds: say so rather than sit silent.
    echo("loading TensorFlow and building the network ...")
    import keras

    from anomalyd_train.models import build_networks, training_loss

    keras.utils.set_random_seed(cfg.training.seed)
    _, length, n_features = train_z.shape
    model, members = build_networks(
        cfg.model, length, n_features, noise=None if predicted_noise is None else predicted_noise[0]
    )
    # Several members train through their twin (each on its own loss); the weights are shared.
    fitted_model = members if members is not None else model
    fitted_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.training.learning_rate),
        loss=training_loss(
            cfg.training.loss,
            train_z,
            members=members is not None,
            predicted_noise=predicted_noise,
        ),
    )
    x, y = _inputs_targets(cfg.model, train_z)
    validation = _inputs_targets(cfg.model, val_z) if val_z is not None and len(val_z) else None
    monitor = "val_loss" if validation is not None else "loss"
    # patience 0 turns stopping off but still keeps the best epoch's weights.
    patience = cfg.training.patience or cfg.training.epochs
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)
    started = time.perf_counter()
    fitted = fitted_model.fit(
        x,
        y,
        batch_size=cfg.training.batch_size,
        epochs=cfg.training.epochs,
        validation_data=validation,
        shuffle=True,
        callbacks=[stopper, _epoch_logger(echo, cfg.training.epochs)],
        verbose=0,
    )
    losses = [float(v) for v in fitted.history.get("loss", [])]
    val_losses = [float(v) for v in fitted.history.get("val_loss", [])]
    watched = val_losses if validation is not None else losses
    history = History(
        loss=losses,
        val_loss=val_losses,
        best_epoch=int(np.argmin(watched)) + 1 if watched else 0,
        stopped_early=len(losses) < cfg.training.epochs,
        seconds=time.perf_counter() - started,
    )
    return model, history


def _evenly(n: int, k: int) -> npt.NDArray[np.int64]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def _windows(cfg: TrainConfig, segments: list[Any]) -> WindowSet:
    return make_windows(segments, cfg.window.length, cfg.window.hop, cfg.window.padding)


@dataclass
class Prepared:
    """The data side of a run: dataset, time split, scaler and windows (no TensorFlow)."""

    dataset: Dataset
    train_segments: list[Segment]
    validation_segments: list[Segment]
    calibration_segments: list[Segment]
    scaler: Scaler
    train_windows: WindowSet  # all training windows
    train_used: WindowSet  # the (subsampled) ones the network is fitted on
    validation_windows: WindowSet
    calibration_windows: WindowSet
    calibration_source: str  # "calibration", or "validation" when calibration_fraction = 0
    score_features: list[str] | None = None  # scored features in input order; None: all
    peak_weights: list[float] | None = None  # model.peak_weights per feature in input order; None: none

    @property
    def scored(self) -> list[bool]:
        """One flag per feature: is it part of the score?"""
        return [self.score_features is None or f in self.score_features for f in self.dataset.features]

    @property
    def window_counts(self) -> dict[str, int]:
        return {
            "train": len(self.train_windows),
            "train_used": len(self.train_used),
            "validation": len(self.validation_windows),
            "calibration": len(self.calibration_windows),
        }

    @property
    def dropped_segments(self) -> int:
        return (
            self.train_windows.dropped_segments
            + self.validation_windows.dropped_segments
            + self.calibration_windows.dropped_segments
        )


def _rows(segments: list[Segment]) -> int:
    return sum(len(s.ts) for s in segments)


def _loading_what(cfg: TrainConfig) -> str:
    """What is about to be loaded, for the first progress line (before any data is read)."""
    if cfg.data.source == "csv" and cfg.data.csv is not None:
        return f"reading {cfg.data.csv.path}"
    syn = cfg.data.synthetic
    return f"generating the synthetic fleet ({syn.n_devices} devices × {syn.duration_s / 3600:g} h)"


def prepare(cfg: TrainConfig, echo: Callable[[str], None] = lambda _: None) -> Prepared:
    """Load, split by time, fit the scaler on training rows only, and cut windows.

    Raises ``DataError`` when a part that the config asks for gives no window, and
    ``ConfigError`` naming ``model.score_features`` when it names a feature the data lacks.
    """
    echo(f"data: {_loading_what(cfg)} ...")
    dataset = load_dataset(cfg)
    echo(
        f"data: {dataset.source}: {dataset.rows} rows in {len(dataset.segments)} segments, "
        f"features {dataset.features}"
    )
    # The notes already say what was skipped and why (counts per reason).
    for note in dataset.notes:
        echo(f"  {note}")
    score_features = check_score_features(cfg, dataset.features)
    check_log_features(cfg, dataset.features)
    peak_weights = check_peak_weights(cfg, dataset.features)
    clip = input_only_clip(cfg, dataset.features)
    if score_features is not None:
        echo(f"score: mean over {len(score_features)} of {len(dataset.features)} features: {score_features}")

    if cfg.split.calibration == "devices":
        train_s, val_s, cal_s = split_by_origin(
            dataset.segments, cfg.split.validation_fraction, cfg.split.calibration_fraction
        )
        held = sorted({s.origin for s in cal_s})
        how = f"{len(held)} held-out origin(s) calibrate the threshold: {', '.join(held)}"
    else:
        train_s, val_s, cal_s = split_by_time(
            dataset.segments, cfg.split.validation_fraction, cfg.split.calibration_fraction
        )
        how = f"by time within each of {len({s.origin for s in dataset.segments})} origin(s)"
    echo(f"split: {how}; rows: train {_rows(train_s)}, validation {_rows(val_s)}, calibration {_rows(cal_s)}")
    # Scaling statistics come from the training part only, so nothing about the held-out
    # parts (validation, calibration) leaks into the model.
    scaler = Scaler.fit(train_s, dataset.features, cfg.model.log_features)
    if clip is not None:
        scaler = replace(scaler, clip=np.asarray(clip, np.float32))
    logged = [n for n, on in zip(dataset.features, scaler.logged, strict=True) if on]
    clipped = [n for n, on in zip(dataset.features, scaler.clipped, strict=True) if on]
    echo(
        f"scaler: mean and std of {len(dataset.features)} features from the {_rows(train_s)} training rows"
        + (f"; on a log scale: {', '.join(logged)}" if logged else "")
        + (f"; clipped to +-{cfg.model.input_only_clip:g} std: {', '.join(clipped)}" if clipped else "")
    )
    train_ws, val_ws, cal_ws = _windows(cfg, train_s), _windows(cfg, val_s), _windows(cfg, cal_s)
    hint = f"(window.length = {cfg.window.length}; lower it, set window.padding = 'pre', or give more data)"
    if len(train_ws) == 0:
        raise DataError(f"the training part gives no windows {hint}")
    if cfg.split.validation_fraction > 0 and len(val_ws) == 0:
        raise DataError(f"the validation part gives no windows {hint}")
    if cfg.split.calibration_fraction > 0 and len(cal_ws) == 0:
        raise DataError(f"the calibration part gives no windows {hint}")
    if len(cal_ws):
        calibration_source = "calibration"
    elif len(val_ws):
        # calibration_fraction = 0: the validation windows are the only held-out data.
        calibration_source = "validation"
    else:
        raise DataError(
            "no held-out windows to calibrate the threshold on: set split.calibration_fraction > 0"
        )
    prepared = Prepared(
        dataset=dataset,
        train_segments=train_s,
        validation_segments=val_s,
        calibration_segments=cal_s,
        scaler=scaler,
        train_windows=train_ws,
        train_used=subsample(train_ws, cfg.training.max_train_windows, cfg.training.seed),
        validation_windows=val_ws,
        calibration_windows=cal_ws,
        calibration_source=calibration_source,
        score_features=score_features,
        peak_weights=peak_weights,
    )
    w = prepared.window_counts
    dropped = prepared.dropped_segments
    echo(
        f"windows: L={cfg.window.length} hop={cfg.window.hop} padding={cfg.window.padding}: "
        f"train {w['train']} (using {w['train_used']}), validation {w['validation']}, "
        f"calibration {w['calibration']}"
        + (f"; {dropped} segments shorter than L dropped" if dropped else "")
    )
    return prepared


def train(cfg: TrainConfig, out_dir: Path, progress: bool = True) -> TrainResult:
    """Train, calibrate, export (with checks) and report; see the module docstring.

    Writes ``out_dir/model.onnx`` and, when ``cfg.report.enabled``, the report beside
    it. Raises ``DataError`` when the data cannot make windows for every part,
    ``ConfigError`` when ``model.score_features`` names a feature the data lacks or
    ``report.devices`` a device it lacks (both before training),
    ``anomalyd_train.export.ExportCheckError`` when an export check fails.
    """
    from anomalyd_train import export, scoring

    started = time.perf_counter()
    echo = _echo(progress, started)
    out_dir = Path(out_dir)

    prep = prepare(cfg, echo)
    if cfg.report.enabled:
        from anomalyd_train.report import check_report_devices

        # Before training: a misspelt device name should cost seconds, not a run.
        check_report_devices(cfg, [s.origin for s in prep.dataset.segments])
    dataset, scaler = prep.dataset, prep.scaler
    train_used, val_ws, cal_ws = prep.train_used, prep.validation_windows, prep.calibration_windows
    calibration_source = prep.calibration_source
    windows, dropped = prep.window_counts, prep.dropped_segments

    train_z = scaler.transform(train_used.windows)
    val_z = scaler.transform(val_ws.windows) if len(val_ws) else None
    echo(
        f"training {cfg.model.kind} model: {cfg.model.layers} x LSTM({cfg.model.units}), "
        f"up to {cfg.training.epochs} epochs, batch {cfg.training.batch_size}"
    )
    # --- score "peak": the network forecasts one step from window.length - peak_steps steps,
    # so it is fitted (and its residual scales measured) on each window's newest
    # window.length - peak_steps + 1 steps; the scoring function gets whole windows.
    net_train_z, net_val_z = train_z, val_z
    if cfg.model.score == "peak":
        first = cfg.model.peak_steps - 1
        net_train_z = train_z[:, first:, :]
        net_val_z = val_z[:, first:, :] if val_z is not None else None
    # --- end score "peak"
    # A heteroscedastic forecaster's noise output is in units of each feature's
    # sample-to-sample noise on the windows it is fitted on: the loss and the score share them.
    predicted_noise = None
    if cfg.model.heteroscedastic:
        from anomalyd_train.models import noise_scales

        predicted_noise = (noise_scales(net_train_z), cfg.model.noise_floor)
    model, history = fit_model(cfg, net_train_z, net_val_z, echo, predicted_noise)
    echo(
        f"training: {len(history.loss)} of {cfg.training.epochs} epochs in "
        f"{format_duration(history.seconds)}; early stopping "
        + describe_early_stopping(history, cfg.training.epochs, cfg.training.patience)
    )

    from anomalyd_train.models import lstm_layers

    bias_score = cfg.model.score == "bias"
    burn_in = cfg.model.burn_in if bias_score else None
    scale = scoring.residual_scales(
        scoring.squared_residuals(model, cfg.model.kind, net_train_z, burn_in=burn_in, noise=predicted_noise)
    )
    bias = None
    if bias_score:
        bias = scoring.BiasScore.measure(
            scoring.forecast_residuals(model, train_z, cfg.model.burn_in),
            scale,
            prep.scored,
            cfg.model.burn_in,
            cfg.model.bias_decay,
        )
    flat_floor = (
        scoring.flatline_floors(train_z, prep.scored, cfg.model.flatline_ratio)
        if cfg.model.flatline
        else None
    )
    echo(
        f"residual scales (normalised units) from the {len(train_z)} training windows: "
        + _per_feature(dataset.features, scale)
        + ("; bias branches measured" if bias is not None else "")
        + ("; flatline floors measured" if flat_floor is not None else "")
    )
    score_fn = scoring.build_scoring_function(
        model,
        cfg.model.kind,
        window_length=cfg.window.length,
        mean=scaler.mean,
        std=scaler.std,
        log_offset=scaler.log_offset,
        input_clip=scaler.clip,
        residual_scale=scale,
        n_lstm_layers=len(lstm_layers(model)),
        scored=prep.scored,
        bias=bias,
        flat_floor=flat_floor,
        peak=(
            scoring.PeakScore.measure(
                train_z,
                cfg.model.peak_steps,
                cfg.model.peak_local_noise,
                predicted_noise,
                cfg.model.peak_span,
                weights=prep.peak_weights,
            )
            if cfg.model.score == "peak"
            else None
        ),
    )
    echo(f"calibration: scoring {len(val_ws)} validation and {len(cal_ws)} calibration windows ...")
    val_scores = score_fn(val_ws.windows)[0] if len(val_ws) else np.zeros(0, np.float32)
    cal_scores = score_fn(cal_ws.windows)[0] if len(cal_ws) else val_scores
    if cfg.calibration.method == "training_quantile":
        # Every window of the training data: the training part (all of it, not only the
        # subsample fitted on) and both held-out parts.
        # (cal_scores is val_scores again when there is no calibration part: count it once.)
        held_out = [val_scores, cal_scores] if len(cal_ws) else [val_scores]
        all_scores = np.concatenate([score_fn(prep.train_windows.windows)[0], *held_out])
        calibration = training_quantile_threshold(
            all_scores.astype(np.float64), cfg.calibration.quantile, cfg.calibration.factor
        )
        calibration_source = "training-data"
        echo(f"threshold {calibration.threshold:.6g} (training_quantile: {calibration.note})")
    else:
        calibration = calibrate_threshold(
            cal_scores.astype(np.float64),
            cfg.calibration.target_false_alarm_rate,
            initial_quantile=cfg.calibration.initial_quantile,
            min_peaks=cfg.calibration.min_peaks,
        )
        echo(
            f"threshold {calibration.threshold:.6g} ({calibration.method}, target false-alarm rate "
            f"{cfg.calibration.target_false_alarm_rate:g} per window, "
            f"{len(cal_scores)} {calibration_source} windows)"
        )

    parity_source = val_ws if len(val_ws) else cal_ws
    parity = parity_source.windows[_evenly(len(parity_source), cfg.export.parity_windows)]
    contract_fields = {
        "kind": cfg.model.kind,
        "features": [{"name": n, "unit": u} for n, u in zip(dataset.features, dataset.units, strict=True)],
        "window_length": cfg.window.length,
        "score_features": prep.score_features,
        "threshold": to_contract_threshold(calibration).model_dump(mode="json"),
        "score": _score_text(cfg, dataset.features, prep.score_features, prep.peak_weights, flat_floor),
        "normalisation": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}
        | ({"log_offset": scaler.log_offset.tolist()} if any(scaler.logged) else {})
        | ({"input_clip": scaler.clip.tolist()} if any(scaler.clipped) else {}),
        "training_data": {
            "source": dataset.source,
            "sha256": dataset_sha256(dataset.segments),
            "rows": dataset.rows,
            "segments": len(dataset.segments),
            "train_windows": len(train_used),
            "validation_windows": len(val_ws),
            "calibration_windows": len(cal_scores),
            "sample_period_s": dataset.sample_period_s,
            "sample_period_p05_s": dataset.sample_period_p05_s,
            "sample_period_p95_s": dataset.sample_period_p95_s,
        },
        "training_config": config_to_dict(cfg),
    }
    echo(f"export: converting to ONNX (opset {cfg.export.opset}) and checking it ...")
    exported = export.export_model(
        score_fn,
        name=cfg.name,
        contract_fields=contract_fields,
        out_path=out_dir / MODEL_FILE,
        opset=cfg.export.opset,
        parity_windows=parity,
        rtol=cfg.export.rtol,
        atol=cfg.export.atol,
    )
    for check in exported.checks:
        echo(f"  check {check.name}: {check.detail}")
    echo(f"export: wrote {exported.path} ({exported.size_bytes / 1024:.1f} KiB)")

    result = TrainResult(
        config=cfg,
        out_dir=out_dir,
        model_path=exported.path,
        dataset=dataset,
        scaler=scaler,
        windows=windows,
        dropped_segments=dropped,
        history=history,
        residual_scale=scale,
        calibration=calibration,
        calibration_source=calibration_source,
        validation_scores=val_scores,
        calibration_scores=cal_scores,
        export=exported,
        scoring=score_fn,
    )
    if cfg.report.enabled:
        from anomalyd_train.report import write_report

        echo("report: drawing figures and scoring the evaluation series ...")
        files = write_report(result, echo)
        echo(f"report: wrote {len(files)} files, {out_dir / 'report.md'} links them")
    result.seconds = time.perf_counter() - started
    return result


def _per_feature(features: list[str], values: FloatArray) -> str:
    """``name value`` per feature, or the range when there are too many for one line."""
    v = np.asarray(values, dtype=np.float64)
    if len(features) <= 8:
        return ", ".join(f"{f} {x:.3g}" for f, x in zip(features, v.tolist(), strict=True))
    return f"{len(features)} features, {v.min():.3g} to {v.max():.3g}"


def _score_text(
    cfg: TrainConfig,
    features: list[str],
    score_features: list[str] | None,
    peak_weights: list[float] | None,
    flat_floor: FloatArray | None,
) -> str:
    """The contract's ``score``: what the graph computes, for people."""
    from anomalyd_train import scoring

    if cfg.model.score == "peak":
        text = scoring.peak_score_definition(
            features,
            score_features,
            steps=cfg.model.peak_steps,
            window_length=cfg.window.length,
            local=cfg.model.peak_local_noise,
            noise_floor=cfg.model.noise_floor if cfg.model.heteroscedastic else None,
            members=cfg.model.members,
            span=cfg.model.peak_span,
            weights=peak_weights,
        )
    elif cfg.model.score == "bias":
        text = scoring.bias_score_definition(
            features,
            score_features,
            decay=cfg.model.bias_decay,
            burn_in=cfg.model.burn_in,
            members=cfg.model.members,
        )
    else:
        text = scoring.score_definition(features, score_features)
        if cfg.model.members > 1:
            text += f"; the network's output is the mean of {cfg.model.members} networks' outputs"
    if flat_floor is not None:
        text += scoring.flatline_definition(flat_floor, features)
    if cfg.model.log_features:
        logged = [f for f in features if f in cfg.model.log_features]
        text += (
            f"; x is log(max(x, 0) + log_offset) for {', '.join(logged)} "
            "(normalisation.log_offset), so mean and std are of the logged values"
        )
    if cfg.model.input_only_clip is not None:
        scored = score_features or features
        clipped = [f for f in features if f not in scored]
        text += (
            f"; the network sees {', '.join(clipped)} (inputs only) clipped to "
            f"+-{cfg.model.input_only_clip:g} after normalisation (normalisation.input_clip)"
        )
    return text


def held_out_devices(result: TrainResult) -> list[str]:
    """The origins held out whole for calibration (``split.calibration = "devices"``), else []."""
    cfg = result.config
    if cfg.split.calibration != "devices" or result.calibration_source != "calibration":
        return []
    return held_out_origins([s.origin for s in result.dataset.segments], cfg.split.calibration_fraction)


def describe_score_features(scored: list[str], features: list[str]) -> str:
    """One line saying which of ``features`` the score is the mean over, for summary and report."""
    if len(scored) == len(features):
        return f"mean over all {len(features)} features"
    inputs_only = [f for f in features if f not in scored]
    return (
        f"mean over {len(scored)} of {len(features)} features: {', '.join(scored)} "
        f"(inputs only: {', '.join(inputs_only)})"
    )


def describe_early_stopping(history: History, epochs: int, patience: int) -> str:
    """Whether early stopping ended the fit, and which epoch's weights were kept.

    ``epochs`` and ``patience`` are the config's (``training.epochs``, ``training.patience``);
    the rest comes from ``history``, which says what the fit did.
    """
    ran = len(history.loss)
    watched = "validation loss" if history.val_loss else "training loss"
    kept = f"weights of epoch {history.best_epoch} kept (lowest {watched})"
    if patience == 0:
        return f"off (training.patience = 0): ran all {ran} epochs; {kept}"
    if history.stopped_early:
        return (
            f"triggered after epoch {ran} of {epochs}: no better {watched} for "
            f"{ran - history.best_epoch} epochs (patience {patience}); {kept}"
        )
    return f"not triggered (patience {patience}): ran all {ran} epochs; {kept}"


def format_summary(result: TrainResult) -> str:
    """The one-screen summary printed at the end of a run."""
    cfg = result.config
    d = result.dataset
    h = result.history
    c = result.calibration
    contract = result.export.contract
    w = result.windows
    units = [f"{n} [{u}]" if u else n for n, u in zip(d.features, d.units, strict=True)]
    best_val = f", val {h.val_loss[h.best_epoch - 1]:.5f}" if h.val_loss and h.best_epoch else ""
    lines = [
        "─" * 78,
        f"model      {contract.model_version}  "
        f"({cfg.model.kind}, {cfg.model.layers} x LSTM({cfg.model.units}))",
        f"data       {d.source}",
        f"           {d.rows} rows, {len(d.segments)} segments, F={len(d.features)}: {', '.join(units)}",
        *(
            [f"score      {describe_score_features(contract.scored_feature_names, d.features)}"]
            if contract.score_features is not None
            else []
        ),
        f"windows    L={cfg.window.length}: train {w['train']} (used {w['train_used']}), "
        f"validation {w['validation']}, calibration {w['calibration']}",
        f"training   {len(h.loss)} of {cfg.training.epochs} epochs in {format_duration(h.seconds)}"
        + f"; best epoch {h.best_epoch}: loss {h.loss[h.best_epoch - 1]:.5f}{best_val}",
        "           early stopping " + describe_early_stopping(h, cfg.training.epochs, cfg.training.patience),
        f"threshold  {c.threshold:.6g} by {c.method} on {c.n_scores} {result.calibration_source} windows"
        + (
            f", target false-alarm rate {c.target_false_alarm_rate:g}/window"
            if c.target_false_alarm_rate is not None
            else ""
        ),
    ]
    held = held_out_devices(result)
    if held:
        lines.append(f"           calibration windows from {len(held)} held-out devices: {', '.join(held)}")
    if result.validation_scores.size:
        above = float(np.mean(result.validation_scores > c.threshold))
        lines.append(
            f"           validation windows above it: {above:.2e} "
            f"(median score {float(np.median(result.validation_scores)):.3g})"
        )
    if c.note:
        lines.append(f"           {c.note}")
    for i, x in enumerate(result.export.checks):
        lines.append(f"{'checks' if i == 0 else '':<11}{x.name} ok: {x.detail}")
    lines.append(f"model      {result.model_path} ({result.export.size_bytes / 1024:.1f} KiB)")
    if result.report_files:
        lines.append(f"report     {result.out_dir / 'report.md'} ({len(result.report_files)} files)")
    for key, value in result.report_numbers.items():
        lines.append(f"           {key}: {value}")
    lines.append(f"total      {format_duration(result.seconds)}")
    lines.append("─" * 78)
    return "\n".join(lines)
