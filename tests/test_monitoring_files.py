"""The shipped Grafana dashboard and Prometheus alert rules (docker/) against the code: every series they query is
one the service exports (with labels it really has), the dashboard has the structure Grafana provisions, and
promtool accepts the rules and the config and its rule unit tests pass (CI installs promtool; elsewhere a
missing promtool skips those)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO

from app.metrics import Metrics, render_metrics_markdown

DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "clipshot.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = {"up": ("job", "instance")}
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum", "_created"), "counter": ("", "_created"),
            "gauge": ("",), "info": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"}
GRID_COLUMNS = 24  # Grafana's grid width


def exported_series() -> dict[str, set[str]]:
    """Exposition name -> its label names, from the same specs that generate docs/reference/metrics.md."""
    metrics = Metrics()
    assert (REPO / "docs" / "reference" / "metrics.md").read_text() == render_metrics_markdown(metrics)
    series = {name: set(labels) for name, labels in PROMETHEUS_SERIES.items()}
    for spec in metrics.specs:
        for suffix in SUFFIXES[spec.type]:
            series[spec.name + suffix] = set(spec.labels) | ({"le"} if suffix == "_bucket" else set())
    return series


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every series selector in a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\$\{?\w+\}?", "1m", expr)  # Grafana variables ($category is inside a string already)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", expr):
        name, matchers = match.group(1), match.group(2) or ""
        after = expr[match.end():].lstrip()
        if name.lower() in PROMQL_WORDS or (after.startswith("(") and not matchers):
            continue  # a keyword or a function call
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        found.append((name, labels))
    return found


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_the_selector_parser_finds_names_and_labels():
    found = selectors('sum by (category) (rate(clipshot_predictions_total{category=~"$category",verdict="x"}'
                      '[$__rate_interval])) / histogram_quantile(0.5, sum by (le) (rate(x_bucket[5m]))) > 0.9')
    assert found == [("clipshot_predictions_total", {"category", "verdict"}), ("x_bucket", set())]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_uses_exported_series_and_their_labels(source):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    series = exported_series()
    assert exprs
    for expr in exprs:
        found = selectors(expr)
        assert found, f"no series in {expr!r}"
        for name, labels in found:
            assert name in series, f"{name} is not exported by the service ({expr!r})"
            assert labels <= series[name], f"{name} has no label(s) {labels - series[name]} ({expr!r})"
        # aggregation labels must exist on at least one queried series
        grouped = {g.strip() for by in re.findall(r"\bby\s*\(([^)]*)\)", expr) for g in by.split(",")}
        known = set().union(*(series[name] for name, _ in found))
        assert grouped <= known, f"grouping by {grouped - known} in {expr!r}"


def test_dashboard_has_the_structure_grafana_provisions():
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40  # Grafana's uid limit
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # a provisioned dashboard gets its id from Grafana
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert panel["type"] in PANEL_TYPES and panel["title"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "xywh")
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= GRID_COLUMNS
        x0, y0 = grid["x"], grid["y"]
        cover = {(x, y) for x in range(x0, x0 + grid["w"]) for y in range(y0, y0 + grid["h"])}
        assert not cover & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cover
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["type"] == "prometheus"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", " ".join(dashboard_exprs()))) - {"__rate_interval"}
    assert used <= set(variables)  # every $variable a query uses is defined
    (name, _), = selectors(variables["category"]["definition"].replace("label_values(", "(").split(",")[0] + ")")
    assert name in exported_series()


def test_panels_cover_what_an_operator_watches():
    text = " ".join(dashboard_exprs())
    for series in ("clipshot_predictions_total", "clipshot_score_threshold_ratio_bucket",
                   "clipshot_http_request_duration_seconds_bucket", "clipshot_queue_depth", "clipshot_jobs"):
        assert series in text
    assert re.search(r'status=~"5\.\."', text) and "histogram_quantile(0.99" in text


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": .ci/run installs it, so CI must have it")
        pytest.skip(message)
    return path


@pytest.mark.parametrize("args", [
    ["check", "rules", "alerts.yml"],
    ["check", "config", "prometheus.yml"],  # also loads the rule files it names
    ["test", "rules", "alerts_test.yml"],  # each alert fires on its made-up trouble and not on the calm twin
])
def test_promtool_accepts_the_rules(args):
    result = subprocess.run([promtool(), *args], cwd=DOCKER / "prometheus", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
