"""The daemon must never import TensorFlow (or the other training-only libraries)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "onnx", "scipy", "matplotlib")

_PROBE = """
import importlib, json, pkgutil, sys
import anomalyd
names = sorted(m.name for m in pkgutil.walk_packages(anomalyd.__path__, "anomalyd."))
for name in names:
    if name != "anomalyd.__main__":
        importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_importing_every_runtime_module_loads_no_training_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert "anomalyd.model" in report["modules"]
    loaded = set(report["loaded"])
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert bad == [], f"runtime package imported training-only modules: {bad[:10]}"


_CHECK_CONFIG = """
import json, sys
from anomalyd.cli import main
code = main(["check-config", sys.argv[1]])
print(json.dumps({"code": code, "loaded": sorted(sys.modules)}))
"""


def test_check_config_loads_no_training_library(tmp_path: Path) -> None:
    """Checking a configuration loads the model as the start does (ONNX Runtime), and
    nothing the start would not."""
    cfg = tmp_path / "anomalyd.toml"
    cfg.write_text('[mqtt]\nhost = "broker.example"\n[batching]\nmax_batch = 32\n')
    out = subprocess.run(
        [sys.executable, "-c", _CHECK_CONFIG, str(cfg)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["code"] == 0
    loaded = {m.split(".")[0] for m in report["loaded"]}
    assert "onnxruntime" in loaded
    assert sorted(loaded & set(FORBIDDEN)) == []
