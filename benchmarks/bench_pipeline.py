"""The daemon's Pipeline on one thread without the MQTT receive path, as a ratio against
ONNX Runtime alone measured in the same run (never absolute targets: machines are shared).

It runs the same ``anomalyd.pipeline.Pipeline`` the service runs — decoder, buffers,
batcher, model, detector, and the real ``Publisher`` on a real MQTT connection to a
private Mosquitto, with the service's metrics — fed pre-built telemetry messages in
drains of ``--drain`` messages, as the service's pipeline thread takes them from its
intake queue. What it leaves out is the paho network thread that receives them (see
``anomalyd bench`` for the whole daemon behind a broker).

Figures, all from this run:

* limit: ONNX Runtime alone scoring preallocated windows at the same batch size, the
  best of 1 and 2 intra-op threads (measured before and after; the higher is kept, so a
  busy neighbour makes the ratio pessimistic, never flattering);
* pipeline: windows/s through the Pipeline, and its split: µs per window inside
  ``model.run`` (from ``anomalyd_inference_seconds``) and µs per window everywhere else;
* the messages published (score messages are rate-limited: ``--score-interval``).

Run:

    .venv/bin/python benchmarks/bench_pipeline.py [--devices 500] [--array 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from anomalyd.broker import PrivateBroker
from anomalyd.config import load_config
from anomalyd.decode import RawMessage
from anomalyd.metrics import Metrics
from anomalyd.model import DEFAULT_MODEL_PATH, LoadedModel, SessionOptions, load_model
from anomalyd.mqtt import MqttLink
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import Publisher
from anomalyd.synthetic import FleetSpec, generate_fleet


def bench_model(model: LoadedModel, max_batch: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    mean = np.asarray(model.contract.normalisation.mean, np.float32)
    std = np.asarray(model.contract.normalisation.std, np.float32)
    windows = (mean + std * rng.normal(size=(max_batch, model.window_length, model.n_features))).astype(
        np.float32
    )
    model.run(windows)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.run(windows)
        n += max_batch
    return n / (time.perf_counter() - t0)


def make_messages(devices: int, readings: int, array: int, topic: str) -> list[RawMessage]:
    """Telemetry of ``devices`` × ``readings`` normal readings, ``array`` per message, stamped
    so that the newest reading is about now (every reading accepted, none in the future)."""
    fleet = generate_fleet(
        FleetSpec(
            n_devices=devices,
            duration_s=readings + 10.0,
            anomalies_per_device_hour=0.0,
            gaps_per_device_hour=0.0,
            seed=7,
        )
    )
    names = ["temperature", "pressure", "vibration"]  # the default model's features
    t_end = time.time()
    now_mono = time.monotonic()
    messages: list[RawMessage] = []
    for k in range(0, readings, array):
        for d, series in enumerate(fleet):
            items = [
                {
                    "ts": t_end - readings + k + j + d * 1e-4,
                    **dict(zip(names, series.values[k + j].tolist(), strict=True)),
                }
                for j in range(min(array, readings - k))
            ]
            payload = orjson.dumps(items if array > 1 else items[0])
            messages.append(RawMessage(topic.replace("{device}", series.device), payload, t_end, now_mono))
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--readings", type=int, default=400, help="readings per device")
    ap.add_argument("--array", type=int, default=20, help="readings per message (1: single readings)")
    ap.add_argument("--seconds", type=float, default=4.0, help="time for the model-only limit")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--concurrent", type=int, default=2, help="model.concurrent_batches")
    ap.add_argument("--providers", default="cpu", choices=("cpu", "cuda"), help="model.providers")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--drain", type=int, default=4096, help="messages per pass, as the service drains")
    ap.add_argument("--score-interval", type=float, default=1.0, help="output.score_interval_s")
    args = ap.parse_args()

    with PrivateBroker() as broker:
        cfg = load_config(
            None,
            {
                "mqtt.host": broker.host,
                "mqtt.port": broker.port,
                "model.path": args.model,
                "model.intra_op_threads": args.threads,
                "model.concurrent_batches": args.concurrent,
                "model.providers": args.providers,
                # faster than real time on purpose: the cadence check would not score it
                "stream.cadence_check": False,
                "batching.max_batch": args.max_batch,
                # Warming every size up to a large max_batch would take longer than the run.
                "batching.warmup_batch_sizes": sorted({1, args.max_batch}),
                "output.score_interval_s": args.score_interval,
                "logging.level": "WARNING",
            },
        )
        model = load_model(
            cfg.model.path, SessionOptions(providers=args.providers, intra_op_threads=args.threads)
        )
        # The limit is the model alone at its best on this machine and provider: 1 or 2
        # intra-op threads.
        alone = [
            load_model(cfg.model.path, SessionOptions(providers=args.providers, intra_op_threads=t))
            for t in (1, 2)
        ]
        model.warm_up(cfg.batching.warmup_sizes())
        c = model.contract
        print(
            f"model {c.model_version}: L={c.window_length} F={c.n_features}, provider "
            f"{model.active_provider}, threads={args.threads}, concurrent batches {args.concurrent}, "
            f"batch {args.max_batch}"
        )
        limit_before = max(bench_model(m, args.max_batch, args.seconds / 4) for m in alone)

        registry = CollectorRegistry()
        metrics = Metrics(registry, args.max_batch)
        link = MqttLink(cfg.mqtt, metrics=metrics, name="bench-publisher")
        publisher = Publisher(
            link, cfg.output, metrics, feature_names=c.feature_names, model_version=c.model_version
        )
        link.start()
        if not link.wait_connected(10):
            raise SystemExit("could not connect to the private broker")
        pipeline = Pipeline(cfg, model, metrics, publisher)
        messages = make_messages(args.devices, args.readings, args.array, cfg.mqtt.topic_in)
        t0 = time.perf_counter()
        for lo in range(0, len(messages), args.drain):
            pipeline.ingest(messages[lo : lo + args.drain])
            pipeline.flush()
        pipeline.flush(force=True)
        wall = time.perf_counter() - t0
        link.flush(10)
        link.close()
        limit = max(limit_before, *(bench_model(m, args.max_batch, args.seconds / 4) for m in alone))

    windows = pipeline.windows_scored
    readings = registry.get_sample_value("anomalyd_readings_accepted_total") or 0.0
    in_model = registry.get_sample_value("anomalyd_inference_seconds_sum") or 0.0
    rate = windows / wall

    def published(kind: str) -> int:
        return int(registry.get_sample_value("anomalyd_published_total", {"kind": kind}) or 0)

    print(
        f"limit_model      {limit:10.0f} windows/s  (ONNX Runtime alone, batch {args.max_batch}, "
        "best of 1-2 threads)"
    )
    print(
        f"pipeline         {rate:10.0f} windows/s  ({len(messages)} messages of {args.array}, "
        f"{readings:.0f} readings, {windows} windows, {wall:.2f} s)"
    )
    print(f"ratio            {rate / limit:10.2f}  (pipeline / limit_model; 1.0: the model is the only cost)")
    # With concurrent batches the time inside model.run overlaps the rest: no "else" figure.
    print(f"  in model.run   {1e6 * in_model / max(windows, 1):10.2f} µs/window (summed over threads)")
    if args.concurrent == 1:
        print(f"  everything else{1e6 * (wall - in_model) / max(windows, 1):10.2f} µs/window")
    print(
        f"published        {published('score')} score messages (score_interval_s {args.score_interval}), "
        f"{published('alert')} alerts"
    )


if __name__ == "__main__":
    main()
