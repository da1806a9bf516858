"""What the parts of ``anomalyd.service.Service`` share: its attributes, declared once.

``Service`` is put together from mixins, one module per concern (``service_reload``,
``service_health``, ``service_pipeline``, ``service_stop``). Each mixin reads and sets the
instance's state, which ``Service.__init__`` creates; this base only declares that state
(and the few ``Service`` methods the mixins call), so that the type checker sees one
instance across the modules. It adds nothing at run time.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from anomalyd.alerts import RetainedStates
from anomalyd.commands import CommandInbox
from anomalyd.config import Config
from anomalyd.homeassistant import HomeAssistantDiscovery
from anomalyd.intake import IntakeQueue
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel
from anomalyd.mqtt import MqttLink
from anomalyd.pipeline import Pipeline
from anomalyd.publisher import Publisher
from anomalyd.routing import ModelRouter
from anomalyd.sdnotify import Notifier
from anomalyd.snapshot import SnapshotKeeper

if TYPE_CHECKING:
    from anomalyd.service_reload import _Handover

#: The logger of every part of ``Service``: one name for the daemon's lifecycle, whichever
#: module the line comes from.
log = logging.getLogger("anomalyd.service")

#: What the pipeline thread runs: one model's pipeline, or a router over several.
Stages = Pipeline | ModelRouter


class ServiceState:
    """The state of one ``Service``, as ``Service.__init__`` sets it (see there)."""

    config: Config
    _config_path: Path | None
    _overrides: dict[str, object]
    notifier: Notifier
    metrics: Metrics
    ready: threading.Event
    model: LoadedModel | None
    _stop: threading.Event
    _force: threading.Event
    _wake: threading.Event
    _draining: threading.Event
    _abort: threading.Event
    _pipeline_done: threading.Event
    _pipeline_failed: bool
    _pipeline_abandoned: bool
    _windows_dropped_at_stop: int
    _queue: IntakeQueue
    _link: MqttLink | None
    _publisher: Publisher | None
    _discovery: HomeAssistantDiscovery | None
    _pipeline: threading.Thread | None
    _handover: _Handover | None
    _handover_lock: threading.Lock
    _handed_over: threading.Event
    _model_digest: str | None
    heartbeat: float
    _idle_tick: float
    _last_housekeeping: float
    commands: CommandInbox
    retained_states: RetainedStates
    _reconnected: threading.Event
    snapshots: SnapshotKeeper
    pipeline: Stages | None
    models: dict[str, LoadedModel]
    _model_digests: dict[str, str | None]
    _model_publishers: dict[str, Publisher]

    if TYPE_CHECKING:
        # Defined by Service (or another mixin); declared here for the type checker only.
        @property
        def threshold(self) -> float | None: ...
        def _load_warm(self, cfg: Config) -> LoadedModel: ...
        def _announce_models(self) -> None: ...
        def _status_line(self) -> str: ...
        def _take_handover(self, pipeline: Stages) -> None: ...
        def _pending_windows(self) -> int: ...
