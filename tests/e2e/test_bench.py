"""``anomalyd bench --quick`` end to end: it runs the real daemon behind a real Mosquitto,
accounts for every reading it offers, measures the probe's latency and writes its figures
as JSON. ``anomalyd bench --instances 1,2 --quick`` does the same for daemon instances
sharing a fleet through a real nats-server's partitions, and ``--hosts`` runs each of
them as a host: a real network namespace and a real CPU cgroup with its quota, all of
them gone afterwards.

Speeds and ratios are not asserted: the machines that run the tests are shared and
noisy, and the quick run's loads are too small to mean anything. This checks that the
benchmark is correct, not that the daemon is fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from anomalyd.benchcluster import PARTITIONED_FILTER
from anomalyd.benchcpu import HOST_BUDGET
from anomalyd.benchhosts import MAX_WEIGHT, CpuController, remove_stale
from anomalyd.benchload import balanced_device_ids
from anomalyd.benchreport import TARGETS
from anomalyd.benchrun import Children, LoadSpec, Probe, publisher_commands, summarise_publishers
from anomalyd.partitions import nats_partition
from tests.broker import MosquittoBroker, PrivateNatsServer, Received, Subscriber, publish_many


def readings_in(messages: list[Received]) -> int:
    """Readings in telemetry messages: an array's length, or one for a single object."""
    docs = [orjson.loads(m.payload) for m in messages]
    return sum(len(d) if isinstance(d, list) else 1 for d in docs)


def test_probe_process_counts_what_it_sent_and_times_the_scores_it_receives(
    broker: MosquittoBroker,
) -> None:
    """The probe child against a bare broker, the test standing in for the daemon: what it
    reports as published is what reached the broker, and a score's latency is its receive
    time minus its ``ts``."""
    seen = Subscriber(broker, ["sensors/+/telemetry"])
    probe = Probe(broker.host, broker.port, "t-probe-", devices=2, rate=20.0, window=5, features=["a", "b"])
    try:
        time.sleep(0.3)
        probe.pause()
        messages, readings = probe.counts()
        assert messages > 2  # one window of past readings per device, then live readings

        seen.wait_until(lambda got: len(got) >= messages, 10, "the probe's readings")
        time.sleep(0.3)
        # Paused: nothing more is sent, and the counts are exactly what the broker got.
        assert probe.counts() == (messages, readings)
        assert len(seen.snapshot()) == messages
        assert readings_in(seen.snapshot()) == readings

        publish_many(broker, [("anomaly/t-probe-1/score", orjson.dumps({"ts": time.time() - 0.25}))])
        assert probe.wait_scored(10)
        (latency,) = probe.latencies()
        assert 0.25 <= latency < 5

        probe.resume()
        time.sleep(0.2)
        probe.stop()
        after = probe.counts()
        assert after[0] > messages
        seen.wait_until(lambda got: len(got) >= after[0], 10, "the readings sent after resume")
        time.sleep(0.2)
        assert probe.counts() == after
        assert len(seen.snapshot()) == after[0]
    finally:
        probe.close()
        seen.close()
    assert probe.exit_code == 0


@pytest.mark.slow
def test_quick_bench_accounts_for_every_reading_and_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "anomalyd", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True

    # Every reading offered (load publishers and probe, every daemon run) is accounted for.
    total = doc["accounting"]
    assert total["offered_readings"] > 10_000
    assert total["accepted_readings"] == total["offered_readings"]
    assert total["lost_readings"] == 0
    assert total["received_messages"] == total["offered_messages"]
    assert total["rejected"] == {}
    assert total["nothing_lost"] is True

    for name in ("arrays", "single", "every-window", "naive"):
        run = doc["scenarios"][name]
        assert run["accounting"]["lost_readings"] == 0, name
        assert run["accounting"]["drained"] is True, name
        assert run["exit_code"] == 0, name
        assert 0 < run["start_to_ready_s"] < 60, name
        burst = run["saturation"]
        assert burst["complete"] is True, name
        assert burst["accepted_readings"] == burst["offered_readings"], name
        assert burst["windows_scored"] == burst["expected_windows"], name
        assert burst["readings_per_s"] > 0, name
        assert burst["windows_per_s"] > 0, name
    # The scenarios' configurations reached the daemon (or were reported as unknown to it).
    naive = doc["scenarios"]["naive"]
    assert naive["config"]["batching.max_batch"] == 1
    assert "output.score_interval_s" in {*naive["config"], *naive["unsupported_keys"]}

    # The probe's publish-to-score latency was measured in every step of the sweep.
    sweep = doc["scenarios"]["arrays"]["sweep"]
    assert sweep["steps"]
    for step in [*sweep["steps"], sweep["half"]]:
        assert step["lost_readings"] == 0
        latency = step["probe_latency_s"]
        assert latency["n"] > 0
        assert 0 < latency["p50"] <= latency["p99"] < 60
        assert set(step["daemon_lag"]) == {
            "anomalyd_data_lag_seconds",
            "anomalyd_lag_seconds",
            "anomalyd_overloaded",
        }

    limits = doc["limits"]
    assert limits["raw_ort"]["windows_per_s"] > 0
    assert limits["bare_subscriber"]["messages_received"] == limits["bare_subscriber"]["messages_sent"]
    assert doc["rss"]["devices_tracked"] == doc["rss"]["devices"]
    assert doc["rss"]["rss_bytes"] > 0

    # Every ratio was computed and judged against its target; whether it met it is the
    # machine's business, not this test's.
    assert set(doc["ratios"]) == set(TARGETS)
    for name, ratio in doc["ratios"].items():
        assert isinstance(ratio["value"], float), name
        assert isinstance(ratio["met"], bool), name
    for ratio in doc["ratios"].values():
        assert ratio["figure"] in proc.stdout


@pytest.mark.parametrize(
    ("args", "code", "problem"),
    [
        (("--pin",), 64, "--pin: only with --instances"),
        (("--instances", "2", "--flood", "--rate", "3"), 64, "not with --flood, --rate"),
        (("--instances", "two"), 78, "expected positive integers separated by commas, got 'two'"),
        (("--instances", "0,2"), 78, "expected positive integers separated by commas, got '0,2'"),
        (("--instances", "8", "--partitions", "4"), 78, "expected at most 4 instances"),
        (("--hosts", "0.5"), 64, "--hosts: only with --instances"),
        (("--instances", "2", "--hosts", "0.5", "--pin"), 64, "--hosts: not with --pin"),
        (("--instances", "4", "--hosts", "1000"), 78, "4 hosts of 1000 CPUs need 4000 cores"),
        (("--instances", "2", "--hosts", "0.001"), 78, "expected at least 0.01 CPUs"),
    ],
)
def test_instances_options_are_checked_before_anything_runs(
    args: tuple[str, ...], code: int, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalyd.cli import main

    assert main(["bench", *args]) == code
    assert problem in capsys.readouterr().err


def test_publishers_spread_their_devices_evenly_over_the_nats_partitions(tmp_path: Path) -> None:
    """The ``--instances`` load: publisher children speaking MQTT 3.1.1 to a real nats-server
    with the partition mapping, device ids chosen so that every partition gets as many
    devices, hence every instance owning as many partitions the same share of the load."""
    partitions = 8
    spec = LoadSpec(
        devices=2 * 3 * partitions,
        prefix="t-bal-",
        array=5,
        burst=10,
        protocol="3.1.1",
        partitions=partitions,
    )
    with PrivateNatsServer(tmp_path / "nats", partitions=partitions) as server:
        seen = Subscriber(server, [PARTITIONED_FILTER])
        kids = Children(publisher_commands(server.host, server.port, spec, 2, ["a", "b"]))
        try:
            kids.wait_ready(60)
            kids.go()
            pub = summarise_publishers(kids.results(60))
            seen.wait_until(lambda got: len(got) >= pub["messages"], 30, "every message of the burst")
        finally:
            kids.close()
            seen.close()
    assert pub["messages"] == spec.devices * 2  # 10 readings per device, 5 per message
    devices_of: dict[int, set[str]] = {}
    for m in seen.snapshot():
        _sensors, device, _telemetry, level = m.topic.split("/")
        # The broker's partition is the one nats_partition computes for the device.
        assert int(level) == nats_partition(device, partitions), m.topic
        devices_of.setdefault(int(level), set()).add(device)
    assert sorted(devices_of) == list(range(partitions))
    assert {len(d) for d in devices_of.values()} == {spec.devices // partitions}
    # The same ids as the bench computes, publisher by publisher.
    expected = {
        d for p in range(2) for d in balanced_device_ids(f"t-bal-p{p}-", spec.devices // 2, partitions)
    }
    assert set().union(*devices_of.values()) == expected


@pytest.mark.slow
def test_instances_bench_scales_out_over_nats_partitions_and_accounts_for_every_reading(
    tmp_path: Path,
) -> None:
    out = tmp_path / "instances.json"
    proc = subprocess.run(
        [sys.executable, "-m", "anomalyd", "bench", "--instances", "2", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "instances"
    assert doc["settings"]["instances"] == [1, 2]  # 1 is always measured: the baseline
    partitions = doc["settings"]["partitions"]
    load = doc["load"]

    total = doc["accounting"]
    assert total["offered_readings"] == 2 * load["readings"]  # the same load for each N
    assert total["nothing_lost"] is True, total
    assert total["accepted_readings"] == total["offered_readings"]

    assert [r["instances"] for r in doc["runs"]] == [1, 2]
    for run in doc["runs"]:
        n = run["instances"]
        assert run["complete"] is True, n
        assert run["accounting"]["offered_readings"] == load["readings"], n
        assert run["windows_scored"] == run["expected_windows"], n
        assert run["windows_per_s"] > 0, n
        assert len(run["per_instance"]) == n
        for inst in run["per_instance"]:
            # Each instance subscribed to its own partitions only, got exactly its share of
            # the evenly spread devices, and rejected nothing (no foreign partition).
            assert inst["partitions_owned"] == partitions // n, inst
            assert inst["windows_scored"] == run["expected_windows"] // n, inst
            assert inst["rejected"] == {}, inst
            assert inst["exit_code"] == 0, inst
        cpu = run["cpu"]
        assert len(cpu["each_instance_pct"]) == n
        assert cpu["broker_pct"] is not None
        assert 0 < cpu["machine_busy_pct"] <= 100
        assert cpu["instances_waiting_pct"] >= 0
        assert run["bottleneck"]["cause"] in {
            "the machine",
            "the load generator",
            "the machine and the load generator",
            "the instances",
        }
        assert run["bottleneck"]["verdict"]

    rows = doc["by_instances"]
    assert rows["1"]["ratio_to_1"] == 1.0
    assert rows["1"]["target"] is None
    assert rows["2"]["target"] == pytest.approx(1.8)
    assert rows["2"]["ratio_to_1"] == pytest.approx(rows["2"]["windows_per_s"] / rows["1"]["windows_per_s"])
    assert isinstance(rows["2"]["met"], bool)
    sub = doc["limits"]["bare_subscriber"]
    assert sub["messages_received"] == sub["messages_sent"] == load["messages"]
    assert "× N=1" in proc.stdout
    assert "where the CPU went" in proc.stdout


# --------------------------------------------------------------------------- --hosts

HOSTS_BENCH = [sys.executable, "-m", "anomalyd", "bench", "--instances", "2", "--quick", "--hosts", "0.5"]


def require_root() -> None:
    """``--hosts`` makes namespaces, links and cgroups: its tests need root (CI has it)."""
    if os.geteuid() != 0:
        pytest.fail(
            "this test needs root: anomalyd bench --hosts creates network namespaces, veth links "
            "and CPU cgroups (test_hosts_are_refused_without_root covers the refusal without it)"
        )


def what_is_left(pid: int) -> list[str]:
    """Namespaces, links and CPU cgroups named for the bench with process id ``pid``."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    left = [line for line in netns.splitlines() if f"anomalyd-bench-{pid}-" in line]
    left += [line for line in links.splitlines() if f"adb{pid}h" in line or f"adb{pid}br" in line]
    root = CpuController.find().root
    left += [str(p) for p in root.glob(f"anomalyd-bench-{pid}*")]
    return left


def test_hosts_are_refused_without_root() -> None:
    """Without root's powers ``--hosts`` is refused, exit 69 (EX_UNAVAILABLE), saying what
    is missing, before anything is made. Run as root, the bench is started without
    CAP_SYS_ADMIN and CAP_NET_ADMIN (``setpriv`` drops them from its bounding set): a
    real process without them, as root in a container without those privileges is."""
    if os.geteuid() == 0:
        drop = "-sys_admin,-net_admin"
        cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *HOSTS_BENCH]
        expected = "--hosts needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN"
    else:
        cmd = HOSTS_BENCH
        expected = f"--hosts needs root (running as uid {os.geteuid()})"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 69, stdout + stderr
    assert expected in stderr
    assert "ip netns" in stderr
    assert "CPU cgroups" in stderr
    assert stdout == ""  # nothing started
    if os.geteuid() == 0:
        assert what_is_left(proc.pid) == []


@pytest.mark.slow
def test_instances_bench_runs_each_instance_as_a_host_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """``--instances 2 --quick --hosts 0.5``: every reading accounted for; each instance in
    a network namespace of its own (not the bench's, not the other's), talking MQTT from
    its host's address to nats-server on the bridge, in a CPU cgroup of its own with
    the quota of 0.5 cores, as the kernel reports it while the instance runs; each host's
    use of its budget and its throttling reported; and nothing left afterwards."""
    require_root()
    out = tmp_path / "hosts.json"
    proc = subprocess.Popen(
        [*HOSTS_BENCH, "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert what_is_left(proc.pid) == []
    assert "could not clean up" not in stderr

    doc = json.loads(out.read_text())
    assert doc["settings"]["host_cpus"] == 0.5
    hosts = doc["hosts"]
    assert (hosts["quota_us"], hosts["period_us"]) == (50_000, 100_000)
    # The hosts' group outweighs any neighbour, so that each host gets its quota.
    assert hosts["cgroup_parent_weight"] == MAX_WEIGHT[hosts["cgroup"]["version"]]
    assert len(hosts["each"]) == 2  # max(N) hosts, the first N used by each N
    assert hosts["bridge"] == f"adb{proc.pid}br"
    mqtt_port = int(doc["broker"]["mqtt"].rsplit(":", 1)[1])
    assert doc["broker"]["mqtt"] == f"{hosts['broker_address']}:{mqtt_port}"  # not 127.0.0.1
    assert {h["namespace"] for h in hosts["each"]} == {f"anomalyd-bench-{proc.pid}-h{i}" for i in (0, 1)}
    assert len({h["address"] for h in hosts["each"]} | {hosts["broker_address"]}) == 3

    total = doc["accounting"]
    assert total["nothing_lost"] is True, total
    assert total["accepted_readings"] == total["offered_readings"] == 2 * doc["load"]["readings"]

    for run in doc["runs"]:
        n = run["instances"]
        assert run["complete"] is True, n
        assert run["windows_scored"] == run["expected_windows"], n
        assert run["hosts"] == {"budget_cpus": 0.5 * n, "cpus_left": doc["machine"]["usable_cpus"] - 0.5 * n}
        namespaces = set()
        for i, inst in enumerate(run["per_instance"]):
            host, seen = inst["host"], inst["host"]["observed"]
            assert host["namespace"] == f"anomalyd-bench-{proc.pid}-h{i}"
            # The kernel's view of the running instance: its own network namespace ...
            assert seen["netns"] != hosts["root_netns"], inst
            namespaces.add(seen["netns"])
            # ... its own cgroup, under the quota ...
            assert seen["cgroup"] == host["cgroup"] == f"/anomalyd-bench-{proc.pid}/h{i}", inst
            assert (seen["quota_us"], seen["period_us"]) == (50_000, 100_000), inst
            # ... and its one MQTT connection from its host's address, over its link.
            (conn,) = seen["broker_connections"]
            assert conn["local"].rsplit(":", 1)[0] == host["address"], conn
            assert conn["remote"] == f"{hosts['broker_address']}:{mqtt_port}", conn
            assert inst["windows_scored"] == run["expected_windows"] // n, inst
            assert inst["rejected"] == {}, inst
            assert inst["exit_code"] == 0, inst
            budget = inst["cpu_budget"]
            assert budget["budget_pct"] == pytest.approx(50.0)
            assert budget["periods"] > 0
            assert 0 <= budget["throttled_periods"] <= budget["periods"]
            assert budget["throttled_s"] >= 0
            assert 0 < budget["of_budget"] == pytest.approx(budget["cpu_pct"] / 50.0)
            # The budget holds: no more than it (and the few ticks /proc rounds to).
            assert budget["cpu_pct"] < 50.0 + 5, budget
            assert inst["bottleneck"] in {HOST_BUDGET, "the machine", "the load generator", "the instance"}
            assert (inst["bottleneck"] == HOST_BUDGET) == budget["at_budget"]
        assert len(namespaces) == n  # one each
    assert "each host's CPU budget" in stdout
    assert "--hosts 0.5" in stdout


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_an_interrupted_hosts_bench_removes_its_hosts(sig: signal.Signals, code: int) -> None:
    """Ctrl-C (SIGINT) or SIGTERM while an instance runs in its host: the bench stops it,
    removes the cgroups, links and namespaces, and exits 130 (143 for SIGTERM)."""
    require_root()
    # A test run started in the background of a non-interactive shell (`cmd &`, nohup)
    # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt: the
    # bench gets Python's Ctrl-C handler back first, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_CTRL_C, *HOSTS_BENCH[3:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        instance = wait_for_instance_in_host0(proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == code, stdout[-2000:] + stderr[-2000:]
    assert what_is_left(proc.pid) == []
    assert "could not clean up" not in stderr
    for pid in instance:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"instance {pid} still runs"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "mode", "started_line", "server"),
    [
        (signal.SIGTERM, 128 + signal.SIGTERM, [], "daemon ready", b"mosquitto"),
        (signal.SIGHUP, 128 + signal.SIGHUP, [], "daemon ready", b"mosquitto"),
        (signal.SIGTERM, 128 + signal.SIGTERM, ["--instances", "1"], "nats-server", b"nats-server"),
    ],
)
def test_a_stopped_bench_stops_its_broker_and_daemon(
    sig: signal.Signals, code: int, mode: list[str], started_line: str, server: bytes
) -> None:
    """SIGTERM (``timeout``, ``kill``) or SIGHUP while a scenario's daemon runs (or, with
    ``--instances``, once its nats-server runs): the bench stops the daemons and its private
    broker and removes its temporary folder, instead of dying at once and leaving them behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomalyd", "bench", "--quick", *mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if started_line in line:
                break
        else:
            raise AssertionError(f"the bench ended before {started_line!r} (exit {proc.wait()})")
        started = children_of(proc.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in started}
        brokers = [pid for pid, argv in commands.items() if any(server in a for a in argv)]
        assert brokers, f"no private broker among the bench's children: {commands}"
        folders = bench_folders(started)
        assert folders, "the broker's configuration is not in the bench's temporary folder"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == code, stderr[-2000:]
    for pid in started:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"{commands[pid]} still runs"
    for folder in folders:
        assert not folder.exists(), f"{folder} was left behind"


#: ``python -c`` this, then HOSTS_BENCH's arguments after ``-m anomalyd``: the bench with
#: Python's own SIGINT handler (KeyboardInterrupt), whatever the test run inherited.
_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'anomalyd'; runpy.run_module('anomalyd', run_name='__main__')"
)


def wait_for_instance_in_host0(proc: subprocess.Popen[str]) -> list[int]:
    """The process ids in host 0's cgroup, once an instance runs there."""
    procs = CpuController.find().root / f"anomalyd-bench-{proc.pid}" / "h0" / "cgroup.procs"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            instance = [int(v) for v in procs.read_text().split()]
            if instance:
                return instance
        time.sleep(0.05)
    raise AssertionError(f"no instance ever ran in host 0 (bench exit {proc.poll()})")


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc/<id>/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_what_a_killed_hosts_bench_left_is_removed_by_the_next_one() -> None:
    """A bench killed outright (SIGKILL) cannot clean up: its namespaces, links, cgroups
    and the instance running in host 0 stay behind. The next ``--hosts`` run removes them
    before it makes its own (``remove_stale``: their owner's process id is gone), and
    kills the instance left in the cgroup."""
    require_root()
    proc = subprocess.Popen(HOSTS_BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started: list[int] = []
    folders: set[Path] = set()
    try:
        instance = wait_for_instance_in_host0(proc)
        started = children_of(proc.pid)  # nats-server and the instance: this test ends them
        # ... and removes the temporary folder they run in, which a killed bench cannot.
        folders = bench_folders(started)
        proc.kill()
        proc.communicate(timeout=30)
        assert what_is_left(proc.pid) != []
        removed = remove_stale(CpuController.find())
        assert what_is_left(proc.pid) == []
        assert f"anomalyd-bench-{proc.pid}-h0" in removed
        assert f"adb{proc.pid}br" in removed
        for pid in instance:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"instance {pid} still runs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_stale(CpuController.find())
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def bench_folders(pids: list[int]) -> set[Path]:
    """The bench's temporary folders (``/tmp/anomalyd-bench-*``) named on these processes'
    command lines."""
    folders = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                path = Path(arg.decode(errors="replace"))
                for parent in (path, *path.parents):
                    if parent.name.startswith("anomalyd-bench-") and parent.parent == Path(
                        tempfile.gettempdir()
                    ):
                        folders.add(parent)
    return folders


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
