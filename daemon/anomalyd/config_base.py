"""What every configuration section module shares: the ``Section`` base model (strict
scalars, unknown keys forbidden, frozen, no infinity or NaN), ``PathField`` for path keys,
and ``check_topic_template``, the rule for MQTT topic templates that both the telemetry
subscription (``[mqtt]``) and the published topics (``[output]``) follow.

Separate so that the section modules (``config_mqtt``, ``config_stream``,
``config_sections``) build on one base and never import one another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PathField", "Section", "check_topic_template"]

#: A path field: strings from TOML or the command line are welcome (strict mode would not take them).
PathField = Annotated[Path, Field(strict=False)]


class Section(BaseModel):
    # allow_inf_nan=False: no duration, size or rate of the daemon means anything at
    # infinity (an infinite drain timeout or queue size crashes the daemon, an infinite
    # delay never fires), and NaN compares false with every bound.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_default=True, frozen=True, allow_inf_nan=False
    )


def check_topic_template(v: str, placeholders: int) -> str:
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
