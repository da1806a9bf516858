"""The ``[mqtt]`` section and its ``[mqtt.tls]`` table: the broker connection, the
credentials, TLS, and the telemetry subscription; and ``read_secret``, which reads the
broker password and the TLS key passphrase.

Separate because it is the one section that does more than declare keys: ``mqtt.host``
takes a broker address or URL (``anomalyd.config_addresses``), taken apart into host, port
and TLS before validation so that the MQTT link only ever sees a bare host; and it is the
only section with secrets. Those never live in the configuration: the password and the
passphrase come from a file or a systemd credential, and only ``read_secret`` (here,
because ``MqttConfig``'s accessors use it) ever reads them.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from anomalyd.config_addresses import check_host, parse_broker_address
from anomalyd.config_base import PathField, Section, check_topic_template
from anomalyd.errors import ConfigError

__all__ = ["MqttConfig", "TlsConfig", "read_secret"]

_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.@:\-]{1,255}$")


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
        return check_topic_template(v, 1)

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
