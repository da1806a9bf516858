"""The model contract: the JSON document stored in an exported model's ONNX metadata.

The training package writes it (``Contract.to_json``); the daemon's model loader reads
it (``Contract.from_json``) and then checks it against the graph (``anomalyd.model``).
It says everything the daemon needs to feed the model: ordered features with units,
the window length, the calibrated threshold and how it was calibrated.

A model may score only some of its inputs (``score_features``): a slow channel can help the
network predict the others yet be useless to score, because it drifts further over a
deployment than over its training rows. The graph does the weighting (an unscored feature's
contribution is exactly 0), so the daemon treats every model alike; the field tells people
which features the score stands for.

The graph itself takes raw sensor values: normalisation, network and scoring are all
inside it. The normalisation constants are repeated here for people and reports only.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anomalyd.errors import ModelContractError

#: Key under ``ModelProto.metadata_props`` that holds the contract JSON.
METADATA_KEY = "anomalyd.contract"
#: Bump when a field changes meaning or a required field is added.
SCHEMA_VERSION = 1

INPUT_NAME = "window"
SCORE_OUTPUT = "score"
CONTRIBUTIONS_OUTPUT = "contributions"

ModelKind = Literal["forecast", "autoencoder"]
ThresholdMethod = Literal["pot", "empirical_quantile", "training_quantile", "manual"]

_FIELD_PATH = re.compile(r"^[a-z_][a-z0-9_.]*$")
_FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Feature(_Strict):
    """One input channel, in the order of the last axis of ``window``."""

    name: str = Field(description="field name in telemetry payloads")
    unit: str = Field(default="", description="unit of the raw values, for people")

    @field_validator("name")
    @classmethod
    def _name_is_identifier_like(cls, v: str) -> str:
        if not _FEATURE_NAME.match(v):
            raise ValueError(
                "must start with a letter or '_' and hold only letters, digits, '_', '.', '-' "
                f"(64 characters at most), got {v!r}"
            )
        if v == "ts":
            raise ValueError("'ts' is reserved for the timestamp")
        return v


class PotFit(_Strict):
    """Peaks-over-threshold fit (Siffer et al., KDD 2017): GPD over exceedances of ``t``."""

    initial_quantile: float = Field(gt=0, lt=1)
    initial_threshold: float
    shape: float
    scale: float = Field(gt=0)
    n_peaks: int = Field(ge=1)


class Threshold(_Strict):
    """The alarm threshold on ``score`` and how it was chosen."""

    value: float = Field(description="score above this is anomalous")
    method: ThresholdMethod
    target_false_alarm_rate: float | None = Field(default=None, gt=0, lt=1)
    n_calibration_windows: int = Field(default=0, ge=0)
    pot: PotFit | None = None
    note: str = ""

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _pot_needs_fit(self) -> Threshold:
        if self.method == "pot" and self.pot is None:
            raise ValueError("method 'pot' needs the 'pot' fit parameters")
        return self


class Normalisation(_Strict):
    """Per-feature mean/std baked into the graph (copied here for people)."""

    mean: list[float]
    std: list[float]
    log_offset: list[float] | None = Field(
        default=None,
        description=(
            "per feature: above 0, the graph takes log(max(x, 0) + log_offset) before mean and "
            "std (which are then of the logged values); 0 or absent: the feature's own scale"
        ),
    )
    input_clip: list[float] | None = Field(
        default=None,
        description=(
            "per feature: above 0, the graph clips the normalised value to +- this before the "
            "network (features that are inputs only); 0 or absent: not clipped"
        ),
    )


class TrainingData(_Strict):
    source: str = Field(description="where the data came from (generator settings or file)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hash of the training array")
    rows: int = Field(ge=0)
    segments: int = Field(ge=0)
    train_windows: int = Field(ge=0)
    validation_windows: int = Field(ge=0)
    calibration_windows: int = Field(default=0, ge=0)
    sample_period_s: float | None = Field(
        default=None, gt=0, description="median step between readings inside segments, seconds"
    )
    # The spread of those steps. Optional: models exported before it was recorded still
    # load, and the daemon's cadence band then rests on its tolerance alone.
    sample_period_p05_s: float | None = Field(default=None, gt=0, description="5th percentile of the steps")
    sample_period_p95_s: float | None = Field(default=None, gt=0, description="95th percentile of the steps")

    @field_validator("sample_period_s", "sample_period_p05_s", "sample_period_p95_s")
    @classmethod
    def _finite_period(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _ordered_periods(self) -> TrainingData:
        p05, p, p95 = self.sample_period_p05_s, self.sample_period_s, self.sample_period_p95_s
        if (p05 is not None or p95 is not None) and p is None:
            raise ValueError("sample_period_p05_s and sample_period_p95_s need sample_period_s")
        if p is not None and not ((p05 is None or p05 <= p) and (p95 is None or p <= p95)):
            raise ValueError(
                "expected sample_period_p05_s <= sample_period_s <= sample_period_p95_s, "
                f"got {p05}, {p}, {p95}"
            )
        return self


class Contract(_Strict):
    """Everything the daemon needs to know about a model, stored inside the model."""

    schema_version: Annotated[int, Field(description="contract schema version")]
    kind: ModelKind
    model_version: str = Field(min_length=1, max_length=128)
    features: list[Feature] = Field(min_length=1)
    window_length: int = Field(ge=2, le=100_000)
    score_features: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "the features the score is the mean over (each one of 'features'); the others are "
            "inputs only and contribute exactly 0. Unset: every feature is scored"
        ),
    )
    threshold: Threshold
    score: str = Field(
        default="mean over features of squared standardised residuals",
        description="what the score means, for people; names the scored features when not all are",
    )
    normalisation: Normalisation
    training_data: TrainingData
    training_config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = Field(description="ISO 8601 UTC creation time")

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this anomalyd reads schema version {SCHEMA_VERSION}, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Contract:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"features: duplicate names in {names}")
        f = len(self.features)
        if len(self.normalisation.mean) != f or len(self.normalisation.std) != f:
            raise ValueError(f"normalisation: mean and std need {f} values, one per feature")
        offsets = self.normalisation.log_offset
        if offsets is not None and (len(offsets) != f or any(not o >= 0 for o in offsets)):
            raise ValueError(f"normalisation: log_offset needs {f} values at or above 0, one per feature")
        clips = self.normalisation.input_clip
        if clips is not None and (len(clips) != f or any(not c >= 0 for c in clips)):
            raise ValueError(f"normalisation: input_clip needs {f} values at or above 0, one per feature")
        if clips is not None and any(c > 0 for c in clips):
            # Clipping a scored feature would hide the very departures its score is for.
            scored_names = self.score_features if self.score_features is not None else names
            both = [n for n, c in zip(names, clips, strict=True) if c > 0 and n in scored_names]
            if both:
                raise ValueError(
                    f"normalisation: input_clip clips the scored features {both}; only features "
                    "that are inputs only may be clipped"
                )
        if self.score_features is not None:
            scored = self.score_features
            repeated = sorted({n for n in scored if scored.count(n) > 1})
            if repeated:
                raise ValueError(f"score_features: each feature may be named once; repeated: {repeated}")
            unknown = [n for n in scored if n not in names]
            if unknown:
                raise ValueError(f"score_features: {unknown} are not features; the features are {names}")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def scored_feature_names(self) -> list[str]:
        """The features the score is made of, in input order (all of them when unset)."""
        if self.score_features is None:
            return self.feature_names
        return [n for n in self.feature_names if n in self.score_features]

    def to_json(self) -> str:
        doc = self.model_dump(mode="json")
        # Unset means "every feature is scored", which is what every contract without the
        # key says too; leaving it out keeps such contracts readable by daemons that predate it.
        if doc["score_features"] is None:
            del doc["score_features"]
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()

    @classmethod
    def from_json(cls, text: str | bytes, path: str | None = None) -> Contract:
        """Parse and validate; raise ``ModelContractError`` naming the first bad field."""
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ModelContractError(f"not valid JSON ({exc})", field=METADATA_KEY, path=path) from None
        if not isinstance(raw, dict):
            raise ModelContractError("must be a JSON object", field=METADATA_KEY, path=path)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in err["loc"])
            if not field:
                # Whole-document checks (``_consistent``) say "<field>: <message>".
                head, sep, rest = msg.partition(": ")
                field, msg = (head, rest) if sep and _FIELD_PATH.match(head) else (METADATA_KEY, msg)
            raise ModelContractError(msg, field=field, path=path) from None

    def _describe_period(self) -> str:
        d = self.training_data
        if d.sample_period_s is None:
            return "not recorded (the daemon checks no cadence)"
        text = f"{d.sample_period_s:.6g} s"
        if d.sample_period_p05_s is not None and d.sample_period_p95_s is not None:
            text += f" (5-95 %: {d.sample_period_p05_s:.6g} to {d.sample_period_p95_s:.6g} s)"
        return text

    def _describe_scored(self) -> str:
        scored = self.scored_feature_names
        if len(scored) == self.n_features:
            return f"all {self.n_features}"
        inputs_only = [n for n in self.feature_names if n not in scored]
        return (
            f"{len(scored)} of {self.n_features}: {', '.join(scored)} "
            f"(inputs only, contribution 0: {', '.join(inputs_only)})"
        )

    def describe(self) -> str:
        """A person-readable summary, printed by ``anomalyd inspect-model``."""
        t = self.threshold
        lines = [
            f"model version   {self.model_version}",
            f"kind            {self.kind}",
            f"window length   {self.window_length} samples",
            f"sample period   {self._describe_period()}",
            "features        "
            + ", ".join(f"{ft.name} [{ft.unit}]" if ft.unit else ft.name for ft in self.features),
            f"scored features {self._describe_scored()}",
            f"threshold       {t.value:.6g}  ({t.method}"
            + (
                f", target false-alarm rate {t.target_false_alarm_rate:g} per window"
                if t.target_false_alarm_rate
                else ""
            )
            + (f", {t.n_calibration_windows} calibration windows" if t.n_calibration_windows else "")
            + ")",
        ]
        if t.pot is not None:
            lines.append(
                f"  POT fit       q0={t.pot.initial_quantile:g} t={t.pot.initial_threshold:.6g} "
                f"shape={t.pot.shape:.4g} scale={t.pot.scale:.4g} peaks={t.pot.n_peaks}"
            )
        if t.note:
            lines.append(f"  note          {t.note}")
        d = self.training_data
        lines += [
            f"score           {self.score}",
            f"training data   {d.source}",
            f"  rows={d.rows} segments={d.segments} train={d.train_windows} "
            f"validation={d.validation_windows} calibration={d.calibration_windows} windows",
            f"  sha256        {d.sha256}",
            "versions        " + ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items())),
            f"created         {self.created}",
        ]
        return "\n".join(lines)
