"""The chart's Grafana dashboard and PrometheusRule (values-configurable), rendered by
the real helm binary, every query parsed by a PromQL parser and every metric it selects
exported by the operator's metrics code.

tests/operator/integration/test_monitoring.py checks the same names against a live
scrape of the operator on a control plane.
"""

from __future__ import annotations

from typing import Any

import pytest
from lorajob_operator.metrics import Metrics
from lorajob_operator.reconcile import Tally
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helm.chart import CHART, render, run_helm, set_args
from tests.helm.monitoring import (
    MONITORING_VALUES,
    alert_rules,
    dashboard,
    dashboard_queries,
    metric_names,
    monitoring_manifests,
)

RUNNING_JOB = {
    "metadata": {"namespace": "team", "name": "a"},
    "status": {
        "phase": "Running",
        "attempts": 1,
        "conditions": [
            {"type": "Running", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
        "progress": {
            "step": 1,
            "totalSteps": 2,
            "loss": 1.0,
            "tokensPerSecond": 1.0,
            "etaSeconds": 9.0,
        },
    },
}


def _exported_names() -> set[str]:
    """Sample names the operator's registry exports once each kind of event happened."""
    m = Metrics()
    m.observe_job(RUNNING_JOB)
    m.observe_job(
        {
            "metadata": {"namespace": "team", "name": "q"},
            "status": {
                "phase": "Queued",
                "conditions": [
                    {
                        "type": "Queued",
                        "status": "True",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            },
        }
    )
    m.record(
        [
            Tally("attempt", "first"),
            Tally("disruption", "Evicted"),
            Tally("attempt_failure", "TrainerError"),
            Tally("failure", "InvalidDataset"),
        ]
    )
    text = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_is_a_sidecar_configmap_with_valid_queries() -> None:
    manifests = monitoring_manifests()
    (config_map,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = dashboard(manifests)
    assert board["uid"] == "lorajob-operator"
    titles = {p["title"] for p in board["panels"]}
    for wanted in (
        "Jobs by phase",
        "Queue wait (pending or queued until running)",
        "Attempts started, by kind",
        "Disruptions, by reason",
        "Progress",
        "Training loss",
        "Throughput (tokens/s)",
        "ETA",
    ):
        assert wanted in titles
    exported = _exported_names()
    queries = dashboard_queries(board)
    assert len(queries) > 15
    for where, expr in queries:
        names = metric_names(expr)  # raises on a PromQL syntax error
        assert names, (where, expr)
        assert names <= exported, (where, names - exported)
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_alerts_query_exported_metrics() -> None:
    rules = alert_rules(monitoring_manifests())
    assert [r["alert"] for r in rules] == [
        "LoRAJobFailed",
        "LoRAJobQueuedTooLong",
        "LoRAJobNoProgress",
        "LoRAJobOperatorReconcileErrors",
    ]
    exported = _exported_names()
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= exported, (rule["alert"], names - exported)
        assert rule["labels"]["severity"] == "warning"
        assert "{{ $labels." in rule["annotations"]["summary"]  # Prometheus templating kept


def test_alert_thresholds_and_toggles_come_from_values() -> None:
    manifests = monitoring_manifests(
        {
            "metrics.prometheusRule.queuedTooLong.minutes": "5",
            "metrics.prometheusRule.noProgress.minutes": "45",
            "metrics.prometheusRule.noProgress.severity": "critical",
            "metrics.prometheusRule.reconcileErrors.enabled": "false",
            "metrics.prometheusRule.labels.release": "kube-prometheus-stack",
        }
    )
    rules = {r["alert"]: r for r in alert_rules(manifests)}
    assert rules["LoRAJobQueuedTooLong"]["expr"].endswith("> 300")
    assert rules["LoRAJobNoProgress"]["expr"].endswith("> 2700")
    assert rules["LoRAJobNoProgress"]["labels"]["severity"] == "critical"
    assert "LoRAJobOperatorReconcileErrors" not in rules
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_off_by_default_and_servicemonitor_keeps_job_namespace() -> None:
    kinds = {m["kind"] for m in render()}
    assert "PrometheusRule" not in kinds
    assert "ConfigMap" not in kinds
    (monitor,) = [m for m in monitoring_manifests() if m["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"metrics.prometheusRule.noProgress.minutes": "0"}, "minutes"),
        ({"metrics.prometheusRule.reconcileErrors.for": "soon"}, "for"),
        ({"metrics.dashboard.lable": "x"}, "lable"),
    ],
)
def test_bad_monitoring_values_are_refused(values: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):
        render(values)


def test_helm_lint_strict_with_monitoring_on() -> None:
    run_helm("lint", "--strict", str(CHART), *set_args(MONITORING_VALUES))
