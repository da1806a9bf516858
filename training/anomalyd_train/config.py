"""The training configuration: one TOML file, declared once here and checked once at load.

Every table is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a
silently ignored default. Models are strict: a TOML string where a number belongs is an
error, not a coercion. ``load_train_config`` turns every problem into one
``anomalyd.errors.ConfigError`` whose ``key_path`` is the dotted path of the offending key.

This module must stay light: no TensorFlow, no numpy (``anomalyd-train --validate-config``
should answer in well under a second).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from anomalyd.config_errors import validation_errors
from anomalyd.contract import Feature
from anomalyd.errors import ConfigError
from anomalyd.feature_names import sanitise_feature_name
from anomalyd.synthetic_spec import FleetSpec

__all__ = [
    "TRAINING_FLEET",
    "CalibrationConfig",
    "CsvDataConfig",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "ReportConfig",
    "SplitConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "TrainingConfig",
    "WindowConfig",
    "check_peak_weights",
    "check_score_features",
    "config_to_dict",
    "error_from_validation",
    "input_only_clip",
    "load_train_config",
    "sanitise_feature_name",
]


class _Section(BaseModel):
    # strict: TOML is typed, so "20" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ----------------------------------------------------------------------------------------- data


#: The fleet training generates where ``[data.synthetic]`` says nothing: the generator's own
#: defaults (``FleetSpec()``) except for what training needs differently.
TRAINING_FLEET = FleetSpec(
    # A fleet model needs history: 48 device-hours, not the generator's one-hour stream of 4.
    n_devices=8,
    duration_s=6 * 3600.0,
    # Training never reads labels, so injected anomalies would be learnt as normal behaviour.
    anomalies_per_device_hour=0.0,
)


class SyntheticDataConfig(_Section):
    """The synthetic fleet of ``anomalyd.synthetic`` (the default training data).

    Each key is the ``FleetSpec`` setting of the same name and defaults to ``TRAINING_FLEET``'s
    value; the generator's settings that have no key here (gaps, jitter, anomaly kinds, ...)
    are ``TRAINING_FLEET``'s. ``fleet_spec()`` is what the generator gets, and FleetSpec's own
    checks run at load, so a fleet it would refuse is a config error.
    """

    n_devices: int = Field(
        default=TRAINING_FLEET.n_devices, ge=1, le=10_000, description="number of simulated devices"
    )
    duration_s: float = Field(
        default=TRAINING_FLEET.duration_s, gt=0, description="simulated history per device, seconds"
    )
    period_s: float = Field(
        default=TRAINING_FLEET.period_s, gt=0, description="nominal sample period, seconds"
    )
    seed: int = Field(default=TRAINING_FLEET.seed, ge=0, description="generator seed; same seed, same data")
    anomalies_per_device_hour: float = Field(
        default=TRAINING_FLEET.anomalies_per_device_hour,
        ge=0,
        description="injected anomalies per device-hour; 0 keeps the training data normal",
    )
    start_stagger_s: float = Field(
        default=TRAINING_FLEET.start_stagger_s,
        ge=0,
        description=(
            "device k starts k * start_stagger_s after the first; ambient temperature follows the "
            "time of day, so staggered starts let short histories cover the whole daily cycle"
        ),
    )

    @model_validator(mode="after")
    def _generator_accepts(self) -> SyntheticDataConfig:
        # The cross-setting rules (at least two samples, a cap on samples per device) are
        # FleetSpec's; its ValueError names the setting.
        self.fleet_spec()
        return self

    def fleet_spec(self) -> FleetSpec:
        """The generator's settings: ``TRAINING_FLEET`` with this table's values."""
        return dataclasses.replace(TRAINING_FLEET, **self.model_dump())


class CsvDataConfig(_Section):
    """A CSV file of real history: a timestamp column plus chosen numeric feature columns."""

    # Path is lax so that a TOML string converts; strictness would demand a Path object.
    path: Annotated[Path, Field(strict=False)] = Field(
        description="CSV file; a relative path is read relative to the training config file"
    )
    separator: str = Field(default=",", min_length=1, max_length=1, description="field separator")
    timestamp_column: str = Field(min_length=1, description="name of the timestamp column")
    timestamp_format: str | None = Field(
        default=None,
        description=(
            "strptime format of the timestamps (e.g. '%Y-%m-%d %H:%M:%S'); unset: epoch seconds "
            "or ISO 8601, detected from the first data row. Times without a zone are read as UTC"
        ),
    )
    feature_columns: list[str] = Field(min_length=1, description="columns used as model inputs, in order")
    feature_names: list[str] | None = Field(
        default=None,
        description=(
            "contract names of the feature columns, same order (the names the daemon expects in "
            "telemetry); unset: a sanitised column name ('Volume Flow RateRMS' → 'volume_flow_rate_rms')"
        ),
    )
    units: dict[str, str] = Field(default_factory=dict, description="unit per feature name, for people")
    label_column: str | None = Field(
        default=None, description="0/1 anomaly label column: kept for reports, never used for training"
    )
    max_gap_s: float | None = Field(
        default=None,
        gt=0,
        description="a step longer than this starts a new segment; unset: 3 × the median sample period",
    )
    first_rows: int | None = Field(
        default=None, ge=1, description="read only the first N data rows (SKAB's protocol trains on 400)"
    )
    encoding: str = Field(default="utf-8", description="text encoding of the file")

    @field_validator("feature_columns")
    @classmethod
    def _unique_columns(cls, v: list[str]) -> list[str]:
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"each column may be used once; repeated: {dupes}")
        return v

    @field_validator("feature_names")
    @classmethod
    def _names_match_columns(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        columns = info.data.get("feature_columns")
        if v is None or columns is None:
            return v
        if len(v) != len(columns):
            raise ValueError(f"needs one name per feature column ({len(columns)}), got {len(v)}")
        return v

    @field_validator("units")
    @classmethod
    def _units_for_known_features(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        columns = info.data.get("feature_columns")
        if columns is None:
            return v
        names = info.data.get("feature_names") or [sanitise_feature_name(c) for c in columns]
        unknown = sorted(set(v) - set(names))
        if unknown:
            raise ValueError(f"keys must be feature names {names}; unknown: {unknown}")
        return v

    @model_validator(mode="after")
    def _valid_contract_names(self) -> CsvDataConfig:
        # Checked here, not at export, so a bad name fails in a second rather than after training.
        names = self.resolved_feature_names()
        for name in names:
            try:
                Feature(name=name)
            except ValidationError as exc:
                raise ValueError(
                    f"feature name {name!r} is not usable in telemetry: {exc.errors()[0]['msg']}"
                ) from None
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique; repeated: {dupes} (set feature_names)")
        if self.timestamp_column in self.feature_columns:
            raise ValueError(f"timestamp column {self.timestamp_column!r} cannot also be a feature")
        if self.label_column is not None and self.label_column in self.feature_columns:
            raise ValueError(f"label column {self.label_column!r} cannot also be a feature")
        return self

    def resolved_feature_names(self) -> list[str]:
        """Feature names for the contract: ``feature_names`` or the sanitised column names."""
        if self.feature_names is not None:
            return list(self.feature_names)
        return [sanitise_feature_name(c) for c in self.feature_columns]


class DataConfig(_Section):
    """Where the training history comes from."""

    source: Literal["synthetic", "csv"] = Field(default="synthetic", description="'synthetic' or 'csv'")
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)
    csv: CsvDataConfig | None = Field(default=None, description="required when source = 'csv'")

    @field_validator("csv")
    @classmethod
    def _csv_when_csv(cls, v: CsvDataConfig | None, info: ValidationInfo) -> CsvDataConfig | None:
        # A field validator (not a model validator) so that the error's key path is "data.csv".
        if info.data.get("source") == "csv" and v is None:
            raise ValueError("source = 'csv' needs a [data.csv] table (path, timestamp_column, ...)")
        return v


# ------------------------------------------------------------------------------ windows, splits


class WindowConfig(_Section):
    """How series become (batch, L, F) windows."""

    length: int = Field(default=50, ge=2, le=100_000, description="window length L in samples")
    hop: int = Field(default=1, ge=1, description="samples between the ends of consecutive windows")
    padding: Literal["none", "pre"] = Field(
        default="none",
        description=(
            "'none': segments shorter than L are dropped and a segment's first L-1 samples get no "
            "window; 'pre': every sample gets a window, edge-padded with the segment's first sample"
        ),
    )


class SplitConfig(_Section):
    """Time-ordered split of each series: train | validation | calibration."""

    validation_fraction: float = Field(default=0.15, ge=0, le=0.5, description="share for early stopping")
    calibration_fraction: float = Field(
        default=0.15, ge=0, le=0.5, description="share held out to calibrate the threshold"
    )
    calibration: Literal["time", "devices"] = Field(
        default="time",
        description=(
            "'time': the last calibration_fraction of every origin's rows calibrate the threshold; "
            "'devices': about calibration_fraction of the origins (devices or files), spread over "
            "their sorted names, are held out whole to calibrate it, so device-to-device variation "
            "is in the calibration scores (needs at least 2 origins)"
        ),
    )

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.validation_fraction + self.calibration_fraction >= 0.9:
            raise ValueError("validation_fraction + calibration_fraction must be below 0.9")
        if self.calibration == "devices" and self.calibration_fraction == 0:
            raise ValueError("calibration = 'devices' needs calibration_fraction > 0")
        return self


# ----------------------------------------------------------------------------- model, training


class ModelConfig(_Section):
    """The network."""

    kind: Literal["forecast", "autoencoder"] = Field(
        default="forecast",
        description=(
            "'forecast': LSTM over steps 1..L-1 predicts step L; 'autoencoder': reconstructs the window"
        ),
    )
    layers: int = Field(default=2, ge=1, le=4, description="stacked LSTM layers")
    units: int = Field(default=32, ge=4, le=512, description="units per LSTM layer")
    dropout: float = Field(default=0.0, ge=0, le=0.5, description="dropout between layers")
    latent_units: int | None = Field(
        default=None, ge=1, le=512, description="autoencoder bottleneck width; unset: units"
    )
    centering: Literal["none", "window_mean", "window_start"] = Field(
        default="none",
        description=(
            "'window_mean': after global normalisation, subtract each feature's mean over the "
            "network's input steps (forecast: steps 1..L-1, and the forecast of step L is made "
            "relative to the same mean; autoencoder: all L steps) and add it back to the output, "
            "so the network sees shapes, not levels: offsets that differ between devices cancel. "
            "'window_start': the same with the mean of the first burn_in steps only, so that a "
            "forecast of a later step never sees a value it is asked to predict (score 'bias')"
        ),
    )
    score: Literal["error", "bias", "peak"] = Field(
        default="error",
        description=(
            "'error': the mean over scored features of the squared standardised residual "
            "(forecast: of step L; autoencoder: over the window). 'bias' (forecast only): the "
            "network forecasts every step from the steps before it, and the score is the largest, "
            "over scored features, of the exponentially weighted mean of those signed residuals "
            "(a lasting bias) and of the last step's residual (a spike), each in units of its "
            "quantile on the training windows. 'peak' (forecast only): each of the window's last "
            "peak_steps steps is forecast from the window.length - peak_steps steps before it, and "
            "the score is the largest squared standardised residual over those steps and the scored "
            "features, so a one-step surprise scores high in peak_steps consecutive windows"
        ),
    )
    peak_steps: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "score 'peak': how many of the window's newest steps are forecast and scored; the "
            "network sees window.length - peak_steps steps. Match it to the daemon's "
            "detector.k_enter so a one-step surprise lasts long enough to raise an alert"
        ),
    )
    peak_span: int = Field(
        default=1,
        ge=1,
        le=100,
        description=(
            "score 'peak': each feature's term is the largest sum of this many consecutive "
            "scored steps' squared residuals (1: the largest single one). A level shift is one "
            "large residual and a smaller one or two after it while the network follows the new "
            "level; 2 adds the second to the first. At most peak_steps; peak_steps - peak_span "
            "+ 1 windows then hold each such run"
        ),
    )
    peak_weights: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "score 'peak': feature name -> weight (unnamed scored features: 1). A feature's term "
            "is multiplied by its weight before the largest is taken, so its surprises count "
            "that many times more: its own threshold is the model's threshold / weight. The "
            "threshold is calibrated on the weighted score. For a feature whose clean running "
            "on unseen machines stays far below the threshold while its small faults are missed "
            "(the default model: temperature and pressure 1.4, vibration 1)"
        ),
    )
    peak_local_noise: bool = Field(
        default=True,
        description=(
            "score 'peak': divide each feature's residuals by max(1, local / reference), local "
            "being its sample-to-sample noise over the window's older steps (the network's input "
            "for the first scored step) and reference the median of that over the training "
            "windows, so a device or stretch noisier than the training fleet is not scored as "
            "anomalous for its noise alone; a quieter one is scored as usual"
        ),
    )
    heteroscedastic: bool = Field(
        default=False,
        description=(
            "score 'peak': the forecaster also predicts how far off each forecast may be (a "
            "noise level per feature and forecast), trained by the Gaussian negative "
            "log-likelihood, and each residual is divided by that predicted noise before it is "
            "scored. It learns where it cannot forecast well (load changes, resonances), so a "
            "miss there scores lower, and a surprise in steady running scores higher. Needs "
            "training.loss 'noise_scaled' (the predicted noise is in those units). With several "
            "members: each is trained on its own likelihood and the graph scores their "
            "combination (the mean forecast, in the mean predicted variance plus the spread "
            "of the members' forecasts)"
        ),
    )
    noise_floor: float = Field(
        default=0.5,
        gt=0,
        description=(
            "heteroscedastic: the predicted noise never goes (smoothly) below this many of a "
            "feature's sample-to-sample noise, so a network very sure of itself cannot turn a "
            "small miss into a huge score"
        ),
    )
    bias_decay: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="score 'bias': weight decay per step of the residual average (EWMA alpha)",
    )
    burn_in: int = Field(
        default=5,
        ge=1,
        le=1000,
        description=(
            "score 'bias': the first steps of a window only give context; their forecasts (made "
            "from too few steps) are neither trained on nor scored"
        ),
    )
    members: int = Field(
        default=1,
        ge=1,
        le=8,
        description=(
            "networks trained side by side from different initial weights and averaged in the "
            "one exported graph (a seed ensemble: one seed's luck matters less)"
        ),
    )
    flatline: bool = Field(
        default=False,
        description=(
            "add a stuck-sensor check to the score: a scored feature whose spread over the window "
            "falls below flatline_ratio times the smallest spread of any training window scores "
            "up to FLATLINE_SCORE (anomalyd_train.scoring), far above any threshold"
        ),
    )
    flatline_ratio: float = Field(
        default=0.1, gt=0, lt=1, description="see flatline: the fraction of the smallest training spread"
    )
    score_features: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "feature names (as in the contract) the score is the mean over; the other features "
            "are inputs only and contribute 0. For channels that help the network predict but "
            "drift too far over a deployment to be scored. Unset: every feature is scored"
        ),
    )

    input_only_clip: float | None = Field(
        default=None,
        gt=0,
        description=(
            "for the features that are inputs only (not in score_features): after "
            "normalisation the graph clips them to +- this many training standard deviations. "
            "Such a channel (a slow temperature) may drift far beyond anything the training "
            "rows showed; the network was never fitted there and would extrapolate, biasing "
            "its forecasts of the scored channels. Clipped, it still tells the network which "
            "side of its training range the machine is on. Unset: no clipping"
        ),
    )
    log_features: list[str] = Field(
        default_factory=list,
        description=(
            "feature names (as in the contract) standardised on a log scale: the graph takes "
            "log(max(x, 0) + offset) before the mean and std, the offset fitted on the training "
            "rows so that the logged sample-to-sample noise is the same at every level. For a "
            "signal whose noise grows with its level, such as a vibration RMS, so a loud "
            "machine's noise is not scored as larger than a quiet one's. Every feature named "
            "must be at or above 0 in at least 99 % of the training rows, and its noise must "
            "grow with its level"
        ),
    )

    @model_validator(mode="after")
    def _heteroscedastic_needs_peak(self) -> ModelConfig:
        if self.heteroscedastic and self.score != "peak":
            raise ValueError("heteroscedastic needs score 'peak' (a forecaster of each scored step)")
        return self

    @model_validator(mode="after")
    def _peak_span_fits_peak_steps(self) -> ModelConfig:
        if self.score == "peak" and self.peak_span > self.peak_steps:
            raise ValueError(
                f"peak_span ({self.peak_span}) must be at most peak_steps ({self.peak_steps}): "
                "it sums that many of the scored steps"
            )
        return self

    @model_validator(mode="after")
    def _peak_weights_fit(self) -> ModelConfig:
        if self.peak_weights and self.score != "peak":
            raise ValueError("peak_weights needs score 'peak' (it weights each feature's peak term)")
        bad = {n: w for n, w in self.peak_weights.items() if not (math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"peak_weights must be finite numbers above 0; got {bad}")
        return self

    @model_validator(mode="after")
    def _peak_needs_forecaster(self) -> ModelConfig:
        if self.score == "peak":
            if self.kind != "forecast":
                raise ValueError("score 'peak' needs kind 'forecast' (a forecast of each scored step)")
            if self.centering == "window_start":
                raise ValueError(
                    "score 'peak' centres each forecast's own input steps; use centering "
                    "'window_mean' or 'none', not 'window_start'"
                )
        return self

    @model_validator(mode="after")
    def _bias_needs_causal_forecaster(self) -> ModelConfig:
        if self.score == "bias":
            if self.kind != "forecast":
                raise ValueError("score 'bias' needs kind 'forecast' (a forecast of every step)")
            if self.centering == "window_mean":
                raise ValueError(
                    "score 'bias' cannot use centering 'window_mean': the mean of the whole window "
                    "holds the values the earlier forecasts are asked for; use 'window_start'"
                )
        return self

    @field_validator("score_features", "log_features")
    @classmethod
    def _features_named_once(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            repeated = sorted({n for n in v if v.count(n) > 1})
            if repeated:
                raise ValueError(f"each feature may be named once; repeated: {repeated}")
        return v


class TrainingConfig(_Section):
    """The optimiser loop."""

    epochs: int = Field(default=20, ge=1, le=10_000, description="maximum epochs")
    batch_size: int = Field(default=128, ge=1, le=65_536, description="windows per batch")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="Adam learning rate")
    patience: int = Field(
        default=3, ge=0, description="early stopping on validation loss after this many epochs; 0 = off"
    )
    seed: int = Field(default=0, ge=0, description="seeds weights, shuffling and subsampling")
    max_train_windows: int | None = Field(
        default=20_000,
        ge=1,
        description="subsample (seeded, evenly over time) to this many training windows; unset: all",
    )
    loss: Literal["mse", "noise_scaled"] = Field(
        default="mse",
        description=(
            "'mse': mean squared error on normalised targets, so each feature weighs by its "
            "global spread. 'noise_scaled': each feature's squared error is divided by its "
            "sample-to-sample noise variance on the training windows (models.noise_scales), "
            "so every feature is fitted down to its own noise level, which is what the score "
            "measures; under 'mse' a smooth channel with a wide range (a temperature) is fitted "
            "far more loosely than its noise allows"
        ),
    )


class CalibrationConfig(_Section):
    """The alarm threshold (peaks over threshold, Siffer et al. 2017, with an empirical fallback)."""

    target_false_alarm_rate: float = Field(
        default=1e-3, gt=0, lt=1, description="wanted false alarms per normal window"
    )
    initial_quantile: float = Field(
        default=0.98, gt=0, lt=1, description="quantile of calibration scores where the tail fit starts"
    )
    min_peaks: int = Field(
        default=30, ge=1, description="fewer exceedances than this: use the empirical quantile instead"
    )
    method: Literal["pot", "training_quantile"] = Field(
        default="pot",
        description=(
            "'pot': the rate target_false_alarm_rate on the held-out calibration windows (above); "
            "'training_quantile': factor x the quantile of the scores of every window of the "
            "training data (all three parts), for data too short to hold out a tail"
        ),
    )
    quantile: float = Field(default=0.99, gt=0, lt=1, description="'training_quantile': which quantile")
    factor: float = Field(default=2.0, gt=0, le=100, description="'training_quantile': times the quantile")


class ExportConfig(_Section):
    """ONNX export and its parity check against Keras."""

    opset: int = Field(default=17, ge=13, le=23, description="ONNX opset")
    rtol: float = Field(default=1e-4, gt=0, description="relative tolerance of the Keras/ORT parity check")
    atol: float = Field(default=1e-5, gt=0, description="absolute tolerance of the Keras/ORT parity check")
    parity_windows: int = Field(default=256, ge=1, description="validation windows used for the check")


class ReportConfig(_Section):
    """The figures written next to the exported model."""

    enabled: bool = Field(default=True, description="write the PNG report and its index page")
    devices: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description=(
            "devices (or files) of the evaluation series to show, by name, e.g. ['machine-007']; "
            "unset: every one, up to max_devices. Checked against the data before training"
        ),
    )
    max_devices: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "without devices: show at most this many, in data order; for synthetic data also "
            "the size of the unseen evaluation fleet (at most data.synthetic.n_devices)"
        ),
    )

    @field_validator("devices")
    @classmethod
    def _devices_once(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            repeated = sorted({n for n in v if v.count(n) > 1})
            if repeated:
                raise ValueError(f"each device may be named once; repeated: {repeated}")
        return v


class TrainConfig(_Section):
    """The whole training configuration (one TOML file)."""

    name: str = Field(
        default="anomalyd-model", min_length=1, max_length=128, description="model name, for the contract"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _burn_in_fits_window(self) -> TrainConfig:
        if self.model.score == "bias" and self.model.burn_in >= self.window.length - 1:
            # Located at the key (like score_features below), so the ConfigError names
            # "model.burn_in" rather than the whole document.
            raise _error_at(
                self,
                ("model", "burn_in"),
                f"must be below window.length - 1 ({self.window.length - 1}), got "
                f"{self.model.burn_in}: no forecast would be left to score",
                self.model.burn_in,
            )
        return self

    @model_validator(mode="after")
    def _heteroscedastic_needs_noise_scaled_loss(self) -> TrainConfig:
        if self.model.heteroscedastic and self.training.loss != "noise_scaled":
            raise _error_at(
                self,
                ("training", "loss"),
                f"must be 'noise_scaled' with model.heteroscedastic, got {self.training.loss!r}: "
                "the predicted noise is in units of each feature's sample-to-sample noise",
                self.training.loss,
            )
        return self

    @model_validator(mode="after")
    def _peak_steps_fit_window(self) -> TrainConfig:
        if self.model.score == "peak" and self.model.peak_steps > self.window.length - 2:
            # The network needs at least two input steps (and the noise estimate one step).
            raise _error_at(
                self,
                ("model", "peak_steps"),
                f"must be at most window.length - 2 ({self.window.length - 2}), got "
                f"{self.model.peak_steps}: the network would see fewer than 2 steps",
                self.model.peak_steps,
            )
        return self

    @model_validator(mode="after")
    def _score_features_are_features(self) -> TrainConfig:
        # Only a CSV's feature names are known here; the synthetic fleet's live in the
        # generator (numpy), so the pipeline checks those (``check_score_features``).
        if self.data.source == "csv" and self.data.csv is not None:
            problem = _score_features_problem(
                self.model.score_features, self.data.csv.resolved_feature_names()
            )
            if problem is not None:
                # Raised as a ValidationError located at the key, so the ConfigError names
                # "model.score_features" rather than the whole document.
                raise _error_at(self, ("model", "score_features"), problem, self.model.score_features)
        return self


def _error_at(model: BaseModel, loc: tuple[str, ...], problem: str, value: Any) -> ValidationError:
    """A ValidationError of ``model`` located at the key ``loc`` (not at the whole document)."""
    return ValidationError.from_exception_data(
        type(model).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError("value_error", "{problem}", {"problem": problem}),
                loc=loc,
                input=value,
            )
        ],
    )


def _score_features_problem(score_features: list[str] | None, feature_names: list[str]) -> str | None:
    """What is wrong with ``model.score_features`` for data with ``feature_names``, or None."""
    if score_features is None:
        return None
    unknown = [n for n in score_features if n not in feature_names]
    if not unknown:
        return None
    return (
        f"{unknown} {'is not a feature name' if len(unknown) == 1 else 'are not feature names'}; "
        f"the data's feature names are {feature_names}"
    )


def check_log_features(cfg: TrainConfig, feature_names: list[str]) -> None:
    """Raises ``ConfigError`` naming ``model.log_features`` when one of them is not among
    ``feature_names`` (the loaded data's)."""
    problem = _score_features_problem(cfg.model.log_features or None, feature_names)
    if problem is not None:
        raise ConfigError(problem, "model.log_features")


def check_peak_weights(cfg: TrainConfig, feature_names: list[str]) -> list[float] | None:
    """``model.peak_weights`` as one weight per feature in input order (1 where unnamed), or
    None when none is set.

    Raises ``ConfigError`` naming ``model.peak_weights`` when a name is not among
    ``feature_names`` (the loaded data's) or names a feature that is not scored.
    """
    weights = cfg.model.peak_weights
    if not weights:
        return None
    problem = _score_features_problem(list(weights), feature_names)
    if problem is not None:
        raise ConfigError(problem, "model.peak_weights")
    scored = cfg.model.score_features
    unscored = [n for n in weights if scored is not None and n not in scored]
    if unscored:
        raise ConfigError(
            f"{unscored} not in model.score_features: an input-only feature has no term to weight",
            "model.peak_weights",
        )
    return [float(weights.get(n, 1.0)) for n in feature_names]


def input_only_clip(cfg: TrainConfig, feature_names: list[str]) -> list[float] | None:
    """``model.input_only_clip`` as one limit per feature in input order (0: not clipped, the
    scored features), or None when it is not set.

    Raises ``ConfigError`` naming ``model.input_only_clip`` when every feature is scored:
    there is then no input-only feature to clip, and clipping a scored one would hide the
    very departures its score is for.
    """
    limit = cfg.model.input_only_clip
    if limit is None:
        return None
    scored = cfg.model.score_features
    inputs_only = [n for n in feature_names if scored is not None and n not in scored]
    if not inputs_only:
        raise ConfigError(
            f"{limit} clips the features that are inputs only, and every feature is scored "
            "(set model.score_features to the features the score is over, or remove this key)",
            "model.input_only_clip",
        )
    return [limit if n in inputs_only else 0.0 for n in feature_names]


def check_score_features(cfg: TrainConfig, feature_names: list[str]) -> list[str] | None:
    """The scored features in input order, or None when every feature is scored.

    Raises ``ConfigError`` naming ``model.score_features`` when one of them is not among
    ``feature_names`` (the loaded data's).
    """
    scored = cfg.model.score_features
    problem = _score_features_problem(scored, feature_names)
    if problem is not None:
        raise ConfigError(problem, "model.score_features")
    if scored is None or set(scored) >= set(feature_names):
        return None
    return [n for n in feature_names if n in scored]


# ---------------------------------------------------------------------------------- loading


def error_from_validation(
    exc: ValidationError, root: type[BaseModel], where: str | None, prefix: str = ""
) -> ConfigError:
    """The first problem ``exc`` found in ``root`` as one ``ConfigError``, with a count of the others.

    The key path and message are ``anomalyd.config_errors``' (the daemon's wording); ``prefix``
    is the path of the validated table within its file (``"train"`` for a benchmark config's
    ``[train]``), and ``where``, when given, names the file at the end of the message.
    """
    errors = validation_errors(exc, root, prefix)
    first = errors[0]
    msg = str(first).removeprefix(f"{first.key_path}: ") if first.key_path else str(first)
    more = len(errors) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    if where is not None:
        msg += f" [{where}]"
    return ConfigError(msg, first.key_path)


def load_train_config(path: str | os.PathLike[str] | None) -> TrainConfig:
    """Read and check a training config; ``None`` gives the embedded defaults.

    Raises ``ConfigError``: for an unreadable file or bad TOML naming the file (and the
    line, from ``tomllib``), for a bad value naming its dotted key path. A relative
    ``data.csv.path`` is resolved against the config file's directory, so a config and its
    data can move together.
    """
    if path is None:
        return TrainConfig()
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read training config {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"training config {file} is not UTF-8 ({exc.reason})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(f"training config {file} is not valid TOML: {exc}") from None
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise error_from_validation(exc, TrainConfig, str(file)) from None
    csv = cfg.data.csv
    if csv is not None and not csv.path.is_absolute():
        csv.path = (file.parent / csv.path).resolve()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A JSON-safe dict of the whole config (paths as strings), for the model contract."""
    return cfg.model_dump(mode="json")
