"""anomalyd_train: fit the LSTM on history and export one self-describing ONNX model.

The data side (``config``, ``data``, ``windows``) imports only numpy and pydantic, so that
validating a config or inspecting data stays fast; TensorFlow is imported by the modules
that train and export, and only when they are used. The runtime package ``anomalyd``
never imports this one.
"""

from __future__ import annotations

__all__: list[str] = []
