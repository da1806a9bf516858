"""Fixtures of the end-to-end tests: daemons run as processes against the test's broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker
from tests.daemon_process import DaemonProcess


@pytest.fixture
def daemon_factory(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(model: Path, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"daemon{len(made)}", broker, model, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
