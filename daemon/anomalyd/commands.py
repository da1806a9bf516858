"""Operator commands over MQTT: the ISA-18.2 alarm-handling verbs.

A command is a message on ``commands.topic`` (default ``anomalyd/cmd/{device}/{verb}``,
so a broker ACL can say who may shelve what), with a JSON object payload::

    {"by": "j.smith", "why": "bearing replaced, vibration level changed", "duration_s": 3600}

``by`` (who, at most 64 characters) and ``why`` (at most 256) are required: every alarm
action is attributable, logged and published in the device's retained alert state.
The verbs:

``shelve``          suppress the device's alerts for ``duration_s`` (default
                    ``commands.default_shelve_s``, at most ``commands.max_shelve_s``); scores
                    are still published; it unshelves itself;
``unshelve``        end a shelving now;
``rebaseline``      accept the device's present behaviour as its new normal (after
                    maintenance): its smoothing, hysteresis, alert and adaptive statistics
                    restart;
``out_of_service``  suppress its alerts until ``in_service``, and learn nothing from it;
``in_service``      back in service.

Only devices the daemon tracks can be commanded (it has no state to change for others).
``CommandInbox`` takes the messages on the network thread and applies them on the
pipeline thread, which owns the per-device state.
A retained command is refused: it would be replayed on every reconnect. Anything else
wrong (bad JSON, unknown verb, missing field, a duration out of range) is a counted,
logged rejection, never an exception.
"""

from __future__ import annotations

import collections
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from anomalyd.config import CommandsConfig
    from anomalyd.metrics import Metrics
    from anomalyd.pipeline import Pipeline

__all__ = ["VERBS", "Command", "CommandError", "CommandInbox", "CommandTopic", "parse_command"]

log = logging.getLogger(__name__)

#: Commands waiting for the pipeline thread; a flood beyond this is refused and counted.
_INBOX_MAX = 10000

SHELVE: Final = "shelve"
UNSHELVE: Final = "unshelve"
REBASELINE: Final = "rebaseline"
OUT_OF_SERVICE: Final = "out_of_service"
IN_SERVICE: Final = "in_service"
VERBS: Final = (SHELVE, UNSHELVE, REBASELINE, OUT_OF_SERVICE, IN_SERVICE)

#: Why a command was refused (the ``reason`` label of ``anomalyd_commands_rejected_total``).
REJECT_REASONS: Final = (
    "queue_full",
    "bad_topic",
    "unknown_verb",
    "bad_device",
    "unknown_device",
    "retained",
    "malformed",
)

_MAX_PAYLOAD = 4096
_MAX_BY = 64
_MAX_WHY = 256


class CommandError(ValueError):
    """A refused command: ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Command:
    device: str
    verb: str
    by: str
    why: str
    duration_s: float | None = None  # shelve only


class CommandTopic:
    """Where ``{device}`` and ``{verb}`` sit in the command topic template."""

    def __init__(self, template: str) -> None:
        levels = template.split("/")
        self.template = template
        self.n_levels = len(levels)
        self.device_level = levels.index("{device}")
        self.verb_level = levels.index("{verb}")
        self.fixed = [(i, lv) for i, lv in enumerate(levels) if lv not in ("{device}", "{verb}")]

    @property
    def subscription(self) -> str:
        """The filter to subscribe to: both placeholders as ``+``."""
        return self.template.replace("{device}", "+").replace("{verb}", "+")

    def split(self, topic: str) -> tuple[str, str]:
        """(device, verb) of a topic that matches the template; ``CommandError`` otherwise."""
        levels = topic.split("/")
        if len(levels) != self.n_levels or any(levels[i] != lv for i, lv in self.fixed):
            raise CommandError("bad_topic", f"topic {topic[:200]!r} does not match {self.template!r}")
        return levels[self.device_level], levels[self.verb_level]


def parse_command(
    topic: CommandTopic,
    topic_name: str,
    payload: bytes,
    retain: bool,
    *,
    device_pattern: re.Pattern[str],
    default_shelve_s: float,
    max_shelve_s: float,
) -> Command:
    """Check one command message; raises ``CommandError`` saying why it is refused."""
    device, verb = topic.split(topic_name)
    if verb not in VERBS:
        raise CommandError("unknown_verb", f"unknown verb {verb[:64]!r} (known: {', '.join(VERBS)})")
    if not device_pattern.fullmatch(device):
        raise CommandError("bad_device", f"device id {device[:64]!r} does not match stream.device_id_pattern")
    if retain:
        raise CommandError(
            "retained",
            "retained command refused (it would be replayed on every reconnect): publish it "
            "without the retain flag, and clear the retained one with an empty retained message",
        )
    if len(payload) > _MAX_PAYLOAD:
        raise CommandError("malformed", f"payload of {len(payload)} bytes (at most {_MAX_PAYLOAD})")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CommandError("malformed", f"payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("malformed", 'payload must be a JSON object like {"by": "...", "why": "..."}')
    by, why = doc.get("by"), doc.get("why")
    if not isinstance(by, str) or not by.strip() or len(by) > _MAX_BY:
        raise CommandError("malformed", f"'by' must name who acts (1 to {_MAX_BY} characters)")
    if not isinstance(why, str) or not why.strip() or len(why) > _MAX_WHY:
        raise CommandError("malformed", f"'why' must say why (1 to {_MAX_WHY} characters)")
    unknown = set(doc) - {"by", "why", "duration_s"}
    if unknown:
        raise CommandError("malformed", f"unknown field(s) {sorted(unknown)[:5]}")
    duration: float | None = None
    if verb == SHELVE:
        raw = doc.get("duration_s", default_shelve_s)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise CommandError("malformed", f"'duration_s' must be a number of seconds, got {raw!r}")
        if not 0 < raw <= max_shelve_s:
            raise CommandError(
                "malformed",
                f"'duration_s' must be > 0 and <= commands.max_shelve_s ({max_shelve_s:g}), got {raw}",
            )
        duration = float(raw)
    elif "duration_s" in doc:
        raise CommandError("malformed", f"'duration_s' only goes with {SHELVE!r}")
    return Command(device, verb, by.strip(), why.strip(), duration)


class CommandInbox:
    """Commands from the network thread (``put``), applied on the pipeline thread
    (``apply_all``): every one is logged and counted, applied or refused."""

    def __init__(
        self, config: CommandsConfig, device_pattern: str, metrics: Metrics, wake: Callable[[], None]
    ) -> None:
        self.config = config
        self.topic = CommandTopic(config.topic)
        self._pattern = re.compile(device_pattern)
        self._metrics = metrics
        self._wake = wake
        # deque appends and pops are atomic: no lock between the two threads
        self._queue: collections.deque[tuple[str, bytes, bool]] = collections.deque()

    def put(self, topic: str, payload: bytes, retain: bool) -> None:
        """Network thread: a message on the command topic."""
        if len(self._queue) >= _INBOX_MAX:
            self._metrics.commands_rejected.labels(reason="queue_full").inc()
            return
        self._queue.append((topic, payload, retain))
        self._wake()

    def apply_all(self, pipeline: Pipeline) -> None:
        """Pipeline thread: check and apply every command waiting."""
        queue = self._queue
        while queue:
            self._apply(pipeline, *queue.popleft())

    def _apply(self, pipeline: Pipeline, topic: str, payload: bytes, retain: bool) -> None:
        cfg = self.config
        try:
            command = parse_command(
                self.topic,
                topic,
                payload,
                retain,
                device_pattern=self._pattern,
                default_shelve_s=cfg.default_shelve_s,
                max_shelve_s=cfg.max_shelve_s,
            )
            if not pipeline.apply_command(command):
                raise CommandError(
                    "unknown_device", f"device {command.device!r} is not tracked by this daemon"
                )
        except CommandError as exc:
            self._metrics.commands_rejected.labels(reason=exc.reason).inc()
            log.warning("command on %r refused (%s): %s", topic[:200], exc.reason, exc)
            return
        self._metrics.commands.labels(verb=command.verb).inc()
        extra = f" for {command.duration_s:g} s" if command.duration_s is not None else ""
        log.info("command %s%s on %s by %r: %s", command.verb, extra, command.device, command.by, command.why)
