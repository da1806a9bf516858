"""Shared fixtures: a real Mosquitto per test, tiny models, fresh metric registries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.broker import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running Mosquitto (anonymous access) on a free port, stopped after the test."""
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Make brokers with options (users=..., tls=..., started=False); all stopped afterwards."""
    made: list[MosquittoBroker] = []

    def make(*, started: bool = True, **kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / f"broker{len(made)}", **kwargs)
        made.append(b)
        if started:
            b.start()
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry, so tests never share metric values."""
    return CollectorRegistry()


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """Build a tiny contract-abiding ONNX model: ``tiny_model(name="m.onnx", **kwargs)``."""
    from tests.helpers.tiny_model import build_tiny_model

    def make(name: str = "tiny.onnx", **kwargs: Any) -> Path:
        return build_tiny_model(tmp_path / "models" / name, **kwargs)

    return make
