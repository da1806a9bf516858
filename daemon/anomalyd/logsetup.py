"""Logging to stderr (the journal, under systemd) as text or JSON lines, and a rate limiter
for log lines that bad input could otherwise turn into a flood.

Log lines are bounded whatever the input behind them: a device can put any text in a topic
or a payload, and it reaches log lines as a device id, a topic or a rejection's detail.
Both formats escape non-printable characters in the message and in fields (a newline cannot
forge a line) and cut them, in UTF-8 bytes: each field (an ``extra=`` value) to
``FIELD_MAX_BYTES``, the message to ``MESSAGE_MAX_BYTES``; a JSON line is then cut further,
if need be, to ``LINE_MAX_BYTES``, which a text line (without its fields) cannot exceed
either. Only a traceback, which comes from a bug and not from input, may add more: up to
``TRACEBACK_MAX_BYTES`` (the middle is cut).
"""

from __future__ import annotations

import logging
import numbers
import sys
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

import orjson

__all__ = [
    "FIELD_MAX_BYTES",
    "LINE_MAX_BYTES",
    "MESSAGE_MAX_BYTES",
    "TRACEBACK_MAX_BYTES",
    "JsonFormatter",
    "RateLimitedLog",
    "TextFormatter",
    "bounded_text",
    "configure",
    "formatter",
    "reconfigure",
]

#: Bounds in UTF-8 bytes (see the module docstring).
FIELD_MAX_BYTES = 200
MESSAGE_MAX_BYTES = 1024
LINE_MAX_BYTES = 2048
TRACEBACK_MAX_BYTES = 16384
_CUT_MARK = "…[cut]"
_INT64 = 2**63 - 1  # orjson writes no larger integer

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s"

# Attributes every LogRecord has; anything else came in through `extra=` and goes into JSON.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _escaped(text: str) -> str:
    """``text`` with every non-printable character (newline, NUL, other controls, invisible
    separators, lone surrogates) written as its escape sequence, as repr() would."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def bounded_text(value: object, max_bytes: int) -> str:
    """``value`` as printable text of at most ``max_bytes`` UTF-8 bytes (a cut ends in a mark)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception:  # e.g. an integer of more than 4300 digits: a log line must not raise
            text = f"<{type(value).__name__} that cannot be shown>"
    text = _escaped(text)
    if len(text) * 4 <= max_bytes:  # no character takes more than 4 bytes
        return text
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    keep = max(0, max_bytes - len(_CUT_MARK.encode()))
    # "ignore": drop a character the cut went through, rather than write half of it.
    return raw[:keep].decode("utf-8", "ignore") + _CUT_MARK


def _cut_middle(text: str, max_bytes: int) -> str:
    """``text`` cut to about ``max_bytes`` by dropping its middle (a traceback: where it was
    raised and what was raised both matter)."""
    # backslashreplace: a lone surrogate in an exception's text would make orjson raise.
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= max_bytes:
        return raw.decode()
    half = max_bytes // 2
    head = raw[:half].decode("utf-8", "ignore")
    tail = raw[-half:].decode("utf-8", "ignore")
    return f"{head}\n...[{len(raw) - 2 * half} bytes cut]...\n{tail}"


def _field(value: object, max_bytes: int) -> object:
    """An ``extra=`` value as JSON writes it: booleans, null and numbers as they are (NaN
    and infinity become null; numpy numbers plain ones, which orjson would refuse), the
    rest as bounded text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        n = int(value)
        return n if -_INT64 <= n <= _INT64 else bounded_text(n, max_bytes)
    if isinstance(value, numbers.Real):
        return float(value)
    return bounded_text(value, max_bytes)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, thread, message, then the ``extra=``
    fields (device, topic, reason, score ...), then the traceback (exc), all bounded."""

    def format(self, record: logging.LogRecord) -> str:
        extras = {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        }
        message = record.getMessage()
        message_max, field_max = MESSAGE_MAX_BYTES, FIELD_MAX_BYTES
        while True:
            doc: dict[str, Any] = {
                "ts": round(record.created, 6),
                "level": record.levelname,
                "logger": record.name,
                "thread": record.threadName,
                "message": bounded_text(message, message_max),
            }
            for key, value in extras.items():
                doc[key] = _field(value, field_max)
            line = orjson.dumps(doc)
            # JSON escapes '"' and '\\' in two bytes: text within its bounds can still make a
            # line too long. Halve the bounds until it fits (they reach 0 in a dozen steps).
            if len(line) <= LINE_MAX_BYTES or (message_max == 0 and field_max == 0):
                break
            message_max, field_max = message_max // 2, field_max // 2
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
            line = orjson.dumps(doc)
        return line.decode()

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802 - logging's name
        return _cut_middle(super().formatException(ei), TRACEBACK_MAX_BYTES)


class TextFormatter(logging.Formatter):
    """``time level logger [thread] message``: the message escaped and cut to
    ``MESSAGE_MAX_BYTES``, so that a record is one line within ``LINE_MAX_BYTES`` (a
    traceback follows on lines of its own). ``extra=`` fields are not shown: the message
    says what they hold."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = bounded_text(record.message, MESSAGE_MAX_BYTES)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802 - logging's name
        return _cut_middle(super().formatException(ei), TRACEBACK_MAX_BYTES)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``logging.format``: "json" or (anything else) "text"."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger to ``stream`` (stderr) in ``fmt`` ("text" or "json") at ``level``.

    Replaces handlers installed by an earlier call, so that it can run again (tests, reload).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_anomalyd", False)]:
        root.removeHandler(old)
    handler._anomalyd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # paho logs nothing unless given a logger; ORT logs through its own C++ logger.


def reconfigure(level: str, fmt: str) -> None:
    """Apply a new level and format (a configuration reload) to the handler ``configure``
    installed, in place: other threads log on meanwhile, and no line is lost or doubled by a
    handler being swapped. Without such a handler, ``configure`` installs one."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_anomalyd", False)]
    if not ours:
        configure(level, fmt)
        return
    for handler in ours:
        handler.setFormatter(formatter(fmt))
    root.setLevel(level)


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

    def log(
        self,
        level: int,
        key: str,
        msg: str,
        *args: object,
        extra: Mapping[str, object] | None = None,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago.

        ``extra`` becomes fields of the record (JSON lines show them: device, topic, reason);
        ``exc_info``, an exception whose traceback the line carries if it is written.
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
            self._logger.log(
                level, "%s (%d similar suppressed)", msg % args, suppressed, extra=extra, exc_info=exc_info
            )
        else:
            self._logger.log(level, msg, *args, extra=extra, exc_info=exc_info)
        return True
