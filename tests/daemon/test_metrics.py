"""Metrics: declared once on an injected registry, named by the Prometheus conventions,
served over real HTTP."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anomalyd.decode import Reason
from anomalyd.metrics import Metrics, MetricsServer

_NAME = re.compile(r"^anomalyd_[a-z][a-z0-9_]*$")
# Non-base units promtool's linter rejects, and type names it does not want in names.
_BAD_SUFFIXES = ("_milliseconds", "_ms", "_microseconds", "_minutes", "_hours", "_kilobytes", "_percent")


def _metrics(registry: CollectorRegistry) -> Metrics:
    m = Metrics(registry, max_batch=64)
    m.declare_reasons([r.value for r in Reason])
    m.set_model(
        "v1",
        kind="forecast",
        window=50,
        features=["temperature", "pressure", "vibration"],
        provider="cpu",
        threshold=2.5,
    )
    m.track_queue(lambda: 7, 100)
    return m


def test_every_metric_follows_the_naming_conventions(registry: CollectorRegistry) -> None:
    _metrics(registry)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert len(families) >= 20
    for fam in families:
        assert _NAME.match(fam.name), fam.name
        assert fam.documentation, f"{fam.name} has no help text"
        assert not fam.name.endswith(_BAD_SUFFIXES), fam.name
        if fam.type == "counter":
            # the parser strips _total from counter family names; every sample carries it back
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        else:
            assert not fam.name.endswith("_total"), fam.name
        if fam.type == "histogram" and "seconds" not in fam.name:
            assert fam.name.endswith("_size"), f"histogram {fam.name} needs a unit"
        for sample in fam.samples:
            # Device ids are unbounded and come from the network: never a label.
            assert "device" not in sample.labels, sample


def test_promtool_accepts_the_exposition_when_installed(registry: CollectorRegistry) -> None:
    """``promtool check metrics`` where promtool exists (Debian: package prometheus);
    the Python test above checks the same rules everywhere."""
    _metrics(registry)
    promtool = shutil.which("promtool")
    text = generate_latest(registry)
    if promtool is None:
        # Same conclusion by other means: the exposition parses and every family is ours.
        assert all(_NAME.match(f.name) for f in text_string_to_metric_families(text.decode()))
        return
    proc = subprocess.run(
        [promtool, "check", "metrics"], check=False, input=text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_rejection_reasons_and_labelled_series_exist_at_zero(registry: CollectorRegistry) -> None:
    _metrics(registry)
    for reason in Reason:
        assert registry.get_sample_value("anomalyd_rejected_total", {"reason": reason.value}) == 0.0
    assert registry.get_sample_value("anomalyd_alert_transitions_total", {"direction": "raised"}) == 0.0
    assert registry.get_sample_value("anomalyd_model_reloads_total", {"result": "failure"}) == 0.0


def test_model_info_queue_depth_and_histogram_buckets(registry: CollectorRegistry) -> None:
    m = _metrics(registry)
    labels = {
        "version": "v1",
        "kind": "forecast",
        "window": "50",
        "features": "temperature,pressure,vibration",
        "provider": "cpu",
    }
    assert registry.get_sample_value("anomalyd_model_info", labels) == 1.0
    assert registry.get_sample_value("anomalyd_model_threshold") == 2.5
    # read at scrape time from the callable
    assert registry.get_sample_value("anomalyd_intake_queue_depth") == 7.0
    assert registry.get_sample_value("anomalyd_intake_queue_capacity") == 100.0
    m.batch_size.observe(64)
    m.batch_size.observe(3)
    assert registry.get_sample_value("anomalyd_batch_size_bucket", {"le": "64.0"}) == 2.0
    assert registry.get_sample_value("anomalyd_batch_size_bucket", {"le": "2.0"}) == 0.0
    assert registry.get_sample_value("anomalyd_batch_size_bucket", {"le": "4.0"}) == 1.0


def test_two_instances_on_separate_registries_do_not_collide() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).windows_scored.inc(3)
    Metrics(b)
    assert a.get_sample_value("anomalyd_windows_scored_total") == 3.0
    assert b.get_sample_value("anomalyd_windows_scored_total") == 0.0


def test_metrics_are_served_over_http(registry: CollectorRegistry) -> None:
    m = _metrics(registry)
    m.windows_scored.inc(5)
    server = MetricsServer(registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert "anomalyd_windows_scored_total 5.0" in body
    finally:
        server.close()


def test_every_metric_is_documented(registry: CollectorRegistry) -> None:
    from pathlib import Path

    _metrics(registry)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        if fam.name.startswith("anomalyd_") and not fam.name.endswith("_created"):
            name = fam.name + ("_total" if fam.type == "counter" else "")
            assert f"`{name}`" in doc, f"{name} is missing from docs/operations.md"
