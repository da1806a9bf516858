"""ONNX Runtime alone on each execution provider, batch size by batch size.

For the machine at hand: which providers ONNX Runtime offers, which one the daemon's
loader really gets for ``model.providers = "cpu"`` and ``"cuda"`` (``LoadedModel.
active_provider``, from ``session.get_providers()``), and windows/s for each batch size
(the best of ``--repeats`` timed runs of ``--seconds`` each, after a warm-up run), with
the scores of the CUDA session checked against the CPU session's on the same windows.

Run (with ``onnxruntime-gpu`` installed for CUDA):

    .venv/bin/python benchmarks/bench_providers.py [--batches 64,128,256,512,1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from anomalyd.errors import AnomalydError
from anomalyd.model import DEFAULT_MODEL_PATH, LoadedModel, SessionOptions, load_model


def windows_per_s(model: LoadedModel, windows: np.ndarray, seconds: float, repeats: int) -> float:
    model.run(windows)  # warm-up: the first run of a shape allocates
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.run(windows)
            n += windows.shape[0]
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    ap.add_argument("--batches", default="1,64,128,256,512,1024")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the CPU session")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    print(f"onnxruntime {ort.__version__}; available providers: {ort.get_available_providers()}")
    models: dict[str, LoadedModel] = {}
    for choice in ("cpu", "cuda"):
        try:
            m = load_model(args.model, SessionOptions(providers=choice, intra_op_threads=args.threads))
        except AnomalydError as exc:
            print(f"providers={choice!r}: refused: {exc}")
            continue
        print(f"providers={choice!r}: session providers {m.providers}, active {m.active_provider}")
        models[choice] = m
    any_model = next(iter(models.values()))
    c = any_model.contract
    rng = np.random.default_rng(0)
    mean = np.asarray(c.normalisation.mean, np.float32)
    std = np.asarray(c.normalisation.std, np.float32)
    print(f"model {c.model_version}: window {c.window_length} x {c.n_features}")
    print(
        f"{'batch':>6} "
        + " ".join(f"{name + ' windows/s':>18}" for name in models)
        + "  max |cuda-cpu| score"
    )
    for b in batches:
        w = (mean + std * rng.normal(size=(b, c.window_length, c.n_features))).astype(np.float32)
        rates = [windows_per_s(m, w, args.seconds, args.repeats) for m in models.values()]
        diff = ""
        if "cuda" in models and "cpu" in models:
            s_cpu, _ = models["cpu"].run(w)
            s_gpu, _ = models["cuda"].run(w)
            diff = f"{float(np.max(np.abs(s_cpu - s_gpu))):.2e} (scores up to {float(np.max(s_cpu)):.3g})"
        print(f"{b:>6} " + " ".join(f"{r:>18,.0f}" for r in rates) + f"  {diff}")


if __name__ == "__main__":
    main()
