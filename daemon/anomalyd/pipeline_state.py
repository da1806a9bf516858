"""What the parts of ``anomalyd.pipeline.Pipeline`` share: the attributes more than one of
them reads or sets, declared once, and where the decisions go (``DecisionSink``).

``Pipeline`` is put together from mixins, one module per concern (``pipeline_alerts``,
``pipeline_warmup``); the flow, snapshots, model swap and housekeeping are its own. Each
mixin reads and sets the instance's state, which ``Pipeline.__init__`` (and
``Pipeline._build_stages``) creates; this base only declares that state (and the few
``Pipeline`` methods the mixins call), so that the type checker sees one instance across
the modules. It adds nothing at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import AlertRecord
from anomalyd.buffers import DeviceBuffers, IngestResult
from anomalyd.config import Config
from anomalyd.decode import Decoder, Rejection
from anomalyd.detector import Decision, Detector
from anomalyd.metrics import Metrics
from anomalyd.model import LoadedModel

#: The logger of every part of ``Pipeline``: one name for the data path, whichever module
#: the line comes from.
log = logging.getLogger("anomalyd.pipeline")


class DecisionSink(Protocol):
    """Where a pipeline's decisions go (the MQTT publisher, or a replay's collector)."""

    def publish_decisions(
        self, decisions: list[Decision], arrival_mono: npt.NDArray[np.float64] | None = None
    ) -> None:
        """Take the decisions of one scored batch, in order."""

    def flush_scores(self) -> None:
        """The end of a pass: what was held back to summarise may go out now."""

    def forget(self, devices: list[str]) -> None:
        """The pipeline stopped tracking these devices."""

    def publish_states(self, records: list[AlertRecord]) -> None:
        """Devices' alert states changed (or are re-asserted): publish them, retained."""

    def set_overloaded(self, overloaded: bool) -> None:
        """The daemon started or stopped falling behind."""


class PipelineState:
    """The state of one ``Pipeline`` that its parts share, as ``Pipeline.__init__`` and
    ``Pipeline._build_stages`` set it (see there)."""

    config: Config
    metrics: Metrics
    model: LoadedModel
    sink: DecisionSink | None
    decoder: Decoder
    buffers: DeviceBuffers
    detector: Detector
    _owns: Callable[[str], bool] | None
    _adopted: dict[str, float]
    _reassert: list[str]
    _horizon: dict[str, float]
    _horizon_until: float

    if TYPE_CHECKING:
        # Defined by Pipeline (or another mixin); declared here for the type checker only.
        def _forget(self, devices: list[str], reason: str) -> None: ...
        def _count_rejections(self, rejections: list[Rejection], *, count: bool = True) -> None: ...
        def _cadence_changed(self, result: IngestResult) -> None: ...
