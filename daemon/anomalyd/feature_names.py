"""The one rule that turns a CSV column name into a contract feature name.

Training (``anomalyd_train.config``) names a CSV's features with it, and the daemon's own
CSV reader (``anomalyd.csvdata``) uses it to find those features again in a recorded file,
so both must apply the same rule: it lives here, in the runtime package (which training
depends on, never the reverse), with nothing heavier than ``re`` so that training's config
module stays light.
"""

from __future__ import annotations

import re

__all__ = ["sanitise_feature_name"]

_CAMEL_LOWER = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_CAMEL_ACRONYM = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def sanitise_feature_name(column: str) -> str:
    """Turn a CSV column name into a contract feature name.

    ``"Volume Flow RateRMS"`` → ``"volume_flow_rate_rms"``, ``"Accelerometer1RMS"`` →
    ``"accelerometer1_rms"``. The result satisfies ``anomalyd.contract.Feature``'s name rule
    (letters, digits, ``_ . -``; starts with a letter or ``_``; at most 64 characters; not
    ``ts``), because telemetry payloads must use it as a JSON key.
    """
    name = _CAMEL_ACRONYM.sub("_", _CAMEL_LOWER.sub("_", column.strip()))
    name = _BAD.sub("_", name).lower()
    name = re.sub(r"_+", "_", name).strip("_")
    if not name:
        name = "feature"
    if not (name[0].isalpha() or name[0] == "_"):
        name = "_" + name
    name = name[:64]
    return "ts_" if name == "ts" else name
