"""Device -> partition, as the NATS server's subject mapping computes it, and the telemetry
topics of a partitioned fleet.

NATS's ``{{partition(P, 1)}}`` hashes the first wildcard token of the subject (the device
id) with 32-bit FNV-1a and takes it modulo P. The daemon never needs the hash to route (the
broker puts the partition in the topic), but it uses it to tell which devices are its own
when it reads what the broker retains (alert states of devices other instances own are
not its business) and to check that a reading's partition level is the device's.
"""

from __future__ import annotations

from functools import lru_cache

from anomalyd.config_cluster import ClusterConfig

__all__ = ["Partitioning", "nats_partition"]

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


@lru_cache(maxsize=65536)
def nats_partition(device: str, partitions: int) -> int:
    """The partition NATS's ``partition(partitions, <the device's token>)`` gives ``device``."""
    h = _FNV_OFFSET
    for byte in device.encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


class Partitioning:
    """One instance's share of the partitions, and its telemetry subscriptions."""

    def __init__(self, cluster: ClusterConfig, topic_in: str) -> None:
        self.partitions = cluster.partitions
        self.owned: frozenset[int] = frozenset(cluster.owned_partitions())
        self.name = cluster.instance_name()
        self._topic_in = topic_in

    def topic_filters(self) -> list[str]:
        """One filter per owned partition: ``topic_in`` with ``{device}`` as ``+`` and the
        partition as a last level."""
        base = self._topic_in.replace("{device}", "+")
        return [f"{base}/{p}" for p in sorted(self.owned)]

    def owns_device(self, device: str) -> bool:
        """True when ``device`` hashes to one of this instance's partitions."""
        return nats_partition(device, self.partitions) in self.owned
