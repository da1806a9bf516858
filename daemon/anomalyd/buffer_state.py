"""The layout of ``DeviceBuffers``' exported state, and its checks.

A snapshot holds each device's window *unrolled*: its last ``min(count, L)`` readings,
oldest first, in the front-zeroed rows of an ``(L, F)`` array, rather than the doubled ring
itself. So it does not depend on where in the ring the device's readings happen to sit
(which is ``count % L``), and a restart can put the devices into any slots, in any order.

A snapshot comes from disk, so every array is checked before any of it is used: its
presence, dtype kind and shape (which carry the model's window length and number of
features, and the number of cadence steps kept), and the values the buffers rely on
(counts >= 0, finite readings and steps, unique device ids). The layout is versioned by
``STATE_VERSION``; a snapshot of another version is refused, not guessed at.

``established`` (which devices had passed probation, ``anomalyd.device_slots``) came
after version 1 and is optional within it, so that snapshots written before it still
load (a device counts as established if it holds a full window) and a daemon from before
it reads the newer ones (it ignores the key).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.cadence import RING_STEPS

__all__ = ["STATE_VERSION", "checked_state", "unroll", "write_unrolled"]

#: Version of the ``export_state`` layout; ``import_state`` refuses any other.
STATE_VERSION = 1


def _reading_rows(
    counts: npt.NDArray[np.int64], length: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Reading number of each row of the unrolled windows, and which rows hold one."""
    reading = counts[:, None] - length + np.arange(length)[None, :]
    return reading, reading >= 0


def unroll(
    ring: npt.NDArray[np.float32], slots: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """The slots' windows, unrolled out of the doubled ring ``[slot, 2L, F]``: ``(n, L, F)``."""
    length = ring.shape[1] // 2
    reading, used = _reading_rows(counts, length)
    windows = ring[slots[:, None], np.where(used, reading % length, 0)]
    windows[~used] = 0.0
    return windows.reshape(slots.shape[0], length, ring.shape[2])


def write_unrolled(
    ring: npt.NDArray[np.float32],
    slots: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    windows: npt.NDArray[np.float32],
) -> None:
    """Write ``unroll``'s windows back into the doubled ring, where ``counts`` puts them."""
    length = ring.shape[1] // 2
    reading, used = _reading_rows(counts, length)
    rows = np.broadcast_to(slots[:, None], used.shape)[used]
    pos = (reading % length)[used]
    vals = windows[used]
    ring[rows, pos] = vals
    ring[rows, pos + length] = vals


def checked_state(state: dict[str, npt.NDArray[Any]], length: int, n_features: int) -> dict[str, Any]:
    """The arrays of an exported state, checked and in the buffers' dtypes (``established``
    always present: when the state lacks it, the devices holding a full window).

    Raises ``ValueError`` naming the first problem found.
    """
    if not isinstance(state, dict):
        raise ValueError(f"buffer state: expected a dict of arrays, got {type(state).__name__}")
    version = state.get("version")
    if not isinstance(version, np.ndarray) or version.shape != () or version.dtype.kind not in "iu":
        raise ValueError("buffer state: 'version' is missing or not an integer scalar")
    if int(version) != STATE_VERSION:
        raise ValueError(f"buffer state: version {int(version)}, this anomalyd reads version {STATE_VERSION}")
    devices = state.get("devices")
    if not isinstance(devices, np.ndarray) or devices.ndim != 1 or devices.dtype.kind != "U":
        raise ValueError("buffer state: 'devices' must be a 1-d unicode array")
    n = devices.shape[0]
    # name: (dtype kinds accepted, shape, dtype to convert to)
    spec: dict[str, tuple[str, tuple[int, ...], type[np.generic]]] = {
        "windows": ("f", (n, length, n_features), np.float32),
        "counts": ("iu", (n,), np.int64),
        "last_ts": ("f", (n,), np.float64),
        "steps": ("f", (n, RING_STEPS), np.float32),
        "n_steps": ("iu", (n,), np.int64),
        "mismatched": ("b", (n,), np.bool_),
        "grid_anchor": ("f", (n,), np.float64),
        "grid_k": ("iu", (n,), np.int64),
        "last_values": ("f", (n, n_features), np.float32),
    }
    out: dict[str, Any] = {"devices": devices}
    for name, (kinds, shape, dtype) in spec.items():
        a = state.get(name)
        if not isinstance(a, np.ndarray):
            raise ValueError(f"buffer state: {name!r} is missing or not an array")
        if a.dtype.kind not in kinds:
            raise ValueError(f"buffer state: {name!r} has dtype {a.dtype}, expected kind {kinds!r}")
        if a.shape != shape:
            raise ValueError(
                f"buffer state: {name!r} has shape {a.shape}, this buffer needs {shape} "
                f"(window length {length}, {n_features} features, {n} devices, "
                f"{RING_STEPS} cadence steps): was it saved with another model?"
            )
        out[name] = a.astype(dtype, copy=False)
    established = state.get("established")
    if established is None:
        out["established"] = out["counts"] >= length
    elif isinstance(established, np.ndarray) and established.dtype.kind == "b" and established.shape == (n,):
        out["established"] = established
    else:
        raise ValueError(f"buffer state: 'established' must be a bool array of shape ({n},)")
    names = devices.tolist()
    if len(set(names)) != n or any(not d for d in names):
        raise ValueError("buffer state: device ids must be unique and non-empty")
    if (out["counts"] < 0).any() or (out["n_steps"] < 0).any() or (out["grid_k"] < 0).any():
        raise ValueError("buffer state: 'counts', 'n_steps' and 'grid_k' must be >= 0")
    for name in ("windows", "steps", "last_values"):
        if not np.isfinite(out[name]).all():
            raise ValueError(f"buffer state: {name!r} holds non-finite values")
    if np.isnan(out["last_ts"]).any() or (out["last_ts"] == np.inf).any():
        raise ValueError("buffer state: 'last_ts' must be finite (or -inf for a device without readings)")
    if np.isinf(out["grid_anchor"]).any():
        raise ValueError("buffer state: 'grid_anchor' must be finite (or NaN: no grid)")
    return out
