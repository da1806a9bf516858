"""Snapshot files: atomic write, and every reason a snapshot is not used."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd.snapshot import FILE_NAME, Snapshot, SnapshotError, load_snapshot, save_snapshot


def snap(created: float | None = None) -> Snapshot:
    return Snapshot(
        "v1",
        ["t", "p"],
        4,
        {"devices": np.asarray(["a", "b"]), "windows": np.arange(16, dtype=np.float32).reshape(2, 4, 2)},
        [{"device": "a", "x": 1.5}, {"device": "b", "x": None}],
        created=time.time() if created is None else created,
    )


def load(directory: Path, **kw: object) -> Snapshot:
    args: dict[str, object] = {
        "model_version": "v1",
        "feature_names": ["t", "p"],
        "window_length": 4,
        "max_age_s": 60,
    }
    args.update(kw)
    return load_snapshot(directory, **args)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    s = snap()
    path = save_snapshot(tmp_path / "state", s)
    assert path.name == FILE_NAME
    back = load(tmp_path / "state")
    assert back.detector == s.detector
    assert back.created == s.created
    assert back.buffers["devices"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(back.buffers["windows"], s.buffers["windows"])
    # no temporary file is left behind
    assert [p.name for p in (tmp_path / "state").iterdir()] == [FILE_NAME]


def test_missing_stale_mismatch(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as info:
        load(tmp_path)
    assert info.value.result == "missing"
    save_snapshot(tmp_path, snap(created=time.time() - 120))
    with pytest.raises(SnapshotError) as info:
        load(tmp_path)
    assert info.value.result == "stale"
    save_snapshot(tmp_path, snap())
    for kw in ({"model_version": "v2"}, {"feature_names": ["t"]}, {"window_length": 5}):
        with pytest.raises(SnapshotError) as info:
            load(tmp_path, **kw)
        assert info.value.result == "model_mismatch"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt(tmp_path: Path, damage: str) -> None:
    path = save_snapshot(tmp_path, snap())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:
        path.write_bytes(b"")
    with pytest.raises(SnapshotError) as info:
        load(tmp_path)
    assert info.value.result == "corrupt"


def test_a_failed_write_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_snapshot(tmp_path, snap())

    def disk_full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the fault a test cannot cause for real
    with pytest.raises(OSError, match="No space left"):
        save_snapshot(tmp_path, snap())
    monkeypatch.undo()
    assert load(tmp_path).detector[0]["device"] == "a"
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
