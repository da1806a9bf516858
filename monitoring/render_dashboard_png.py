"""Draw the Grafana dashboard's time-series panels from a real Prometheus into one PNG.

For documentation, and for a look at the dashboard without a Grafana: every time-series
panel of monitoring/grafana/anomalyd-dashboard.json becomes a subplot, each of its queries
evaluated over the chosen time range through Prometheus' ``/api/v1/query_range`` with
Grafana's variables replaced by fixed values (``--rate-interval``, ``--job``,
``--instance``), each series labelled by the query's legend format. The stat and table
panels (health, model) are summarised in the figure's title.

    python monitoring/render_dashboard_png.py http://127.0.0.1:9090 --minutes 3 \\
        --out docs/images/dashboard.png

Needs matplotlib (``pip install 'anomalyd[plot]'``). Exit status: 0 with the PNG
written; 1 when Prometheus cannot be queried or a query is refused; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "anomalyd-dashboard.json"

#: Grafana units the dashboard uses, as an axis label.
UNIT_LABELS = {"s": "seconds", "ops": "per second", "percentunit": "fraction", "short": ""}


class QueryError(Exception):
    """Prometheus could not be reached or refused a query."""


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]
    right_axis: bool = False


@dataclass
class Panel:
    title: str
    unit: str
    stacked: bool
    series: list[Series] = field(default_factory=list)


def grafana_variables(
    rate_interval: str, job: str, instance: str, step_s: float, range_s: float
) -> dict[str, str]:
    """What Grafana would put in place of the dashboard's variables."""
    return {
        "$__rate_interval": rate_interval,
        "$__interval": f"{step_s:g}s",
        "$__range": f"{range_s:.0f}s",
        "$job": job,
        "$instance": instance,
    }


def substitute(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with the variables replaced, longest names first (``$__range`` before ``$__r``)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` becomes the label's value ("" when absent)."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    text = " ".join(text.split())
    return text or json.dumps(labels, sort_keys=True)


class Prometheus:
    """The two HTTP API calls this script needs."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise QueryError(f"{params.get('query', path)}: HTTP {exc.code}: {exc.read().decode()}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise QueryError(f"cannot reach Prometheus at {self.url}: {exc}") from None
        if body.get("status") != "success":
            raise QueryError(f"{params.get('query', path)}: {body}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self._get("query", {"query": expr, "time": f"{at:.3f}"})["result"])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        return list(self._get("query_range", params)["result"])


def right_axis_refs(panel: dict[str, Any]) -> set[str]:
    """refIds that the panel draws on a right-hand axis (its field overrides)."""
    refs = set()
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") != "byFrameRefID":
            continue
        for prop in override.get("properties", []):
            if prop.get("id") == "custom.axisPlacement" and prop.get("value") == "right":
                refs.add(matcher.get("options", ""))
    return refs


def drawn_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' children included, rows themselves not, in layout order."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return sorted(out, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def collect(
    prom: Prometheus,
    dashboard: dict[str, Any],
    variables: dict[str, str],
    *,
    start: float,
    end: float,
    step_s: float,
) -> list[Panel]:
    """Query every time-series panel over [start, end]."""
    out = []
    for spec in drawn_panels(dashboard):
        if spec["type"] != "timeseries":
            continue
        defaults = spec.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        panel = Panel(
            title=spec["title"],
            unit=defaults.get("unit", "short"),
            stacked=custom.get("stacking", {}).get("mode", "none") != "none",
        )
        right = right_axis_refs(spec)
        for target in spec["targets"]:
            expr = substitute(target["expr"], variables)
            for result in prom.query_range(expr, start, end, step_s):
                points = [(float(t), float(v)) for t, v in result["values"]]
                panel.series.append(
                    Series(
                        label=legend(target.get("legendFormat", ""), result["metric"]),
                        times=[t for t, _ in points],
                        values=[v for _, v in points],
                        right_axis=target["refId"] in right,
                    )
                )
        out.append(panel)
    return out


def summary(prom: Prometheus, variables: dict[str, str], at: float) -> str:
    """One line on the daemon(s) at the end of the range: model, provider, devices."""
    selector = substitute('{job="$job", instance=~"$instance"}', variables)
    parts = []
    for r in prom.query(f"anomalyd_model_info{selector}", at):
        m = r["metric"]
        parts.append(
            f"{m.get('instance', '?')}: model {m.get('version', '?')} ({m.get('kind', '?')}, window "
            f"{m.get('window', '?')}) on {m.get('provider', '?')}"
        )
    for r in prom.query(f"sum(anomalyd_devices_tracked{selector})", at):
        parts.append(f"{float(r['value'][1]):.0f} devices tracked")
    return "; ".join(parts) or "no anomalyd_model_info: is the daemon scraped?"


def render(panels: list[Panel], title: str, out: Path, *, start: float, end: float, columns: int = 3) -> None:
    """Draw ``panels`` into ``out`` (PNG), ``columns`` subplots a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 3.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels, strict=False):
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(UNIT_LABELS.get(panel.unit, panel.unit), fontsize=8)
        twin = None
        stack_base: dict[float, float] = {}
        for s in panel.series:
            minutes = [(t - start) / 60.0 for t in s.times]
            target_ax = ax
            if s.right_axis:
                twin = twin or ax.twinx()
                target_ax = twin
            style = "--" if s.right_axis else "-"
            label = s.label + (" (right)" if s.right_axis else "")
            if panel.stacked:
                # Grafana's normal stacking: each series drawn on top of the ones before it.
                base = [stack_base.get(t, 0.0) for t in s.times]
                top = [b + v for b, v in zip(base, s.values, strict=True)]
                stack_base.update(zip(s.times, top, strict=True))
                target_ax.fill_between(minutes, base, top, alpha=0.35, linewidth=0.8, label=label)
            else:
                target_ax.plot(minutes, s.values, style, linewidth=1.2, label=label)
        if not panel.series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlim(0, (end - start) / 60.0)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
            twin.tick_params(labelsize=7)
        if handles:
            ax.legend(handles[:8], labels[:8], fontsize=6, loc="upper left")
    for ax in flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prometheus", metavar="URL", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, default=Path("dashboard.png"), help="PNG to write (dashboard.png)")
    p.add_argument(
        "--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="dashboard JSON (the shipped one)"
    )
    p.add_argument("--minutes", type=_positive, default=15.0, help="time range ending now or at --end (15)")
    p.add_argument("--end", type=float, help="end of the range, UNIX time (default: now)")
    p.add_argument("--step", type=_positive, default=5.0, help="seconds between points (5)")
    p.add_argument("--rate-interval", default="1m", help="value of $__rate_interval (1m: 4 x a 15 s scrape)")
    p.add_argument("--job", default="anomalyd", help="value of $job (anomalyd)")
    p.add_argument("--instance", default=".+", help="value of $instance, a regex (.+: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    end = time.time() if args.end is None else args.end
    start = end - args.minutes * 60.0
    dashboard = json.loads(args.dashboard.read_text())
    variables = grafana_variables(args.rate_interval, args.job, args.instance, args.step, end - start)
    prom = Prometheus(args.prometheus)
    try:
        panels = collect(prom, dashboard, variables, start=start, end=end, step_s=args.step)
        line = summary(prom, variables, end)
    except QueryError as exc:
        print(f"render_dashboard_png: {exc}", file=sys.stderr)
        return 1
    stamp = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{dashboard.get('title', 'dashboard')}: {args.minutes:g} min to {stamp}\n{line}"
    render(panels, title, args.out, start=start, end=end)
    empty = [p.title for p in panels if not p.series]
    print(f"wrote {args.out}: {len(panels)} panels, {sum(len(p.series) for p in panels)} series")
    if empty:
        print(f"panels with no data: {', '.join(empty)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
