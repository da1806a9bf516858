"""A tiny, hand-built ONNX model that satisfies the anomalyd model contract.

Tests use it wherever they need a real ONNX Runtime session but not a trained LSTM:
the graph is a few ops, builds in milliseconds and has a score that tests can compute
by hand:

    last = window[:, L-1, :]                  # (batch, F), raw units
    contributions = last ** 2 / F             # (batch, F)
    score = sum(contributions, axis=1)        # (batch,) == mean of squared last-step values

so ``sum(contributions) == score`` as the real models promise. Only tests import this
module (it needs ``onnx``, which the runtime package must never import).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from anomalyd.contract import (
    CONTRIBUTIONS_OUTPUT,
    INPUT_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    SCORE_OUTPUT,
)

#: Pass as a value in ``contract_overrides`` to delete that key from the contract.
DROP = object()

_UNITS = {"temperature": "degC", "pressure": "kPa", "vibration": "g"}

# ONNX Runtime reads IR versions up to what it was built with; pin an old, widely read
# one so the file does not depend on which onnx release wrote it.
_IR_VERSION = 8
_OPSET = 17


def tiny_contract(
    window_length: int = 8,
    features: tuple[str, ...] | list[str] = ("temperature", "pressure", "vibration"),
    threshold: float = 1.0,
    contract_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The contract document (as a dict) that ``build_tiny_model`` stores.

    ``contract_overrides`` replaces top-level keys; a value of ``DROP`` removes the key.
    """
    f = len(features)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "forecast",
        "model_version": "tiny-test-1",
        "features": [{"name": n, "unit": _UNITS.get(n, "")} for n in features],
        "window_length": window_length,
        "threshold": {"value": threshold, "method": "manual", "note": "tiny test model"},
        "score": "mean over features of squared last-step raw values (test model)",
        "normalisation": {"mean": [0.0] * f, "std": [1.0] * f},
        "training_data": {
            "source": "none (hand-built test model)",
            "sha256": hashlib.sha256(b"tiny").hexdigest(),
            "rows": 0,
            "segments": 0,
            "train_windows": 0,
            "validation_windows": 0,
        },
        "training_config": {},
        "versions": {"onnx": onnx.__version__},
        "created": "2024-11-24T12:00:00Z",
    }
    for key, value in (contract_overrides or {}).items():
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = copy.deepcopy(value)
    return doc


def build_tiny_model(
    path: str | Path,
    window_length: int = 8,
    features: tuple[str, ...] | list[str] = ("temperature", "pressure", "vibration"),
    threshold: float = 1.0,
    contract_overrides: dict[str, Any] | None = None,
    *,
    raw_contract: str | bytes | None = None,
    include_contract: bool = True,
) -> Path:
    """Write the tiny model to ``path`` and return it.

    ``contract_overrides`` changes top-level contract keys (``DROP`` deletes one), so a
    test can make the contract disagree with the graph (e.g. ``{"window_length": 9}``:
    the graph keeps ``window_length``). ``raw_contract`` stores that text verbatim
    (malformed-JSON tests); ``include_contract=False`` leaves the metadata out.
    """
    path = Path(path)
    f = len(features)
    last = window_length - 1
    inits = [
        numpy_helper.from_array(np.array([last], dtype=np.int64), "last_start"),
        numpy_helper.from_array(np.array([last + 1], dtype=np.int64), "last_end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(float(f), dtype=np.float32), "n_features"),
    ]
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "last_start", "last_end", "axis1"], ["last3d"]),
        helper.make_node("Squeeze", ["last3d", "axis1"], ["last"]),
        helper.make_node("Mul", ["last", "last"], ["squared"]),
        helper.make_node("Div", ["squared", "n_features"], [CONTRIBUTIONS_OUTPUT]),
        helper.make_node("ReduceSum", [CONTRIBUTIONS_OUTPUT, "axis1"], [SCORE_OUTPUT], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "anomalyd_tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", window_length, f])],
        [
            helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(CONTRIBUTIONS_OUTPUT, TensorProto.FLOAT, ["batch", f]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="anomalyd-tests"
    )
    model.ir_version = _IR_VERSION
    if raw_contract is not None:
        text = raw_contract.decode() if isinstance(raw_contract, bytes) else raw_contract
        helper.set_model_props(model, {METADATA_KEY: text})
    elif include_contract:
        doc = tiny_contract(window_length, features, threshold, contract_overrides)
        helper.set_model_props(model, {METADATA_KEY: json.dumps(doc)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def tiny_scores(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the tiny model computes, in numpy: ``(score, contributions)``."""
    last = np.asarray(windows, dtype=np.float32)[:, -1, :]
    contributions = last * last / np.float32(last.shape[1])
    return contributions.sum(axis=1, dtype=np.float32), contributions
