"""Detector: threshold, EWMA, hysteresis transitions, NaN handling, forget, threshold reload."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalyd.detector import Decision, Detector

F = 3


def run(det: Detector, devices: list[str], scores: list[float], padded: bool = False) -> list[Decision]:
    n = len(scores)
    contributions = np.arange(n * F, dtype=np.float32).reshape(n, F)
    return det.update(
        devices,
        np.arange(n, dtype=np.float64),
        np.asarray(scores, np.float32),
        contributions,
        np.full(n, padded),
    )


def det(**kw: object) -> Detector:
    args: dict[str, object] = {
        "threshold": 1.0,
        "smoothing": "none",
        "ewma_alpha": 0.5,
        "k_enter": 3,
        "k_exit": 2,
    }
    args.update(kw)
    return Detector(**args)  # type: ignore[arg-type]


def test_window_level_anomaly_is_score_above_threshold() -> None:
    out = run(det(k_enter=10), ["a"] * 3, [0.5, 1.0, 1.5])
    assert [d.anomaly for d in out] == [False, False, True]  # equal is not above
    assert [d.smoothed for d in out] == [0.5, 1.0, 1.5]
    assert all(d.threshold == 1.0 for d in out)
    assert out[2].contributions.tolist() == [6.0, 7.0, 8.0]
    assert out[1].ts == 1.0


def test_hysteresis_enter_after_k_enter_leave_after_k_exit() -> None:
    d = det(k_enter=3, k_exit=2)
    scores = [2, 2, 0, 2, 2, 2, 2, 0, 2, 0, 0, 0, 2]
    out = run(d, ["a"] * len(scores), scores)
    assert [x.alert for x in out] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert [i for i, x in enumerate(out) if x.alert_changed] == [5, 10]
    assert d.alert_state("a") is False


def test_k_enter_one_alerts_on_the_first_anomalous_window() -> None:
    out = run(det(k_enter=1, k_exit=1), ["a"] * 3, [5, 0, 5])
    assert [(x.alert, x.alert_changed) for x in out] == [(True, True), (False, True), (True, True)]


def test_devices_are_independent_within_one_batch() -> None:
    d = det(k_enter=2)
    out = run(d, ["a", "b", "a", "b"], [2, 0, 2, 2])
    assert [x.alert for x in out] == [False, False, True, False]
    assert d.alert_state("a")
    assert not d.alert_state("b")
    assert d.active_alerts == 1
    assert d.n_devices == 2


def test_ewma() -> None:
    out = run(det(smoothing="ewma", ewma_alpha=0.5, k_enter=1), ["a"] * 4, [4, 0, 0, 0])
    assert [x.smoothed for x in out] == [4.0, 2.0, 1.0, 0.5]
    assert [x.anomaly for x in out] == [True, True, False, False]
    assert [x.score for x in out] == [4.0, 0.0, 0.0, 0.0]


def test_ewma_is_per_device() -> None:
    out = run(det(smoothing="ewma", ewma_alpha=0.5), ["a", "b", "a"], [4, 100, 0])
    assert [x.smoothed for x in out] == [4.0, 100.0, 2.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_changes_nothing(bad: float) -> None:
    d = det(smoothing="ewma", ewma_alpha=0.5, k_enter=2, k_exit=1)
    out = run(d, ["a"] * 4, [4, bad, 4, bad])
    assert [x.anomaly for x in out] == [True, False, True, False]
    assert [x.alert for x in out] == [False, False, True, True]  # the bad windows neither reset nor count
    assert [x.alert_changed for x in out] == [False, False, True, False]
    assert math.isnan(out[1].smoothed)
    assert out[2].smoothed == 4.0  # the EWMA state was not poisoned
    assert d.non_finite == 2
    out = run(d, ["a"], [bad])
    assert out[0].alert  # a NaN does not clear an alert either
    assert not out[0].alert_changed


def test_forget_starts_afresh() -> None:
    d = det(k_enter=1)
    run(d, ["a", "b"], [2, 2])
    d.forget(["a", "unknown"], "evicted", 0.0)
    assert not d.alert_state("a")
    assert d.alert_state("b")
    out = run(d, ["a"], [2])
    assert out[0].alert_changed


def test_set_threshold_keeps_state() -> None:
    d = det(k_enter=1, k_exit=1)
    run(d, ["a"], [2])
    d.set_threshold(5.0)
    (x,) = run(d, ["a"], [2])
    assert x.threshold == 5.0
    assert not x.anomaly
    assert x.alert_changed
    with pytest.raises(ValueError, match="finite"):
        d.set_threshold(math.nan)


def test_padded_flag_is_passed_through() -> None:
    (x,) = run(det(), ["a"], [0.1], padded=True)
    assert x.padded is True


@pytest.mark.parametrize(
    "kw",
    [
        {"smoothing": "median"},
        {"ewma_alpha": 0.0},
        {"ewma_alpha": 1.5},
        {"k_enter": 0},
        {"k_exit": 0},
        {"threshold": math.inf},
    ],
)
def test_bad_arguments(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        det(**kw)


@given(
    k_enter=st.integers(1, 4),
    k_exit=st.integers(1, 4),
    steps=st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from([0.0, 2.0, math.nan])), max_size=60),
    chunk=st.integers(1, 7),
)
@settings(max_examples=300, deadline=None)
def test_alert_follows_the_hysteresis_reference(
    k_enter: int, k_exit: int, steps: list[tuple[str, float]], chunk: int
) -> None:
    d = det(k_enter=k_enter, k_exit=k_exit)
    out: list[Decision] = []
    for i in range(0, len(steps), chunk):  # batch boundaries must not matter
        part = steps[i : i + chunk]
        out += run(d, [s[0] for s in part], [s[1] for s in part])
    # reference: alert(t) per device from the run lengths of finite scores
    history: dict[str, list[bool]] = {"a": [], "b": []}
    alert = {"a": False, "b": False}
    for (dev, score), x in zip(steps, out, strict=True):
        prev = alert[dev]
        if not math.isnan(score):
            history[dev].append(score > 1.0)
            tail = history[dev]
            if not prev and len(tail) >= k_enter and all(tail[-k_enter:]):
                alert[dev] = True
            if prev and len(tail) >= k_exit and not any(tail[-k_exit:]):
                alert[dev] = False
        assert x.alert == alert[dev]
        assert x.alert_changed == (alert[dev] != prev)


# ------------------------------------------------------------------ threshold_scale, adaptive


def test_threshold_scale_multiplies_the_base_threshold_also_on_reload() -> None:
    d = det(threshold=2.0, threshold_scale=1.5, k_enter=1)
    out = run(d, ["a"] * 2, [2.9, 3.1])
    assert [x.anomaly for x in out] == [False, True]
    assert out[0].threshold == 3.0
    d.set_threshold(4.0)
    assert d.threshold == 6.0
    assert d.base_threshold == 4.0
    assert d.device_threshold("unknown") == 6.0


def adaptive_det(**kw: object) -> Detector:
    args: dict[str, object] = {
        "threshold": 100.0,
        "k_enter": 1,
        "k_exit": 1,
        "adaptive": True,
        "adaptive_windows": 1000,
        "adaptive_min_windows": 4,
        "adaptive_k": 1.0,
        "adaptive_floor": 0.0,
    }
    args.update(kw)
    return det(**args)


def test_adaptive_threshold_is_exp_of_mean_plus_k_std_of_log_scores_after_warm_up() -> None:
    d = adaptive_det()
    e1, e3 = math.exp(1.0), math.exp(3.0)
    warm = run(d, ["a"] * 4, [e1, e3, e1, e3])
    assert all(x.threshold == 100.0 for x in warm)  # the static threshold until warm
    # log-scores 1, 3, 1, 3: mean 2, (population) std 1 -> exp(2 + 1 * 1)
    assert d.device_threshold("a") == pytest.approx(e3)
    (x,) = run(d, ["a"], [e3 * 1.01])
    assert x.threshold == pytest.approx(e3)
    assert x.anomaly
    assert d.device_threshold("b") == 100.0  # per device


def test_after_warm_up_anomalous_and_alert_windows_are_not_learnt() -> None:
    d = adaptive_det(k_enter=2, k_exit=3)
    run(d, ["a"] * 4, [1.0, 1.0, 1.0, 1.0])  # std 0: threshold exp(0) = 1
    before = d.device_threshold("a")
    out = run(d, ["a"] * 6, [50.0, 60.0, 70.0, 0.5, 0.5, 0.5])
    assert [x.alert for x in out] == [False, True, True, True, True, False]
    # the anomalies and the normal windows seen while in alert taught nothing
    assert d.device_threshold("a") == before
    run(d, ["a"], [0.5])  # normal again, not in alert: learnt
    assert d.device_threshold("a") != before


def test_warm_up_learns_every_window_so_a_low_static_threshold_cannot_lock_it() -> None:
    # The static threshold (0.1) is far below the stream's normal scores (~1): every warm-up
    # window is anomalous, yet warm-up learns them and the learnt threshold takes over.
    d = adaptive_det(threshold=0.1, k_enter=2, k_exit=2)
    warm = run(d, ["a"] * 4, [1.0, 1.2, 0.9, 1.1])
    assert warm[-1].alert
    after = run(d, ["a"] * 3, [1.0, 1.05, 0.95])
    assert not after[-1].alert
    assert after[0].threshold > 1.0


def test_adaptive_floor_keeps_the_threshold_above_a_share_of_the_static_one() -> None:
    d = adaptive_det(threshold=10.0, adaptive_floor=0.5)
    run(d, ["a"] * 4, [1.0, 1.0, 1.0, 1.0])
    assert d.device_threshold("a") == 5.0
    d = adaptive_det(threshold=10.0, adaptive_floor=1.0)
    run(d, ["a"] * 4, [1.0, 1.0, 1.0, 1.0])
    assert d.device_threshold("a") == 10.0  # floor 1: it can only raise the threshold


def test_padded_and_non_finite_windows_are_not_learnt() -> None:
    d = adaptive_det()
    run(d, ["a"] * 4, [1.0] * 4, padded=True)
    assert d.device_threshold("a") == 100.0  # nothing learnt
    run(d, ["a"] * 4, [math.nan] * 4)
    assert d.device_threshold("a") == 100.0


def test_set_threshold_restarts_adaptive_learning_and_forget_drops_it() -> None:
    d = adaptive_det()
    run(d, ["a", "b"] * 4, [1.0] * 8)
    assert d.device_threshold("a") == 1.0
    d.forget(["b"], "idle", 0.0)
    assert d.device_threshold("b") == 100.0
    d.set_threshold(50.0)
    assert d.device_threshold("a") == 50.0


def test_adaptive_threshold_follows_a_slow_drift_of_normal_scores() -> None:
    d = adaptive_det(adaptive_windows=50, adaptive_min_windows=10, adaptive_k=3.0)
    # log-scores ramp from 0 to 2 over 1000 windows with +-0.5 noise (std 0.5): the EWMA
    # mean lags by about slope x time constant = 0.002 x 50 = 0.1.
    logs = 0.002 * np.arange(1000) + np.where(np.arange(1000) % 2 == 0, 0.5, -0.5)
    out = run(d, ["a"] * 1000, np.exp(logs).tolist())
    assert not any(x.alert for x in out)
    assert math.log(d.device_threshold("a")) == pytest.approx(2.0 - 0.1 + 3 * 0.5, abs=0.1)


def test_from_config_maps_every_field() -> None:
    from anomalyd.config import DetectorConfig

    cfg = DetectorConfig(
        smoothing="ewma",
        ewma_alpha=0.2,
        k_enter=2,
        k_exit=4,
        threshold_scale=2.0,
        adaptive=True,
        adaptive_windows=30,
        adaptive_min_windows=7,
        adaptive_k=1.5,
        adaptive_floor=0.25,
    )
    d = Detector.from_config(cfg, contract_threshold=3.0)
    assert (d.base_threshold, d.threshold) == (3.0, 6.0)
    assert (d.smoothing, d.ewma_alpha, d.k_enter, d.k_exit) == ("ewma", 0.2, 2, 4)
    assert (d.adaptive, d.adaptive_windows, d.adaptive_min_windows) == (True, 30, 7)
    assert (d.adaptive_k, d.adaptive_floor) == (1.5, 0.25)
    assert Detector.from_config(DetectorConfig(threshold=1.0), 3.0).threshold == 1.0
    default = Detector.from_config(DetectorConfig(), 3.0)
    assert (default.adaptive, default.threshold) == (False, 3.0)  # defaults keep the old behaviour


@pytest.mark.parametrize(
    "kw",
    [
        {"threshold_scale": 0.0},
        {"threshold_scale": math.nan},
        {"adaptive_windows": 0},
        {"adaptive_min_windows": 0},
        {"adaptive_k": -1.0},
        {"adaptive_floor": -0.5},
    ],
)
def test_bad_adaptive_arguments(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        det(**kw)


def test_channel_ewma_averages_each_features_residual_size_and_takes_the_largest() -> None:
    d = det(smoothing="channel_ewma", ewma_alpha=0.5, k_enter=2, threshold=1.2, n_scored=2)
    n = 12
    # feature 0: residual 0; feature 1: a lasting bias of 1.5 residual RMS. Contributions are
    # r^2 / n_scored, as the exported graph makes them.
    contributions = np.tile(np.asarray([[0.0, 1.5**2 / 2]], np.float32), (n, 1))
    out = d.update(
        ["a"] * n, np.arange(n, dtype=np.float64), contributions.sum(axis=1), contributions, np.zeros(n, bool)
    )
    assert out[0].smoothed == pytest.approx(1.5)  # starts at the first window's sizes
    assert out[-1].smoothed == pytest.approx(1.5)
    assert out[-1].alert  # 1.5 > 1.2, for k_enter windows
    # the mean-of-squares score would have said (0 + 2.25) / 2 = 1.125 < 1.2: diluted
    assert float(out[-1].score) == pytest.approx(1.125)
    state = d.export_state()[0]
    assert state["channel"] == pytest.approx([0.0, 1.5])
    e = det(smoothing="channel_ewma", ewma_alpha=0.5, k_enter=2, threshold=1.2, n_scored=2)
    e.import_state(d.export_state(), 2)
    assert e.export_state() == d.export_state()
