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

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from anomalyd.errors import ConfigError
from anomalyd.paths import DEFAULT_MODEL_PATH

__all__ = [
    "BatchingConfig",
    "BrokerAddress",
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
    "check_host",
    "parse_broker_address",
    "read_secret",
]

#: A path field: strings from TOML or the command line are welcome (strict mode would not take them).
PathField = Annotated[Path, Field(strict=False)]

_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.@:\-]{1,255}$")


class Section(BaseModel):
    # allow_inf_nan=False: no duration, size or rate of the daemon means anything at
    # infinity (an infinite drain timeout or queue size crashes the daemon, an infinite
    # delay never fires), and NaN compares false with every bound.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_default=True, frozen=True, allow_inf_nan=False
    )


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


# --------------------------------------------------------------------------- broker addresses

#: URL schemes of a broker address, as MQTT clients and tools write them (Paho, Telegraf,
#: Node-RED, mosquitto_sub -L): whether the scheme means TLS, and its default port.
_BROKER_SCHEMES: dict[str, tuple[bool, int]] = {
    "mqtt": (False, 1883),
    "tcp": (False, 1883),
    "mqtts": (True, 8883),
    "ssl": (True, 8883),
}
_WEBSOCKET_SCHEMES = ("ws", "wss")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?$")
_BROKER_FORMS = "HOST, HOST:PORT, [IPv6]:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A broker address taken apart: ``host`` (a name or an IP address, no brackets),
    ``port`` (None: not given) and ``tls`` (None: a bare host says nothing about TLS;
    True/False: the URL's scheme does)."""

    host: str
    port: int | None = None
    tls: bool | None = None
    scheme: str | None = None

    @property
    def default_port(self) -> int:
        """The port of the scheme (8883 for TLS, else 1883) when the address gives none."""
        return 8883 if self.tls else 1883


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name; ``ValueError`` saying why not.

    Names follow RFC 1123 (letters, digits, '-', dot-separated labels of at most 63
    characters), plus '_', which container and internal DNS names use. A name whose last
    label is all digits is taken for a mistyped IPv4 address, as resolvers would.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is allowed
    except ValueError:
        pass
    else:
        return host
    name = host.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"expected a host name or an IP address, got {host!r}")
    if labels[-1].isdigit():
        raise ValueError(f"expected a host name or an IP address, {host!r} is neither (not a valid IPv4)")
    return host


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"expected a port between 1 and 65535 in {address!r}, got {text!r}")
    return int(text)


def _host_and_port(text: str, address: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``IPv6``, ``[IPv6]`` or ``[IPv6]:PORT`` → (host, port or None)."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6] or [IPv6]:PORT, got {address!r}")
        try:
            ipaddress.IPv6Address(inside.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"expected an IPv6 address between '[' and ']', got {address!r}") from None
        return inside, _port(rest[1:], address) if rest else None
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            raise ValueError(
                f"expected one of {_BROKER_FORMS}, got {address!r}: more than one ':' (an IPv6 "
                "address with a port is written [ADDRESS]:PORT)"
            ) from None
        return text, None
    host, colon, port = text.partition(":")
    return check_host(host), _port(port, address) if colon else None


def parse_broker_address(text: str) -> BrokerAddress:
    """A broker address as people write it: a host name or IP address, ``HOST:PORT``,
    ``[IPv6]:PORT``, or a URL ``mqtt://`` / ``tcp://`` (plain TCP) or ``mqtts://`` /
    ``ssl://`` (TLS) ``HOST[:PORT]``. ``ValueError`` says what is wrong and which form
    works: websockets (``ws://``, ``wss://``) are refused, anomalyd speaks MQTT over TCP.
    """
    text = text.strip()
    if "://" not in text:
        host, port = _host_and_port(text, text)
        return BrokerAddress(host, port)
    scheme = text.partition("://")[0].lower()
    if scheme in _WEBSOCKET_SCHEMES:
        tls = scheme == "wss"
        raise ValueError(
            f"MQTT over websockets ({scheme}://) is not supported: anomalyd connects to the "
            f"broker's MQTT TCP listener; write {'mqtts' if tls else 'mqtt'}://HOST:"
            f"{8883 if tls else 1883} (the broker's {'TLS ' if tls else ''}MQTT port), got {text!r}"
        )
    if scheme not in _BROKER_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme + '://'!r}: expected mqtt:// or tcp:// (plain TCP), "
            f"mqtts:// or ssl:// (TLS), or a bare host name, got {text!r}"
        )
    url = urlsplit(text)
    if "@" in url.netloc:
        raise ValueError(
            "a user name or password does not go in the broker address: set mqtt.username and "
            "mqtt.password_file or mqtt.password_credential"
        )
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"expected {scheme}://HOST[:PORT] with nothing after it, got {text!r}")
    if not url.netloc:
        raise ValueError(f"expected a host after {scheme}://, got {text!r}")
    host, port = _host_and_port(url.netloc, text)
    return BrokerAddress(host, port, tls=_BROKER_SCHEMES[scheme][0], scheme=scheme)


@dataclass(frozen=True, slots=True)
class _BadBrokerAddress:
    """Stands in for ``mqtt.host`` when ``MqttConfig`` could not take the address apart, so
    that the problem is reported at ``mqtt.host`` (a model validator's error has no key)."""

    message: str


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

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="broker: a host name or IP address, HOST:PORT, [IPv6]:PORT, or a URL HOST[:PORT] with "
        "mqtt:// or tcp:// (plain TCP) or mqtts:// or ssl:// (TLS on; default port 8883); "
        "ws:// and wss:// are refused (anomalyd speaks MQTT over TCP)",
    )
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

    @model_validator(mode="before")
    @classmethod
    def _broker_url(cls, data: Any) -> Any:
        """``host`` may be a URL or ``HOST:PORT`` (see ``parse_broker_address``): take it
        apart into ``host``, ``port`` and ``tls`` here, so the MQTT link only ever sees a
        bare host. ``mqtts://`` turns TLS on (an empty ``[mqtt.tls]`` if there is none);
        a port given twice must agree."""
        if not isinstance(data, dict) or not isinstance(data.get("host"), str):
            return data
        try:
            address = parse_broker_address(data["host"])
        except ValueError as exc:
            return {**data, "host": _BadBrokerAddress(str(exc))}
        out = {**data, "host": address.host}
        port = data.get("port")
        port_given = "port" in data and isinstance(port, int) and not isinstance(port, bool)
        if address.port is not None:
            if port_given and port != address.port:
                problem = (
                    f"the address gives port {address.port} but mqtt.port is {port}: give the port "
                    "once (in the address or in mqtt.port)"
                )
                return {**data, "host": _BadBrokerAddress(problem)}
            if "port" not in data or port_given:
                out["port"] = address.port  # else mqtt.port's own error is reported
        elif address.scheme is not None and "port" not in data:
            out["port"] = address.default_port
        tls_given = data.get("tls") is not None
        if address.tls is True and not tls_given:
            out["tls"] = {}
        elif address.tls is False and tls_given:
            rest = data["host"].strip().split("://", 1)[1]
            problem = (
                f"{address.scheme}:// is plain TCP but [mqtt.tls] is set: write mqtts://{rest} "
                "for TLS, or remove [mqtt.tls]"
            )
            return {**data, "host": _BadBrokerAddress(problem)}
        return out

    @field_validator("host", mode="before")
    @classmethod
    def _host_was_taken_apart(cls, v: object) -> object:
        if isinstance(v, _BadBrokerAddress):
            raise ValueError(v.message)
        return v

    @field_validator("host")
    @classmethod
    def _host_is_a_host(cls, v: str) -> str:
        # Set directly (MqttConfig(host=...)) rather than through _broker_url, it must still
        # be a bare host.
        return check_host(v)

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
        default=10000,
        ge=1,
        le=10_000_000,
        description="devices tracked at once; newcomers may push out only devices on probation "
        "(stream.probation_slots)",
    )
    max_gap_s: float = Field(
        default=60.0, gt=0, description="a gap longer than this between readings restarts the device's window"
    )
    idle_evict_s: float = Field(default=3600.0, gt=0, description="forget a device silent for this long")
    # Admission (anomalyd.device_slots): a burst of unknown ids must not push out real devices.
    probation_slots: int | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="slots held back for new devices on probation (until they have sent a full window); "
        "newcomers push out only devices on probation, never established ones (unset: max_devices / 10)",
        examples=[1000],
    )
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
    # Both keys are applied by anomalyd.decode, whose docstring says what they mean.
    device_id_pattern: str = Field(
        default=r"^[A-Za-z0-9_.:\-]{1,64}$",
        description="regular expression the whole device id must match; whatever it says, '.', '..' and "
        "ids holding '+', '#', '/' or a non-printable character are refused",
    )
    max_future_skew_s: float = Field(
        default=5.0,
        gt=0,
        description="reject readings stamped further than this ahead of their arrival (reason future); "
        "keep it small: a reading that gets in holds back the device's earlier-stamped ones "
        "(out_of_order) until real time catches up",
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

    @field_validator("intake_queue_mib")
    @classmethod
    def _queue_holds_a_message(cls, v: float, info: ValidationInfo) -> float:
        # A queue smaller than one message of the largest accepted size (plus a topic, which
        # MQTT bounds at 64 KiB) would drop every such message, however idle the daemon.
        largest = info.data.get("max_payload_bytes")
        if largest is not None and v * 2**20 < largest + 65536:
            need = (largest + 65536) / 2**20
            raise ValueError(
                f"expected room for one message of stream.max_payload_bytes ({largest} bytes) and "
                f"its topic: at least {need:.3g} MiB, got {v:g}"
            )
        return v

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
        # Scores are >= 0: a threshold at or below 0 would hold every device in alert.
        if v is not None and v <= 0:
            raise ValueError(f"expected a threshold > 0 (scores are never negative), got {v}")
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
