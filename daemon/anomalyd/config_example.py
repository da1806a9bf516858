"""The commented example configuration, ``systemd/anomalyd.toml``, generated from the
pydantic models in ``anomalyd.config`` so that it lists every key with its default and
cannot drift from them (a test compares the committed file with ``render_example_config``).

Regenerate after changing a model: ``python -m anomalyd.config_example > systemd/anomalyd.toml``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from anomalyd.config import Config, ModelEntry, section_model
from anomalyd.paths import DEFAULT_MODEL_PATH

__all__ = ["render_example_config"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {value!r}")


def _render_section(
    model: type[BaseModel], name: str, commented: bool, out: list[str], intro: str | None = None
) -> None:
    out.append("")
    if intro:
        out.append(f"# {intro}")
    out.append(f"{'#' if commented else ''}[{name}]")
    if model.__doc__:
        out.append(f"# {model.__doc__.strip().splitlines()[0]}")
    subsections = []
    for field_name, info in model.model_fields.items():
        sub = section_model(model, field_name)
        if sub is not None:
            subsections.append((field_name, sub, info))
            continue
        out.append(f"# {info.description}")
        if info.is_required():
            out.append(f"#{field_name} = {_toml_value((info.examples or [None])[0])}  # example; required")
            continue
        default = info.get_default(call_default_factory=True)
        if default is None or default == DEFAULT_MODEL_PATH:
            # No TOML spelling for "unset", and the shipped model's absolute path is
            # machine-specific: show an example instead, to be uncommented and edited.
            example = (info.examples or [None])[0]
            said = "unset" if default is None else "the shipped model"
            out.append(f"#{field_name} = {_toml_value(example)}  # example; default: {said}")
        else:
            out.append(f"#{field_name} = {_toml_value(default)}")
    for field_name, sub, info in subsections:
        # Optional sub-tables ([mqtt.tls], [cluster.jetstream]) switch something on by being
        # there, so they stay commented.
        _render_section(sub, f"{name}.{field_name}", True, out, intro=f"{field_name}: {info.description}")


def _render_models_example(out: list[str]) -> None:
    """Several models (``[[models]]``): an example, as prose comments (``# key = ...``), since
    it replaces ``[model]`` rather than adding keys to the defaults above."""
    out += [
        "",
        "# Several models instead of [model]: one [[models]] table per model, each scoring the",
        "# devices whose id its glob patterns match (a device must match exactly one model).",
        "# Every key of [model] may be set per model; [models.detector] overrides keys of",
        "# [detector] for that model only. [model] and [[models]] together are an error.",
        "# [[models]]",
    ]
    examples = {"name": '"pumps"', "path": '"/var/lib/anomalyd/pumps.onnx"', "devices": '["pump-*"]'}
    for field_name, example in examples.items():
        out.append(f"# {field_name} = {example}  # {ModelEntry.model_fields[field_name].description}")
    out += ["# [models.detector]", "# k_enter = 5"]


def render_example_config() -> str:
    """The commented example configuration (``systemd/anomalyd.toml``), generated from the models."""
    out = [
        "# anomalyd configuration (TOML). Generated from anomalyd.config: every key, commented",
        "# out, with its default. Uncomment a key to change it; leave the rest as they are.",
        "# Relative paths are relative to this file's directory. Check with:",
        "#     anomalyd check-config /etc/anomalyd/anomalyd.toml",
        "# Secrets (MQTT password, TLS key passphrase) never go in this file: use the *_file",
        "# keys or systemd credentials (LoadCredential= in anomalyd.service, *_credential keys).",
    ]
    for name, info in Config.model_fields.items():
        sub = section_model(Config, name)
        assert sub is not None
        # An optional section ([cluster]) changes what the daemon does by being there: commented.
        optional = not info.is_required() and info.default is None
        _render_section(sub, name, optional, out, intro=f"{name}: {info.description}" if optional else None)
    _render_models_example(out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m anomalyd.config_example > systemd/anomalyd.toml
    print(render_example_config(), end="")
