"""The ``[cluster]`` section: which share of a partitioned fleet this daemon scores, and
``[cluster.jetstream]``, where it refills its windows from.

Absent, the daemon is alone: it subscribes to ``mqtt.topic_in`` and scores every device.
Present, the broker (NATS with its MQTT gateway and a subject mapping, ``docs/scaling.md``)
has appended a partition number to every telemetry topic
(``sensors/<device>/telemetry/<p>``, ``p`` in ``0 .. partitions-1``, the same hash for the
same device every time) and this daemon subscribes only to the partitions it owns:

- ``instance = i`` with ``instances = N``: partition ``p`` belongs to instance ``p % N``
  (instances count from 0, as the systemd template unit ``anomalyd@<i>.service`` does).
  Modulo rather than contiguous ranges so that doubling N (with P a power of two) only
  takes partitions away from the existing instances and never moves one between them;
- ``owned = [p, ...]``: an explicit list, for uneven hosts.

Kept apart from the other sections because it is the only one whose keys depend on each
other across a fleet: every instance must be given the same ``partitions``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from anomalyd.config_base import PathField, Section

__all__ = ["ClusterConfig", "JetStreamConfig"]

#: Upper bound on ``partitions``: a subscription per owned partition is made on every connect.
MAX_PARTITIONS = 4096

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NATS_URL = re.compile(r"^(nats|tls)://[^\s/]+$")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class JetStreamConfig(Section):
    """Warm-up from a NATS JetStream stream that keeps each device's last readings."""

    servers: list[str] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        min_length=1,
        description="NATS server URLs (nats://HOST:PORT or tls://HOST:PORT) of the cluster whose MQTT "
        "gateway the daemon is connected to",
    )
    stream: str = Field(
        default="ANOMALYD_TELEMETRY",
        description="the JetStream stream holding the partitioned telemetry subjects",
    )
    create_stream: bool = Field(
        default=True,
        description="create the stream if it is missing (subjects from mqtt.topic_in, one per partition; "
        "max_msgs_per_subject = the model's window length)",
    )
    user: str | None = Field(
        default=None, description="NATS user name, if the server asks for one", examples=["anomalyd"]
    )
    password_file: PathField | None = Field(
        default=None,
        description="file holding the NATS password (first line)",
        examples=["/etc/anomalyd/nats_password"],
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="longest a warm-up may take; live readings wait meanwhile, then the daemon goes on "
        "with what it has and says so",
    )

    @field_validator("servers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not _NATS_URL.match(url):
                raise ValueError(f"expected nats://HOST:PORT or tls://HOST:PORT, got {url!r}")
        return v

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, v: str) -> str:
        if not _STREAM_NAME.match(v):
            raise ValueError(f"expected a JetStream stream name of [A-Za-z0-9_-], got {v!r}")
        return v


class ClusterConfig(Section):
    """One instance of a fleet split into partitions by the broker (NATS subject mapping)."""

    partitions: int = Field(
        ge=1,
        le=MAX_PARTITIONS,
        description="P of the broker's mapping partition(P, ...): the same on every instance; at least "
        "4 x the largest number of instances, a power of two to double cleanly",
        examples=[16],
    )
    instance: int | None = Field(
        default=None,
        ge=0,
        description="this instance's number, 0 .. instances-1 (with instances)",
        examples=[0],
    )
    instances: int | None = Field(
        default=None,
        ge=1,
        description="how many instances share the partitions (partition p: instance p % N)",
        examples=[2],
    )
    owned: list[int] | None = Field(
        default=None,
        description="explicit partitions this instance owns (instead of instance/instances)",
        examples=[[0, 2]],
    )
    name: str = Field(
        default="",
        description="this instance's name in its status topic, client id and metrics; empty: the instance "
        'number, or "p<first>-..." for an owned list',
    )
    jetstream: JetStreamConfig | None = Field(
        default=None, description="warm-up from JetStream; absent: windows fill from live readings"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_assignment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        by_number = "instance" in data or "instances" in data
        if by_number and "owned" in data:
            raise ValueError("expected instance with instances, or owned, not both")
        if not by_number and "owned" not in data:
            raise ValueError("expected instance with instances (partition p: instance p % N), or owned")
        if by_number and ("instance" not in data or "instances" not in data):
            raise ValueError("expected instance and instances together")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.instance is not None and self.instances is not None:
            if self.instance >= self.instances:
                raise ValueError(
                    f"expected instance < instances (instances count from 0), got {self.instance} of "
                    f"{self.instances}"
                )
            if self.instances > self.partitions:
                raise ValueError(
                    f"expected instances <= partitions, got {self.instances} instances for "
                    f"{self.partitions} partitions (an instance would own none)"
                )
        if self.owned is not None:
            if not self.owned:
                raise ValueError("expected at least one owned partition")
            bad = [p for p in self.owned if not 0 <= p < self.partitions]
            if bad:
                raise ValueError(f"expected owned partitions in 0..{self.partitions - 1}, got {bad}")
            if len(set(self.owned)) != len(self.owned):
                raise ValueError(f"expected each owned partition once, got {self.owned}")
        if self.name and not _NAME.match(self.name):
            raise ValueError(f"expected name of [A-Za-z0-9_-], at most 64 characters, got {self.name!r}")
        return self

    def owned_partitions(self) -> list[int]:
        """The partitions this instance subscribes to, ascending."""
        if self.owned is not None:
            return sorted(self.owned)
        assert self.instance is not None
        assert self.instances is not None
        return [p for p in range(self.partitions) if p % self.instances == self.instance]

    def instance_name(self) -> str:
        """``name``, else the instance number, else ``p<first>-<second>...`` of the owned list."""
        if self.name:
            return self.name
        if self.instance is not None:
            return str(self.instance)
        return "p" + "-".join(str(p) for p in self.owned_partitions())[:60]
