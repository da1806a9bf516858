"""Shared by the tests that train one tiny model per module and check its exported file:
the ``run``/``prep``/``session`` fixtures and a helper that scores windows with ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from anomalyd.contract import CONTRIBUTIONS_OUTPUT, INPUT_NAME, SCORE_OUTPUT
from anomalyd_train.config import TrainConfig
from anomalyd_train.pipeline import Prepared, TrainResult, prepare, train


def trained_model_fixtures(config: Callable[[], TrainConfig], tag: str) -> tuple[Any, Any, Any]:
    """Module-scoped fixtures ``run`` (the model ``config()`` trains, exported under a
    temporary folder named after ``tag``), ``prep`` (its data, prepared again) and
    ``session`` (an ONNX Runtime CPU session on its file). Assign them to those three names
    in the test module: ``run, prep, session = trained_model_fixtures(my_config, "mine")``."""

    @pytest.fixture(scope="module", name="run")
    def run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
        return train(config(), tmp_path_factory.mktemp(tag), progress=False)

    @pytest.fixture(scope="module", name="prep")
    def prep(run: TrainResult) -> Prepared:
        return prepare(run.config)

    @pytest.fixture(scope="module", name="session")
    def session(run: TrainResult) -> Any:
        return ort.InferenceSession(run.model_path.read_bytes(), providers=["CPUExecutionProvider"])

    return run, prep, session


def ort_scores(session: Any, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``score (n,)`` and ``contributions (n, F)`` of raw ``windows`` through ``session``."""
    score, contrib = session.run(
        [SCORE_OUTPUT, CONTRIBUTIONS_OUTPUT], {INPUT_NAME: np.ascontiguousarray(windows, np.float32)}
    )
    return np.asarray(score), np.asarray(contrib)


def tiny_forecaster_config(
    name: str, window_length: int, model: dict[str, Any], **sections: dict[str, Any]
) -> TrainConfig:
    """A forecaster that trains in seconds: 2 synthetic devices × 30 min (seed 3), one
    LSTM(8), 2 epochs on at most 1,500 windows with the noise-scaled loss, 20 % validation and
    20 % calibration, a POT threshold for 1e-2 per window, no report. ``model`` adds to the
    model section; ``sections`` (``split``, ``training``, ``calibration``) replace whole ones."""
    doc: dict[str, Any] = {
        "name": name,
        "data": {"synthetic": {"n_devices": 2, "duration_s": 1800.0, "seed": 3}},
        "window": {"length": window_length},
        "split": {"validation_fraction": 0.2, "calibration_fraction": 0.2},
        "model": {"kind": "forecast", "layers": 1, "units": 8, **model},
        "training": {"epochs": 2, "batch_size": 64, "max_train_windows": 1500, "loss": "noise_scaled"},
        "calibration": {"target_false_alarm_rate": 0.01, "initial_quantile": 0.9, "min_peaks": 10},
        "report": {"enabled": False},
    }
    return TrainConfig.model_validate(doc | sections)
