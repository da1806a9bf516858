"""A private NATS server with its MQTT gateway, JetStream and the partition mapping: what
``anomalyd bench --instances`` and the scale-out tests run a partitioned fleet against.

The generated configuration is the one ``docs/scaling.md`` gives operators, on free ports:

    server_name: <name>
    listen: 127.0.0.1:<client port>
    jetstream { store_dir: <workdir>/jetstream }
    mqtt { listen: 127.0.0.1:<mqtt port> }
    mappings = { "sensors.*.telemetry": "sensors.{{wildcard(1)}}.telemetry.{{partition(P,1)}}" }

NATS's MQTT gateway needs JetStream (it keeps sessions and retained messages there) and a
``server_name``; it speaks MQTT 3.1.1 only. ``host``/``port`` are the MQTT listener's, so
code written for ``PrivateBroker`` talks MQTT to it unchanged; ``nats_url`` is the client
listener JetStream clients use.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from anomalyd.broker import BrokerProcess, free_port, port_open
from anomalyd.errors import BrokerError

__all__ = ["PrivateNatsServer", "find_nats_server", "partition_mapping"]


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary; BrokerError saying how to install it if missing."""
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "nats-server not found: install it (Debian/Ubuntu: apt-get install nats-server; "
        "or the binary from nats.io on PATH)"
    )


def partition_mapping(topic_in: str, partitions: int) -> tuple[str, str]:
    """The NATS subject mapping (source, destination) that appends a partition level to the
    telemetry topic ``topic_in`` (``{device}`` one whole level): ``sensors/{device}/telemetry``
    gives ``("sensors.*.telemetry", "sensors.{{wildcard(1)}}.telemetry.{{partition(P,1)}}")``."""
    levels = topic_in.split("/")
    source = ".".join("*" if level == "{device}" else level for level in levels)
    dest = ".".join("{{wildcard(1)}}" if level == "{device}" else level for level in levels)
    return source, f"{dest}.{{{{partition({partitions},1)}}}}"


class PrivateNatsServer(BrokerProcess):
    """One nats-server process on 127.0.0.1: client port, MQTT port, JetStream in ``workdir``.

    ``partitions`` (with ``topic_in``) adds the partition mapping. The configuration is
    written once, here, so ``restart()`` comes back on the same ports with the same
    JetStream directory (retained messages and streams survive it).
    """

    #: The only MQTT version NATS's gateway speaks (``mqtt.protocol`` of a daemon behind it).
    mqtt_protocol = "3.1.1"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        partitions: int | None = None,
        topic_in: str = "sensors/{device}/telemetry",
        name: str = "anomalyd-nats",
        extra_config: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            workdir,
            prefix="anomalyd-nats-",
            executable=find_nats_server(),
            log_name="nats-server.log",
            config_name="nats-server.conf",
        )
        self.port = free_port(self.host)  # MQTT
        self.nats_port = free_port(self.host)
        self.partitions = partitions
        lines = [
            f"server_name: {name}",
            f"listen: {self.host}:{self.nats_port}",
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}',
            f"mqtt {{ listen: {self.host}:{self.port} }}",
        ]
        if partitions is not None:
            source, dest = partition_mapping(topic_in, partitions)
            lines.append(f'mappings = {{ "{source}": "{dest}" }}')
        self.config_path.write_text("\n".join([*lines, *extra_config]) + "\n")

    @property
    def address(self) -> str:
        """``host:port`` of the MQTT listener, as ``--broker`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start and return once both the client and the MQTT port accept connections."""
        if self.running:
            return
        self._launch()
        deadline = time.monotonic() + timeout
        while not (port_open(self.nats_port, self.host) and port_open(self.port, self.host)):
            if self._exited() or time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"could not start nats-server on {self.address}: {self.log_text()[-2000:]}")
            time.sleep(0.02)
