"""Detection metrics: SKAB's point metrics, the NAB-style score, delays, event metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomalyd_train.evaluation import (
    LOW_FN,
    STANDARD,
    Confusion,
    alarm_onsets,
    confusion,
    detection_delays,
    episodes,
    event_metrics,
    nab_score,
)


def test_confusion_and_skab_formulas() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    decide = [0, 1, 0, 0, 0, 1, 1, 1, 1, 1]
    c = confusion(labels, decide)
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 2, 1, 3)
    assert c.f1 == pytest.approx(4 / (4 + 3 / 2))
    assert c.far == pytest.approx(100 * 2 / 5)
    assert c.mar == pytest.approx(100 * 1 / 5)
    d = c.to_dict()
    assert d["TP"] == 4
    assert d["F1"] == pytest.approx(c.f1)


def test_pooling_adds_counts_not_ratios() -> None:
    a = confusion([1, 1, 0, 0], [1, 1, 0, 0])  # perfect
    b = confusion([1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1])  # all wrong
    p = a + b
    assert (p.tp, p.fp, p.fn, p.tn) == (2, 2, 6, 2)
    assert p.f1 == pytest.approx(2 / (2 + 4))
    assert p.n == 12


def test_undefined_rates_are_nan_and_none_in_json() -> None:
    c = Confusion(tp=3, fn=1)
    assert math.isnan(c.far)
    assert c.to_dict()["FAR"] is None
    assert Confusion().f1 == 0.0


def test_all_anomaly_baseline_matches_the_readme_figure() -> None:
    # About half the rows anomalous: flagging everything gives F1 = 2/3 at 50 %.
    c = confusion([1] * 50 + [0] * 50, [1] * 100)
    assert c.f1 == pytest.approx(50 / (50 + 25))
    assert c.far == 100.0
    assert c.mar == 0.0


def test_confusion_refuses_different_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        confusion([1, 0], [1])


def test_episodes_and_onsets() -> None:
    x = [1, 1, 0, 0, 1, 0, 1, 1, 1]
    assert episodes(x) == [(0, 2), (4, 5), (6, 9)]
    assert alarm_onsets(x).tolist() == [0, 4, 6]
    assert episodes([0, 0]) == []


def _sig(p: float) -> float:
    return 2 / (1 + math.exp(5 * p)) - 1


def test_nab_early_detection_scores_about_one_and_normalises_to_100() -> None:
    ts = np.arange(300, dtype=float)
    cp = np.zeros(300, bool)
    cp[100] = True
    decide = np.zeros(300, bool)
    decide[100:150] = True  # onset exactly at the changepoint
    r = nab_score(ts, cp, decide, window_s=60)
    assert r.raw == pytest.approx(1.0)
    assert r.normalised == pytest.approx(100.0)
    assert (r.windows, r.detected, r.false_positives) == (1, 1, 0)


def test_nab_late_detection_scores_less_and_a_miss_costs_a_fn() -> None:
    ts = np.arange(400, dtype=float)
    cp = np.zeros(400, bool)
    cp[[100, 300]] = True
    decide = np.zeros(400, bool)
    decide[130:200] = True  # half-way into the first window; the second window is missed
    r = nab_score(ts, cp, decide, window_s=60)
    expected = _sig(-0.5) / _sig(-1.0) - 1.0
    assert r.raw == pytest.approx(expected)
    assert r.normalised == pytest.approx(100 * (expected + 2) / 4)
    assert r.detected == 1


def test_nab_false_positives_cost_by_distance_after_a_window() -> None:
    ts = np.arange(1000, dtype=float)
    cp = np.zeros(1000, bool)
    cp[500] = True
    decide = np.zeros(1000, bool)
    decide[[10, 590, 900]] = True  # before any window; 30 s after the window; far after
    r = nab_score(ts, cp, decide, window_s=60)
    assert r.false_positives == 3
    assert r.detected == 0
    fp = 0.11 * (_sig(3.0) + _sig(30 / 60) + _sig(340 / 60))
    assert r.raw == pytest.approx(-1.0 + fp)
    assert _sig(30 / 60) > _sig(3.0)  # an echo just after a window costs less than a stray alarm


def test_nab_only_the_first_onset_in_a_window_counts_and_results_add() -> None:
    ts = np.arange(200, dtype=float)
    cp = np.zeros(200, bool)
    cp[50] = True
    decide = np.zeros(200, bool)
    decide[[50, 60, 70]] = True
    a = nab_score(ts, cp, decide, window_s=60)
    assert a.raw == pytest.approx(1.0)
    total = a + nab_score(ts, cp, np.zeros(200, bool), window_s=60)
    assert total.windows == 2
    assert total.normalised == pytest.approx(50.0)
    with pytest.raises(ValueError, match="profiles"):
        _ = a + nab_score(ts, cp, decide, profile=LOW_FN)
    assert a.profile is STANDARD


def test_detection_delays() -> None:
    ts = np.arange(20, dtype=float) * 2.0  # 2 s per row
    labels = np.zeros(20, bool)
    labels[2:6] = True
    labels[10:14] = True
    labels[16:18] = True
    decide = np.zeros(20, bool)
    decide[4] = True  # 2 rows = 4 s after the first episode's start
    decide[10] = True  # at the second's start
    d = detection_delays(ts, labels, decide)
    assert d.delays[:2] == (4.0, 0.0)
    assert math.isnan(d.delays[2])
    assert d.missed == 1
    assert d.mean == pytest.approx(2.0)
    assert d.to_dict()["delays_s"][2] is None


def test_event_metrics_recall_and_false_alerts() -> None:
    ts = np.arange(7200, dtype=float)  # two hours at 1 Hz
    decide = np.zeros(7200, bool)
    alert = np.zeros(7200, bool)
    events = [(1000.0, 1100.0, "spike"), (3000.0, 3060.0, "drift"), (5000.0, 5010.0, "spike")]
    decide[1050] = alert[1050:1060] = True  # found
    decide[3070] = alert[3070:3080] = True  # found within the 30 s tolerance after its end
    decide[6000] = alert[6000:6010] = True  # a false alert
    alert[6500:6510] = True  # another false alert (alerts count, not decisions)
    r = event_metrics(ts, decide, alert, events, tolerance_s=30.0)
    assert (r.events, r.found, r.false_alerts) == (3, 2, 2)
    assert r.recall == pytest.approx(2 / 3)
    assert r.hours == pytest.approx(7199 / 3600)
    assert r.false_alerts_per_hour == pytest.approx(2 / (7199 / 3600))
    # covered: [1000, 1130] and [3000, 3090] -> 131 + 91 rows; 20 normal rows in alert
    assert r.normal_rows == 7200 - 131 - 91 - 41
    assert r.normal_rows_in_alert == 20
    assert r.normal_alert_share == pytest.approx(20 / r.normal_rows)
    both = r + r
    assert both.normal_rows_in_alert == 40
    assert both.kinds_found == (("drift", 2, 2), ("spike", 2, 4))
    assert both.recall == pytest.approx(2 / 3)
