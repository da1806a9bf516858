"""Hosts for ``anomalyd bench --instances --hosts CPUS``: each daemon instance runs as if
on a machine of its own, with a network stack and a CPU budget of its own, so that the
ratio of N instances to one says what another host of the same size adds, not what
another process on the same cores adds.

Host i of a bench whose process id is PID is

* a network namespace ``anomalyd-bench-PID-h<i>`` (``ip netns``), whose only link besides
  its loopback is ``eth0``: one end of a veth pair whose other end, ``adbPIDh<i>``, is a
  port of the bridge ``adbPIDbr`` in the root namespace. The bridge holds the first
  address of a free private /24 (``10.250.X.1``, X chosen so that no address or route of
  the machine overlaps it), host i the address ``10.250.X.<i + 2>``. nats-server listens,
  MQTT and client port, on the bridge's address only: an instance's MQTT traffic crosses
  its own (virtual) link, not 127.0.0.1, and nothing listens on the machine's other
  interfaces. The bench scrapes each instance's ``/metrics`` at its host's address.
* a CPU cgroup ``anomalyd-bench-PID/h<i>``: in cgroup v1's ``cpu`` hierarchy
  (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``) or, where only cgroup v2 offers the
  cpu controller, with ``cpu.max``. It holds CPUS cores' worth of time per period. The
  instance's process joins it before it runs anything (a ``sh`` that writes its own pid
  into ``cgroup.procs``, then ``exec``s ``ip netns exec``, which ``exec``s the daemon: one
  process id throughout), so every thread it ever starts is held to the budget. The
  hosts' parent group ``anomalyd-bench-PID`` has the highest CPU weight: a host's cores
  are its own, so it gets its quota whenever it can use it, ahead of anything else on
  the machine (with the default weight, the kernel's autogroups let a neighbour's session
  at nice 19 weigh as much as all the hosts together). The quota, not the neighbours, is
  what holds an instance.

The publishers, nats-server and the bench stay in the root namespace and cgroup, as a
fleet's devices and broker stand outside the hosts that score it.

Creating namespaces, links and cgroups takes root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
``check_hosts_possible()`` says what is missing (no root or not those capabilities, no
``ip``, no CPU cgroup controller) as ``HostsUnavailableError``, exit 69, before anything runs.

``Hosts`` is a context manager that removes everything it made when it is left, whether
the bench ended, failed, or was stopped by Ctrl-C, SIGTERM or SIGHUP (the last two turned
into ``SystemExit`` while the hosts exist, so that the cleanup runs): a process still in a host's cgroup is
killed (only the bench's instances are started there), the cgroups removed, the veth
pairs, the namespaces and the bridge deleted. A bench killed outright (SIGKILL) cannot
clean up; its names carry its process id, so a later ``--hosts`` run finds them, sees
that process gone, and removes them first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from anomalyd.errors import AnomalydError

if TYPE_CHECKING:
    from anomalyd.nats_broker import PrivateNatsServer

__all__ = [
    "CpuController",
    "CpuGroup",
    "CpuStat",
    "Host",
    "Hosts",
    "HostsUnavailableError",
    "check_hosts_possible",
]

#: Names of what a bench makes: namespaces and cgroups ``anomalyd-bench-PID...``, links
#: ``adbPID...`` (a link's name has at most 15 characters: ``adb`` + 7 digits + ``h`` + 2
#: digits fits, and Linux process ids have at most 7 digits).
NAME_PREFIX = "anomalyd-bench-"
LINK_PREFIX = "adb"
#: CFS period of each host's budget (the kernel's default): the quota is CPUS times this.
PERIOD_US = 100_000
#: The least CFS quota the kernel takes (1 ms).
MIN_QUOTA_US = 1000
#: The private /16 whose /24s the hosts' links are numbered from.
SUBNETS = ipaddress.IPv4Network("10.250.0.0/16")
#: Capabilities ``ip netns`` and ``ip link``/``ip addr`` need (linux/capability.h numbers).
NEEDED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
#: An instance that used at least this share of its host's budget was held by the budget.
AT_BUDGET = 0.90
#: The weight of the hosts' parent group, by cgroup version (v1 ``cpu.shares``, v2
#: ``cpu.weight``): the highest, so that a host gets its quota whenever it can use it.
#: With the default weight a neighbour outweighs the hosts: the kernel's autogroups give
#: each session's tasks, at whatever nice, as much weight as the hosts' group has in all.
MAX_WEIGHT = {1: 262_144, 2: 10_000}


class HostsUnavailableError(AnomalydError):
    """``--hosts`` cannot run here: not root, no ``ip``, no CPU cgroup controller, or the
    kernel refused a namespace, link or cgroup."""

    exit_code = 69  # EX_UNAVAILABLE: the machine lacks it; no option fixes it


# --------------------------------------------------------------------------- what is needed


def missing_capabilities(status: str = "/proc/self/status") -> list[str]:
    """Those of ``NEEDED_CAPABILITIES`` this process does not have (its ``CapEff``)."""
    effective = 0
    with open(status) as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    return [name for name, bit in NEEDED_CAPABILITIES.items() if not effective >> bit & 1]


@dataclass(frozen=True)
class CpuController:
    """The cgroup hierarchy that has the cpu controller: v1's ``cpu`` hierarchy (preferred:
    where it is mounted, v2 cannot have the controller) or a cgroup v2 mount offering it."""

    version: int
    root: Path

    @classmethod
    def find(cls, mounts: str = "/proc/self/mounts") -> CpuController:
        """The controller from the mount table; ``HostsUnavailableError`` saying what is there
        when neither kind offers it."""
        v1: Path | None = None
        v2: list[Path] = []
        with open(mounts) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 4:
                    continue
                # The mount table writes a space in a path as \040.
                point = Path(fields[1].replace("\\040", " "))
                if fields[2] == "cgroup" and "cpu" in fields[3].split(","):
                    v1 = point
                elif fields[2] == "cgroup2":
                    v2.append(point)
        if v1 is not None:
            return cls(1, v1)
        seen = []
        for root in v2:
            try:
                controllers = (root / "cgroup.controllers").read_text().split()
            except OSError:
                controllers = []
            if "cpu" in controllers:
                return cls(2, root)
            seen.append(f"{root} offers {' '.join(controllers) or 'no controller'}")
        raise HostsUnavailableError(
            "--hosts: no CPU cgroup controller: no cgroup v1 'cpu' hierarchy is mounted"
            + (f", and the cgroup v2 mount {'; '.join(seen)}" if seen else ", nor any cgroup v2")
        )


def check_hosts_possible() -> CpuController:
    """What ``--hosts`` needs, checked before anything runs; the CPU controller to use.
    ``HostsUnavailableError`` (exit 69) says what is missing."""
    euid = os.geteuid()
    if euid != 0:
        raise HostsUnavailableError(
            f"--hosts needs root (running as uid {euid}): it creates network namespaces "
            "(ip netns), veth links and CPU cgroups"
        )
    missing = missing_capabilities()
    if missing:
        raise HostsUnavailableError(
            f"--hosts needs root with {' and '.join(NEEDED_CAPABILITIES)} (this process is uid 0 "
            f"without {', '.join(missing)}): it creates network namespaces (ip netns), veth links "
            "and CPU cgroups"
        )
    if shutil.which("ip") is None:
        raise HostsUnavailableError("--hosts needs the 'ip' command (iproute2) on PATH")
    if not os.path.exists("/proc/self/ns/net"):
        raise HostsUnavailableError("--hosts: this kernel has no network namespaces (/proc/self/ns/net)")
    return CpuController.find()


# --------------------------------------------------------------------------- CPU cgroups


@dataclass(frozen=True)
class CpuStat:
    """A cgroup's budget and throttling counters at one moment (its ``cpu.stat``)."""

    cpus: float  # budget: quota over period, in cores
    periods: int
    throttled_periods: int
    throttled_s: float


@dataclass
class CpuGroup:
    """One CPU cgroup, ``path`` relative to its controller's root (``/anomalyd-bench-PID/h0``)."""

    controller: CpuController
    path: str
    #: None: no limit of its own, and the highest weight (the parent of the hosts).
    quota_us: int | None = None

    @property
    def dir(self) -> Path:
        return self.controller.root / self.path.lstrip("/")

    @property
    def procs_file(self) -> Path:
        return self.dir / "cgroup.procs"

    def create(self) -> None:
        try:
            self.dir.mkdir()
            if self.controller.version == 2:
                # The cpu controller reaches a group only through its parent's subtree_control.
                if self.quota_us is None:
                    _enable_cpu(self.controller.root)
                    (self.dir / "cpu.weight").write_text(f"{MAX_WEIGHT[2]}\n")
                    _enable_cpu(self.dir)
                else:
                    (self.dir / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}\n")
            elif self.quota_us is None:
                (self.dir / "cpu.shares").write_text(f"{MAX_WEIGHT[1]}\n")
            else:
                (self.dir / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                (self.dir / "cpu.cfs_quota_us").write_text(f"{self.quota_us}\n")
        except OSError as exc:
            raise HostsUnavailableError(f"--hosts: cannot set up the CPU cgroup {self.dir}: {exc}") from None

    def limits(self) -> tuple[int | None, int]:
        """(quota, period) in microseconds as the kernel has them; quota None: unlimited."""
        if self.controller.version == 2:
            quota, period = (self.dir / "cpu.max").read_text().split()
            return (None if quota == "max" else int(quota)), int(period)
        quota_us = int((self.dir / "cpu.cfs_quota_us").read_text())
        return (None if quota_us < 0 else quota_us), int((self.dir / "cpu.cfs_period_us").read_text())

    def stat(self) -> CpuStat:
        """The budget and the throttling so far: v1 ``throttled_time`` is in nanoseconds,
        v2 ``throttled_usec`` in microseconds."""
        fields = {}
        for line in (self.dir / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                fields[key] = int(value)
        quota, period = self.limits()
        throttled = (
            fields.get("throttled_time", 0) / 1e9
            if self.controller.version == 1
            else (fields.get("throttled_usec", 0) / 1e6)
        )
        return CpuStat(
            cpus=math.inf if quota is None else quota / period,
            periods=fields.get("nr_periods", 0),
            throttled_periods=fields.get("nr_throttled", 0),
            throttled_s=throttled,
        )

    def pids(self) -> list[int]:
        try:
            return [int(v) for v in self.procs_file.read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is still in the group (only the bench's instances are started in a
        host's group), wait for it to be empty, remove it. Nothing to do if it is gone."""
        if not self.dir.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise OSError(f"processes {left} are still in {self.dir}")
            time.sleep(0.05)
        # The kernel may still be tearing the last task down: rmdir says EBUSY meanwhile.
        while True:
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _enable_cpu(group: Path) -> None:
    control = group / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu\n")


def cgroup_of(pid: int, controller: CpuController) -> str | None:
    """The cgroup of ``pid`` in ``controller``'s hierarchy, from ``/proc/<pid>/cgroup``."""
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if controller.version == 1 and "cpu" in controllers.split(","):
                return path
            if controller.version == 2 and controllers == "":
                return path
    return None


# --------------------------------------------------------------------------- links and namespaces


def _ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its output. ``HostsUnavailableError`` with ip's message if it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostsUnavailableError(f"--hosts: 'ip {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _ip("-j", *args).strip()
    return list(json.loads(out)) if out else []


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine has an address in or a route to (the default route
    excepted: it covers everything)."""
    nets = []
    for link in _ip_json("-4", "addr", "show"):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def free_subnet(start: int) -> ipaddress.IPv4Network:
    """A /24 of ``SUBNETS`` that overlaps nothing the machine uses, tried from the
    ``start``-th on (the bench's pid, so that two benches try different ones first)."""
    used = used_networks()
    subnets = list(SUBNETS.subnets(new_prefix=24))
    for k in range(len(subnets)):
        net = subnets[(start + k) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostsUnavailableError(
        f"--hosts: every /24 of {SUBNETS} overlaps an address or route of this machine"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The names ``--hosts`` gives, each with the bench's process id as its group.
NAMESPACE_NAME = re.compile(rf"{re.escape(NAME_PREFIX)}(\d+)-h\d+")
CGROUP_NAME = re.compile(rf"{re.escape(NAME_PREFIX)}(\d+)")
LINK_NAME = re.compile(rf"{re.escape(LINK_PREFIX)}(\d+)(?:h\d+|br)")


def _owner(name: str, pattern: re.Pattern[str]) -> int | None:
    """The bench process id a name made by ``--hosts`` carries, or None if it is not one."""
    m = pattern.fullmatch(name)
    return int(m.group(1)) if m else None


def remove_stale(controller: CpuController) -> list[str]:
    """Remove what benches that no longer run left behind (killed before they could clean
    up); the names removed."""
    removed = []
    for group in sorted(controller.root.glob(f"{NAME_PREFIX}*")):
        pid = _owner(group.name, CGROUP_NAME)
        if pid is not None and group.is_dir() and not _alive(pid):
            for child in sorted(p for p in group.iterdir() if p.is_dir()):
                CpuGroup(controller, f"/{group.name}/{child.name}").remove()
            CpuGroup(controller, f"/{group.name}").remove()
            removed.append(str(group))
    for link in _ip_json("link", "show"):
        name = str(link.get("ifname", ""))
        pid = _owner(name, LINK_NAME)
        if pid is not None and not _alive(pid):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for line in _ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        pid = _owner(name, NAMESPACE_NAME)
        if pid is not None and not _alive(pid):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def netns_of(pid: int | str) -> str:
    """The network namespace of a process (``net:[inode]``): equal for two processes
    exactly when they share one."""
    return os.readlink(f"/proc/{pid}/ns/net")


def tcp_connections(pid: int) -> list[tuple[str, str]]:
    """(local, remote) ``address:port`` of the established IPv4 TCP connections in the
    network namespace of ``pid`` (``/proc/<pid>/net/tcp``)."""

    def address(field: str) -> str:
        hex_ip, hex_port = field.split(":")
        ip = ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(hex_ip), "little"))
        return f"{ip}:{int(hex_port, 16)}"

    out = []
    with open(f"/proc/{pid}/net/tcp") as fh:
        next(fh)  # the header
        for line in fh:
            fields = line.split()
            if fields[3] == "01":  # ESTABLISHED
                out.append((address(fields[1]), address(fields[2])))
    return out


# --------------------------------------------------------------------------- hosts


@dataclass
class Host:
    """One host: its namespace, its link, its address and its CPU cgroup."""

    index: int
    namespace: str
    veth: str  # the root namespace's end of its link
    address: str
    cgroup: CpuGroup

    def launcher(self) -> list[str]:
        """The command prefix that runs a program in this host: into the cgroup first
        (``sh`` writes its own pid, then ``exec``s), then into the namespace."""
        return [
            "sh",
            "-c",
            'echo $$ > "$0" && exec "$@"',
            str(self.cgroup.procs_file),
            "ip",
            "netns",
            "exec",
            self.namespace,
        ]

    def describe(self) -> dict[str, Any]:
        quota, period = self.cgroup.limits()
        return {
            "host": self.index,
            "namespace": self.namespace,
            "veth": self.veth,
            "address": self.address,
            "cgroup": self.cgroup.path,
            "quota_us": quota,
            "period_us": period,
        }

    def observe(self, pid: int, broker_port: int) -> dict[str, Any]:
        """What the kernel says of a process started in this host: its network namespace,
        its CPU cgroup with the quota it is under, and its connections to the broker's
        port as seen from its own namespace."""
        path = cgroup_of(pid, self.cgroup.controller)
        observed = CpuGroup(self.cgroup.controller, path) if path else None
        quota, period = observed.limits() if observed is not None else (None, 0)
        return {
            "netns": netns_of(pid),
            "cgroup": path,
            "quota_us": quota,
            "period_us": period,
            "broker_connections": [
                {"local": local, "remote": remote}
                for local, remote in tcp_connections(pid)
                if remote.rsplit(":", 1)[1] == str(broker_port)
            ],
        }


class Hosts:
    """``count`` hosts of ``cpus`` cores each, for as long as the ``with`` block runs."""

    def __init__(self, count: int, cpus: float, controller: CpuController | None = None) -> None:
        if count < 1 or count > 253:
            raise ValueError(f"hosts: expected 1 to 253 (one /24), got {count}")
        self.controller = controller or check_hosts_possible()
        self.count = count
        self.cpus = cpus
        self.quota_us = max(MIN_QUOTA_US, round(cpus * PERIOD_US))
        pid = os.getpid()
        self.bridge = f"{LINK_PREFIX}{pid}br"
        self.parent = CpuGroup(self.controller, f"/{NAME_PREFIX}{pid}")
        self.hosts: list[Host] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.stale_removed: list[str] = []
        self._made_bridge = False
        self._made_parent = False
        self._namespaces: list[str] = []
        self._previous: dict[int, Any] = {}

    @property
    def broker_address(self) -> str:
        """The bridge's address: where nats-server listens, reachable from every host."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    # ------------------------------------------------------------------ life

    def __enter__(self) -> Hosts:
        self._catch_sigterm()
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _catch_sigterm(self) -> None:
        """SIGTERM (and SIGHUP) end the bench the way Ctrl-C does: as an exception, so the
        cleanup runs. Only the main thread can set signal handlers."""
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, _frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, stop)

    def create(self) -> None:
        pid = os.getpid()
        self.stale_removed = remove_stale(self.controller)
        self.subnet = free_subnet(pid)
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip("addr", "add", f"{self.broker_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.parent.create()
        self._made_parent = True
        for i in range(self.count):
            namespace = f"{NAME_PREFIX}{pid}-h{i}"
            veth = f"{LINK_PREFIX}{pid}h{i}"
            address = str(self.subnet.network_address + 2 + i)
            group = CpuGroup(self.controller, f"{self.parent.path}/h{i}", self.quota_us)
            host = Host(i, namespace, veth, address, group)
            _ip("netns", "add", namespace)
            self._namespaces.append(namespace)
            self.hosts.append(host)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            host.cgroup.create()

    def close(self) -> None:
        """Remove everything made, in the order that frees each part: the cgroups (their
        processes killed), the links, the namespaces, the bridge. What cannot be removed is
        said on stderr with its name, the rest is removed regardless. Ctrl-C and SIGTERM
        wait until this is done."""
        ignored = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                ignored[sig] = signal.signal(sig, signal.SIG_IGN)
        problems: list[str] = []
        try:
            for host in self.hosts:
                try:
                    host.cgroup.remove()
                except OSError as exc:
                    problems.append(f"cgroup {host.cgroup.dir}: {exc}")
            if self._made_parent:
                try:
                    self.parent.remove()
                except OSError as exc:
                    problems.append(f"cgroup {self.parent.dir}: {exc}")
            for host in self.hosts:
                # Deleting one end of a veth pair deletes both, at once (a namespace's end
                # would otherwise go only when the kernel gets round to the namespace).
                _ip("link", "del", host.veth, check=False)
            for namespace in self._namespaces:
                _ip("netns", "del", namespace, check=False)
            if self._made_bridge:
                _ip("link", "del", self.bridge, check=False)
            problems += [f"left behind: {name}" for name in self.leftovers()]
        finally:
            # SIGTERM and SIGHUP back to what they were before the hosts; SIGINT as it was.
            for sig, current in ignored.items():
                signal.signal(sig, self._previous.pop(sig, current))
            self._previous.clear()
            self.hosts, self._namespaces = [], []
            self._made_bridge = self._made_parent = False
        for problem in problems:
            print(f"anomalyd bench --hosts: could not clean up {problem}", file=sys.stderr)

    def leftovers(self) -> list[str]:
        """Names of this bench's hosts that still exist (nothing, after ``close()``)."""
        return list(leftovers_of(os.getpid(), self.controller))

    # ------------------------------------------------------------------ use

    def nats_server(self, workdir: Path, partitions: int) -> PrivateNatsServer:
        """A private nats-server with the partition mapping that listens, MQTT and client
        port, on the bridge's address only (its later settings override the loopback
        ones it is written with)."""
        from anomalyd.broker import free_port
        from anomalyd.nats_broker import PrivateNatsServer

        address = self.broker_address
        mqtt_port, client_port = free_port(address), free_port(address)
        nats = PrivateNatsServer(
            workdir,
            partitions=partitions,
            extra_config=(f"listen: {address}:{client_port}", f"mqtt {{ listen: {address}:{mqtt_port} }}"),
        )
        nats.host, nats.port, nats.nats_port = address, mqtt_port, client_port
        return nats

    def describe(self) -> dict[str, Any]:
        assert self.subnet is not None
        return {
            "cpus_each": self.cpus,
            "quota_us": self.quota_us,
            "period_us": PERIOD_US,
            "cgroup": {"version": self.controller.version, "root": str(self.controller.root)},
            "cgroup_parent": self.parent.path,
            # The parent's weight as the kernel has it (v1 cpu.shares, v2 cpu.weight).
            "cgroup_parent_weight": int(
                (
                    self.parent.dir / ("cpu.shares" if self.controller.version == 1 else "cpu.weight")
                ).read_text()
            ),
            "subnet": str(self.subnet),
            "bridge": self.bridge,
            "broker_address": self.broker_address,
            "root_netns": netns_of("self"),
            "stale_removed": self.stale_removed,
            "each": [h.describe() for h in self.hosts],
        }


def leftovers_of(pid: int, controller: CpuController) -> Iterator[str]:
    """Namespaces, links and cgroups named for the bench with process id ``pid`` that exist."""
    for line in _ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        if _owner(name, NAMESPACE_NAME) == pid:
            yield f"namespace {name}"
    for link in _ip_json("link", "show"):
        name = str(link.get("ifname", ""))
        if _owner(name, LINK_NAME) == pid:
            yield f"link {name}"
    group = controller.root / f"{NAME_PREFIX}{pid}"
    if group.exists():
        yield f"cgroup {group}"
