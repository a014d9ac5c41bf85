"""Prometheus config and the provisioned Grafana dashboard: they parse, and every metric and
label the dashboard queries is one the service exports (names read from the app's registry)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import Metrics
from tests.deploy.helpers import DEPLOY, ROOT

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
METRIC = re.compile(r"\bbbqrec_[a-z0-9_]+\b")
LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)|[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def exported() -> dict[str, set[str]]:
    """Series name -> its label names, for every metric the service registers."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    collectors = [c for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)]
    registered = {family.name for family in registry.collect()}
    assert registered == {f.name for c in collectors for f in c.describe()}
    series: dict[str, set[str]] = {}
    for collector in collectors:
        for family in collector.describe():
            labels = set(collector._labelnames)
            for suffix in SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                series[family.name + suffix] = labels | extra
    return series


@pytest.fixture(scope="module")
def dashboard() -> Any:
    return json.loads((DEPLOY / "grafana/dashboards/bbqrec.json").read_text())


def labels_used(expr: str, legend: str = "") -> set[str]:
    """Label names an expression groups by or matches on, and its legend shows."""
    used = set(LEGEND.findall(legend))
    for group, matcher in LABELS.findall(expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
        used |= {matcher} if matcher else set()
    return used


def targets(dashboard: Any) -> list[dict[str, Any]]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_exported_names_come_from_the_registry() -> None:
    series = exported()
    assert "bbqrec_http_requests_total" in series
    assert series["bbqrec_http_request_duration_seconds_bucket"] == {"route", "method", "le"}
    assert "bbqrec_http_request_duration_seconds" not in series  # only its three series


def test_dashboard_queries_only_exported_metrics_and_their_labels(dashboard: Any) -> None:
    series = exported()
    for target in targets(dashboard):
        expr = target["expr"]
        names = set(METRIC.findall(expr))
        assert names, f"queries no service metric: {expr}"
        unknown = names - series.keys()
        assert not unknown, f"{expr}: not exported by the service: {sorted(unknown)}"
        available = set().union(*(series[n] for n in names))
        used = labels_used(expr, target.get("legendFormat", ""))
        assert used <= available, f"{expr}: labels {sorted(used - available)} do not exist"


def test_label_extraction_sees_grouping_matchers_and_legends() -> None:
    expr = 'sum by (le, route) (rate(x_bucket{status=~"5..", method!="GET"}[1m]))'
    assert labels_used(expr, "{{ route }} {{status}}") == {"le", "route", "status", "method"}
    assert labels_used("sum without (user_id) (x)") == {"user_id"}


def test_dashboard_covers_what_an_operator_needs(dashboard: Any) -> None:
    queried = {m for t in targets(dashboard) for m in METRIC.findall(t["expr"])}
    for needed in (
        "bbqrec_http_requests_total",  # RPS and errors
        "bbqrec_http_request_duration_seconds_bucket",  # p50 / p99
        "bbqrec_queue_wait_seconds_bucket",
        "bbqrec_inference_seconds_bucket",
        "bbqrec_redis_seconds_bucket",
        "bbqrec_batch_size_bucket",
        "bbqrec_cold_start_total",
    ):
        assert needed in queried, needed
    exprs = " ".join(t["expr"] for t in targets(dashboard))
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs
    assert 'status=~"5.."' in exprs


def test_dashboard_uses_the_provisioned_datasource(dashboard: Any) -> None:
    provisioning = DEPLOY / "grafana/provisioning"
    provisioned = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for t in targets(dashboard)}
    assert uids == {source["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    providers = yaml.safe_load((provisioning / "dashboards/bbqrec.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_api_metrics_route() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for s in job["static_configs"] for t in s["targets"]]
    assert targets == ["api:8000"]  # the compose service and the port the image serves on
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "api" in compose["services"]
    assert re.fullmatch(r"\d+s", config["global"]["scrape_interval"])
