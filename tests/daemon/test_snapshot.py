"""Snapshot files: atomic write, and every reason a snapshot is not used; what the keeper
logs and counts when the state directory cannot be read or written; one file per model
with several models."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from anomalyd.config import load_config
from anomalyd.decode import RawMessage
from anomalyd.metrics import Metrics
from anomalyd.model import load_model
from anomalyd.pipeline import Pipeline
from anomalyd.snapshot import (
    FILE_NAME,
    Snapshot,
    SnapshotError,
    SnapshotKeeper,
    load_snapshot,
    save_snapshot,
    snapshot_file_name,
)


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


def _refuse(monkeypatch: pytest.MonkeyPatch, method: str, target: Path) -> None:
    """Make ``Path.<method>`` raise EACCES for ``target`` only. Root (who runs these tests)
    searches and reads any directory whatever its mode, so the fault is injected."""
    real = getattr(Path, method)

    def refused(self: Path, *args: object, **kwargs: object) -> object:
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, refused)


def test_a_directory_that_cannot_be_searched_is_unreadable_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_snapshot(tmp_path, snap())
    # Python 3.11's Path.is_file raises PermissionError for a directory without search permission.
    _refuse(monkeypatch, "is_file", tmp_path / FILE_NAME)
    with pytest.raises(SnapshotError) as info:
        load(tmp_path)
    assert info.value.result == "unreadable"
    assert "Permission denied" in str(info.value)
    assert str(tmp_path / FILE_NAME) in str(info.value)


def test_a_snapshot_file_that_cannot_be_opened_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_snapshot(tmp_path, snap())
    _refuse(monkeypatch, "open", tmp_path / FILE_NAME)
    with pytest.raises(SnapshotError) as info:
        load(tmp_path)
    assert info.value.result == "unreadable"
    assert "Permission denied" in str(info.value)


def test_a_failed_cleanup_does_not_hide_why_the_write_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the faults a test cannot cause for real
    _refuse_all_unlinks(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_snapshot(tmp_path, snap())


def _refuse_all_unlinks(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)


# --------------------------------------------------------------------------- the keeper


@pytest.fixture
def keeper(
    tmp_path: Path, tiny_model: Callable[..., Path], registry: CollectorRegistry
) -> Iterator[Callable[..., tuple[SnapshotKeeper, Pipeline]]]:
    """A keeper and the pipeline whose state it keeps; ``state.directory`` as given, or
    (None) ``$STATE_DIRECTORY``, as the service builds it."""
    made: list[Pipeline] = []
    model = load_model(tiny_model(window_length=4))

    def make(
        directory: Path | None, into: CollectorRegistry | None = None
    ) -> tuple[SnapshotKeeper, Pipeline]:
        overrides = {} if directory is None else {"state.directory": str(directory)}
        cfg = load_config(None, overrides)
        metrics = Metrics(registry if into is None else into)
        pipeline = Pipeline(cfg, model, metrics)
        made.append(pipeline)
        return SnapshotKeeper(cfg.state.resolved_directory(), cfg.state, metrics), pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def test_the_keeper_warns_naming_the_key_and_counts_an_unreadable_state_directory(
    tmp_path: Path,
    keeper: Callable[..., tuple[SnapshotKeeper, Pipeline]],
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _refuse(monkeypatch, "is_file", state / FILE_NAME)
    k, pipeline = keeper(state)
    assert k.restore(pipeline) == 0
    assert registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "unreadable"}) == 1.0
    [record] = [r for r in caplog.records if r.name == "anomalyd.snapshot"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"snapshot not used (unreadable): state.directory: cannot read {state / FILE_NAME}: Permission denied"
    )
    # From systemd's StateDirectory=: the log names where the directory came from.
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    caplog.clear()
    k, pipeline = keeper(None, CollectorRegistry())
    assert k.restore(pipeline) == 0
    assert "snapshot not used (unreadable): $STATE_DIRECTORY: cannot read" in caplog.text


def test_the_keeper_logs_and_counts_a_state_directory_it_cannot_write(
    tmp_path: Path,
    keeper: Callable[..., tuple[SnapshotKeeper, Pipeline]],
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    _refuse(monkeypatch, "mkdir", state)
    k, pipeline = keeper(state)
    assert k.save_final(pipeline) is False
    assert registry.get_sample_value("anomalyd_snapshot_saves_total", {"result": "failed"}) == 1.0
    assert (
        f"state.directory: cannot write the snapshot in {state}: [Errno 13] Permission denied" in caplog.text
    )


def test_a_snapshot_that_cannot_be_encoded_is_a_counted_failure_not_a_crash(
    tmp_path: Path,
    keeper: Callable[..., tuple[SnapshotKeeper, Pipeline]],
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unencodable(*_a: object, **_k: object) -> None:
        raise TypeError("injected: an array numpy cannot write")

    k, pipeline = keeper(tmp_path / "state")
    monkeypatch.setattr(np, "savez", unencodable)  # a bug that cannot be caused on demand
    assert k.save_final(pipeline) is False
    assert registry.get_sample_value("anomalyd_snapshot_saves_total", {"result": "failed"}) == 1.0
    assert "cannot take the snapshot (a bug: not the disk)" in caplog.text
    assert list((tmp_path / "state").iterdir()) == []  # no temporary file left behind


# --------------------------------------------------------------------------- several models


def _readings(device: str, t0: float, n: int) -> list[RawMessage]:
    now = time.time()
    return [
        RawMessage(
            f"sensors/{device}/telemetry",
            orjson.dumps({"ts": t0 + i, "temperature": 0.1, "pressure": 0.2, "vibration": 0.3}),
            now,
            time.monotonic(),
        )
        for i in range(n)
    ]


def test_each_model_has_its_own_snapshot_file_and_an_unusable_one_costs_only_its_model(
    tmp_path: Path,
    tiny_model: Callable[..., Path],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    cfg = load_config(None, {"state.directory": str(state), "state.snapshot_interval_s": 60.0})
    models = {
        "pumps": load_model(
            tiny_model("pumps.onnx", window_length=4, contract_overrides={"model_version": "p1"})
        ),
        "fans": load_model(
            tiny_model("fans.onnx", window_length=4, contract_overrides={"model_version": "f1"})
        ),
    }
    made: list[Pipeline] = []

    def pipelines(metrics: Metrics) -> dict[str, Pipeline]:
        out = {name: Pipeline(cfg, model, metrics, name=name) for name, model in models.items()}
        made.extend(out.values())
        return out

    try:
        metrics = Metrics(CollectorRegistry())
        keeper = SnapshotKeeper(cfg.state.resolved_directory(), cfg.state, metrics)
        first = pipelines(metrics)
        t0 = time.time() - 100
        first["pumps"].ingest(_readings("pump-1", t0, 6))
        first["fans"].ingest(_readings("fan-1", t0, 6) + _readings("fan-2", t0, 6))
        for p in first.values():
            p.flush(force=True)
        # The periodic snapshot writes every model's file (on its writer thread).
        keeper.maybe_save(first, time.monotonic() + 3600)
        assert keeper._writer is not None
        keeper._writer.join(30)
        assert sorted(f.name for f in state.iterdir()) == [
            snapshot_file_name("fans"),
            snapshot_file_name("pumps"),
        ]
        assert snapshot_file_name(None) == FILE_NAME == "snapshot.npz"
        assert snapshot_file_name("pumps") == "snapshot-pumps.npz"
        # The last one, per model.
        assert keeper.save_final(first["pumps"], "pumps")
        assert keeper.save_final(first["fans"], "fans")

        # The fans' file is damaged: the fans start empty, the pumps resume.
        (state / snapshot_file_name("fans")).write_bytes(b"not a zip")
        keeper = SnapshotKeeper(cfg.state.resolved_directory(), cfg.state, Metrics(registry))
        second = pipelines(keeper.metrics)
        assert keeper.restore(second["pumps"], "pumps") == 1
        assert keeper.restore(second["fans"], "fans") == 0
        assert second["pumps"].buffers.devices() == ["pump-1"]
        assert list(second["fans"].buffers.devices()) == []
        assert registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "restored"}) == 1.0
        assert registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "corrupt"}) == 1.0
        [warning] = [
            r for r in caplog.records if r.name == "anomalyd.snapshot" and r.levelno == logging.WARNING
        ]
        assert warning.getMessage().startswith(
            f"snapshot of model fans not used (corrupt): cannot read {state / snapshot_file_name('fans')}"
        )
        # A model's snapshot is not another's: each file is checked against its own model.
        (state / snapshot_file_name("pumps")).rename(state / snapshot_file_name("fans"))
        third = pipelines(keeper.metrics)
        assert keeper.restore(third["fans"], "fans") == 0
        assert (
            registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "model_mismatch"}) == 1.0
        )
        assert keeper.restore(third["pumps"], "pumps") == 0
        assert registry.get_sample_value("anomalyd_snapshot_restores_total", {"result": "missing"}) == 1.0
    finally:
        for p in made:
            p.close()
