"""Replay through the real stages with a real (tiny) ONNX model in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import load_config
from anomalyd.decode import Reason
from anomalyd.model import LoadedModel, load_model
from anomalyd.replay import replay
from tests.helpers.tiny_model import build_tiny_model, tiny_scores

L = 8
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny.onnx", window_length=L, threshold=1.0)
    return load_model(path)


def series(n: int, spikes: list[tuple[int, int]], level: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    values = rng.uniform(-0.5, 0.5, size=(n, 3)).astype(np.float32)  # score <= 0.25: normal
    for lo, hi in spikes:
        values[lo:hi] = level  # score = level**2 = 4 > threshold 1
    return T0 + np.arange(n, dtype=np.float64), values


def test_tiny_model_satisfies_the_contract(model: LoadedModel, tmp_path: Path) -> None:
    assert model.contract.feature_names == ["temperature", "pressure", "vibration"]
    assert model.window_length == L
    w = np.random.default_rng(0).normal(size=(5, L, 3)).astype(np.float32)
    s, c = model.run(w)
    ref_s, ref_c = tiny_scores(w)
    np.testing.assert_allclose(s, ref_s, rtol=1e-6)
    np.testing.assert_allclose(c, ref_c, rtol=1e-6)
    np.testing.assert_allclose(c.sum(axis=1), s, rtol=1e-6)


def test_scores_alerts_and_warmup(model: LoadedModel) -> None:
    cfg = load_config(overrides={"detector.k_enter": 3, "detector.k_exit": 2, "batching.max_batch": 5})
    ts, values = series(60, [(30, 36)])
    r = replay(model, cfg, "dev", ts, values)
    assert len(r) == 60
    assert r.threshold == 1.0
    # warm-up: no window before L readings
    assert np.isnan(r.score[: L - 1]).all()
    np.testing.assert_allclose(r.score[L - 1 :], (values[L - 1 :] ** 2).mean(axis=1), rtol=1e-5)
    assert np.flatnonzero(r.anomaly).tolist() == list(range(30, 36))
    # alert from the 3rd anomalous window, cleared at the 2nd normal one
    assert np.flatnonzero(r.alert).tolist() == list(range(32, 37))
    assert not r.padded.any()
    np.testing.assert_allclose(np.nansum(r.contributions, axis=1)[L - 1 :], r.score[L - 1 :], rtol=1e-5)
    assert r.rejections == []


def test_history_rows_only_fill_the_window(model: LoadedModel) -> None:
    cfg = load_config()
    ts, values = series(40, [])
    r = replay(model, cfg, "dev", ts, values, history=L - 1)
    assert len(r) == 40 - (L - 1)
    assert not np.isnan(r.score).any()  # the first returned row already has a full window
    np.testing.assert_array_equal(r.ts, ts[L - 1 :])


def test_threshold_override_ewma_pad_and_hop(model: LoadedModel) -> None:
    cfg = load_config(
        overrides={
            "detector.threshold": 10.0,
            "stream.warmup": "pad",
            "stream.hop": 2,
            "detector.smoothing": "ewma",
            "detector.ewma_alpha": 0.5,
        }
    )
    ts, values = series(12, [(0, 12)], level=4.0)  # every score 16
    r = replay(model, cfg, "dev", ts, values)
    assert r.threshold == 10.0
    scored = np.flatnonzero(~np.isnan(r.score)).tolist()
    assert scored == [0, 2, 4, 6, 8, 10]  # pad: from the first reading, every 2nd
    assert r.padded[scored].tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(r.smoothed[scored], 16.0, rtol=1e-6)
    assert r.anomaly[scored].all()
    assert not r.anomaly[1::2].any()
    # k_enter = 3 (default): third scored window raises the alert, carried over unscored rows
    assert r.alert.tolist() == [False] * 4 + [True] * 8


def test_out_of_order_rows_are_rejected_like_the_daemon(model: LoadedModel) -> None:
    ts, values = series(20, [])
    ts = ts.copy()
    ts[12] = ts[11]  # duplicate
    ts[15] = ts[3]  # out of order
    r = replay(model, load_config(), "dev", ts, values)
    assert [x.reason for x in r.rejections] == [Reason.DUPLICATE, Reason.OUT_OF_ORDER]
    assert np.isnan(r.score[[12, 15]]).all()
    assert not np.isnan(r.score[[11, 13, 14, 16]]).any()


def test_bad_shapes(model: LoadedModel) -> None:
    ts, values = series(10, [])
    with pytest.raises(ValueError, match="values"):
        replay(model, load_config(), "dev", ts, values[:, :2])
    with pytest.raises(ValueError, match="history"):
        replay(model, load_config(), "dev", ts, values, history=11)
