"""Stops that cannot go as planned: a batch stuck in ONNX Runtime, a second signal.

The real daemon runs as a subprocess. A hung ONNX Runtime call cannot be caused on
demand, so it is injected: a ``sitecustomize`` module, on the daemon's ``PYTHONPATH`` only,
makes ``LoadedModel.run`` block for good on the inference threads (the warm-up, on the main
thread, runs the real model) and touch a file once it has.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.config import load_config
from anomalyd.sdnotify import Notifier
from anomalyd.service import EXIT_FORCED, EXIT_INTERNAL, Service
from tests.broker import MosquittoBroker, Subscriber, publish_many, wait_for
from tests.daemon_process import DaemonProcess, NotifyListener

FEATURES = ("temperature", "pressure", "vibration")
L = 4  # tiny model window: quick to fill

_STUCK_INFERENCE = '''\
"""Test fault injection: ONNX Runtime hangs on the daemon's inference threads."""
import os
import threading

from anomalyd import model as _model

_real_run = _model.LoadedModel.run
_entered = os.environ["ANOMALYD_TEST_STUCK_FLAG"]


def _stuck_run(self, windows):
    if threading.current_thread().name.startswith("anomalyd-inference"):
        open(_entered, "w").close()
        threading.Event().wait()  # never returns, like a hung ONNX Runtime call
    return _real_run(self, windows)


_model.LoadedModel.run = _stuck_run
'''


def readings(device: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` readings one second apart, ending about now (the daemon rejects future ones)."""
    t0 = time.time() - n - 5
    return [
        (f"sensors/{device}/telemetry", orjson.dumps({"ts": t0 + i, **dict.fromkeys(FEATURES, 0.1)}))
        for i in range(n)
    ]


@pytest.fixture
def stuck_daemon(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Callable[..., Path]
) -> Iterator[Callable[..., tuple[DaemonProcess, Path]]]:
    """Start the daemon with ONNX Runtime hanging on its inference threads; returns it and
    the file that appears once a batch is stuck."""
    made: list[DaemonProcess] = []

    def start(**sections: dict[str, Any]) -> tuple[DaemonProcess, Path]:
        inject = tmp_path / "inject"
        inject.mkdir(exist_ok=True)
        (inject / "sitecustomize.py").write_text(_STUCK_INFERENCE)
        flag = tmp_path / "stuck"
        path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
        d = DaemonProcess(
            tmp_path / "daemon",
            broker,
            tiny_model(window_length=L),
            sections={"model": {"concurrent_batches": 2}, "batching": {"max_delay_ms": 1.0}, **sections},
            env={"PYTHONPATH": path, "ANOMALYD_TEST_STUCK_FLAG": str(flag)},
        )
        made.append(d)
        return d, flag

    yield start
    for d in made:
        d.close()


def _get_stuck(broker: MosquittoBroker, d: DaemonProcess, flag: Path) -> None:
    d.wait_ready()
    publish_many(broker, readings("w", L))  # one full window: one batch, which hangs
    wait_for(flag.exists, 20, what="a batch stuck in ONNX Runtime")


def test_a_stop_gives_up_on_a_stuck_batch_at_the_drain_deadline_and_exits_70(
    broker: MosquittoBroker, stuck_daemon: Callable[..., tuple[DaemonProcess, Path]]
) -> None:
    status = Subscriber(broker, ["anomaly/status"])
    try:
        d, flag = stuck_daemon(shutdown={"drain_timeout_s": 1.0})
        _get_stuck(broker, d, flag)
        d.signal(signal.SIGTERM)
        # Generous: the stop takes the 1 s deadline and 2 s of grace. Without the fix the
        # process never ends (the interpreter's exit waits for the stuck thread).
        assert d.wait(60) == EXIT_INTERNAL
        # The stop still told the broker.
        status.wait_until(lambda ms: bool(ms) and ms[-1].payload == b"stopped", 10, "stopped")
    finally:
        status.close()
    log = d.log()
    assert "drain deadline (1.0 s) passed" in log
    assert "the pipeline thread did not end" in log
    assert "about 1 windows lost" in log
    assert "stopped (exit 70)" in log
    assert "Traceback" not in log


def test_a_second_sigterm_ends_a_stop_stuck_on_a_batch_with_130(
    broker: MosquittoBroker, stuck_daemon: Callable[..., tuple[DaemonProcess, Path]]
) -> None:
    d, flag = stuck_daemon(shutdown={"drain_timeout_s": 600.0})
    _get_stuck(broker, d, flag)
    d.signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1", 20)  # the first stop has begun
    time.sleep(1.0)  # not needed to pass: lets the first stop reach its wait for the drain
    d.signal(signal.SIGTERM)
    # Far less than the 600 s drain deadline the first stop would wait for.
    assert d.wait(60) == EXIT_FORCED
    log = d.log()
    assert "second stop request" in log
    assert "the pipeline thread did not end" in log
    assert "forced stop: dropped 0 queued messages and about 1 pending windows" in log
    assert "stopped (exit 130)" in log
    assert "drain deadline" not in log


# --------------------------------------------------------------------------- in-process


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_a_forced_stop_counts_and_logs_the_telemetry_left_in_the_intake_queue(
    broker: MosquittoBroker,
    tiny_model: Callable[..., Path],
    notify: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cfg = load_config(
        None,
        {
            "mqtt.host": broker.host,
            "mqtt.port": broker.port,
            "model.path": str(tiny_model(window_length=L)),
            "model.concurrent_batches": 1,  # the pipeline thread itself scores: stuck, it takes nothing
            "metrics.enabled": False,
            "batching.max_delay_ms": 1.0,
        },
    )
    svc = Service(cfg, registry=CollectorRegistry(), notifier=Notifier(str(notify.path)))
    assert svc.start()
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(svc.run_forever()), name="test-run")
    runner.start()
    release = threading.Event()
    entered = threading.Event()
    try:
        assert svc.model is not None
        real_run = svc.model.run

        def stuck_run(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fault injection
            entered.set()
            release.wait(60)
            return real_run(windows)

        monkeypatch.setattr(svc.model, "run", stuck_run)
        publish_many(broker, readings("w", L))
        assert entered.wait(20)
        queued = 25
        publish_many(broker, readings("q", queued))

        def depth() -> float:
            return svc.registry.get_sample_value("anomalyd_intake_queue_depth") or 0.0

        wait_for(lambda: depth() == queued, 20, what=f"{queued} messages in the intake queue")
        svc.request_stop()
        svc.request_stop()
        release.set()  # the pipeline thread ends its pass, then obeys the forced stop
        runner.join(60)
        assert codes == [EXIT_FORCED]
    finally:
        release.set()
        svc.request_stop()
        runner.join(60)
    dropped = svc.registry.get_sample_value("anomalyd_messages_dropped_total", {"reason": "shutdown"})
    assert dropped == queued
    assert f"forced stop: dropped {queued} queued messages and 0 pending windows" in caplog.text
    assert depth() == 0
