"""Published alert states: the detector's state per device, operator overlays, payloads."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from anomalyd.alerts import AlertRecord, OperatorAction, alert_payload
from anomalyd.detector import Decision, Detector

F = 2


def run(det: Detector, device: str, scores: list[float], t0: float = 100.0) -> list[Decision]:
    n = len(scores)
    contributions = np.tile(np.asarray([[0.25, 0.75]], np.float32), (n, 1)) * np.asarray(
        scores, np.float32
    ).reshape(n, 1)
    return det.update(
        [device] * n,
        t0 + np.arange(n, dtype=np.float64),
        np.asarray(scores, np.float32),
        contributions,
        np.zeros(n, bool),
    )


def make(**kw: object) -> Detector:
    args: dict[str, object] = {
        "threshold": 1.0,
        "smoothing": "none",
        "ewma_alpha": 0.5,
        "k_enter": 2,
        "k_exit": 2,
    }
    args.update(kw)
    return Detector(**args)  # type: ignore[arg-type]


def action(verb: str, at: float = 1000.0) -> OperatorAction:
    return OperatorAction(verb, "j.smith", "maintenance", at)


def test_first_decided_window_publishes_normal_then_raise_and_clear() -> None:
    d = make()
    out = run(d, "a", [0.5, 0.5, 2.0, 3.0, 2.5, 0.1, 0.1, 0.1])
    assert [x.state_changed for x in out] == [True, False, False, True, False, False, True, False]
    rec = d.record("a")
    assert rec is not None
    assert rec.state == "normal"
    assert rec.since == 106.0
    # while the alert was active its peak was kept: raised at t=103 (score 3), peak 3.0 there
    out = run(d, "a", [5.0, 4.0, 9.0, 1.5], t0=200.0)
    rec = d.record("a")
    assert rec is not None
    assert (rec.state, rec.since, rec.peak_score, rec.peak_ts) == ("anomalous", 201.0, 9.0, 202.0)
    assert rec.peak_contributions is not None
    assert rec.peak_contributions.tolist() == pytest.approx([2.25, 6.75])
    assert d.active_alerts == 1
    assert d.sweep(0.0).oldest_alert_since == 201.0
    assert d.sweep(0.0).counts == {"anomalous": 1}


def test_forget_gives_unknown_with_the_reason_and_never_a_stale_state() -> None:
    d = make(k_enter=1)
    run(d, "a", [5.0])
    run(d, "b", [0.1])
    records = d.forget(["a", "b", "never-seen"], "idle", 500.0)
    assert [(r.device, r.state, r.reason, r.since) for r in records] == [
        ("a", "unknown", "idle", 500.0),
        ("b", "unknown", "idle", 500.0),
    ]
    assert d.record("a") is None
    assert d.n_devices == 0


def test_shelve_overlays_the_state_and_expires_into_the_then_true_state() -> None:
    d = make(k_enter=1, k_exit=1)
    run(d, "a", [0.1])
    rec = d.shelve("a", until=2000.0, action=action("shelve"))
    assert rec is not None
    assert rec.state == "shelved"
    assert rec.shelved_until == 2000.0
    assert rec.operator is not None
    assert rec.operator.by == "j.smith"
    # the machine goes anomalous while shelved: decided underneath, not published
    out = run(d, "a", [5.0, 6.0])
    assert out[0].alert
    assert out[0].alert_changed
    assert not out[0].state_changed
    rec = d.record("a")
    assert rec is not None
    assert (rec.state, rec.condition) == ("shelved", "anomalous")
    assert d.sweep(1999.0).expired == []
    expired = d.sweep(2000.0).expired
    assert [(r.state, r.since) for r in expired] == [("anomalous", 2000.0)]


def test_unshelve_and_out_of_service() -> None:
    d = make(k_enter=1)
    run(d, "a", [0.1])
    d.shelve("a", until=5000.0, action=action("shelve"))
    rec = d.unshelve("a", action("unshelve", 1001.0))
    assert rec is not None
    assert rec.state == "normal"
    assert d.unshelve("a", action("unshelve")) is None  # not shelved: nothing to do
    rec = d.set_out_of_service("a", True, action("out_of_service"))
    assert rec is not None
    assert rec.state == "out_of_service"
    run(d, "a", [5.0])
    rec = d.record("a")
    assert rec is not None
    assert (rec.state, rec.condition) == ("out_of_service", "anomalous")
    rec = d.set_out_of_service("a", False, action("in_service", 1002.0))
    assert rec is not None
    assert (rec.state, rec.operator) == ("anomalous", None)


def test_out_of_service_learns_nothing() -> None:
    d = make(adaptive=True, adaptive_min_windows=2)
    run(d, "a", [0.1])
    d.set_out_of_service("a", True, action("out_of_service"))
    run(d, "a", [0.5] * 10)
    assert d.export_state()[0]["learnt"] == 1


def test_rebaseline_accepts_the_new_level_with_adaptive_thresholds() -> None:
    d = make(adaptive=True, adaptive_min_windows=20, adaptive_k=4.0, k_enter=3)
    run(d, "a", list(np.full(20, 0.5)))
    out = run(d, "a", [3.0, 3.1, 2.9, 3.0], t0=200.0)  # a lasting new level after maintenance
    assert out[-1].alert
    rec = d.rebaseline("a", action("rebaseline", 300.0))
    assert rec is not None
    assert rec.state == "normal"
    assert rec.operator is not None
    rng = np.random.default_rng(0)
    out = run(d, "a", list(3.0 + 0.1 * rng.standard_normal(40)), t0=301.0)
    assert not any(x.alert for x in out)  # no alert while learning, none after: the new normal
    assert d.device_threshold("a") > 3.0
    # and a real anomaly on top of the new normal is still caught
    out = run(d, "a", [30.0, 30.0, 30.0], t0=400.0)
    assert out[-1].alert


def test_rebaseline_without_adaptive_clears_the_alert_but_the_static_threshold_stays() -> None:
    d = make(k_enter=2)
    run(d, "a", [3.0, 3.0])
    rec = d.rebaseline("a", action("rebaseline"))
    assert rec is not None
    assert rec.state == "normal"
    out = run(d, "a", [3.0, 3.0], t0=200.0)
    assert out[-1].alert
    assert out[-1].state_changed


def test_cadence_mismatch_overlay_and_return() -> None:
    d = make()
    rec = d.set_cadence("a", True, 5.0, 1.0, 50.0)  # a device never decided yet
    assert rec is not None
    assert (rec.state, rec.period_s, rec.expected_period_s) == (
        "cadence_mismatch",
        5.0,
        1.0,
    )
    rec = d.set_cadence("a", False, 1.0, 1.0, 60.0)
    assert rec is not None
    assert (rec.state, rec.since) == ("unknown", 60.0)
    out = run(d, "a", [0.1], t0=61.0)
    assert out[0].state_changed
    assert d.record("a").state == "normal"


def test_export_import_round_trip_keeps_every_field() -> None:
    d = make(adaptive=True, adaptive_min_windows=3, smoothing="ewma")
    run(d, "a", [0.2, 0.3, 0.25, 5.0, 6.0, 7.0])
    run(d, "b", [0.1])
    d.shelve("b", 9999.0, action("shelve"))
    d.set_cadence("c", True, 5.0, 1.0, 10.0)
    exported = orjson.loads(orjson.dumps(d.export_state()))  # as it goes to disk
    e = make(adaptive=True, adaptive_min_windows=3, smoothing="ewma")
    assert e.import_state(exported, F) == 3
    for device in ("a", "b", "c"):
        assert as_json(e.record(device)) == as_json(d.record(device))
    # both continue identically
    assert [x.smoothed for x in run(d, "a", [1.0, 0.1])] == [x.smoothed for x in run(e, "a", [1.0, 0.1])]


def as_json(record: AlertRecord | None) -> bytes:
    assert record is not None
    return orjson.dumps(alert_payload(record, ["x", "y"], "v"), option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize(
    "bad",
    [
        [{"device": "a"}],
        [{"device": 3}],
        ["x"],
        [{**{"device": "a"}, "published": "weird"}],
    ],
)
def test_import_refuses_malformed_state(bad: list[object]) -> None:
    d = make()
    with pytest.raises(ValueError, match=r"."):  # any message, as long as it refuses
        d.import_state(bad, F)  # type: ignore[arg-type]
    assert d.n_devices == 0


def test_payload_fields() -> None:
    rec = AlertRecord(
        "pump-7",
        "anomalous",
        "anomalous",
        since=100.0,
        ts=160.0,
        score=2.5,
        threshold=1.0,
        peak_score=9.0,
        peak_ts=130.0,
        peak_contributions=np.asarray([0.25, 0.75], np.float32),
    )
    doc = alert_payload(rec, ["temperature", "pressure"], "v1")
    assert doc["state"] == "anomalous"
    assert doc["alert"] is True
    assert doc["duration_s"] == 60.0
    assert doc["since"] == 100.0
    assert doc["peak_score"] == 9.0
    assert doc["model_version"] == "v1"
    body = orjson.loads(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
    assert body["contributions"] == {"temperature": 0.25, "pressure": 0.75}
    unknown = alert_payload(AlertRecord("x", "unknown", "unknown", 5.0, 5.0, reason="idle"), ["t", "p"], "v1")
    assert unknown["alert"] is False
    assert unknown["reason"] == "idle"
    assert unknown["score"] is None
    assert math.isclose(unknown["duration_s"], 0.0)
