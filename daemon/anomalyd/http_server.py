"""The daemon's HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for
supervisors, orchestrators and load balancers.

* ``GET /metrics`` (and ``HEAD``): the registry in the Prometheus text format, or
  OpenMetrics when the ``Accept`` header asks for it; gzip when ``Accept-Encoding``
  allows it; ``?name[]=...`` restricts it to those families (all as prometheus_client's
  own server does).
* ``GET /healthz``: liveness. 200 ``ok`` while every liveness check passes, else 503.
* ``GET /readyz``: readiness. 200 ``ok`` while every readiness check passes, else 503.
  Both list their checks on a failure, or with ``?verbose``, one a line (``[+]name ok`` or
  ``[-]name failed``, as Kubernetes' own components do).
* Any other path: 404; another method on one of these paths: 405.

The checks are callables that return ``{name: passing}``; this module knows nothing of
what they look at. Without a callable, that endpoint has no checks and answers 200.

Resources stay bounded whatever clients do: at most ``max_connections`` connections are
served at once, one thread each; a connection beyond that is closed as soon as it is
accepted (no thread, no read) and counted (``on_refused``). A connection that sends no
request for ``idle_timeout_s`` (none yet, or none after the previous response) is closed,
and so is one whose request line and headers have not all arrived ``header_timeout_s``
after their first byte (a slow sender cannot keep it open by trickling bytes); a client
that does not read its response within ``idle_timeout_s`` loses it. Request bodies are
never read: a request that has one gets its answer and then the connection is closed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import socket
import socketserver
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from anomalyd.logsetup import RateLimitedLog

if TYPE_CHECKING:
    from email.message import Message

    from _typeshed import WriteableBuffer

__all__ = ["Checks", "HttpLimits", "HttpServer"]

log = logging.getLogger(__name__)

#: A health check source: returns ``{check name: passing}``; called on every request.
Checks = Callable[[], Mapping[str, bool]]

_PLAIN = "text/plain; charset=utf-8"
_ALLOWED_METHODS = ("GET", "HEAD")
#: Longest request line taken (as http.server's own limit); headers are limited by http.client.
_MAX_REQUEST_LINE = 65536
#: Accepted connections waiting in the kernel for the accept loop.
_LISTEN_BACKLOG = 128
#: How often the accept loop looks for a shutdown request (bounds how long ``close`` takes).
_SHUTDOWN_POLL_S = 0.1
#: How long ``close`` waits for the connection threads to end once their sockets are shut.
_CLOSE_JOIN_S = 5.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Timeouts and the connection bound (``[metrics]`` in the configuration)."""

    idle_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    max_connections: int = 32

    def __post_init__(self) -> None:
        if not (self.idle_timeout_s > 0 and self.header_timeout_s > 0):
            raise ValueError("HTTP timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


@dataclass(frozen=True, slots=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = _PLAIN
    headers: tuple[tuple[str, str], ...] = field(default=())


class _Endpoints:
    """What each path answers; independent of the connection handling."""

    def __init__(
        self, registry: CollectorRegistry, liveness: Checks | None, readiness: Checks | None
    ) -> None:
        self._registry = registry
        self._checks: dict[str, Checks | None] = {"healthz": liveness, "readyz": readiness}
        self._error_log = RateLimitedLog(log, 60.0)
        self.paths: dict[str, Callable[[Mapping[str, list[str]], Message[str, str]], _Response]] = {
            "/metrics": self.metrics,
            "/healthz": lambda query, _headers: self.health("healthz", query),
            "/readyz": lambda query, _headers: self.health("readyz", query),
        }

    def metrics(self, query: Mapping[str, list[str]], headers: Message[str, str]) -> _Response:
        encoder, content_type = choose_encoder(headers.get("Accept", ""))
        source: Collector = self._registry
        if "name[]" in query:
            source = self._registry.restricted_registry(query["name[]"])
        try:
            body = encoder(source)
        except Exception:
            # A collector failed (e.g. a callback gauge): say so, keep serving.
            self._error_log.log(
                logging.ERROR, "metrics", "rendering /metrics failed:\n%s", traceback.format_exc().rstrip()
            )
            return _Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"rendering the metrics failed; see the log\n")
        extra: tuple[tuple[str, str], ...] = ()
        if gzip_accepted(headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            extra = (("Content-Encoding", "gzip"),)
        return _Response(HTTPStatus.OK, body, content_type, extra)

    def health(self, name: str, query: Mapping[str, list[str]]) -> _Response:
        no_store = (("Cache-Control", "no-store"),)
        source = self._checks[name]
        try:
            results = dict(source()) if source is not None else {}
        except Exception:
            self._error_log.log(
                logging.ERROR, name, "the /%s checks failed:\n%s", name, traceback.format_exc().rstrip()
            )
            body = f"[-]checks raised an error\n{name} check failed\n".encode()
            return _Response(HTTPStatus.SERVICE_UNAVAILABLE, body, headers=no_store)
        passing = all(results.values())
        if passing and "verbose" not in query:
            return _Response(HTTPStatus.OK, b"ok\n", headers=no_store)
        lines = [f"[+]{check} ok" if ok else f"[-]{check} failed" for check, ok in results.items()]
        lines.append(f"{name} check {'passed' if passing else 'failed'}")
        status = HTTPStatus.OK if passing else HTTPStatus.SERVICE_UNAVAILABLE
        return _Response(status, ("\n".join(lines) + "\n").encode(), headers=no_store)


class _DeadlineReader(io.RawIOBase):
    """The socket read against one deadline for a whole phase (waiting for a request,
    reading its head), not a timeout per ``recv``: a client trickling a byte at a time
    cannot stretch the phase."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(None if math.isinf(remaining) else remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    """One connection: requests one after another (HTTP/1.1 keep-alive), GET and HEAD only."""

    protocol_version = "HTTP/1.1"
    # Malformed requests get a status line too (0.9 would mean a bare body).
    default_request_version = "HTTP/1.0"
    server_version = "anomalyd"
    sys_version = ""
    error_content_type = _PLAIN
    error_message_format = "%(code)d %(message)s\n"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Our own buffered reader over the deadline-bound raw reader (replaces the plain one).
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection)
        self._buffered = io.BufferedReader(self._reader)
        self.rfile = self._buffered

    def handle_one_request(self) -> None:
        limits = self.server.limits
        self.close_connection = True
        self._reader.deadline = time.monotonic() + limits.idle_timeout_s
        try:
            if not self._buffered.peek(1):
                return  # the client closed the connection
        except TimeoutError:
            log.debug(
                "HTTP connection from %s idle for %.1f s: closed",
                self.address_string(),
                limits.idle_timeout_s,
            )
            return
        self._reader.deadline = time.monotonic() + limits.header_timeout_s
        try:
            self.raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) > _MAX_REQUEST_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline or not self.parse_request():
                return  # closed mid-line, or parse_request has answered the error
        except TimeoutError:
            log.debug(
                "HTTP request head from %s incomplete after %.1f s: closed",
                self.address_string(),
                limits.header_timeout_s,
            )
            return
        # Writing the response: a client that does not read cannot hold the thread forever.
        self.connection.settimeout(limits.idle_timeout_s)
        if (
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or "Transfer-Encoding" in self.headers
        ):
            self.close_connection = True  # its body is not read: the next request would start inside it
        self._respond(self._answer())
        self.wfile.flush()

    def handle_expect_100(self) -> bool:
        # No "100 Continue": no body is ever read; the answer comes without it.
        return True

    def _answer(self) -> _Response:
        url = urlsplit(self.path)
        endpoint = self.server.endpoints.paths.get(url.path)
        if endpoint is None:
            return _Response(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz or /readyz\n")
        if self.command not in _ALLOWED_METHODS:
            return _Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed: use GET or HEAD\n",
                headers=(("Allow", ", ".join(_ALLOWED_METHODS)),),
            )
        query = parse_qs(url.query, keep_blank_values=True)
        return endpoint(query, self.headers)

    def _respond(self, response: _Response) -> None:
        if self.command not in _ALLOWED_METHODS:
            self.close_connection = True  # a body may follow that we do not read
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: object) -> None:
        log.debug("HTTP %s: %s", self.address_string(), format % args)


class _Server(socketserver.TCPServer):
    """Accepts connections and serves each on its own thread, at most ``max_connections``."""

    allow_reuse_address = True
    request_queue_size = _LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        endpoints: _Endpoints,
        limits: HttpLimits,
        on_refused: Callable[[], None] | None,
    ) -> None:
        self.address_family = family
        self.endpoints = endpoints
        self.limits = limits
        self.refused = 0
        self._on_refused = on_refused
        self._refusal_log = RateLimitedLog(log, 60.0)
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        # The sockets being served and their threads. Sockets are shut down and closed only
        # under this lock, so ``close`` never shuts a descriptor that was closed and reused.
        self._lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        super().__init__(address, _Handler)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        """On the accept thread: hand the connection to a thread of its own, or close it."""
        if self._closing or not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        thread = threading.Thread(
            target=self._serve, args=(request, client_address), name="anomalyd-http", daemon=True
        )
        with self._lock:
            self._open[request] = thread
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: treat it as over the bound
            with self._lock:
                del self._open[request]
            self._slots.release()
            self._refuse(request, client_address)

    def _refuse(self, request: socket.socket, client_address: object) -> None:
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused()
        self._refusal_log.log(
            logging.WARNING,
            "refused",
            "HTTP connection from %s closed unserved: %d connections already open (metrics.max_connections)",
            client_address,
            self.limits.max_connections,
        )
        self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError as exc:  # reset, broken pipe, timeout while writing: the client's doing
            log.debug("HTTP connection from %s ended: %r", client_address, exc)
        except Exception:
            log.exception("HTTP connection from %s failed", client_address)
        finally:
            with self._lock:
                self.shutdown_request(request)
                self._open.pop(request, None)
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        # Only reached from the accept thread, in an except block (our threads catch their own).
        log.error("HTTP server error with %s:\n%s", client_address, traceback.format_exc().rstrip())

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection (its thread then ends) and wait for the threads."""
        with self._lock:
            self._closing = True
            threads = list(self._open.values())
            for sock in self._open:
                with contextlib.suppress(OSError):  # already shut by its own thread
                    sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _bind_address(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The family and address to bind: what ``host`` resolves to first (``::``: IPv6;
    empty: every interface)."""
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, str(sockaddr[0])


class HttpServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free
    one; ``port`` holds the one bound) from a thread of its own, until ``close()``.

    Raises ``OSError`` if the address cannot be bound (taken, not ours, unknown host).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        limits: HttpLimits | None = None,
        liveness: Checks | None = None,
        readiness: Checks | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits if limits is not None else HttpLimits()
        family, address = _bind_address(host, port)
        self._server = _Server(
            (address, port),
            family,
            _Endpoints(registry, liveness, readiness),
            self.limits,
            on_refused,
        )
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_SHUTDOWN_POLL_S,),
            name="anomalyd-http-accept",
            daemon=True,
        )
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """Connections being served now (at most ``limits.max_connections``)."""
        return self._server.open_connections

    @property
    def refused(self) -> int:
        """Connections closed unserved because ``limits.max_connections`` were open."""
        return self._server.refused

    def close(self) -> None:
        """Stop accepting, release the port, end every open connection."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(_CLOSE_JOIN_S)
        self._server.close_connections(_CLOSE_JOIN_S)
