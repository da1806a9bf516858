"""Configuration: declared once (pydantic models), checked once, with key paths in errors.

This module is the public entry: ``Config``, ``load_config``, ``config_errors``, and the
section models re-exported from where they are declared (``config_mqtt``: ``[mqtt]`` and
TLS; ``config_stream``: ``[stream]``; ``config_sections``: the smaller sections; all on
``config_base.Section``).

Every section is a pydantic model with ``extra="forbid"``; defaults are the embedded
defaults, so ``Config()`` is what ``anomalyd run`` uses without a file. Scalars are
strict (``port = "1883"`` or ``enabled = "yes"`` in the TOML is an error, not a guess);
paths accept strings. Relative paths in a file are relative to that file's directory
(systemd starts services in ``/``); relative paths in overrides (the command line) are
relative to the working directory.

Secrets never live in the configuration: the MQTT password and the TLS key passphrase
come from a file (``password_file``) or a systemd credential (``password_credential``,
read from ``$CREDENTIALS_DIRECTORY``), and only ``read_secret`` ever reads them. A
``password`` key in the TOML is rejected with a message that says where it belongs.

``anomalyd.config_example`` generates ``systemd/anomalyd.toml`` from these models, and a
test checks the committed file against it, so the example cannot drift.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from anomalyd.config_base import Section
from anomalyd.config_cluster import ClusterConfig, JetStreamConfig
from anomalyd.config_errors import validation_errors
from anomalyd.config_mqtt import MqttConfig, TlsConfig, read_secret
from anomalyd.config_sections import (
    BatchingConfig,
    CommandsConfig,
    DetectorConfig,
    HomeAssistantConfig,
    LoggingConfig,
    MetricsConfig,
    ModelEntry,
    ModelSection,
    OutputConfig,
    ShutdownConfig,
    StateConfig,
)
from anomalyd.config_stream import StreamConfig
from anomalyd.errors import ConfigError
from anomalyd.globs import overlap_witness

__all__ = [
    "BatchingConfig",
    "ClusterConfig",
    "CommandsConfig",
    "Config",
    "DetectorConfig",
    "HomeAssistantConfig",
    "JetStreamConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelEntry",
    "ModelSection",
    "MqttConfig",
    "MultiModelConfig",
    "OutputConfig",
    "ShutdownConfig",
    "StateConfig",
    "StreamConfig",
    "TlsConfig",
    "config_errors",
    "load_config",
    "model_entries",
    "read_secret",
    "section_model",
]

#: Keys that would hold a secret in the TOML, and where the secret belongs instead.
_FORBIDDEN_SECRET_KEYS: dict[tuple[str, ...], str] = {
    ("mqtt", "password"): (
        "a password must not be written in the configuration file; put it in a file readable only "
        "by anomalyd and set mqtt.password_file, or use systemd's LoadCredential= and set "
        "mqtt.password_credential"
    ),
    ("mqtt", "tls", "key_passphrase"): (
        "a key passphrase must not be written in the configuration file; set "
        "mqtt.tls.key_passphrase_file, or use systemd's LoadCredential= and set "
        "mqtt.tls.key_passphrase_credential"
    ),
}


class Config(Section):
    """The whole configuration; ``Config()`` is the embedded default."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT broker and subscription")
    model: ModelSection = Field(default_factory=ModelSection, description="the ONNX model")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="input limits and windows")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="dynamic batching")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="thresholds and alerts")
    output: OutputConfig = Field(default_factory=OutputConfig, description="published topics")
    commands: CommandsConfig = Field(default_factory=CommandsConfig, description="operator commands")
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery"
    )
    state: StateConfig = Field(default_factory=StateConfig, description="snapshots across restarts")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="logging")
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig, description="shutdown")
    cluster: ClusterConfig | None = Field(
        default=None,
        description="one instance of a partitioned fleet (NATS); absent: this daemon scores every device",
    )

    @model_validator(mode="after")
    def _cluster_fits_the_other_sections(self) -> Config:
        """Checks across sections for ``[cluster]``, each reported at the key to change."""
        cluster = self.cluster
        if cluster is None:
            return self
        problems: list[InitErrorDetails] = []
        if self.mqtt.protocol != "3.1.1":
            problems.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "value_error",
                        "a [cluster] instance talks to NATS's MQTT gateway, which speaks MQTT 3.1.1 "
                        'only: set protocol = "3.1.1"',
                    ),
                    loc=("mqtt", "protocol"),
                    input=self.mqtt.protocol,
                )
            )
        # The instance's status topic (anomalyd.publisher.instance_status_topic) must not be a
        # device topic of its own subscriptions or outputs: "anomaly/status/alert" would be
        # read back as the alert state of a device called "status".
        status = f"{self.output.status_topic}/{cluster.instance_name()}"
        for key in ("alert_topic", "score_topic"):
            template = getattr(self.output, key)
            if _fits_template(status, template):
                problems.append(
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "value_error",
                            f"the status topic of this instance, {status!r}, is also a topic of "
                            f"output.{key}: choose another cluster.name",
                        ),
                        loc=("cluster", "name"),
                        input=cluster.name,
                    )
                )
        if problems:
            # A ValidationError (not a ValueError) keeps each problem's own key path.
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def detector_for(self, entry: ModelEntry) -> DetectorConfig:
        """The ``[detector]`` a ``[[models]]`` entry runs with: the top-level one, with the
        keys the entry sets itself in its place."""
        own = entry.detector
        if own is None:
            return self.detector
        merged = self.detector.model_dump() | own.model_dump(include=own.model_fields_set)
        return DetectorConfig.model_validate(merged)

    def for_model(self, entry: ModelEntry) -> Config:
        """This configuration as one ``[[models]]`` entry's pipeline sees it: a plain
        ``Config`` with the entry as ``[model]`` and its ``[detector]``."""
        section = ModelSection.model_validate(
            entry.model_dump(include=set(ModelSection.model_fields)), strict=False
        )
        parts = {name: getattr(self, name) for name in Config.model_fields}
        return Config(**parts | {"model": section, "detector": self.detector_for(entry)})


class MultiModelConfig(Config):
    """A configuration with several models (``[[models]]``, instead of ``[model]``): each
    entry scores the devices its globs match (``anomalyd.routing``).

    A subclass rather than a field of ``Config``: a lone ``[model]`` stays exactly what it
    was (the same schema, example file and reload keys); ``load_config`` validates a file
    with a ``[[models]]`` table against this one."""

    models: list[ModelEntry] = Field(
        min_length=1,
        description="several models, each scoring the devices its globs match ([[models]]; "
        "instead of [model])",
    )

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> MultiModelConfig:
        if "model" in self.model_fields_set:
            raise ValueError("[model] and [[models]] do not go together: make every model a [[models]] entry")
        seen_names: set[str] = set()
        for entry in self.models:
            if entry.name in seen_names:
                raise ValueError(f"two [[models]] entries are named {entry.name!r}")
            seen_names.add(entry.name)
        # A device id two models' globs both match would have two owners: refuse the file,
        # naming such an id. (Decided exactly, anomalyd.globs; the router still counts an
        # ambiguous device as a rejection, should one ever get through.)
        for k, first in enumerate(self.models):
            for second in self.models[k + 1 :]:
                for p in first.devices:
                    for q in second.devices:
                        witness = overlap_witness(p, q)
                        if witness is not None:
                            raise ValueError(
                                f"device patterns {p!r} (model {first.name!r}) and {q!r} (model "
                                f"{second.name!r}) both match {witness!r}: a device must match "
                                "exactly one model"
                            )
        return self


def _fits_template(topic: str, template: str) -> bool:
    """Whether ``topic`` is ``template`` with some device id as its ``{device}`` level."""
    prefix, _, suffix = template.partition("{device}")
    device = topic[len(prefix) : len(topic) - len(suffix)]
    return (
        len(topic) > len(prefix) + len(suffix)
        and topic.startswith(prefix)
        and topic.endswith(suffix)
        and "/" not in device
    )


def model_entries(config: Config) -> list[ModelEntry] | None:
    """The ``[[models]]`` entries of a configuration with several models; None for a lone ``[model]``."""
    return config.models if isinstance(config, MultiModelConfig) else None


# --------------------------------------------------------------------------- loading


def section_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model class of a sub-section field (unwrapping ``X | None``), or None for scalars."""
    ann = model.model_fields[name].annotation
    for cand in (ann, *get_args(ann)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _table_array_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of an array-of-tables field (``list[X] | None``), or None for any other."""
    for cand in (model.model_fields[name].annotation, *get_args(model.model_fields[name].annotation)):
        for item in get_args(cand) if get_origin(cand) is list else ():
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def _is_path_field(model: type[BaseModel], name: str) -> bool:
    ann = model.model_fields[name].annotation
    # Optional fields keep the Annotated wrapper inside the union: unwrap one level more.
    return ann is Path or any(a is Path or Path in get_args(a) for a in get_args(ann))


def _resolve_paths(raw: dict[str, Any], model: type[BaseModel], base: Path) -> None:
    """Make relative path strings in a file's tables relative to the file's directory."""
    for key, value in raw.items():
        if key not in model.model_fields:
            continue  # reported as unknown by validation
        sub = section_model(model, key) or _table_array_model(model, key)
        if sub is not None and isinstance(value, dict):
            _resolve_paths(value, sub, base)
        elif sub is not None and isinstance(value, list):  # an array of tables: [[models]]
            for item in value:
                if isinstance(item, dict):
                    _resolve_paths(item, sub, base)
        elif _is_path_field(model, key) and isinstance(value, str) and not Path(value or "/").is_absolute():
            raw[key] = str(base / value)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(p)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {str(p)!r} is not UTF-8 text") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(p)!r} is not valid TOML: {exc}") from None
    _resolve_paths(raw, _schema(raw), p.resolve().parent)
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, object]) -> None:
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("is not a table, cannot set a key inside it", ".".join(parts[: i + 1]))
            node = child
        node[parts[-1]] = value


def _pop_secrets(raw: dict[str, Any]) -> list[ConfigError]:
    errors = []
    for keys, message in _FORBIDDEN_SECRET_KEYS.items():
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            del node[keys[-1]]  # so that its value never reaches an error message
            errors.append(ConfigError(message, ".".join(keys)))
    return errors


def _schema(raw: dict[str, Any]) -> type[Config]:
    """The model a file's tables are validated against: ``[[models]]`` picks the several-model one."""
    return MultiModelConfig if "models" in raw else Config


def _validate(raw: dict[str, Any]) -> tuple[Config | None, list[ConfigError]]:
    errors = _pop_secrets(raw)
    schema = _schema(raw)
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as exc:
        return None, errors + validation_errors(exc, schema)
    return (cfg, errors) if not errors else (None, errors)


def config_errors(
    path: str | os.PathLike[str] | None, overrides: dict[str, object] | None = None
) -> list[ConfigError]:
    """Every problem with a configuration file (and overrides), for ``anomalyd check-config``.

    Returns an empty list when the configuration is valid. File-level problems (unreadable,
    not TOML) come back as a single error without a key path.
    """
    try:
        raw = _read_toml(path) if path is not None else {}
        _apply_overrides(raw, overrides or {})
    except ConfigError as exc:
        return [exc]
    return _validate(raw)[1]


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, object] | None = None
) -> Config:
    """Read, merge and validate: the embedded defaults, then ``path`` (TOML), then ``overrides``.

    ``overrides`` use dotted keys (``{"mqtt.port": 1884, "model.path": "x.onnx"}``).
    Raises ``ConfigError`` naming the key path of the first problem (and how many more
    there are).
    """
    raw = _read_toml(path) if path is not None else {}
    _apply_overrides(raw, overrides or {})
    cfg, errors = _validate(raw)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more; run `anomalyd check-config`)" if len(errors) > 1 else ""
        msg = str(first)
        if first.key_path:
            msg = msg.removeprefix(f"{first.key_path}: ")
        raise ConfigError(msg + more, first.key_path)
    assert cfg is not None
    return cfg
