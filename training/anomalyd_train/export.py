"""Export a trained network as one self-describing ONNX file, and check it.

The exported graph is the whole model: it takes raw windows ``window (batch, L, F)``,
normalises them, runs the network and computes the score; the TensorFlow function it is
converted from, and the score's definition, are in ``anomalyd_train.scoring``. The
contract (``anomalyd.contract.Contract``) goes into ``metadata_props``.

Every export is checked, and a failed check fails the export with
``ExportCheckError`` naming the check; nothing is written then. The checks are
plain functions so tests can feed them models that break them:

- ``check_onnx_checker``: ``onnx.checker.check_model`` (full) passes;
- ``check_fused_lstm``: exactly one fused ``LSTM`` op per Keras LSTM layer, and no
  ``Loop`` / ``Scan`` anywhere (those are what unrolled, masked or cuDNN-only layers
  turn into, and they run many times slower);
- ``check_parity``: ONNX Runtime's ``score`` and ``contributions`` match the
  TensorFlow scoring function on real windows within ``rtol``/``atol``;
- ``check_loads``: the written file loads with the daemon's own loader
  (``anomalyd.model.load_model``), which checks the contract against the graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from anomalyd.contract import (
    CONTRIBUTIONS_OUTPUT,
    INPUT_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    SCORE_OUTPUT,
    Contract,
)
from anomalyd.errors import AnomalydError
from anomalyd_train.scoring import FloatArray, ScoringFunction

_FORBIDDEN_OPS = ("Loop", "Scan")


class ExportCheckError(AnomalydError):
    """An export check failed; ``check`` names it. Nothing was written."""

    exit_code = 70  # EX_SOFTWARE: the trained artefact is wrong, not the user's input

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(f"export check {check!r} failed: {message}")


@dataclass(frozen=True)
class CheckResult:
    """One passed export check and what it measured, for the summary and the model card."""

    name: str
    detail: str


@dataclass
class ExportResult:
    """What ``export_model`` wrote and checked."""

    path: Path
    size_bytes: int
    contract: Contract
    checks: list[CheckResult] = field(default_factory=list)


def _rename_value(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def convert(scoring: ScoringFunction, opset: int) -> Any:
    """Convert the scoring function with tf2onnx; name the graph's input and outputs
    exactly as the contract says (``window``; ``score``, ``contributions``)."""
    import tensorflow as tf
    import tf2onnx

    # tf2onnx logs its graph surgery at INFO/WARNING ("TF freezing failed. Attempting
    # to fix ...", which it then does); the export checks below judge the result.
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.ERROR)
    try:
        proto, _ = tf2onnx.convert.from_function(
            scoring.fn,
            input_signature=[
                tf.TensorSpec((None, scoring.window_length, scoring.n_features), tf.float32, name=INPUT_NAME)
            ],
            opset=opset,
        )
    finally:
        tf2onnx_log.setLevel(level)
    graph = proto.graph
    if len(graph.input) != 1:
        raise ExportCheckError(
            "graph_io", f"expected one graph input, tf2onnx produced {[i.name for i in graph.input]}"
        )
    _rename_value(graph, graph.input[0].name, INPUT_NAME)
    # tf2onnx names outputs after the TF tensors ("Identity:0", ...); tell them apart by
    # rank rather than by order: score is (batch,), contributions (batch, F).
    by_rank = {len(o.type.tensor_type.shape.dim): o.name for o in graph.output}
    if len(graph.output) != 2 or sorted(by_rank) != [1, 2]:
        raise ExportCheckError(
            "graph_io",
            f"expected a rank-1 and a rank-2 output, tf2onnx produced {[o.name for o in graph.output]}",
        )
    _rename_value(graph, by_rank[1], SCORE_OUTPUT)
    _rename_value(graph, by_rank[2], CONTRIBUTIONS_OUTPUT)
    return proto


def _all_nodes(graph: Any) -> list[Any]:
    """Every node, including those inside subgraphs (If/Loop bodies)."""
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                nodes.extend(_all_nodes(attr.g))
            for sub in attr.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def op_counts(proto: Any) -> dict[str, int]:
    """How often each op type occurs in the model, subgraphs included."""
    counts: dict[str, int] = {}
    for node in _all_nodes(proto.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_onnx_checker(proto: Any) -> CheckResult:
    """``onnx.checker.check_model(full_check=True)`` must pass."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises ValidationError and friends; all mean "invalid"
        raise ExportCheckError("onnx_checker", str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    return CheckResult("onnx_checker", f"passed (opset {_opset(proto)}, ir {proto.ir_version})")


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_fused_lstm(proto: Any, expected_lstm_layers: int) -> CheckResult:
    """Exactly ``expected_lstm_layers`` fused ``LSTM`` ops and no ``Loop``/``Scan``."""
    counts = op_counts(proto)
    bad = {op: counts[op] for op in _FORBIDDEN_OPS if counts.get(op)}
    if bad:
        raise ExportCheckError(
            "fused_lstm",
            f"graph holds {bad}: a recurrent layer was not fused (unrolled, masked or "
            "cuDNN-only LSTM?); build LSTMs with use_cudnn=False, unroll=False, no masking",
        )
    n_lstm = counts.get("LSTM", 0)
    if n_lstm != expected_lstm_layers:
        raise ExportCheckError(
            "fused_lstm",
            f"graph holds {n_lstm} fused LSTM ops, the Keras model has {expected_lstm_layers} LSTM layers",
        )
    return CheckResult(
        "fused_lstm", f"{n_lstm} fused LSTM ops for {expected_lstm_layers} layers, no Loop/Scan"
    )


def _ort_session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def check_parity(
    model_bytes: bytes,
    reference: Callable[[FloatArray], tuple[FloatArray, FloatArray]],
    windows: FloatArray,
    rtol: float,
    atol: float,
) -> CheckResult:
    """ONNX Runtime's ``score`` and ``contributions`` equal ``reference``'s on ``windows``
    within ``|ort - ref| <= atol + rtol * |ref|`` (numpy's ``allclose`` rule)."""
    if len(windows) == 0:
        raise ExportCheckError("parity", "no windows to compare on")
    try:
        session = _ort_session(model_bytes)
        got_score, got_contrib = session.run(
            [SCORE_OUTPUT, CONTRIBUTIONS_OUTPUT], {INPUT_NAME: np.ascontiguousarray(windows, np.float32)}
        )
    except Exception as exc:  # ORT raises its own exception types; all mean "cannot run"
        raise ExportCheckError("parity", f"ONNX Runtime cannot run the graph: {exc}") from None
    ref_score, ref_contrib = reference(windows)
    worst_abs = 0.0
    worst_ratio = 0.0  # largest share of the allowed difference used by any value
    for name, got, ref in (
        (SCORE_OUTPUT, np.asarray(got_score), ref_score),
        (CONTRIBUTIONS_OUTPUT, np.asarray(got_contrib), ref_contrib),
    ):
        if got.shape != ref.shape:
            raise ExportCheckError(
                "parity", f"{name}: ONNX shape {got.shape} != TensorFlow shape {ref.shape}"
            )
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        allowed = atol + rtol * np.abs(ref.astype(np.float64))
        if not np.all(np.isfinite(got)) or np.any(diff > allowed):
            i = int(np.nanargmax(diff - allowed)) if np.all(np.isfinite(got)) else 0
            raise ExportCheckError(
                "parity",
                f"{name}: ONNX Runtime differs from TensorFlow beyond rtol={rtol:g} atol={atol:g} "
                f"on {int(np.sum(diff > allowed))} of {diff.size} values "
                f"(worst: {got.flat[i]!r} vs {ref.flat[i]!r})",
            )
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ratio = max(worst_ratio, float((diff / allowed).max()))
    return CheckResult(
        "parity",
        f"{len(windows)} windows, max |diff| {worst_abs:.2e}, "
        f"at most {worst_ratio:.0%} of the allowed atol {atol:g} + rtol {rtol:g}·|value|",
    )


def check_loads(path: Path) -> CheckResult:
    """The file loads with the daemon's loader, which checks the contract against the graph."""
    from anomalyd.model import SessionOptions, load_model

    try:
        loaded = load_model(path, SessionOptions(providers="cpu"))
    except AnomalydError as exc:
        raise ExportCheckError("daemon_loader", str(exc)) from None
    return CheckResult(
        "daemon_loader", f"anomalyd.model.load_model accepted it ({loaded.contract.model_version})"
    )


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the exported model."""
    versions: dict[str, str] = {}
    for dist in (
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "numpy",
        "anomalyd",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "tensorflow-cpu" in versions:  # one TensorFlow, whichever wheel provides it
        versions.setdefault("tensorflow", versions.pop("tensorflow-cpu"))
    return versions


def graph_digest(proto: Any) -> str:
    """sha256 of what the graph computes: every initializer's dtype, shape and bytes, the
    op types, and the input/output names and shapes (each sorted).

    Names are left out on purpose: tf2onnx names deduplicated constants differently from
    run to run, so a hash of the serialised graph would change between two exports of the
    same weights. This one does not, and any change of a weight changes it.
    """
    import onnx

    h = hashlib.sha256()
    blobs = sorted(
        f"{init.data_type}:{tuple(init.dims)}:".encode() + onnx.numpy_helper.to_array(init).tobytes()
        for init in proto.graph.initializer
    )
    for blob in blobs:
        h.update(hashlib.sha256(blob).digest())
    # Sorted, like the initializers: tf2onnx's node and output order can vary too.
    for op in sorted(node.op_type for node in proto.graph.node):
        h.update(op.encode() + b";")
    signature = []
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        signature.append(f"{value.name}{dims};")
    for item in sorted(signature):
        h.update(item.encode())
    return h.hexdigest()


def export_model(
    scoring: ScoringFunction,
    *,
    name: str,
    contract_fields: dict[str, Any],
    out_path: Path,
    opset: int,
    parity_windows: FloatArray,
    rtol: float,
    atol: float,
) -> ExportResult:
    """Convert, check and write the model to ``out_path``.

    ``contract_fields`` holds the contract fields that training knows (kind, features,
    window_length, threshold, normalisation, training_data, training_config); this
    function adds ``schema_version``, ``versions``, ``created`` and ``model_version`` =
    ``{name}-{first 12 hex of graph_digest}``, so two files with the same version hold
    the same weights, and re-exporting the same weights gives the same version. Raises
    ``ExportCheckError`` naming the first failed check; the file is then not written (an
    earlier file at ``out_path`` stays as it was).
    """
    import onnx

    from anomalyd import __version__

    proto = convert(scoring, opset)
    checks = [check_onnx_checker(proto), check_fused_lstm(proto, scoring.n_lstm_layers)]

    contract = Contract.model_validate(
        {
            **contract_fields,
            "schema_version": SCHEMA_VERSION,
            "model_version": f"{name}-{graph_digest(proto)[:12]}",
            "versions": library_versions(),
            "created": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
    )
    proto.producer_name = "anomalyd-train"
    proto.producer_version = __version__
    proto.doc_string = (
        f"anomalyd {contract.kind} model {contract.model_version}: raw windows "
        f"{INPUT_NAME} (batch, {contract.window_length}, {contract.n_features}) -> {SCORE_OUTPUT} (batch,), "
        f"{CONTRIBUTIONS_OUTPUT} (batch, {contract.n_features}). "
        f"Contract JSON in metadata_props[{METADATA_KEY!r}]."
    )
    onnx.helper.set_model_props(proto, {METADATA_KEY: contract.to_json()})
    model_bytes = proto.SerializeToString()
    checks.append(check_parity(model_bytes, scoring, parity_windows, rtol, atol))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename only after the daemon's loader accepted it,
    # so a failed export never leaves a half-checked model where the daemon looks.
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model_bytes)
        # mkstemp creates the file 0600; a model is meant to be read by the daemon's user.
        tmp.chmod(0o644)
        checks.append(check_loads(tmp))
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=out_path, size_bytes=len(model_bytes), contract=contract, checks=checks)
