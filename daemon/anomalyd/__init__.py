"""anomalyd: the runtime package (MQTT intake, rolling windows, ONNX Runtime scoring).

This package must never import TensorFlow: it is what the daemon loads on start.
"""

__version__ = "0.1.0"
