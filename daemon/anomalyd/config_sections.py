"""The configuration's sections: one pydantic model per TOML table (``[mqtt]``, ``[stream]``,
...), each with its keys, defaults, ranges and descriptions, declared once.

``anomalyd.config`` assembles them into ``Config`` and loads files and overrides into it;
``anomalyd.config_example`` renders ``systemd/anomalyd.toml`` from the descriptions here.
Every section forbids unknown keys and takes strict scalars (``port = "1883"`` is an error,
not a guess); paths accept strings.

Secrets never live in the configuration: the MQTT password and the TLS key passphrase come
from a file or a systemd credential, and only ``read_secret`` (here, because the sections'
accessors use it) ever reads them.
"""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from anomalyd.errors import ConfigError
from anomalyd.paths import DEFAULT_MODEL_PATH

__all__ = [
    "BatchingConfig",
    "CommandsConfig",
    "DetectorConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelSection",
    "MqttConfig",
    "OutputConfig",
    "PathField",
    "Section",
    "ShutdownConfig",
    "StateConfig",
    "StreamConfig",
    "TlsConfig",
    "read_secret",
]

#: A path field: strings from TOML or the command line are welcome (strict mode would not take them).
PathField = Annotated[Path, Field(strict=False)]

_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.@:\-]{1,255}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)


def _existing_file(v: Path | None, info: ValidationInfo) -> Path | None:
    if v is not None and not v.is_file():
        raise ValueError(f"expected an existing readable file, {str(v)!r} is not one")
    return v


def _credential_name(v: str | None) -> str | None:
    if v is not None and (not _CREDENTIAL_NAME.match(v) or v in {".", ".."}):
        raise ValueError(
            "expected the name of a systemd credential (a file name in $CREDENTIALS_DIRECTORY, "
            f"no '/'), got {v!r}"
        )
    return v


def _check_topic_template(v: str, placeholders: int) -> str:
    """MQTT topics: ``{device}`` must be a whole level (it becomes ``+`` when subscribing)."""
    levels = v.split("/")
    if any(ch in v for ch in "+#\x00"):
        raise ValueError(f"expected a topic without the wildcards '+' or '#', got {v!r}")
    if not v or v.startswith("$"):
        raise ValueError(f"expected a non-empty topic not starting with '$', got {v!r}")
    n = v.count("{device}")
    if n != placeholders:
        want = "exactly one '{device}'" if placeholders == 1 else "no '{device}'"
        raise ValueError(f"expected {want} in the topic, got {v!r}")
    if placeholders and "{device}" not in levels:
        raise ValueError(f"expected '{{device}}' to be a whole topic level (between '/'), got {v!r}")
    stripped = v.replace("{device}", "")
    if "{" in stripped or "}" in stripped:
        raise ValueError(f"expected no placeholder other than '{{device}}', got {v!r}")
    return v


class TlsConfig(Section):
    """TLS to the broker. Present (even empty) means TLS on."""

    ca_file: PathField | None = Field(
        default=None,
        description="CA bundle that signs the broker's certificate (unset: the system's trust store)",
        examples=["/etc/anomalyd/ca.pem"],
    )
    cert_file: PathField | None = Field(
        default=None,
        description="client certificate for mutual TLS (needs key_file)",
        examples=["/etc/anomalyd/client.pem"],
    )
    key_file: PathField | None = Field(
        default=None,
        description="private key of the client certificate (needs cert_file)",
        examples=["/etc/anomalyd/client.key"],
    )
    key_passphrase_file: PathField | None = Field(
        default=None,
        description="file holding the private key's passphrase, if the key is encrypted",
        examples=["/etc/anomalyd/client.key.pass"],
    )
    key_passphrase_credential: str | None = Field(
        default=None,
        description="systemd credential (LoadCredential=) holding the key passphrase; "
        "exclusive with key_passphrase_file",
        examples=["mqtt-key-passphrase"],
    )
    insecure: bool = Field(
        default=False,
        description="skip verification of the broker's certificate and host name (testing only)",
    )

    _files = field_validator("ca_file", "cert_file", "key_file", "key_passphrase_file")(_existing_file)

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if "cert_file" in info.data and (v is None) != (info.data["cert_file"] is None):
            raise ValueError("expected cert_file and key_file together (mutual TLS needs both)")
        return v

    @field_validator("key_passphrase_credential")
    @classmethod
    def _one_passphrase_source(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("key_passphrase_file") is not None:
            raise ValueError("expected key_passphrase_file or key_passphrase_credential, not both")
        return _credential_name(v)


class MqttConfig(Section):
    """Connection to the MQTT broker and the telemetry subscription."""

    host: str = Field(default="127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port (8883 is usual for TLS)")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description='MQTT version: "5" or "3.1.1"')
    client_id: str = Field(
        default="",
        max_length=128,
        description='MQTT client id; empty: "anomalyd-<hostname>-<pid>"',
    )
    username: str | None = Field(default=None, description="user name for the broker", examples=["anomalyd"])
    password_file: PathField | None = Field(
        default=None,
        description="file holding the broker password (first line); never put the password here",
        examples=["/etc/anomalyd/mqtt_password"],
    )
    password_credential: str | None = Field(
        default=None,
        description="systemd credential (LoadCredential=) holding the broker password; "
        "exclusive with password_file",
        examples=["mqtt_password"],
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; absent: plain TCP")
    keepalive_s: int = Field(default=30, ge=1, le=65535, description="MQTT keep-alive interval, seconds")
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="first reconnect delay, seconds (doubles per attempt, jittered)"
    )
    reconnect_max_s: float = Field(default=30.0, gt=0, description="cap on the reconnect delay, seconds")
    topic_in: str = Field(
        default="sensors/{device}/telemetry",
        description="telemetry topic template; exactly one '{device}' level, subscribed as '+'",
    )
    qos_in: Literal[0, 1, 2] = Field(default=0, description="QoS of the telemetry subscription")
    clean_start: bool = Field(
        default=True, description="start a fresh session on connect (false: broker keeps our session)"
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, v: object) -> object:
        # `protocol = 5` is the natural thing to write in TOML.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    _password_file = field_validator("password_file")(_existing_file)

    @field_validator("password_credential")
    @classmethod
    def _one_password_source(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("password_file") is not None:
            raise ValueError("expected password_file or password_credential, not both")
        return _credential_name(v)

    @field_validator("reconnect_max_s")
    @classmethod
    def _max_not_below_min(cls, v: float, info: ValidationInfo) -> float:
        lo = info.data.get("reconnect_min_s")
        if lo is not None and v < lo:
            raise ValueError(f"expected reconnect_max_s >= reconnect_min_s ({lo}), got {v}")
        return v

    @field_validator("topic_in")
    @classmethod
    def _topic(cls, v: str) -> str:
        return _check_topic_template(v, 1)

    def password(self) -> str | None:
        """The broker password from ``password_file`` or ``password_credential`` (None: neither)."""
        key = "mqtt.password_credential" if self.password_credential else "mqtt.password_file"
        return read_secret(self.password_file, self.password_credential, key)

    def key_passphrase(self) -> str | None:
        """The TLS client key's passphrase, if TLS is on and one is configured."""
        tls = self.tls
        if tls is None:
            return None
        key = (
            "mqtt.tls.key_passphrase_credential"
            if tls.key_passphrase_credential
            else "mqtt.tls.key_passphrase_file"
        )
        return read_secret(tls.key_passphrase_file, tls.key_passphrase_credential, key)

    def effective_client_id(self) -> str:
        """``client_id``, or ``anomalyd-<hostname>-<pid>`` when it is empty."""
        return self.client_id or f"anomalyd-{socket.gethostname()}-{os.getpid()}"


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


class StreamConfig(Section):
    """Validation limits and per-device rolling windows."""

    max_devices: int = Field(
        default=10000, ge=1, le=10_000_000, description="devices tracked at once; the least recent goes"
    )
    max_gap_s: float = Field(
        default=60.0, gt=0, description="a gap longer than this between readings restarts the device's window"
    )
    idle_evict_s: float = Field(default=3600.0, gt=0, description="forget a device silent for this long")
    hop: int = Field(default=1, ge=1, description="score a device every `hop` new readings (1: every one)")
    warmup: Literal["wait", "pad"] = Field(
        default="wait",
        description='"wait": score once a device has a full window; "pad": score early, edge-padded',
    )
    max_payload_bytes: int = Field(
        default=65536, ge=16, le=256 * 1024 * 1024, description="larger messages are rejected unread"
    )
    max_readings_per_message: int = Field(
        default=1000, ge=1, description="arrays / SenML packs with more readings are rejected"
    )
    intake_queue_size: int = Field(
        default=100000, ge=1, description="messages waiting for the pipeline; overflow is dropped, counted"
    )
    intake_queue_mib: float = Field(
        default=32.0,
        gt=0,
        description="... and their size in MiB (payloads, topics, about 200 bytes each besides): "
        "bounds the daemon's memory and the lag it can build under a flood; overflow is dropped, counted",
    )
    device_id_pattern: str = Field(
        default=r"^[A-Za-z0-9_.:\-]{1,64}$", description="regular expression a device id must match"
    )
    max_future_skew_s: float = Field(
        default=300.0, gt=0, description="reject readings stamped further than this in the future"
    )
    overload_lag_s: float = Field(
        default=10.0,
        gt=0,
        description="overloaded when every pipeline pass in a check (about 1 s) scored readings whose "
        "newest was older than this in data time",
    )
    cadence_check: bool = Field(
        default=True,
        description="check each device's sample period against the model's (false: score every device "
        "whatever its cadence, e.g. for load tests that run faster than real time)",
    )
    cadence_tolerance: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="a device whose median step between readings is off the model's sample period by "
        "more than this fraction, and outside the training data's 5-95 % spread, is not scored "
        "(or is resampled)",
    )
    resample: Literal["off", "linear"] = Field(
        default="off",
        description='"linear": interpolate a device at the wrong cadence onto the model\'s sample '
        "period and score it, instead of not scoring it (CPU grows with the ratio of periods)",
    )

    @field_validator("device_id_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"expected a regular expression, {v!r} does not compile: {exc}") from None
        return v


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
        return _check_topic_template(v, 1)

    @field_validator("status_topic", "batch_topic")
    @classmethod
    def _plain_topic(cls, v: str) -> str:
        return _check_topic_template(v, 0)


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
    """The Prometheus endpoint."""

    enabled: bool = Field(default=True, description="serve /metrics over HTTP")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=9847, ge=0, le=65535, description="TCP port (0: any free port)")


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


def read_secret(file: Path | None, credential: str | None, what: str) -> str | None:
    """Read a secret from ``file`` or from systemd credential ``credential``; None if neither.

    The first line is the secret (a trailing newline is not part of it). Raises
    ``ConfigError`` (with ``what`` as key path) if the source cannot be read; the value is
    never logged nor put in a message.
    """
    if file is None and credential is None:
        return None
    if credential is not None:
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ConfigError(
                f"credential {credential!r} requested but $CREDENTIALS_DIRECTORY is not set "
                "(it is set by systemd's LoadCredential=)",
                what,
            )
        source = Path(base) / credential
    else:
        assert file is not None
        source = file
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read secret from {str(source)!r}: {exc.strerror}", what) from None
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {str(source)!r} is not UTF-8 text", what) from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ConfigError(f"secret file {str(source)!r} is empty", what)
    return secret
