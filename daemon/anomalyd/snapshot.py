"""Snapshots of per-device state, so that a restart neither blinds the fleet nor forgets
which devices are in alert.

A snapshot holds, for every tracked device, its rolling window (``DeviceBuffers``) and its
detector state (smoothing, adaptive statistics, hysteresis counters, alert state and
since, operator overlays), plus what it was taken with: the model version, its features
and window length, and when. It is one file in the state directory (numpy's zip of
arrays, read without pickle), written atomically: to a temporary file in the same
directory, flushed to disk, then renamed over the previous one, so a crash mid-write
leaves the previous snapshot intact.

One model (``[model]``): ``snapshot.npz``. Several models (``[[models]]``): one file per
model, ``snapshot-<name>.npz`` (``snapshot_file_name``), each written and restored on its
own with the same rules, so one model's unusable snapshot costs the others nothing. A
model name is ``[a-z0-9_-]`` (``ModelEntry``), so it is always a plain file name.

On start the daemon restores each snapshot if it is usable; otherwise that model starts
empty and the daemon says why, with one warning and ``anomalyd_snapshot_restores_total{result}``
(counted once per snapshot file; the saves likewise, in ``anomalyd_snapshot_saves_total``):

``missing``         no snapshot (first start, or snapshots just enabled);
``stale``           older than ``state.max_age_s`` (windows that old describe another day);
``model_mismatch``  taken with another model version, features or window length (its
                    adaptive statistics describe another model's scores);
``corrupt``         not a snapshot this version of anomalyd can read (damaged, or of
                    another format);
``unreadable``      the state directory cannot be searched, or the snapshot file cannot
                    be opened (permissions, an I/O error): the warning names
                    ``state.directory`` (or ``$STATE_DIRECTORY``) and the OS error.

An unreadable state directory does not stop the start, as an unwritable one does not stop
a running daemon (each failed write is logged at ERROR and counted): per-device state is
worth having, not worth refusing to score for. ``anomalyd check-config`` reports a state
directory the daemon cannot write.

``SnapshotKeeper`` decides when: restore before the pipeline thread starts, a periodic
snapshot every ``state.snapshot_interval_s`` (the pipeline thread copies the state of every
model, a thread of its own writes the files one after the other, so a slow disk never
stalls scoring), and a last one after the drain of a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import orjson

if TYPE_CHECKING:
    from anomalyd.config import StateConfig
    from anomalyd.metrics import Metrics
    from anomalyd.pipeline import Pipeline

__all__ = [
    "RESTORE_RESULTS",
    "Snapshot",
    "SnapshotError",
    "SnapshotKeeper",
    "load_snapshot",
    "save_snapshot",
    "snapshot_file_name",
]

log = logging.getLogger(__name__)

FILE_NAME: Final = "snapshot.npz"
FORMAT: Final = 1
RESTORE_RESULTS: Final = ("restored", "missing", "stale", "model_mismatch", "corrupt", "unreadable")

_META = "meta"
_DETECTOR = "detector"
_BUFFER_PREFIX = "buffers."


def snapshot_file_name(model: str | None = None) -> str:
    """The snapshot's file name: ``snapshot.npz`` for the one model of ``[model]`` (None),
    ``snapshot-<model>.npz`` for the ``[[models]]`` entry named ``model``."""
    return FILE_NAME if model is None else f"snapshot-{model}.npz"


class SnapshotError(Exception):
    """A snapshot that cannot be used; ``result`` is one of ``RESTORE_RESULTS``."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Snapshot:
    """What a snapshot holds. ``created`` is a UNIX time."""

    model_version: str
    feature_names: list[str]
    window_length: int
    buffers: dict[str, npt.NDArray[Any]]
    detector: list[dict[str, Any]]
    created: float = field(default_factory=time.time)

    @property
    def n_devices(self) -> int:
        return len(self.detector)


def _as_bytes_array(doc: Any) -> npt.NDArray[np.uint8]:
    return np.frombuffer(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), dtype=np.uint8)


def save_snapshot(directory: Path, snap: Snapshot, file_name: str = FILE_NAME) -> Path:
    """Write ``snap`` to ``directory/file_name`` atomically; returns the path. OSError on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / file_name
    meta = {
        "format": FORMAT,
        "created": snap.created,
        "model_version": snap.model_version,
        "features": snap.feature_names,
        "window_length": snap.window_length,
    }
    arrays: dict[str, npt.NDArray[Any]] = {
        _META: _as_bytes_array(meta),
        _DETECTOR: _as_bytes_array(snap.detector),
    }
    for key, value in snap.buffers.items():
        arrays[_BUFFER_PREFIX + key] = np.asarray(value)
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # The write's own error is the one to report, not a failure to clean up after it.
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is durable once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load_snapshot(
    directory: Path,
    *,
    model_version: str,
    feature_names: list[str],
    window_length: int,
    max_age_s: float,
    now: float | None = None,
    file_name: str = FILE_NAME,
) -> Snapshot:
    """Read the snapshot ``directory/file_name`` and check it fits; ``SnapshotError`` says
    why not (no OSError escapes: a directory or file that cannot be read is ``unreadable``)."""
    path = directory / file_name
    try:
        # Python 3.11's is_file() raises, rather than answers False, when the directory
        # cannot be searched (EACCES).
        if not path.is_file():
            raise SnapshotError("missing", f"no snapshot at {path}")
        # Our own file object: np.load leaves its file open when the zip is broken.
        f = path.open("rb")
    except OSError as exc:
        raise SnapshotError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with f, np.load(f, allow_pickle=False) as npz:
            files = set(npz.files)
            if _META not in files or _DETECTOR not in files:
                raise SnapshotError("corrupt", f"{path} lacks its metadata")
            meta = orjson.loads(npz[_META].tobytes())
            detector = orjson.loads(npz[_DETECTOR].tobytes())
            buffers = {k.removeprefix(_BUFFER_PREFIX): npz[k] for k in files if k.startswith(_BUFFER_PREFIX)}
    except SnapshotError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, orjson.JSONDecodeError, EOFError) as exc:
        raise SnapshotError("corrupt", f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(detector, list):
        raise SnapshotError("corrupt", f"{path} is not a snapshot of format {FORMAT}")
    created = meta.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise SnapshotError("corrupt", f"{path} has no creation time")
    age = (time.time() if now is None else now) - created
    if age > max_age_s:
        raise SnapshotError("stale", f"{path} is {age:.0f} s old (state.max_age_s = {max_age_s:g})")
    theirs = (meta.get("model_version"), meta.get("features"), meta.get("window_length"))
    ours = (model_version, feature_names, window_length)
    if theirs != ours:
        raise SnapshotError(
            "model_mismatch",
            f"{path} was taken with model {theirs[0]!r} (features {theirs[1]}, window {theirs[2]}); "
            f"serving {ours[0]!r} (features {ours[1]}, window {ours[2]})",
        )
    return Snapshot(model_version, feature_names, window_length, buffers, detector, float(created))


def _what(model: str | None) -> str:
    """How the log names a snapshot: the one model's, or that of the model named."""
    return "snapshot" if model is None else f"snapshot of model {model}"


class SnapshotKeeper:
    """When the daemon's per-device state is snapshotted and restored (see the module
    docstring). ``directory`` None: snapshots are off.

    Each method takes one pipeline, or (several models) every model's pipeline by model
    name: each model's state goes to, and comes from, its own file
    (``snapshot_file_name``)."""

    def __init__(self, directory: Path | None, config: StateConfig, metrics: Metrics) -> None:
        self.directory = directory
        self.config = config
        #: What the log names when the directory is at fault (as ``check-config`` does).
        self.key = "state.directory" if config.directory is not None else "$STATE_DIRECTORY"
        self.metrics = metrics
        self._last = time.monotonic()
        self._writer: threading.Thread | None = None

    def restore(self, pipeline: Pipeline, model: str | None = None) -> int:
        """Before the pipeline thread starts: resume ``pipeline`` from its snapshot (that of
        the ``[[models]]`` entry ``model``; None: the one model's) if it is usable.
        Returns the devices restored (0: none, and the log says why).

        Raises nothing for a snapshot it cannot use: a state directory or snapshot file that
        cannot be read is one warning naming ``state.directory`` and the OS error, counted
        as ``unreadable``, and the start goes on without per-device state (see the module
        docstring for why it does not stop the start)."""
        directory = self.directory
        if directory is None:
            log.info("no state directory (state.directory, $STATE_DIRECTORY): no snapshots")
            return 0
        what = _what(model)
        c = pipeline.model.contract
        try:
            snap = load_snapshot(
                directory,
                model_version=c.model_version,
                feature_names=c.feature_names,
                window_length=c.window_length,
                max_age_s=self.config.max_age_s,
                file_name=snapshot_file_name(model),
            )
            n = pipeline.restore_snapshot(snap)
        except SnapshotError as exc:
            self.metrics.snapshot_restores.labels(result=exc.result).inc()
            at_fault = f"{self.key}: " if exc.result == "unreadable" else ""
            log.warning(
                "%s not used (%s): %s%s; starting without per-device state", what, exc.result, at_fault, exc
            )
            return 0
        except ValueError as exc:
            self.metrics.snapshot_restores.labels(result="corrupt").inc()
            log.warning("%s not used (corrupt): %s; starting without per-device state", what, exc)
            return 0
        self.metrics.snapshot_restores.labels(result="restored").inc()
        log.info(
            "restored %d devices from the %s of %.0f s ago (%s)",
            n,
            what,
            time.time() - snap.created,
            directory,
        )
        return n

    def _write(self, snap: Snapshot, model: str | None = None) -> bool:
        assert self.directory is not None
        what = _what(model)
        t0 = time.perf_counter()
        try:
            path = save_snapshot(self.directory, snap, snapshot_file_name(model))
        except OSError as exc:
            self.metrics.snapshot_saves.labels(result="failed").inc()
            log.error("%s: cannot write the %s in %s: %s", self.key, what, self.directory, exc)
            return False
        except Exception:
            # Not the disk: a bug in what the snapshot holds. It must not end the writer
            # thread unseen, nor the stop that writes the last snapshot.
            self.metrics.snapshot_saves.labels(result="failed").inc()
            log.exception("cannot take the %s (a bug: not the disk)", what)
            return False
        self.metrics.snapshot_saves.labels(result="ok").inc()
        self.metrics.snapshot_last_success.set(snap.created)
        log.debug("%s of %d devices in %s (%.3f s)", what, snap.n_devices, path, time.perf_counter() - t0)
        return True

    def _write_each(self, snaps: list[tuple[str | None, Snapshot]]) -> None:
        """The writer thread: each model's snapshot in turn (a failed one does not stop the others)."""
        for model, snap in snaps:
            self._write(snap, model)

    def maybe_save(self, pipelines: Pipeline | Mapping[str, Pipeline], now_mono: float) -> None:
        """Pipeline thread, about once a second: the periodic snapshot when it is due, of
        one pipeline or of every model's (``pipelines`` by model name)."""
        interval = self.config.snapshot_interval_s
        if self.directory is None or interval <= 0 or now_mono - self._last < interval:
            return
        if self._writer is not None and self._writer.is_alive():
            return  # the previous one is still being written (a slow disk): skip this round
        self._last = now_mono
        by_model: list[tuple[str | None, Pipeline]] = (
            list(pipelines.items()) if isinstance(pipelines, Mapping) else [(None, pipelines)]
        )
        # Copies: the writer never touches live state.
        snaps = [(model, p.export_snapshot()) for model, p in by_model]
        self._writer = threading.Thread(
            target=self._write_each, args=(snaps,), name="anomalyd-snapshot", daemon=True
        )
        self._writer.start()

    def save_final(self, pipeline: Pipeline, model: str | None = None) -> bool:
        """After the drain of a clean stop (the pipeline thread has ended): the last
        snapshot of ``pipeline`` (that of the ``[[models]]`` entry ``model``; None: the one
        model's), written now. False without a state directory or if the write failed."""
        if self._writer is not None:
            self._writer.join(10.0)
        return self.directory is not None and self._write(pipeline.export_snapshot(), model)
