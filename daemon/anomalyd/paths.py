"""Where anomalyd finds the files it ships, without importing anything heavy.

The configuration's defaults name the committed default model; keeping its path here
(and not in ``anomalyd.model``) means that reading and validating a configuration, and
rendering the config example, never import ONNX Runtime. (``anomalyd check-config`` does
load it, to check the model, but only once the file itself is valid.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["DEFAULT_MODEL_PATH"]


def _default_model_path() -> Path:
    """The committed default model: in a checkout (or editable install) it is
    ``exported_models/default/model.onnx`` beside ``daemon/``; a wheel install puts the same
    file under ``<prefix>/share/anomalyd/default/`` (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "exported_models" / "default" / "model.onnx"
    installed = Path(sys.prefix) / "share" / "anomalyd" / "default" / "model.onnx"
    return installed if not checkout.is_file() and installed.is_file() else checkout


#: Where the committed default model lives (see ``_default_model_path``).
DEFAULT_MODEL_PATH = _default_model_path()
