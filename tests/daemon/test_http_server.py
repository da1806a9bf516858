"""The HTTP endpoint over real sockets: /metrics, /healthz, /readyz, 404/405, the idle and
header timeouts, the connection bound; and /healthz, /readyz of a real service against a
real Mosquitto."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from anomalyd.config import load_config
from anomalyd.http_server import HttpLimits, HttpServer
from anomalyd.metrics import Metrics, MetricsServer
from anomalyd.sdnotify import Notifier
from anomalyd.service import Service
from tests.broker import MosquittoBroker, publish_many, wait_for

FEATURES = ("temperature", "pressure", "vibration")
L = 4  # tiny model window

#: Long enough never to fire during a test that is not about it.
NEVER_S = 120.0


def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    status, _headers, body = request(port, "GET", path)
    return status, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed ``sock`` (EOF or reset), False after ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def sample(body: bytes, name: str) -> float | None:
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and not s.labels:
                return float(s.value)
    return None


class FakeChecks:
    """Stand-in health source: the test sets each check's result."""

    def __init__(self, **checks: bool) -> None:
        self.checks = dict(checks)
        self.fail_with: Exception | None = None

    def __call__(self) -> dict[str, bool]:
        if self.fail_with is not None:
            raise self.fail_with
        return dict(self.checks)


@pytest.fixture
def servers() -> Iterator[list[HttpServer | MetricsServer]]:
    made: list[HttpServer | MetricsServer] = []
    yield made
    for s in made:
        s.close()


@pytest.fixture
def serve(
    registry: CollectorRegistry, servers: list[HttpServer | MetricsServer]
) -> Callable[..., HttpServer]:
    def make(**kwargs: object) -> HttpServer:
        server = HttpServer(registry, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    return make


# --------------------------------------------------------------------------- endpoints


def test_metrics_get_and_head_serve_the_registry(
    registry: CollectorRegistry, serve: Callable[..., HttpServer]
) -> None:
    metrics = Metrics(registry)
    metrics.windows_scored.inc(5)
    server = serve()
    status, headers, body = request(server.port, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert sample(body, "anomalyd_windows_scored_total") == 5.0
    # HEAD: the same head, no body.
    status, head_headers, head_body = request(server.port, "HEAD", "/metrics")
    assert (status, head_body) == (200, b"")
    assert head_headers["Content-Length"] == str(len(body))
    # OpenMetrics when asked for, gzip when accepted, one family when filtered.
    status, headers, om = request(server.port, "GET", "/metrics", {"Accept": "application/openmetrics-text"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.rstrip().endswith(b"# EOF")
    status, headers, zipped = request(server.port, "GET", "/metrics", {"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert sample(gzip.decompress(zipped), "anomalyd_windows_scored_total") == 5.0
    status, only = get(server.port, "/metrics?name[]=anomalyd_windows_scored_total")
    assert status == 200
    assert {f.name for f in text_string_to_metric_families(only.decode())} == {"anomalyd_windows_scored"}


def test_requests_share_a_keep_alive_connection(serve: Callable[..., HttpServer]) -> None:
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for path in ("/metrics", "/healthz", "/readyz", "/nope", "/metrics"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == (404 if path == "/nope" else 200)
        assert server.open_connections == 1
    finally:
        conn.close()


def test_healthz_and_readyz_answer_their_checks(serve: Callable[..., HttpServer]) -> None:
    live = FakeChecks(pipeline_loop=True)
    ready = FakeChecks(model_loaded=True, broker_connected=False)
    server = serve(liveness=live, readiness=ready)
    assert get(server.port, "/healthz") == (200, b"ok\n")
    status, body = get(server.port, "/readyz")
    assert status == 503
    assert body == b"[+]model_loaded ok\n[-]broker_connected failed\nreadyz check failed\n"
    ready.checks["broker_connected"] = True
    assert get(server.port, "/readyz") == (200, b"ok\n")
    assert get(server.port, "/readyz?verbose") == (
        200,
        b"[+]model_loaded ok\n[+]broker_connected ok\nreadyz check passed\n",
    )
    live.checks["pipeline_loop"] = False
    assert get(server.port, "/healthz") == (503, b"[-]pipeline_loop failed\nhealthz check failed\n")
    status, headers, _ = request(server.port, "HEAD", "/healthz")
    assert (status, headers["Cache-Control"]) == (503, "no-store")
    # A check that raises fails its endpoint; the server goes on serving.
    ready.fail_with = RuntimeError("boom")
    status, body = get(server.port, "/readyz")
    assert status == 503
    assert b"check failed" in body
    assert get(server.port, "/metrics")[0] == 200


def test_without_checks_health_endpoints_answer_ok(serve: Callable[..., HttpServer]) -> None:
    server = serve()
    assert get(server.port, "/healthz") == (200, b"ok\n")
    assert get(server.port, "/readyz") == (200, b"ok\n")


@pytest.mark.parametrize(
    "path", ["/", "/foo", "/metrics/x", "/metrics/", "/healthz/", "/readyzz", "/METRICS"]
)
def test_other_paths_are_404(serve: Callable[..., HttpServer], path: str) -> None:
    server = serve()
    status, body = get(server.port, path)
    assert status == 404
    assert b"/metrics" in body  # says where to look


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_other_methods_are_405(serve: Callable[..., HttpServer], method: str) -> None:
    server = serve()
    for path in ("/metrics", "/healthz", "/readyz"):
        status, headers, _ = request(server.port, method, path, body=b"x=1")
        assert status == 405, (method, path)
        assert headers["Allow"] == "GET, HEAD"
        # Its body is never read, so the connection is not reused.
        assert headers["Connection"] == "close"


def test_malformed_and_oversized_requests_get_4xx(serve: Callable[..., HttpServer]) -> None:
    server = serve()
    for raw, status in (
        (b"NONSENSE\r\n\r\n", b" 400 "),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b" 414 "),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(raw)
            assert status in sock.recv(200).split(b"\r\n")[0] + b" "
    assert get(server.port, "/metrics")[0] == 200


# --------------------------------------------------------------------------- timeouts, bound


def test_an_idle_connection_is_closed_after_the_idle_timeout(serve: Callable[..., HttpServer]) -> None:
    server = serve(limits=HttpLimits(idle_timeout_s=0.3, header_timeout_s=NEVER_S))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        assert closed_by_server(silent, 30)
    # ... and also after a response, waiting for the next request.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"ok\n"):
            reply += kept.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert closed_by_server(kept, 30)
    wait_for(lambda: server.open_connections == 0, 10, what="the connections to be let go")


def test_a_request_head_trickled_in_is_cut_off_at_the_header_timeout(
    serve: Callable[..., HttpServer],
) -> None:
    # Each byte comes well within the idle timeout: only the deadline on the whole head can end it.
    server = serve(limits=HttpLimits(idle_timeout_s=NEVER_S, header_timeout_s=0.5))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed = False
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([slow], [], [], 0.1)
            if readable:
                closed = closed_by_server(slow, 1)
        assert closed, "the server kept a request head open for 30 s"


def test_connections_beyond_the_bound_are_closed_counted_and_take_no_thread(
    registry: CollectorRegistry, servers: list[HttpServer | MetricsServer]
) -> None:
    metrics = Metrics(registry)
    bound, extra = 8, 192
    server = MetricsServer(
        registry,
        "127.0.0.1",
        0,
        limits=HttpLimits(idle_timeout_s=NEVER_S, header_timeout_s=NEVER_S, max_connections=bound),
        metrics=metrics,
    )
    servers.append(server)
    threads_before = threading.active_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(bound + extra):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        wait_for(
            lambda: registry.get_sample_value("anomalyd_http_connections_refused_total") == extra,
            30,
            what=f"{extra} refusals",
        )
        assert registry.get_sample_value("anomalyd_http_connections") == bound
        assert threading.active_count() <= threads_before + bound
        # The refused ones were closed by the server; the served ones are still open.
        assert sum(closed_by_server(s, 5) for s in idle[bound:]) == extra
        # While the bound is taken, a scrape is refused too (closed unanswered).
        with pytest.raises(ConnectionError):  # reset, or closed before any answer
            get(server.port, "/metrics")
    finally:
        for s in idle:
            s.close()
    wait_for(
        lambda: registry.get_sample_value("anomalyd_http_connections") == 0, 30, what="the connections to end"
    )
    status, body = get(server.port, "/metrics")
    assert status == 200
    assert sample(body, "anomalyd_http_connections_refused_total") == extra + 1
    wait_for(lambda: threading.active_count() <= threads_before, 30, what="the connection threads to end")


def test_idle_connections_holding_the_bound_time_out_and_the_server_recovers(
    serve: Callable[..., HttpServer],
) -> None:
    server = serve(limits=HttpLimits(idle_timeout_s=0.5, header_timeout_s=NEVER_S, max_connections=2))
    hogs = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        wait_for(lambda: server.open_connections == 2, 10, what="both hogs to be served")
        # The hogs never close; the server's idle timeout frees the slots.
        for hog in hogs:
            assert closed_by_server(hog, 30)

        def scrape_ok() -> bool:
            with contextlib.suppress(ConnectionError):
                return get(server.port, "/metrics")[0] == 200
            return False

        wait_for(scrape_ok, 30, what="a scrape to be served again")
    finally:
        for hog in hogs:
            hog.close()


def test_close_ends_open_connections(serve: Callable[..., HttpServer]) -> None:
    threads_before = threading.active_count()
    server = serve(limits=HttpLimits(idle_timeout_s=NEVER_S, header_timeout_s=NEVER_S))
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        wait_for(lambda: server.open_connections == 3, 10, what="three connections served")
        server.close()
        assert all(closed_by_server(s, 10) for s in idle)
        wait_for(lambda: threading.active_count() <= threads_before, 10, what="every server thread to end")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    finally:
        for s in idle:
            s.close()


# --------------------------------------------------------------------------- the real service


def _readings(device: str, n: int, start: float) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/{device}/telemetry", orjson.dumps({"ts": start + i, **dict.fromkeys(FEATURES, 0.1)}))
        for i in range(n)
    ]


def test_service_health_follows_broker_stall_and_overload(
    broker_factory: Callable[..., MosquittoBroker],
    tiny_model: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = broker_factory(started=False)  # the service starts before its broker
    cfg = load_config(
        None,
        {
            "mqtt.host": broker.host,
            "mqtt.port": broker.port,
            "mqtt.reconnect_max_s": 0.5,
            "model.path": str(tiny_model(window_length=L)),
            "metrics.enabled": True,
            "metrics.port": 0,
            "metrics.stall_timeout_s": 2.0,
            "batching.max_delay_ms": 1.0,
            "stream.overload_lag_s": 5.0,
        },
    )
    svc = Service(cfg, registry=CollectorRegistry(), notifier=Notifier(""))
    started: list[bool] = []
    starter = threading.Thread(target=lambda: started.append(svc.start()), name="test-start")
    starter.start()
    runner: threading.Thread | None = None
    release = threading.Event()
    stop_flood = threading.Event()
    try:
        port: int = wait_for(lambda: svc.metrics_port or 0, 30, what="the metrics server")
        # Waiting for the broker: alive, not ready, and it says why.
        wait_for(lambda: get(port, "/healthz") == (200, b"ok\n"), 10, what="/healthz 200")
        status, body = get(port, "/readyz")
        assert status == 503
        assert b"[+]model_loaded ok" in body
        assert b"[-]broker_connected failed" in body
        assert b"[-]running failed" in body
        assert get(port, "/metrics")[0] == 200
        broker.start()
        starter.join(30)
        assert started == [True]
        runner = threading.Thread(target=svc.run_forever, name="test-run")
        runner.start()
        assert get(port, "/readyz") == (200, b"ok\n")
        assert sample(get(port, "/metrics")[1], "anomalyd_ready") == 1.0

        # A batch stuck in ONNX Runtime (fault injection): /healthz fails, then recovers.
        assert svc.model is not None
        real_run = svc.model.run
        entered = threading.Event()

        def stuck_run(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            entered.set()
            release.wait(60)
            return real_run(windows)

        monkeypatch.setattr(svc.model, "run", stuck_run)
        publish_many(broker, _readings("stuck", L, time.time() - L - 5))
        assert entered.wait(20)
        wait_for(lambda: get(port, "/healthz")[0] == 503, 30, what="/healthz 503 while stuck")
        assert b"failed" in get(port, "/healthz")[1]
        release.set()
        monkeypatch.setattr(svc.model, "run", real_run)
        wait_for(lambda: get(port, "/healthz") == (200, b"ok\n"), 30, what="/healthz 200 once unstuck")

        # Overloaded: telemetry that keeps arriving a minute behind (a backlog in the broker):
        # five devices, each a reading a second in data time and in wall time, in turns, so
        # that every pipeline pass scores late windows.
        def flood() -> None:
            devices = [f"late-{k}" for k in range(5)]
            base = time.time() - 60
            publish_many(broker, [m for d in devices for m in _readings(d, L - 1, base - L)])
            i = 0
            while not stop_flood.is_set():
                publish_many(broker, _readings(devices[i % 5], 1, base + i // 5))
                i += 1
                stop_flood.wait(0.2)

        flooder = threading.Thread(target=flood, name="test-flood", daemon=True)
        flooder.start()
        wait_for(lambda: b"[-]not_overloaded failed" in get(port, "/readyz")[1], 30, what="overloaded")
        stop_flood.set()
        flooder.join(30)
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="ready again after the backlog")

        # The broker goes away: not ready (still alive); back: ready.
        broker.stop()
        wait_for(lambda: b"[-]broker_connected failed" in get(port, "/readyz")[1], 30, what="not ready")
        assert get(port, "/healthz")[0] == 200
        broker.start()
        wait_for(lambda: get(port, "/readyz") == (200, b"ok\n"), 30, what="ready after reconnect")
    finally:
        release.set()
        stop_flood.set()
        svc.request_stop()
        starter.join(30)
        if runner is not None:
            runner.join(30)
        else:
            svc.shutdown()
