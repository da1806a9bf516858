"""Pydantic validation errors as ``ConfigError``s: the key path, and what was expected there.

One formatter for every configuration made of pydantic models (the daemon's ``anomalyd.toml``,
the training config, the benchmark config and the daemon tables inside it), so the same
mistake reads the same everywhere: an unknown key lists the keys allowed at that place in the
schema that was validated, with the closest one as a suggestion.

Imports pydantic only (besides ``anomalyd.errors``): validating a training config must not
pay for the daemon's runtime.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from anomalyd.errors import ConfigError

__all__ = ["validation_errors"]


def _sub_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model class of a sub-section field (unwrapping ``X | None``), or None for scalars."""
    ann = model.model_fields[name].annotation
    for cand in (ann, *get_args(ann)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _key_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """Dotted key path of a pydantic error location (``mqtt.tls.ca_file``, ``sizes[1]``).

    ``prefix`` is the path of the table that was validated, when it is not the file's root.
    """
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "(" in part:
            continue  # pydantic's union/function tags, not keys
        else:
            out += f".{part}" if out else part
    return out


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model of the table at ``loc`` in ``root``'s schema; None where it is not a table."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return model
        model = _sub_model(model, part)
    return model


def _unknown_key(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    parent = _model_at(root, loc[:-1]) or root
    allowed = sorted(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    # A table whose every key is itself a table (the daemon's top level) holds sections.
    sections = all(_sub_model(parent, name) is not None for name in allowed)
    what = "section" if sections and allowed else "key"
    return f"unknown {what} (expected one of: {', '.join(allowed)}){hint}"


def _describe(err: Any, root: type[BaseModel]) -> str:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(root, loc)
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = re.sub(r"^Input should be ", "expected ", msg)
    if kind != "value_error" and msg.startswith("expected") and "input" in err:
        got = repr(err["input"])
        msg += f", got {got if len(got) <= 80 else got[:77] + '...'}"
    return msg


def validation_errors(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> list[ConfigError]:
    """One ``ConfigError`` per problem in ``exc``, raised by validating ``root``.

    Each names its full key path (under ``prefix``, the path of the validated table within
    its file, e.g. ``"daemon"``); an unknown key lists the keys ``root``'s schema allows in
    its table, and the closest of them.
    """
    return [
        ConfigError(_describe(err, root), _key_path(tuple(err["loc"]), prefix) or None)
        for err in exc.errors(include_url=False)
    ]
