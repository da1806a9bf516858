"""benchmarks/eval_default_model.py's threshold sweep: the same replayed scores decided again
by the daemon's detector must agree with the replay itself at the replay's threshold, and
move the right way away from it (the default model, a small unseen fleet)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from anomalyd.model import DEFAULT_MODEL_PATH, read_contract

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_default_model.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_default_model", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_sweep_at_the_models_threshold_repeats_the_replay(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = read_contract(DEFAULT_MODEL_PATH).threshold.value
    out = tmp_path / "eval.json"
    # Seed 7, 3 devices x 1 h: a few events and enough scored windows to flag some at half
    # the threshold; nothing on this fleet scores anywhere near 1e9.
    argv = ["--seeds", "7", "--devices", "3", "--hours", "1", "--stagger-h", "8"]
    assert script.main([*argv, "--thresholds", f"{own / 2!r},{own!r},1e9", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    summary, sweep = doc["summary"], doc["thresholds"]
    assert summary["events"] > 0

    at_own = sweep[f"{own:g}"]
    for key in ("clean_flagged", "clean_alerts", "recall_window", "recall_alert", "clean_windows"):
        assert at_own[key] == summary[key], key

    lower, never = sweep[f"{own / 2:g}"], sweep["1e+09"]
    assert lower["clean_flagged"] > summary["clean_flagged"]  # more windows above a lower bar
    assert lower["recall_window"] >= summary["recall_window"]
    assert never["clean_flagged"] == never["clean_alerts"] == 0
    assert never["recall_window"] == never["recall_alert"] == 0
    assert "thr 1e+09" in capsys.readouterr().out


def test_thresholds_must_be_positive_numbers(script: ModuleType) -> None:
    for bad in ("abc", "0", "-3", "nan", ","):
        with pytest.raises(SystemExit):
            script.main(["--thresholds", bad])
