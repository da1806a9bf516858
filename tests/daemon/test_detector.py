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
    d.forget(["a", "unknown"])
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
