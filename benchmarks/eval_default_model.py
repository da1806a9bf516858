"""How a model generalises to devices it never saw: unseen synthetic fleets with injected
anomalies, scored through the daemon's own stages (``anomalyd.replay``: buffers, batcher,
ONNX Runtime, detector) with the daemon's default configuration (``anomalyd.config.Config()``:
no smoothing, the contract's threshold, alert after 3 windows above, clear after 5 below).

Per seed, a fleet of ``--devices`` devices × ``--hours`` h; device k starts
``k · --stagger-h`` hours after 00:00 UTC of 2026-01-01 plus ``--start-hour`` (the default 8
devices × 3 h staggered by 3 h cover every hour of the day once per seed). The training fleet
uses seed 0; pick seeds for choosing, and report on other seeds. Use many: a target of 0.02
false alerts per device-hour is one alert in 50 device-hours, so the default 12 seeds (288
device-hours, 400-460 events) are the least that tells two models apart; 3 seeds have
given 1 and 5 false alerts for the same model.

What it prints, per device and pooled (definitions as in tests/e2e/test_daemon_e2e.py):

* clean-window flag rate: windows that contain no labelled sample and score above the
  threshold, over all such windows (the contract's per-window false-alarm target is 1e-3);
* event recall (window): an injected event is found when a window ending between its first
  sample and ``1.1 · (L-1)`` sample periods after its last is above the threshold;
  event recall (alert): the device's alert is on at some row in that interval;
* clean alerts per device-hour: alert onsets (after hysteresis) outside every such interval
  (``--clean-alerts`` prints each one with the contributions of the window that raised it);
* with ``--thresholds``: the pooled line again for each threshold given, from the same scores
  decided again by the daemon's detector, so two models can be compared at equal false
  alerts rather than each at its own calibrated threshold.

Run (about 1 s per device-hour on one core, plus a few seconds per threshold swept):

    .venv/bin/python benchmarks/eval_default_model.py [--model PATH] [--seeds 101-112] \\
        [--thresholds 28,32,36,40]
    # the end-to-end test's stream, one line per seed:
    .venv/bin/python benchmarks/eval_default_model.py --devices 2 --hours 3 --stagger-h 0 \\
        --gaps-per-hour 0 --anomalies 3 --seeds 1-20 --per-seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anomalyd.config import Config
from anomalyd.detector import Detector
from anomalyd.model import DEFAULT_MODEL_PATH, LoadedModel, SessionOptions, load_model
from anomalyd.replay import ReplayResult, replay
from anomalyd.synthetic import DeviceSeries, FleetSpec, generate_fleet

#: 2026-01-01T00:00:00Z, FleetSpec's default start.
DAY0 = 1_767_225_600.0
#: A device whose clean windows are flagged more often than this is counted as "noisy".
NOISY_RATE = 0.01


@dataclass
class DeviceResult:
    """One device's outcome."""

    seed: int
    device: str
    hours: float
    clean_windows: int
    clean_flagged: int
    events: int
    found_window: int
    found_alert: int
    clean_alerts: int
    kinds_missed: list[str] = field(default_factory=list)  # window level
    kinds: list[str] = field(default_factory=list)  # every event's kind
    kinds_missed_alert: list[str] = field(default_factory=list)  # alert level
    # Each clean alert: its onset (seconds after the device's first row) and the contributions
    # of the window that raised it, to see which feature drives the false alerts.
    clean_alert_onsets: list[tuple[float, list[float]]] = field(default_factory=list)

    @property
    def clean_rate(self) -> float:
        return self.clean_flagged / self.clean_windows if self.clean_windows else 0.0


def _intervals(dev: DeviceSeries, tail_s: float) -> list[tuple[float, float]]:
    return [(e.start_ts, e.end_ts + tail_s) for e in dev.events]


def score_device(
    model: LoadedModel, config: Config, dev: DeviceSeries, seed: int, period_s: float
) -> tuple[DeviceResult, ReplayResult]:
    """Replay one device and count what an operator would see; also returns the replay."""
    r = replay(model, config, dev.device, dev.ts, dev.values)
    return count_device(dev, seed, model.window_length, period_s, r, r.anomaly, r.alert), r


def redecide(
    model: LoadedModel, config: Config, r: ReplayResult, threshold: float
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """The window verdicts and alert states the daemon's detector would have reached on the
    replayed scores ``r`` with ``threshold`` instead (the rest of ``[detector]`` as in
    ``config``): a fresh ``anomalyd.detector.Detector``, fed the same windows in order."""
    cfg = config.detector.model_copy(update={"threshold": threshold})
    detector = Detector.from_config(
        cfg, model.contract.threshold.value, len(model.contract.scored_feature_names)
    )
    rows = np.flatnonzero(~np.isnan(r.row_threshold))  # the rows that ended a window
    decisions = detector.update(
        ["device"] * len(rows),
        r.ts[rows],
        r.score[rows].astype(np.float32),
        r.contributions[rows],
        r.padded[rows],
    )
    anomaly = np.zeros(len(r.ts), np.bool_)
    alert_at = np.full(len(r.ts), -1, np.int8)
    anomaly[rows] = [d.anomaly for d in decisions]
    alert_at[rows] = [d.alert for d in decisions]
    # The alert state carries over rows that ended no window, as in the replay.
    last = np.maximum.accumulate(np.where(alert_at >= 0, np.arange(len(r.ts)), -1))
    return anomaly, (last >= 0) & (alert_at[np.maximum(last, 0)] == 1)


def count_device(  # noqa: PLR0917 - one device's replay, taken apart
    dev: DeviceSeries,
    seed: int,
    length: int,
    period_s: float,
    r: ReplayResult,
    anomaly: npt.NDArray[np.bool_],
    alert: npt.NDArray[np.bool_],
) -> DeviceResult:
    """Count one device's outcome from its window verdicts ``anomaly`` and alert states
    ``alert`` (per row, as ``ReplayResult`` has them; ``r`` gives the rows' timestamps, scores
    and contributions)."""
    ts = r.ts
    scored = ~np.isnan(r.score)
    # A window ending at row i holds rows i-L+1..i (the buffers restart after a gap, so a
    # window never reaches back across one): dirty when any of them is labelled.
    cs = np.concatenate([[0], np.cumsum(dev.labels.astype(np.int64))])
    idx = np.arange(len(dev.ts))
    dirty = (cs[idx + 1] - cs[np.maximum(idx - length + 1, 0)]) > 0
    clean = scored & ~dirty
    tail_s = (length - 1) * period_s * 1.1
    intervals = _intervals(dev, tail_s)
    found_w = found_a = 0
    missed: list[str] = []
    missed_alert: list[str] = []
    for (lo, hi), ev in zip(intervals, dev.events, strict=True):
        inside = (ts >= lo) & (ts <= hi)
        hit_w = bool((anomaly & inside).any())
        hit_a = bool((alert & inside).any())
        found_w += hit_w
        found_a += hit_a
        if not hit_w:
            missed.append(ev.kind)
        if not hit_a:
            missed_alert.append(ev.kind)
    onsets = np.flatnonzero(alert & ~np.concatenate([[False], alert[:-1]]))
    in_event = np.zeros(len(ts), bool)
    for lo, hi in intervals:
        in_event |= (ts >= lo) & (ts <= hi)
    clean_onsets = onsets[~in_event[onsets]]
    return DeviceResult(
        seed=seed,
        device=dev.device,
        hours=float(dev.ts[-1] - dev.ts[0]) / 3600.0,
        clean_windows=int(clean.sum()),
        clean_flagged=int((clean & anomaly).sum()),
        events=len(dev.events),
        found_window=found_w,
        found_alert=found_a,
        clean_alerts=len(clean_onsets),
        kinds_missed=missed,
        kinds=[e.kind for e in dev.events],
        kinds_missed_alert=missed_alert,
        clean_alert_onsets=[
            (float(ts[i] - dev.ts[0]), [round(float(c), 3) for c in r.contributions[i]])
            for i in clean_onsets.tolist()
        ],
    )


@dataclass
class Summary:
    """Pooled figures over a set of devices."""

    devices: int
    device_hours: float
    clean_windows: int
    clean_flagged: int
    clean_rate: float
    device_rate_median: float
    device_rate_max: float
    noisy_devices: int  # clean-window flag rate above NOISY_RATE
    events: int
    recall_window: float
    recall_alert: float
    clean_alerts: int
    clean_alerts_per_device_hour: float


def summarise(results: list[DeviceResult]) -> Summary:
    """Pool counts (never average ratios) over ``results``."""
    rates = np.array([d.clean_rate for d in results]) if results else np.zeros(1)
    cw = sum(d.clean_windows for d in results)
    cf = sum(d.clean_flagged for d in results)
    ev = sum(d.events for d in results)
    hours = sum(d.hours for d in results)
    ca = sum(d.clean_alerts for d in results)
    return Summary(
        devices=len(results),
        device_hours=hours,
        clean_windows=cw,
        clean_flagged=cf,
        clean_rate=cf / cw if cw else 0.0,
        device_rate_median=float(np.median(rates)),
        device_rate_max=float(rates.max()),
        noisy_devices=int((rates > NOISY_RATE).sum()),
        events=ev,
        recall_window=sum(d.found_window for d in results) / ev if ev else float("nan"),
        recall_alert=sum(d.found_alert for d in results) / ev if ev else float("nan"),
        clean_alerts=ca,
        clean_alerts_per_device_hour=ca / hours if hours else 0.0,
    )


def _format(label: str, s: Summary) -> str:
    return (
        f"{label:<10} {s.devices:>3} dev {s.device_hours:6.1f} h | clean flagged {s.clean_flagged:>5}/"
        f"{s.clean_windows:<7} {s.clean_rate:.2e} (per device median {s.device_rate_median:.1e}, "
        f"max {s.device_rate_max:.1e}, >{NOISY_RATE:g}: {s.noisy_devices}) | events {s.events:>3} "
        f"recall win {s.recall_window:.2f} alert {s.recall_alert:.2f} | clean alerts {s.clean_alerts:>3} "
        f"= {s.clean_alerts_per_device_hour:.3f}/dev-h"
    )


def _recall_by_kind(results: list[DeviceResult]) -> str:
    """``kind found/events (share)`` at alert level, every kind."""
    total: dict[str, int] = {}
    missed: dict[str, int] = {}
    for d in results:
        for k in d.kinds:
            total[k] = total.get(k, 0) + 1
        for k in d.kinds_missed_alert:
            missed[k] = missed.get(k, 0) + 1
    return ", ".join(
        f"{k} {n - missed.get(k, 0)}/{n} ({(n - missed.get(k, 0)) / n:.2f})" for k, n in sorted(total.items())
    )


def _detector_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for ``[detector]``; the value is read as TOML (``adaptive=true``, ``k_enter=2``)."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"need KEY=VALUE, got {text!r}")
    return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"need numbers separated by commas, got {text!r}") from exc
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive numbers separated by commas, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    ap.add_argument("--seeds", type=_seeds, default=_seeds("101-112"), help="e.g. 101,102 or 1-20")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--hours", type=float, default=3.0)
    ap.add_argument("--stagger-h", type=float, default=3.0, help="device k starts k * this later")
    ap.add_argument(
        "--start-hour", type=float, default=0.0, help="first device's start, hours after 00:00 UTC"
    )
    ap.add_argument("--anomalies", type=float, default=2.0, help="injected anomalies per device-hour")
    ap.add_argument("--gaps-per-hour", type=float, default=0.5, help="data gaps per device-hour")
    ap.add_argument("--per-device", action="store_true", help="one line per device")
    ap.add_argument("--per-seed", action="store_true", help="one summary line per seed")
    ap.add_argument(
        "--clean-alerts",
        action="store_true",
        help="one line per clean (false) alert: device, onset and the raising window's contributions",
    )
    ap.add_argument("--json", type=Path, help="write every device's result and the summary here")
    ap.add_argument(
        "--threshold",
        type=float,
        help="score threshold instead of the contract's (to compare calibrations of one network)",
    )
    ap.add_argument(
        "--thresholds",
        type=_thresholds,
        default=[],
        help="also decide the same scores at each of these thresholds (e.g. 30,35,40): one "
        "pooled line each, so models compare at equal false alerts",
    )
    ap.add_argument(
        "--detector",
        type=_detector_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [detector] setting instead of the daemon default (repeatable), e.g. k_enter=2",
    )
    args = ap.parse_args(argv)

    model = load_model(args.model, SessionOptions(providers="cpu"))
    config = Config()
    if args.threshold is not None:
        config = config.model_copy(
            update={"detector": config.detector.model_copy(update={"threshold": args.threshold})}
        )
    if args.detector:
        # Validated like a config file's [detector], so a misspelt key is an error here too.
        merged = config.detector.model_dump() | dict(args.detector)
        config = config.model_copy(update={"detector": type(config.detector).model_validate(merged)})
    period_s = 1.0
    print(
        f"model {model.contract.model_version} ({args.model}), "
        f"threshold {model.contract.threshold.value if args.threshold is None else args.threshold:.4g}"
        f"{'' if args.threshold is None else ' (given)'}; "
        f"seeds {args.seeds}: {args.devices} devices x {args.hours:g} h, stagger {args.stagger_h:g} h, "
        f"start {args.start_hour:g} h, {args.anomalies:g} anomalies and {args.gaps_per_hour:g} gaps "
        f"per device-hour",
        flush=True,
    )
    started = time.perf_counter()
    results: list[DeviceResult] = []
    replays: list[tuple[int, DeviceSeries, ReplayResult]] = []  # kept for --thresholds only
    per_seed: dict[int, Summary] = {}
    for seed in args.seeds:
        spec = FleetSpec(
            n_devices=args.devices,
            duration_s=args.hours * 3600.0,
            period_s=period_s,
            seed=seed,
            anomalies_per_device_hour=args.anomalies,
            gaps_per_device_hour=args.gaps_per_hour,
            start_ts=DAY0 + args.start_hour * 3600.0,
            start_stagger_s=args.stagger_h * 3600.0,
        )
        seed_results = []
        for dev in generate_fleet(spec):
            outcome, replayed = score_device(model, config, dev, seed, period_s)
            seed_results.append(outcome)
            if args.thresholds:
                replays.append((seed, dev, replayed))
        results += seed_results
        per_seed[seed] = summarise(seed_results)
        if args.per_device:
            for d in seed_results:
                print(
                    f"  seed {seed} {d.device}: clean {d.clean_flagged:>5}/{d.clean_windows:<6} "
                    f"{d.clean_rate:.2e}  events {d.found_window}/{d.events} (alert {d.found_alert})  "
                    f"clean alerts {d.clean_alerts}"
                    + (f"  missed {d.kinds_missed}" if d.kinds_missed else ""),
                    flush=True,
                )
        if args.per_seed:
            print(_format(f"seed {seed}", per_seed[seed]), flush=True)
        if args.clean_alerts:
            names = model.contract.feature_names
            for d in seed_results:
                for onset_s, contributions in d.clean_alert_onsets:
                    parts = ", ".join(f"{n} {c:g}" for n, c in zip(names, contributions, strict=True))
                    print(f"  clean alert: seed {seed} {d.device} at {onset_s:.0f} s: {parts}", flush=True)
    total = summarise(results)
    print(_format("all", total))
    missed: dict[str, int] = {}
    for d in results:
        for k in d.kinds_missed:
            missed[k] = missed.get(k, 0) + 1
    print(f"missed events by kind (window level): {dict(sorted(missed.items()))}")
    print(f"event recall by kind (alert level): {_recall_by_kind(results)}")
    sweep: dict[str, dict[str, object]] = {}
    for threshold in args.thresholds:
        # The same scores, decided again by the daemon's detector at another threshold.
        swept = []
        for seed, dev, replayed in replays:
            anomaly, alert = redecide(model, config, replayed, threshold)
            swept.append(count_device(dev, seed, model.window_length, period_s, replayed, anomaly, alert))
        at = summarise(swept)
        print(_format(f"thr {threshold:g}", at))
        print(f"  event recall by kind (alert level): {_recall_by_kind(swept)}", flush=True)
        sweep[f"{threshold:g}"] = asdict(at) | {"recall_by_kind": _recall_by_kind(swept)}
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        doc = {
            "model": str(args.model),
            "model_version": model.contract.model_version,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summary": asdict(total),
            "per_seed": {str(k): asdict(v) for k, v in per_seed.items()},
            "devices": [asdict(d) | {"clean_rate": d.clean_rate} for d in results],
            "thresholds": sweep,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
