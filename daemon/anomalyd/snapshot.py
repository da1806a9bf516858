"""Snapshots of per-device state, so that a restart neither blinds the fleet nor forgets
which devices are in alert.

A snapshot holds, for every tracked device, its rolling window (``DeviceBuffers``) and its
detector state (smoothing, adaptive statistics, hysteresis counters, alert state and
since, operator overlays), plus what it was taken with: the model version, its features
and window length, and when. It is one file, ``snapshot.npz`` in the state directory
(numpy's zip of arrays, read without pickle), written atomically: to a temporary file in
the same directory, flushed to disk, then renamed over the previous one, so a crash
mid-write leaves the previous snapshot intact.

On start the daemon restores the snapshot if it is usable; otherwise it starts empty and
says why, with one warning and ``anomalyd_snapshot_restores_total{result}``:

``missing``         no snapshot (first start, or snapshots just enabled);
``stale``           older than ``state.max_age_s`` (windows that old describe another day);
``model_mismatch``  taken with another model version, features or window length (its
                    adaptive statistics describe another model's scores);
``corrupt``         unreadable, or not what this version of anomalyd writes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

__all__ = ["RESTORE_RESULTS", "Snapshot", "SnapshotError", "load_snapshot", "save_snapshot"]

log = logging.getLogger(__name__)

FILE_NAME: Final = "snapshot.npz"
FORMAT: Final = 1
RESTORE_RESULTS: Final = ("restored", "missing", "stale", "model_mismatch", "corrupt")

_META = "meta"
_DETECTOR = "detector"
_BUFFER_PREFIX = "buffers."


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


def save_snapshot(directory: Path, snap: Snapshot) -> Path:
    """Write ``snap`` to ``directory/snapshot.npz`` atomically; returns the path. OSError on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILE_NAME
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
) -> Snapshot:
    """Read the snapshot in ``directory`` and check it fits; ``SnapshotError`` says why not."""
    path = directory / FILE_NAME
    if not path.is_file():
        raise SnapshotError("missing", f"no snapshot at {path}")
    try:
        # Our own file object: np.load leaves its file open when the zip is broken.
        with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
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
