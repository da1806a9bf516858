"""Loading an exported model: read the file, check its contract against its graph, and
run it in ONNX Runtime.

``load_model`` is the only way the daemon gets a model; it refuses a model whose
contract is missing, malformed or disagrees with the graph, naming the field at fault.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from anomalyd.contract import (
    CONTRIBUTIONS_OUTPUT,
    INPUT_NAME,
    METADATA_KEY,
    SCORE_OUTPUT,
    Contract,
)
from anomalyd.errors import ModelContractError, ProviderError
from anomalyd.paths import DEFAULT_MODEL_PATH

# DEFAULT_MODEL_PATH is re-exported: callers that load the default model find it here too.
__all__ = ["DEFAULT_MODEL_PATH", "LoadedModel", "SessionOptions", "load_model", "read_contract"]

log = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "cpu", "cuda"]

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class SessionOptions:
    providers: ProviderChoice = "auto"
    intra_op_threads: int = 1
    # ORT's idle worker threads busy-wait by default, taking a core from the MQTT
    # thread on small machines (measured on 2 cores: 114 % vs 23 % CPU at the same load).
    allow_spinning: bool = False


class LoadedModel:
    """An ONNX Runtime session together with the contract it was checked against."""

    def __init__(self, path: Path, session: ort.InferenceSession, contract: Contract) -> None:
        self.path = path
        self.session = session
        self.contract = contract
        self.window_length = contract.window_length
        self.n_features = contract.n_features
        self.providers: list[str] = list(session.get_providers())
        self._outputs = [SCORE_OUTPUT, CONTRIBUTIONS_OUTPUT]

    @property
    def active_provider(self) -> str:
        """``"cuda"`` or ``"cpu"``: what really runs the graph (first provider wins)."""
        return "cuda" if self.providers and self.providers[0] == _CUDA else "cpu"

    def run(
        self, windows: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Score a batch of raw windows ``(B, L, F)``; returns ``score (B,)``, ``contributions (B, F)``."""
        if windows.dtype != np.float32:
            windows = windows.astype(np.float32)
        if windows.ndim != 3 or windows.shape[1:] != (self.window_length, self.n_features):
            raise ValueError(
                f"windows must be (batch, {self.window_length}, {self.n_features}), got {windows.shape}"
            )
        score, contributions = self.session.run(self._outputs, {INPUT_NAME: windows})
        return np.asarray(score, dtype=np.float32), np.asarray(contributions, dtype=np.float32)

    def warm_up(self, batch_sizes: list[int] | tuple[int, ...]) -> None:
        """Run every batch shape once so the first real batch pays no allocation cost."""
        norm = self.contract.normalisation
        typical = np.asarray(norm.mean, dtype=np.float64)
        if norm.log_offset is not None:
            # A log-scaled feature's mean is of log(x + offset): back to raw units.
            offset = np.asarray(norm.log_offset, dtype=np.float64)
            typical = np.where(offset > 0, np.exp(typical) - offset, typical)
        for b in batch_sizes:
            self.run(
                np.zeros((b, self.window_length, self.n_features), dtype=np.float32)
                + typical.astype(np.float32)
            )


def read_contract(path: str | os.PathLike[str]) -> Contract:
    """Read only the contract from a model file (CPU session, no graph checks)."""
    p = Path(path)
    if not p.is_file():
        raise ModelContractError("no such model file", path=str(p))
    try:
        session = ort.InferenceSession(str(p), providers=[_CPU])
    except Exception as exc:
        raise ModelContractError(f"ONNX Runtime cannot load the file: {exc}", path=str(p)) from None
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ModelContractError("missing from metadata_props", field=METADATA_KEY, path=str(p))
    return Contract.from_json(meta[METADATA_KEY], path=str(p))


def _dims(node_arg: Any) -> list[int | str | None]:
    return list(node_arg.shape) if node_arg.shape is not None else []


def check_graph(session: ort.InferenceSession, contract: Contract, path: str) -> None:
    """Raise ``ModelContractError`` if the graph's inputs/outputs disagree with the contract."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelContractError(
            f"graph must have exactly one input {INPUT_NAME!r}, has {[i.name for i in inputs]}",
            field="graph.inputs",
            path=path,
        )
    inp = inputs[0]
    if inp.name != INPUT_NAME:
        raise ModelContractError(
            f"graph input is {inp.name!r}, expected {INPUT_NAME!r}", field="graph.inputs.name", path=path
        )
    if inp.type != "tensor(float)":
        raise ModelContractError(
            f"graph input type is {inp.type}, expected tensor(float)", field="graph.inputs.type", path=path
        )
    dims = _dims(inp)
    if len(dims) != 3:
        raise ModelContractError(
            f"graph input has rank {len(dims)}, expected 3 (batch, L, F)",
            field="graph.inputs.rank",
            path=path,
        )
    if isinstance(dims[0], int) and dims[0] != -1:
        raise ModelContractError(
            f"graph input batch dimension is fixed at {dims[0]}, must be dynamic",
            field="graph.inputs.batch",
            path=path,
        )
    if dims[1] != contract.window_length:
        raise ModelContractError(
            f"contract says {contract.window_length}, graph input has {dims[1]}",
            field="window_length",
            path=path,
        )
    if dims[2] != contract.n_features:
        raise ModelContractError(
            f"contract lists {contract.n_features} features, graph input has {dims[2]}",
            field="features",
            path=path,
        )
    outputs = {o.name: o for o in session.get_outputs()}
    for name, rank in ((SCORE_OUTPUT, 1), (CONTRIBUTIONS_OUTPUT, 2)):
        if name not in outputs:
            raise ModelContractError(
                f"graph has no output {name!r} (has {sorted(outputs)})",
                field=f"graph.outputs.{name}",
                path=path,
            )
        odims = _dims(outputs[name])
        if len(odims) != rank:
            raise ModelContractError(
                f"output {name!r} has rank {len(odims)}, expected {rank}",
                field=f"graph.outputs.{name}",
                path=path,
            )
        if outputs[name].type != "tensor(float)":
            raise ModelContractError(
                f"output {name!r} type is {outputs[name].type}, expected tensor(float)",
                field=f"graph.outputs.{name}",
                path=path,
            )
    cdims = _dims(outputs[CONTRIBUTIONS_OUTPUT])
    if isinstance(cdims[1], int) and cdims[1] != contract.n_features:
        raise ModelContractError(
            f"output 'contributions' has {cdims[1]} columns, contract lists {contract.n_features} features",
            field="graph.outputs.contributions",
            path=path,
        )


def _providers_for(choice: ProviderChoice) -> list[str]:
    if choice == "cpu":
        return [_CPU]
    return [_CUDA, _CPU]


def load_model(path: str | os.PathLike[str], options: SessionOptions | None = None) -> LoadedModel:
    """Load, check and return a model. Raises ``ModelContractError`` or ``ProviderError``."""
    options = options or SessionOptions()
    p = Path(path)
    if not p.is_file():
        raise ModelContractError("no such model file", path=str(p))
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, options.intra_op_threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    so.log_severity_level = 3  # ORT's own warnings (e.g. "CUDA not available") we report ourselves
    wanted = _providers_for(options.providers)
    available = ort.get_available_providers()
    try:
        session = ort.InferenceSession(
            str(p), sess_options=so, providers=[x for x in wanted if x in available] or [_CPU]
        )
    except Exception as exc:
        raise ModelContractError(f"ONNX Runtime cannot load the file: {exc}", path=str(p)) from None
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ModelContractError("missing from metadata_props", field=METADATA_KEY, path=str(p))
    contract = Contract.from_json(meta[METADATA_KEY], path=str(p))
    check_graph(session, contract, str(p))
    model = LoadedModel(p, session, contract)
    # With the CPU wheel, asking for CUDA only warns and quietly runs on CPU:
    # get_providers() is the truth (the CPU wheel only warns when asked for CUDA).
    if options.providers == "cuda" and model.active_provider != "cuda":
        raise ProviderError(
            "providers = 'cuda' was requested but ONNX Runtime runs this model on "
            f"{model.providers} (available: {available}); install onnxruntime-gpu with a working "
            "CUDA, or set model.providers = 'auto' or 'cpu'"
        )
    log.info(
        "model %s loaded: %s, L=%d, features=%s, provider=%s",
        p,
        contract.model_version,
        contract.window_length,
        contract.feature_names,
        model.active_provider,
    )
    return model
