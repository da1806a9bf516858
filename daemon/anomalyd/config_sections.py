"""The smaller sections of the configuration, one pydantic model per TOML table:
``[model]`` (and each ``[[models]]`` entry, ``ModelEntry``), ``[batching]``, ``[detector]``,
``[output]``, ``[commands]``, ``[homeassistant]``, ``[state]``, ``[metrics]``, ``[logging]``
and ``[shutdown]``, each with its keys, defaults, ranges and descriptions, declared once.

The larger sections have modules of their own: ``[mqtt]`` (broker address, TLS, secrets)
in ``anomalyd.config_mqtt`` and ``[stream]`` in ``anomalyd.config_stream``; all of them
build on ``anomalyd.config_base.Section``. ``anomalyd.config`` assembles them into
``Config`` and loads files and overrides into it; ``anomalyd.config_example`` renders
``systemd/anomalyd.toml`` from the descriptions. Every section forbids unknown keys and
takes strict scalars (``port = "1883"`` is an error, not a guess); paths accept strings.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from anomalyd.config_addresses import check_host
from anomalyd.config_base import PathField, Section, check_topic_template
from anomalyd.paths import DEFAULT_MODEL_PATH

__all__ = [
    "BatchingConfig",
    "CommandsConfig",
    "DetectorConfig",
    "HomeAssistantConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelEntry",
    "ModelSection",
    "OutputConfig",
    "ShutdownConfig",
    "StateConfig",
]


class ModelSection(Section):
    """The ONNX model and how ONNX Runtime runs it."""

    path: PathField = Field(
        default=DEFAULT_MODEL_PATH,
        description="exported model file (default: the model shipped with anomalyd, "
        "exported_models/default/model.onnx)",
        examples=["/var/lib/anomalyd/model.onnx"],
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description='"auto": CUDA if it really works, else CPU; "cuda": CUDA or refuse to start; "cpu"',
    )
    intra_op_threads: int = Field(default=1, ge=1, le=256, description="ONNX Runtime intra-op threads")
    allow_spinning: bool = Field(
        default=False,
        description="let idle ONNX Runtime threads busy-wait (steals CPU from MQTT on small machines)",
    )
    concurrent_batches: int = Field(
        default=2,
        ge=1,
        le=64,
        description="batches scored at once, each on its own thread, while the pipeline thread "
        "prepares the next (1: score on the pipeline thread)",
    )


class BatchingConfig(Section):
    """Dynamic batching of ready windows (like Triton's dynamic batcher)."""

    max_batch: int = Field(default=64, ge=1, le=4096, description="a batch goes when it holds this many")
    # 5 ms: under load a batch fills long before (64 windows at 13k windows/s take 5 ms),
    # and at low load the wait is what a score's latency is made of.
    max_delay_ms: float = Field(
        default=5.0, ge=0, description="... or when its oldest window has waited this long, milliseconds"
    )
    warmup_batch_sizes: list[int] | None = Field(
        default=None,
        description="batch sizes to run once before ready; unset: every size from 1 to max_batch",
        examples=[[1, 8, 64]],
    )

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _sizes_fit(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        top = info.data.get("max_batch")
        if v is not None:
            if not v:
                raise ValueError("expected at least one batch size (or leave the key out)")
            bad = [b for b in v if b < 1 or (top is not None and b > top)]
            if bad:
                raise ValueError(f"expected sizes between 1 and max_batch ({top}), got {bad}")
        return v

    def warmup_sizes(self) -> list[int]:
        """Batch sizes to warm up: the configured ones, else every size the batcher can emit."""
        return sorted(set(self.warmup_batch_sizes or range(1, self.max_batch + 1)))


class DetectorConfig(Section):
    """Per-device smoothing, threshold and alert hysteresis."""

    threshold: float | None = Field(
        default=None,
        description="score threshold; unset: the model contract's calibrated threshold",
        examples=[2.5],
    )
    smoothing: Literal["none", "ewma", "channel_ewma"] = Field(
        default="none",
        description='"ewma" smooths scores per device; "channel_ewma" smooths each scored feature\'s '
        "residual size on its own and takes the largest (set threshold in those units)",
    )
    ewma_alpha: float = Field(default=0.3, gt=0, le=1, description="EWMA weight of the newest score")
    k_enter: int = Field(default=3, ge=1, description="consecutive anomalous windows that raise an alert")
    k_exit: int = Field(default=5, ge=1, description="consecutive normal windows that clear it")
    threshold_scale: float = Field(
        default=1.0,
        gt=0,
        description="multiplies the threshold (configured or the contract's): the static threshold",
    )
    adaptive: bool = Field(
        default=False,
        description="raise a device's threshold to exp(mean + adaptive_k * std) of its normal log-scores",
    )
    adaptive_windows: int = Field(
        default=600, ge=1, description="time constant of the adaptive statistics, in windows"
    )
    adaptive_min_windows: int = Field(
        default=60, ge=1, description="normal windows a device needs before its adaptive threshold applies"
    )
    adaptive_k: float = Field(
        default=4.0, ge=0, description="adaptive threshold: standard deviations of log-score above the mean"
    )
    adaptive_floor: float = Field(
        default=1.0,
        ge=0,
        description="the adaptive threshold stays >= this times the static one (1: it only raises it)",
    )

    @field_validator("threshold_scale", "adaptive_k", "adaptive_floor")
    @classmethod
    def _finite_number(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v}")
        # Scores are >= 0: a threshold at or below 0 would hold every device in alert.
        if v is not None and v <= 0:
            raise ValueError(f"expected a threshold > 0 (scores are never negative), got {v}")
        return v


#: A model's name: the ``model`` label of the per-model metrics, so it stays short and plain.
MODEL_NAME_PATTERN = r"[a-z0-9_-]{1,32}"


class ModelEntry(ModelSection):
    """One of several models (``[[models]]``): its file, how ONNX Runtime runs it (the keys
    of ``[model]``), the devices it scores, and its own ``[detector]`` keys, if any."""

    name: str = Field(
        description="the model's name: the model label of its metrics, [a-z0-9_-], at most 32",
        examples=["pumps"],
    )
    path: PathField = Field(description="exported model file", examples=["/var/lib/anomalyd/pumps.onnx"])
    devices: list[str] = Field(
        min_length=1,
        description="glob patterns (fnmatch: *, ?, [seq]) on the device id; a device must match "
        "exactly one model",
        examples=[["pump-*"]],
    )
    detector: DetectorConfig | None = Field(
        default=None,
        description="[detector] keys for this model only; the keys left out are the top-level [detector]'s",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(MODEL_NAME_PATTERN, v):
            raise ValueError(f"expected 1 to 32 of a-z, 0-9, '_' and '-', got {v!r}")
        return v

    @field_validator("devices")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern or "/" in pattern:
                raise ValueError(
                    f"expected a non-empty glob without '/' (a device id is one level), got {pattern!r}"
                )
        return v


class OutputConfig(Section):
    """What is published, where, and with which QoS."""

    score_topic: str = Field(
        default="anomaly/{device}/score",
        description="per-device score topic (latest score, rate-limited by score_interval_s)",
    )
    alert_topic: str = Field(default="anomaly/{device}/alert", description="alert state changes (retained)")
    status_topic: str = Field(
        default="anomaly/status", description="online / overloaded / offline (last will) / stopped (retained)"
    )
    batch_topic: str = Field(
        default="anomaly/scores", description="every score of a flush in one message (batched_scores)"
    )
    publish_scores: bool = Field(default=True, description="publish per-device score messages")
    score_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="a device's score message goes out when its newest window is at least this much "
        "data time after the one its previous message reported; at most one per device per flush; "
        "0: one message per window",
    )
    batched_scores: bool = Field(
        default=False, description="publish every score of a flush in one message to batch_topic"
    )
    include_contributions: bool = Field(default=True, description="add per-feature contributions to scores")
    score_qos: Literal[0, 1, 2] = Field(default=0, description="QoS of score messages")
    alert_qos: Literal[0, 1, 2] = Field(default=1, description="QoS of alert messages")
    status_qos: Literal[0, 1, 2] = Field(default=1, description="QoS of status messages")

    @field_validator("score_topic", "alert_topic")
    @classmethod
    def _device_topic(cls, v: str) -> str:
        return check_topic_template(v, 1)

    @field_validator("status_topic", "batch_topic")
    @classmethod
    def _plain_topic(cls, v: str) -> str:
        return check_topic_template(v, 0)


class CommandsConfig(Section):
    """Operator commands over MQTT (shelve, rebaseline, out of service: docs/operations.md)."""

    enabled: bool = Field(default=True, description="subscribe to the command topic")
    topic: str = Field(
        default="anomalyd/cmd/{device}/{verb}",
        description="command topic template: '{device}' and '{verb}' each a whole level (grant it "
        "to operators only in the broker's ACL)",
    )
    default_shelve_s: float = Field(
        default=3600.0, gt=0, description="how long `shelve` lasts when the command gives no duration_s"
    )
    max_shelve_s: float = Field(default=7 * 86400.0, gt=0, description="the longest shelving accepted")

    @field_validator("topic")
    @classmethod
    def _command_topic(cls, v: str) -> str:
        levels = v.split("/")
        if any(ch in v for ch in "+#\x00") or not v or v.startswith("$"):
            raise ValueError(f"expected a topic without '+', '#' and not starting with '$', got {v!r}")
        for name in ("{device}", "{verb}"):
            if v.count(name) != 1 or name not in levels:
                raise ValueError(f"expected exactly one {name!r}, as a whole topic level, got {v!r}")
        stripped = v.replace("{device}", "").replace("{verb}", "")
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"expected no placeholder other than '{{device}}' and '{{verb}}', got {v!r}")
        return v

    @field_validator("max_shelve_s")
    @classmethod
    def _max_not_below_default(cls, v: float, info: ValidationInfo) -> float:
        default = info.data.get("default_shelve_s")
        if default is not None and v < default:
            raise ValueError(f"expected max_shelve_s >= default_shelve_s ({default}), got {v}")
        return v


class HomeAssistantConfig(Section):
    """Home Assistant MQTT discovery: an alert binary sensor and a score sensor per device."""

    enabled: bool = Field(
        default=False,
        description="publish retained discovery configs (<discovery_prefix>/<component>/<node_id>/...) "
        "for every device with a state; removed when the device is forgotten (idle, evicted)",
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        description="Home Assistant's discovery prefix (a setting of its MQTT integration)",
    )
    node_id: str = Field(
        default="anomalyd",
        description="discovery topic level naming this daemon, and the prefix of its unique ids and device "
        "identifiers (<node_id>_<device>): give each daemon on one broker its own",
    )
    status_topic: str = Field(
        default="homeassistant/status",
        description="where Home Assistant announces itself ('online' after a start): the configs are "
        "published again then; empty: do not listen",
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        check_topic_template(v, 0)
        if "" in v.split("/"):
            raise ValueError(f"expected no empty topic level (a leading, trailing or double '/'), got {v!r}")
        return v

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        # Home Assistant's rule for the node_id and object_id levels of a discovery topic.
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v):
            raise ValueError(f"expected 1 to 64 letters, digits, '_' or '-', got {v!r}")
        return v

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, v: str) -> str:
        return check_topic_template(v, 0) if v else v


class StateConfig(Section):
    """Snapshots of per-device state (windows, detector, alert states) across restarts."""

    directory: PathField | None = Field(
        default=None,
        description="where snapshots go; unset: $STATE_DIRECTORY (systemd's StateDirectory=) if set, "
        "else no snapshots",
        examples=["/var/lib/anomalyd"],
    )
    snapshot_interval_s: float = Field(
        default=300.0, ge=0, description="snapshot this often while running (0: only on a clean stop)"
    )
    max_age_s: float = Field(
        default=3600.0, gt=0, description="a snapshot older than this at start is ignored (stale)"
    )

    def resolved_directory(self) -> Path | None:
        """``directory``, else ``$STATE_DIRECTORY`` (first entry), else None (snapshots off)."""
        if self.directory is not None:
            return self.directory
        env = os.environ.get("STATE_DIRECTORY", "")
        first = env.split(":")[0]
        return Path(first) if first else None


class MetricsConfig(Section):
    """The HTTP endpoint: Prometheus metrics (/metrics), liveness (/healthz), readiness (/readyz)."""

    enabled: bool = Field(default=True, description="serve /metrics, /healthz and /readyz over HTTP")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=9847, ge=0, le=65535, description="TCP port (0: any free port)")
    idle_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="close a connection that sends no request for this long (also the time a client "
        "gets to read a response)",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="close a connection whose request line and headers have not all arrived this long "
        "after their first byte",
    )
    max_connections: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="connections served at once, a thread each; more are closed unserved and counted "
        "(anomalyd_http_connections_refused_total)",
    )
    stall_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="/healthz fails (503) once the pipeline loop has not turned, or a batch has been in "
        "ONNX Runtime, for this long",
    )

    @field_validator("host")
    @classmethod
    def _listen_host(cls, v: str) -> str:
        # Empty: every interface. Anything else must be an address or a name to bind to,
        # or the start fails on it.
        return check_host(v) if v else v


class LoggingConfig(Section):
    """Log level and format (logs go to stderr: the journal under systemd)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")
    format: Literal["text", "json"] = Field(default="text", description='"text" or "json" lines')
    rejection_log_interval_s: float = Field(
        default=10.0, ge=0, description="log rejected input at most once per interval (all are counted)"
    )


class ShutdownConfig(Section):
    """Stopping on SIGTERM / SIGINT."""

    drain_timeout_s: float = Field(
        default=10.0, gt=0, description="score and publish pending windows for at most this long"
    )
