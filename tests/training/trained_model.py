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
