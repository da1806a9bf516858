"""Logging to stderr (the journal, under systemd) as text or JSON lines, and a rate limiter
for log lines that bad input could otherwise turn into a flood.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s"

# Attributes every LogRecord has; anything else came in through `extra=` and goes into JSON.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, thread, message (+ extra fields, exc)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger to ``stream`` (stderr) in ``fmt`` ("text" or "json") at ``level``.

    Replaces handlers installed by an earlier call, so that it can run again (tests, reload).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_anomalyd", False)]:
        root.removeHandler(old)
    handler._anomalyd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # paho logs nothing unless given a logger; ORT logs through its own C++ logger.


class RateLimitedLog:
    """Log at most once per ``interval_s`` per key; say how many were suppressed meanwhile.

    Used for rejected input and queue overflow: every event is still *counted* (in a
    metric), only the log lines are limited. Thread-safe (the network thread and the
    pipeline thread both use one).
    """

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._logger = logger
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago.

        Returns True if the line was written.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self._logger.log(level, "%s (%d similar suppressed)", msg % args, suppressed)
        else:
            self._logger.log(level, msg, *args)
        return True
