"""The cadence check on healthy synthetic fleets sent at the wrong rate.

Healthy devices (no injected anomalies, no gaps) at a sample period of 5 s, 1 s and 0.5 s
go through the daemon's own ``Pipeline`` (decoder-free: readings straight into the
buffers) with the committed default model (trained at 1 s): without the cadence check
(``stream.cadence_check = false``: what the daemon did before it had one), with it
(mismatched devices are not scored), and with linear resampling. Printed per run: windows scored,
the share flagged (score above the threshold), alert states raised, and the devices'
final alert states. Deterministic for a given ``--seed``.

Run: ``.venv/bin/python benchmarks/eval_cadence.py`` (about 30 s on one core).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from anomalyd.alerts import ANOMALOUS, AlertRecord
from anomalyd.config import load_config
from anomalyd.decode import DecodedBatch
from anomalyd.detector import Decision
from anomalyd.metrics import Metrics
from anomalyd.model import DEFAULT_MODEL_PATH, load_model
from anomalyd.pipeline import Pipeline
from anomalyd.simulator import SimulationSettings, build_stream
from anomalyd.synthetic_spec import FleetSpec


class Collector:
    """Keeps every decision and alert state the pipeline hands out."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.states: list[AlertRecord] = []

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        self.decisions.extend(decisions)

    def flush_scores(self) -> None:
        pass

    def forget(self, devices: list[str]) -> None:
        pass

    def set_overloaded(self, overloaded: bool) -> None:
        pass

    def publish_states(self, records: list[AlertRecord]) -> None:
        self.states.extend(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument(
        "--hours", type=float, default=1.0, help="hours of data per device at 1 s (longer when slower)"
    )
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    model = load_model(DEFAULT_MODEL_PATH)
    for period in (5.0, 1.0, 0.5):
        for mode in ("no check", "check", "resample"):
            if period == 1.0 and mode == "resample":
                continue  # nothing to resample at the model's own rate
            spec = FleetSpec(
                n_devices=args.devices,
                duration_s=3600 * args.hours * max(1.0, period),
                period_s=period,
                seed=args.seed,
                anomalies_per_device_hour=0.0,
                gaps_per_device_hour=0.0,
            )
            stream = build_stream(SimulationSettings(fleet=spec), time.time() - spec.duration_s - 100)
            cfg = load_config(
                None,
                {
                    "batching.max_delay_ms": 0.0,
                    "model.concurrent_batches": 1,
                    "stream.cadence_check": mode != "no check",
                    "stream.resample": "linear" if mode == "resample" else "off",
                },
            )
            sink = Collector()
            pipeline = Pipeline(cfg, model, Metrics(CollectorRegistry()), sink)
            names = [d.device for d in stream.fleet]
            t0 = time.perf_counter()
            for i in range(0, len(stream.ts), 2000):
                sl = slice(i, i + 2000)
                n = len(stream.ts[sl])
                batch = DecodedBatch(
                    [names[k] for k in stream.device_index[sl]],
                    stream.ts[sl],
                    stream.values[sl],
                    np.full(n, time.monotonic()),
                    [],
                )
                pipeline.ingest_readings(batch)
            pipeline.flush(force=True)
            pipeline.close()
            seconds = time.perf_counter() - t0
            scored = len(sink.decisions)
            flagged = sum(d.anomaly for d in sink.decisions)
            raised = sum(1 for r in sink.states if r.state == ANOMALOUS)
            final = {r.device: r.state for r in sink.states}
            hours = args.devices * spec.duration_s / 3600
            print(
                f"period {period:g} s, {mode}: {len(stream.ts)} readings, {scored} windows "
                f"scored, {flagged} flagged ({100 * flagged / max(1, scored):.2f} %), {raised} alerts in "
                f"{hours:g} device-hours, final states {dict(collections.Counter(final.values()))} "
                f"({seconds:.1f} s)"
            )


if __name__ == "__main__":
    main()
