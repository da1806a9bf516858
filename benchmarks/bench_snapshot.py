"""Size and cost of a state snapshot (``anomalyd.snapshot``) with the committed default model.

``--devices`` devices, each with a full window, through the daemon's own ``Pipeline``;
then: copying the state on the pipeline thread (``export_snapshot``), writing the file
(``save_snapshot``, what the snapshot thread does), and at start reading it back and
restoring it into a fresh pipeline.

Run: ``.venv/bin/python benchmarks/bench_snapshot.py`` (a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from anomalyd.config import load_config
from anomalyd.decode import DecodedBatch
from anomalyd.metrics import Metrics
from anomalyd.model import DEFAULT_MODEL_PATH, load_model
from anomalyd.pipeline import Pipeline
from anomalyd.snapshot import load_snapshot, save_snapshot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args()
    model = load_model(DEFAULT_MODEL_PATH)
    c = model.contract
    cfg = load_config(None, {"batching.max_delay_ms": 0.0, "stream.max_devices": args.devices})
    pipeline = Pipeline(cfg, model, Metrics(CollectorRegistry()))
    names = [f"dev-{i:05d}" for i in range(args.devices)]
    rng = np.random.default_rng(0)
    t0 = time.time() - c.window_length - 10
    for k in range(c.window_length + 2):
        values = rng.normal(size=(args.devices, c.n_features)).astype(np.float32)
        now = np.full(args.devices, time.monotonic())
        pipeline.ingest_readings(DecodedBatch(names, np.full(args.devices, t0 + k), values, now, []))
    pipeline.flush(force=True)
    start = time.perf_counter()
    snap = pipeline.export_snapshot()
    exported = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = save_snapshot(Path(tmp), snap)
        written = time.perf_counter() - start
        size = path.stat().st_size
        start = time.perf_counter()
        back = load_snapshot(
            Path(tmp),
            model_version=c.model_version,
            feature_names=c.feature_names,
            window_length=c.window_length,
            max_age_s=60,
        )
        loaded = time.perf_counter() - start
    fresh = Pipeline(cfg, model, Metrics(CollectorRegistry()))
    start = time.perf_counter()
    restored = fresh.restore_snapshot(back)
    restore = time.perf_counter() - start
    pipeline.close()
    fresh.close()
    print(
        f"{args.devices} devices, window {c.window_length}, {c.n_features} features: copy "
        f"{1000 * exported:.0f} ms (pipeline thread), write {1000 * written:.0f} ms, "
        f"{size / 1e6:.1f} MB, read {1000 * loaded:.0f} ms, restore {1000 * restore:.0f} ms "
        f"({restored} devices)"
    )


if __name__ == "__main__":
    main()
