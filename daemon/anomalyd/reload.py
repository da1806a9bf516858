"""What a reload (SIGHUP, ``systemctl reload``) changes: the differences between the running
configuration and the one just read again, split into what the running daemon takes live
and what only a restart can change.

``plan_reload(running, new)`` is pure: it compares two ``Config`` objects key by key and
returns a ``ReloadPlan``: the configuration to run with from now on (the running one with
every live change in it, every other key at its running value), the live changes, and the
changes that need a restart, each with its key path (``mqtt.port``). The service
(``anomalyd.service``) applies the plan; this module changes nothing itself.

What changes live, and why the rest cannot:

- ``[detector]``, every key: the pipeline thread reconfigures its detector in place
  (``Detector.reconfigure`` keeps each device's alert state and hysteresis counts).
- ``[output]`` ``score_topic``, ``batch_topic``, ``publish_scores``, ``score_interval_s``,
  ``batched_scores``, ``include_contributions``, ``score_qos``, ``alert_qos``: the
  publisher reads them per message. Not ``status_topic`` and ``status_qos``: they are also
  the last will, which the broker took in our CONNECT; not ``alert_topic``: the daemon
  subscribes to it to reconcile the alert states the broker retains, and those sit on the
  old topics.
- ``[logging]`` ``level``, ``format``: the log handler is re-set in place. Not
  ``rejection_log_interval_s``: rate limiters on several threads were built with it.
- ``[model]`` ``path``, ``providers``, ``intra_op_threads``, ``allow_spinning``: a new
  session is loaded and warmed beside the serving one and swapped in, as for a reload of
  the model file. Not ``concurrent_batches``: the pipeline's inference threads.
- ``[stream]`` ``idle_evict_s``, ``overload_lag_s``: read at every housekeeping pass. The
  rest of ``[stream]`` shapes the decoder, the device windows and the intake queue.
- ``[shutdown]`` ``drain_timeout_s``: read when a stop begins.
- Everything else (``[mqtt]``, ``[batching]``, ``[commands]``, ``[state]``, ``[metrics]``
  and the keys above that are not listed) needs a restart.
- ``[[models]]`` (several models), every key of every entry: the pipelines, one per entry,
  are built at the start. A model's *file* that changed is still loaded again on a reload,
  that model alone (``anomalyd.service``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from anomalyd.config import Config

__all__ = ["LIVE_KEYS", "Change", "ReloadPlan", "changed_keys", "file_digest", "plan_reload"]

#: Key paths that change live; an entry covers every key below it (``detector``: all of
#: ``[detector]``). See the module docstring for why each is here and the rest is not.
LIVE_KEYS = frozenset(
    {
        "detector",
        "output.score_topic",
        "output.batch_topic",
        "output.publish_scores",
        "output.score_interval_s",
        "output.batched_scores",
        "output.include_contributions",
        "output.score_qos",
        "output.alert_qos",
        "logging.level",
        "logging.format",
        "model.path",
        "model.providers",
        "model.intra_op_threads",
        "model.allow_spinning",
        "stream.idle_evict_s",
        "stream.overload_lag_s",
        "shutdown.drain_timeout_s",
    }
)

#: Values longer than this are shortened in log lines (topics, patterns, whole tables).
_MAX_VALUE_CHARS = 80

_M = TypeVar("_M", bound=BaseModel)


def _is_live(key_path: str) -> bool:
    parts = key_path.split(".")
    return any(".".join(parts[:i]) in LIVE_KEYS for i in range(1, len(parts) + 1))


def _show(value: object) -> str:
    text = str(value) if isinstance(value, Path) else repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class Change:
    """One key whose value differs between the running and the reloaded configuration."""

    key_path: str
    old: object
    new: object

    def describe(self) -> str:
        """``detector.threshold 2.0 -> 3.0`` (long values shortened)."""
        return f"{self.key_path} {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload does with a configuration read again (see ``plan_reload``)."""

    #: The configuration to run with from now on: the reloaded values of the live keys,
    #: the running values of every other key.
    config: Config
    #: Changes the running daemon takes (in declaration order of the configuration).
    live: tuple[Change, ...]
    #: Changes that only a restart applies; ``config`` keeps their running values.
    restart: tuple[Change, ...]

    @property
    def unchanged(self) -> bool:
        """Nothing differs between the running and the reloaded configuration."""
        return not self.live and not self.restart

    def live_in(self, section: str) -> bool:
        """Some live change lies in ``section`` (``"detector"``, ``"model"``, ...)."""
        return any(c.key_path.split(".")[0] == section for c in self.live)


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """The key paths of every value that differs between two configurations (or sections)
    of the same model, in declaration order. A table present in one and absent in the other
    (``mqtt.tls``) is one key path; tables present in both are compared key by key."""
    out: list[str] = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(a, BaseModel) and type(a) is type(b):
            out += changed_keys(a, b, path)
        else:
            out.append(path)
    return out


def _value_at(model: BaseModel, key_path: str) -> object:
    node: object = model
    for part in key_path.split("."):
        node = getattr(node, part)
    return node


def _with_value(running: _M, new: _M, parts: list[str]) -> _M:
    """A copy of ``running`` with the value at ``parts`` taken from ``new``.

    No validation runs again: ``new`` was validated whole, and no live key has a validator
    that reads another key of its table, except within ``[detector]``, which is taken whole.
    """
    head, rest = parts[0], parts[1:]
    value = getattr(new, head) if not rest else _with_value(getattr(running, head), getattr(new, head), rest)
    return running.model_copy(update={head: value})


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Compare the running configuration with a reloaded one: what changes live, what needs
    a restart, and the configuration that results (see ``ReloadPlan``)."""
    live: list[Change] = []
    restart: list[Change] = []
    config = running
    for key_path in changed_keys(running, new):
        change = Change(key_path, _value_at(running, key_path), _value_at(new, key_path))
        if _is_live(key_path):
            live.append(change)
            config = _with_value(config, new, key_path.split("."))
        else:
            restart.append(change)
    return ReloadPlan(config, tuple(live), tuple(restart))


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes (a model file: did it change since it was loaded?); None
    if it cannot be read (loading it will say why)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
