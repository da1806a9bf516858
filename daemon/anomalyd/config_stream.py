"""The ``[stream]`` section: what the intake accepts (message size, readings per message,
device ids, clock skew), how much it queues, how many devices it tracks and how new ones
are admitted, and how each device's rolling window is kept (gaps, hop, warm-up, cadence,
resampling), and when the pipeline counts as overloaded.

Separate because it is the largest section after ``[mqtt]`` and its keys check one
another (the intake queue must hold one message of the largest accepted size). The
pipeline reads it for the decoder, the device table and the windows; the service for the
intake queue's bounds.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from anomalyd.config_base import Section

__all__ = ["StreamConfig"]


class StreamConfig(Section):
    """Validation limits and per-device rolling windows."""

    max_devices: int = Field(
        default=10000,
        ge=1,
        le=10_000_000,
        description="devices tracked at once; newcomers may push out only devices on probation "
        "(stream.probation_slots)",
    )
    max_gap_s: float = Field(
        default=60.0, gt=0, description="a gap longer than this between readings restarts the device's window"
    )
    idle_evict_s: float = Field(default=3600.0, gt=0, description="forget a device silent for this long")
    # Admission (anomalyd.device_slots): a burst of unknown ids must not push out real devices.
    probation_slots: int | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="slots held back for new devices on probation (until they have sent a full window); "
        "newcomers push out only devices on probation, never established ones (unset: max_devices / 10)",
        examples=[1000],
    )
    hop: int = Field(default=1, ge=1, description="score a device every `hop` new readings (1: every one)")
    warmup: Literal["wait", "pad"] = Field(
        default="wait",
        description='"wait": score once a device has a full window; "pad": score early, edge-padded',
    )
    max_payload_bytes: int = Field(
        default=65536, ge=16, le=256 * 1024 * 1024, description="larger messages are rejected unread"
    )
    max_readings_per_message: int = Field(
        default=1000, ge=1, description="arrays / SenML packs with more readings are rejected"
    )
    intake_queue_size: int = Field(
        default=100000, ge=1, description="messages waiting for the pipeline; overflow is dropped, counted"
    )
    intake_queue_mib: float = Field(
        default=32.0,
        gt=0,
        description="... and their size in MiB (payloads, topics, about 200 bytes each besides): "
        "bounds the daemon's memory and the lag it can build under a flood; overflow is dropped, counted",
    )
    # Both keys are applied by anomalyd.decode, whose docstring says what they mean.
    device_id_pattern: str = Field(
        default=r"^[A-Za-z0-9_.:\-]{1,64}$",
        description="regular expression the whole device id must match; whatever it says, '.', '..' and "
        "ids holding '+', '#', '/' or a non-printable character are refused",
    )
    max_future_skew_s: float = Field(
        default=5.0,
        gt=0,
        description="reject readings stamped further than this ahead of their arrival (reason future); "
        "keep it small: a reading that gets in holds back the device's earlier-stamped ones "
        "(out_of_order) until real time catches up",
    )
    overload_lag_s: float = Field(
        default=10.0,
        gt=0,
        description="overloaded when every pipeline pass in a check (about 1 s) scored readings whose "
        "newest was older than this in data time",
    )
    cadence_check: bool = Field(
        default=True,
        description="check each device's sample period against the model's (false: score every device "
        "whatever its cadence, e.g. for load tests that run faster than real time)",
    )
    cadence_tolerance: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="a device whose median step between readings is off the model's sample period by "
        "more than this fraction, and outside the training data's 5-95 % spread, is not scored "
        "(or is resampled)",
    )
    resample: Literal["off", "linear"] = Field(
        default="off",
        description='"linear": interpolate a device at the wrong cadence onto the model\'s sample '
        "period and score it, instead of not scoring it (CPU grows with the ratio of periods)",
    )

    @field_validator("intake_queue_mib")
    @classmethod
    def _queue_holds_a_message(cls, v: float, info: ValidationInfo) -> float:
        # A queue smaller than one message of the largest accepted size (plus a topic, which
        # MQTT bounds at 64 KiB) would drop every such message, however idle the daemon.
        largest = info.data.get("max_payload_bytes")
        if largest is not None and v * 2**20 < largest + 65536:
            need = (largest + 65536) / 2**20
            raise ValueError(
                f"expected room for one message of stream.max_payload_bytes ({largest} bytes) and "
                f"its topic: at least {need:.3g} MiB, got {v:g}"
            )
        return v

    @field_validator("device_id_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"expected a regular expression, {v!r} does not compile: {exc}") from None
        return v
