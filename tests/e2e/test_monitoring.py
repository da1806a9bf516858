"""The shipped monitoring (monitoring/) against the real thing, not just its syntax.

1. ``promtool check metrics`` accepts what a real daemon serves on ``/metrics`` once it has
   scored telemetry (histograms filled in).
2. ``promtool check rules`` and ``promtool test rules`` pass on the shipped alert rules and
   their unit tests (a firing and a not-firing case for every alert).
3. A real Prometheus (its own configuration, storage and free port) scrapes a real daemon
   every second while a simulated fleet with injected anomalies streams through a real
   Mosquitto: every query of every dashboard panel, Grafana's interval variables replaced
   by fixed values, returns a sample with a finite value through ``/api/v1/query``; every
   metric name the dashboard and the rules use is one the daemon serves; and the rules
   load in that Prometheus and evaluate without error; monitoring/render_dashboard_png.py
   draws the panels from it.

Prometheus and promtool come from Debian's ``prometheus`` package (scripts/bootstrap.sh
installs it).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from anomalyd.config import MqttConfig
from anomalyd.model import DEFAULT_MODEL_PATH
from anomalyd.mqtt import MqttLink
from anomalyd.simulator import SIMULATED_FLEET, SimulationSettings, Stream, build_stream
from anomalyd.synthetic import FEATURES
from tests.broker import MosquittoBroker, free_port, publish_many, wait_for
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana" / "anomalyd-dashboard.json"
RULES = REPO / "monitoring" / "prometheus" / "anomalyd-rules.yml"
RULE_TESTS = REPO / "monitoring" / "prometheus" / "anomalyd-rules.test.yml"
EXAMPLE_CONFIG = REPO / "monitoring" / "prometheus" / "prometheus.yml"
RENDER = REPO / "monitoring" / "render_dashboard_png.py"

#: The scrape job the rules expect (``up{job="anomalyd"}``, ``process_start_time_seconds``).
JOB = "anomalyd"
#: What Grafana puts in place of its variables; intervals sized for a 1 s scrape interval.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5s",
    "$__interval": "2s",
    "$__range": "1m",
    "$job": JOB,
    "$instance": ".+",
}
#: Panels allowed to return no data in this test, by title, with the reason. None: every
#: panel's queries return data even when nothing went wrong (a 0 series, not "No data").
EXEMPT_PANELS: dict[str, str] = {}

#: The simulated fleet: devices at the default model's 1 Hz, anomalies of the kinds that
#: show within a minute, frequent (no event starts in a series' first 5 minutes).
DEVICES = 20
BACKFILL_S = 380.0  # data published at once when the test starts: windows full, events begun
LIVE_S = 120.0  # then one reading per device per second, in real time, until the test ends
FLEET = replace(
    SIMULATED_FLEET,
    n_devices=DEVICES,
    duration_s=BACKFILL_S + LIVE_S,
    anomalies_per_device_hour=60.0,
    anomaly_kinds=("spike", "level_shift", "noise_burst"),
    seed=7,
)
#: The synthetic physics follows the time of day: the stream is generated at a fixed one
#: (so the readings, the scores and the alerts raised are the same on every run) and its
#: timestamps moved to the present when it is published.
STREAM_START = 1_767_225_600.0 + 6 * 3600.0  # 2026-01-01 06:00 UTC


def tool(name: str) -> str:
    """Path of a Prometheus binary; a clear failure when the package is missing."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).is_file(), (
        f"{name} not found: install Debian's 'prometheus' package (scripts/bootstrap.sh does, "
        f"as root: apt-get install prometheus)"
    )
    return path


# --------------------------------------------------------------------------- the dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that draws something (rows' children included, rows themselves not)."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced (longest names first: $__range_ms...)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


# What is not a metric name in a PromQL expression: string literals, label matchers,
# ranges, grouping label lists, keywords; functions are identifiers followed by "(".
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS_AND_RANGES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    for pattern in (_STRINGS, _MATCHERS_AND_RANGES, _GROUPINGS):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def test_dashboard_is_a_grafana_dashboard_on_the_ds_prometheus_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"  # file provisioning: no import step
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    drawn = list(panels(dashboard))
    assert len(drawn) >= 20
    for panel in drawn:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert metric_names(substitute(target["expr"])), (panel["title"], target["expr"])
    # every panel the operator needs is there
    titles = {p["title"] for p in drawn}
    for needed in (
        "Throughput",
        "Data lag",
        "Rejections by reason",
        "End-to-end latency",
        "Batch size",
        "Devices tracked",
        "Active alerts and oldest alert age",
        "Alert states",
        "MQTT connected",
        "Model and execution provider",
        "Windows scored per model",
        "Devices per model",
        "Inference time per batch, by model",
        "Publish failures",
        "HTTP connections",
    ):
        assert needed in titles


def test_metric_names_are_found_in_expressions() -> None:
    expr = 'sum by (le, model) (rate(anomalyd_x_bucket{job="a", le=~"0.5"}[5s])) or on() vector(0)'
    assert metric_names(expr) == {"anomalyd_x_bucket"}
    assert metric_names("changes(process_start_time_seconds[1h]) > 0 and up == 0") == {
        "process_start_time_seconds",
        "up",
    }
    expr = "sum without (reason) (a_total) / on (instance) group_left (version) b_info > bool 1e3"
    assert metric_names(expr) == {"a_total", "b_info"}
    assert metric_names('label_replace(vector(0), "reason", "none", "", "") or anomalyd_ready') == {
        "anomalyd_ready"
    }


# --------------------------------------------------------------------------- rules


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], check=False, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 14 rules found" in check.stdout
    tests = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        check=False,
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout
    config = subprocess.run(
        [promtool, "check", "config", str(EXAMPLE_CONFIG)], check=False, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
    text = RULE_TESTS.read_text()
    for alert in alerts:
        cases = re.findall(rf"alertname: {alert}\n\s*exp_alerts:( \[\])?", text)
        assert "" in cases, f"{alert}: no case where it fires"
        assert " []" in cases, f"{alert}: no case where it must not fire"


# --------------------------------------------------------------------------- live


def telemetry(device: str, ts: float, value: float) -> tuple[str, bytes]:
    return f"sensors/{device}/telemetry", orjson.dumps(
        {"ts": ts, "temperature": value, "pressure": value, "vibration": value}
    )


def test_live_metrics_pass_promtool_check_metrics(
    broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    d = daemon_factory(DEFAULT_MODEL_PATH)
    d.wait_ready(60)
    now = time.time()
    # 60 readings of one device (a window of the default model is 50) and one bad message
    publish_many(broker, [telemetry("m1", now - 60 + i, 0.5) for i in range(60)])
    publish_many(broker, [("sensors/m1/telemetry", b"{not json")])
    d.wait_metric("anomalyd_windows_scored_total", lambda v: v > 0, 30)
    d.wait_metric("anomalyd_rejected_total", lambda v: v == 1, 30, reason="malformed_json")
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read()
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"], check=False, input=text, capture_output=True
    )
    problems = check.stdout.decode() + check.stderr.decode()
    assert check.returncode == 0, problems
    assert problems == ""


class Prometheus:
    """A real Prometheus server: scrapes ``targets`` every second, evaluates ``rule_files``
    every second, stores in ``workdir``, listens on a free 127.0.0.1 port."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self._ready, 30, 0.1, "prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class LiveFleet:
    """Publishes ``stream`` on its own thread, its timestamps moved so that it starts
    ``backlog_s`` ago: what is stamped up to now at once (a backlog), the rest each when
    the wall clock reaches its timestamp, as devices would; every ``bad_every_s`` one
    malformed message too."""

    def __init__(
        self, broker: MosquittoBroker, stream: Stream, backlog_s: float, bad_every_s: float = 1.0
    ) -> None:
        self._stream = stream
        self._shift_s = time.time() - backlog_s - float(stream.ts[0])
        self._bad_every_s = bad_every_s
        self._stop = threading.Event()
        self.published = 0
        self.failed = 0
        self.link = MqttLink(
            MqttConfig(host=broker.host, port=broker.port), client_id="monitoring-fleet", name="fleet"
        )
        self.link.start()
        assert self.link.wait_connected(10)
        self._thread = threading.Thread(target=self._run, name="monitoring-fleet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        names = [d.device for d in self._stream.fleet]
        next_bad = time.time()
        for i, data_ts in enumerate(self._stream.ts.tolist()):
            ts = data_ts + self._shift_s
            ahead = ts - time.time()
            if ahead > 0 and self._stop.wait(ahead):
                return
            device = names[int(self._stream.device_index[i])]
            payload = orjson.dumps(
                {"ts": ts, **dict(zip(FEATURES, self._stream.values[i].tolist(), strict=True))}
            )
            if self.link.publish(f"sensors/{device}/telemetry", payload):
                self.published += 1
            else:
                self.failed += 1
            if time.time() >= next_bad:
                self.link.publish(f"sensors/{device}/telemetry", b'{"ts": "garbage"')
                next_bad += self._bad_every_s

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.link.close(10)


def loaded_rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]


def test_every_dashboard_panel_has_data_in_a_real_prometheus_and_the_rules_load(
    tmp_path: Path, broker: MosquittoBroker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    d = daemon_factory(
        DEFAULT_MODEL_PATH,
        sections={"state": {"directory": str(tmp_path / "state"), "snapshot_interval_s": 2.0}},
    )
    d.wait_ready(60)
    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{d.metrics_port}"], [RULES])
    stream = build_stream(SimulationSettings(fleet=FLEET), STREAM_START)
    assert stream.events, "the simulated fleet must carry injected anomalies"
    fleet = LiveFleet(broker, stream, BACKFILL_S)
    try:
        # The backlog is scored, alerts are raised, and a few seconds of live data are in
        # Prometheus: the rate windows ($__rate_interval: 5 s) hold live data only.
        wait_for(
            lambda: prometheus.query(
                f'sum(anomalyd_alert_transitions_total{{job="{JOB}",direction="raised"}}) > 0'
            ),
            60,
            0.5,
            "an alert raised on the injected anomalies",
        )
        wait_for(
            lambda: d.metric("anomalyd_lag_seconds") < 5 and d.metric("anomalyd_overloaded") == 0,
            60,
            0.2,
            "the backlog scored",
        )
        time.sleep(6)

        # ---- the rules are loaded (as Prometheus parsed them) and evaluate without error
        alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M))
        wait_for(
            lambda: all(r["health"] == "ok" for r in loaded_rules(prometheus)),
            10,
            0.5,
            "every rule evaluated",
        )
        rules = loaded_rules(prometheus)
        assert {r["name"] for r in rules} == alerts
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert not rule.get("lastError"), rule

        # ---- every metric the dashboard and the rules name is one the daemon serves
        served = {name for name, _ in d.scrape()} | {"up"}
        exprs = {p["title"]: [substitute(t["expr"]) for t in p["targets"]] for p in panels(dashboard)}
        every_expr = [*itertools.chain.from_iterable(exprs.values()), *(r["query"] for r in rules)]
        named = {name for expr in every_expr for name in metric_names(expr)}
        assert named - served == set()

        # ---- every panel's every query returns data with a finite value
        no_data = {}
        for title, queries in exprs.items():
            if title in EXEMPT_PANELS:
                continue
            for expr in queries:
                values = [float(r["value"][1]) for r in prometheus.query(expr)]
                if not any(math.isfinite(v) for v in values):
                    no_data[f"{title}: {expr}"] = values
        assert no_data == {}
        # ---- the per-model panels draw the labelled families: a lone [model] is "default"
        labelled = {
            "anomalyd_model_windows_scored_total",
            "anomalyd_model_anomalous_windows_total",
            "anomalyd_model_inference_seconds_bucket",
            "anomalyd_model_devices_tracked",
            "anomalyd_served_model_info",
        }
        per_model = [e for e in itertools.chain.from_iterable(exprs.values()) if metric_names(e) & labelled]
        assert set().union(*(metric_names(e) for e in per_model)) >= labelled
        for expr in per_model:
            assert {r["metric"].get("model") for r in prometheus.query(expr)} == {"default"}, expr
        # ---- the documentation's picture is drawn from the same queries
        png = tmp_path / "dashboard.png"
        options = ["--out", str(png), "--minutes", "1", "--step", "1"]
        options += ["--rate-interval", GRAFANA_VARIABLES["$__rate_interval"]]
        render = subprocess.run(
            [sys.executable, str(RENDER), prometheus.url, *options],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert render.returncode == 0, render.stdout + render.stderr
        assert "panels with no data" not in render.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert fleet.failed == 0
    finally:
        fleet.close()
        prometheus.close()
