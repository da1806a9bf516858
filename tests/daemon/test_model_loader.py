"""The runtime model loader: a model whose contract is missing, malformed or disagrees
with its graph is refused with a ModelContractError that names the field at fault."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from anomalyd.contract import METADATA_KEY
from anomalyd.errors import ModelContractError, ProviderError
from anomalyd.model import SessionOptions, load_model, read_contract
from tests.helpers.tiny_model import DROP, build_tiny_model, tiny_scores


def test_valid_model_loads_and_scores(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m.onnx", window_length=8)
    model = load_model(path, SessionOptions(providers="cpu"))
    assert model.window_length == 8
    assert model.n_features == 3
    assert model.active_provider == "cpu"
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(5, 8, 3)).astype(np.float32)
    score, contributions = model.run(windows)
    want_score, want_contrib = tiny_scores(windows)
    np.testing.assert_allclose(score, want_score, rtol=1e-6)
    np.testing.assert_allclose(contributions, want_contrib, rtol=1e-6)
    model.warm_up([1, 4])
    assert read_contract(path) == model.contract


def test_wrong_window_shape_is_refused_before_ort(tmp_path: Path) -> None:
    model = load_model(build_tiny_model(tmp_path / "m.onnx"), SessionOptions(providers="cpu"))
    with pytest.raises(ValueError, match=r"\(batch, 8, 3\)"):
        model.run(np.zeros((2, 7, 3), dtype=np.float32))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"include_contract": False}, METADATA_KEY),
        ({"raw_contract": "{broken"}, METADATA_KEY),
        ({"contract_overrides": {"window_length": 9}}, "window_length"),
        ({"contract_overrides": {"kind": "gan"}}, "kind"),
        ({"contract_overrides": {"threshold": DROP}}, "threshold"),
        (
            {
                "contract_overrides": {
                    "features": [{"name": "temperature"}, {"name": "pressure"}],
                    "normalisation": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
                }
            },
            "features",
        ),
    ],
)
def test_broken_contract_is_refused_naming_the_field(tmp_path: Path, kwargs: dict, field: str) -> None:
    path = build_tiny_model(tmp_path / "m.onnx", **kwargs)
    with pytest.raises(ModelContractError) as info:
        load_model(path, SessionOptions(providers="cpu"))
    assert info.value.field == field
    assert repr(field) in str(info.value)
    assert str(path) in str(info.value)


def _rewrite(path: Path, edit: str) -> Path:
    """Make the graph itself disagree with the (unchanged) contract."""
    m = onnx.load(str(path))
    g = m.graph
    if edit == "input_name":
        old = g.input[0].name
        g.input[0].name = "x"
        for node in g.node:
            node.input[:] = ["x" if i == old else i for i in node.input]
    elif edit == "output_missing":
        del g.output[1]
    elif edit == "input_rank":
        del g.input[0].type.tensor_type.shape.dim[2]
    elif edit == "fixed_batch":
        dim = g.input[0].type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 4
    out = path.with_name(f"{edit}.onnx")
    onnx.save_model(m, str(out))
    return out


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("input_name", "graph.inputs.name"),
        ("output_missing", "graph.outputs.contributions"),
        ("input_rank", "graph.inputs.rank"),
        ("fixed_batch", "graph.inputs.batch"),
    ],
)
def test_graph_that_disagrees_with_contract_is_refused(tmp_path: Path, edit: str, field: str) -> None:
    path = _rewrite(build_tiny_model(tmp_path / "m.onnx"), edit)
    with pytest.raises(ModelContractError) as info:
        load_model(path, SessionOptions(providers="cpu"))
    assert info.value.field == field


def test_missing_and_garbage_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelContractError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 this is not a protobuf" * 10)
    with pytest.raises(ModelContractError, match="cannot load"):
        load_model(garbage)
    with pytest.raises(ModelContractError, match="cannot load"):
        read_contract(garbage)


def test_cuda_requested_without_cuda_is_a_provider_error(tmp_path: Path) -> None:
    # Hide every GPU so the CUDA provider cannot start even with onnxruntime-gpu on a GPU
    # machine: ORT then quietly runs on CPU, which the loader must refuse for "cuda".
    path = build_tiny_model(tmp_path / "m.onnx")
    probe = (
        "import sys\n"
        "from anomalyd.errors import ProviderError\n"
        "from anomalyd.model import SessionOptions, load_model\n"
        "try:\n"
        f"    load_model({str(path)!r}, SessionOptions(providers='cuda'))\n"
        "except ProviderError as exc:\n"
        "    print(exc); sys.exit(exc.exit_code)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == ProviderError.exit_code, done.stderr
    assert "providers = 'cuda' was requested" in done.stdout


def test_auto_falls_back_to_cpu_and_says_so(tmp_path: Path) -> None:
    model = load_model(build_tiny_model(tmp_path / "m.onnx"), SessionOptions(providers="auto"))
    assert model.providers[-1] == "CPUExecutionProvider"
    assert model.active_provider in {"cpu", "cuda"}
