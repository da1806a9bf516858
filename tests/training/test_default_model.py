"""The committed default model and its committed training config describe one model:
``make default-model`` (``anomalyd-train train --config training/configs/default.toml``)
re-trains what ``exported_models/default/model.onnx`` is, not some earlier candidate."""

from __future__ import annotations

from pathlib import Path

from anomalyd.model import read_contract
from anomalyd_train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_config_is_the_one_the_committed_model_was_trained_with() -> None:
    cfg = load_train_config(ROOT / "training" / "configs" / "default.toml")
    contract = read_contract(ROOT / "exported_models" / "default" / "model.onnx")
    # The contract records the whole config the run used, every default filled in. A key
    # added to the config after the model was trained is absent there; it must then be at its
    # default, which is what the training ran without it (model.peak_span: 1, one step).
    current = cfg.model_dump(mode="json")
    defaults = type(cfg).model_validate({}).model_dump(mode="json")
    for section, values in current.items():
        recorded = contract.training_config.get(section)
        if isinstance(values, dict) and isinstance(recorded, dict):
            for key in set(values) - set(recorded):
                assert values[key] == defaults[section][key], f"{section}.{key} is not at its default"
                del values[key]
    assert contract.training_config == current
    assert contract.window_length == cfg.window.length
    assert contract.model_version.startswith(f"{cfg.name}-")
